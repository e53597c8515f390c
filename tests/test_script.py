"""Which file runs for a URL: confinement to the CGI directory, PATH_INFO, argv."""

import os

import pytest

from cgigate.cgi.script import command_line, locate, search_words
from cgigate.errors import HTTPError


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "cgi"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.sh"
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o755)
    for name in ("run.sh", "sub/deep.sh", ".hidden.sh", "nph-raw.sh"):
        path = root / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "data.txt").write_text("x")
    (root / "lib.py").write_text("print()")
    os.symlink(outside, root / "escape.sh")
    os.symlink(root / "run.sh", root / "alias.sh")
    os.symlink(tmp_path, root / "updir")
    os.mkfifo(root / "fifo")
    return os.fsencode(os.path.realpath(root))


def segs(path: str):
    return [s.encode() for s in path.split("/") if s]


def test_script_and_path_info(tree):
    script = locate(tree, "/cgi-bin/", segs("run.sh/a/b"), {})
    assert script.filename == tree + b"/run.sh"
    assert script.directory == tree
    assert script.script_name == "/cgi-bin/run.sh"
    assert script.path_info == "/a/b"


def test_subdirectory(tree):
    script = locate(tree, "/cgi-bin/", segs("sub/deep.sh"), {})
    assert script.script_name == "/cgi-bin/sub/deep.sh" and script.path_info == ""


def test_symlink_inside_is_followed(tree):
    assert locate(tree, "/c/", segs("alias.sh"), {}).filename == tree + b"/run.sh"


@pytest.mark.parametrize("path,status", [
    ("missing.sh", 404), (".hidden.sh", 404), ("sub", 403), ("", 404), ("escape.sh", 403),
    ("updir/outside.sh", 403), ("data.txt", 403), ("fifo", 403), ("run.sh.bak", 404)])
def test_refused(tree, path, status):
    with pytest.raises(HTTPError) as info:
        locate(tree, "/cgi-bin/", segs(path), {})
    assert info.value.status == status


def test_interpreter_mapping(tree):
    script = locate(tree, "/cgi-bin/", segs("lib.py"), {".py": ["/usr/bin/python3"]})
    assert script.interpreter == ("/usr/bin/python3",)
    assert command_line(script, b"", True) == [b"/usr/bin/python3", tree + b"/lib.py"]


def test_nph(tree):
    assert locate(tree, "/c/", segs("nph-raw.sh"), {}).is_nph
    assert not locate(tree, "/c/", segs("run.sh"), {}).is_nph


@pytest.mark.parametrize("query,words", [
    (b"", []),
    (b"a=b", []),
    (b"one", [b"one"]),
    (b"one+two%20three", [b"one", b"two three"]),
    (b"%41%42", [b"AB"]),
    (b"-s", []),                          # CVE-2012-1823: no option injection
    (b"x+-d+allow_url_include%3d1", []),
    (b"%2Ds", []),
    (b"a++b", []),                        # an empty word: the RFC grammar has none
    (b"a%00b", []),
    (b"x" * 20000, []),
])
def test_search_words(query, words):
    assert search_words(query) == words


def test_isindex_off(tree):
    script = locate(tree, "/c/", segs("run.sh"), {})
    assert command_line(script, b"one+two", False) == [tree + b"/run.sh"]
    assert command_line(script, b"one+two", True) == [tree + b"/run.sh", b"one", b"two"]
