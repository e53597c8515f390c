"""Config loading and the CLI contract: errors name the file, the key and the fix."""

import os
import subprocess
import sys
import tomllib

import pytest

from cgigate import __version__, config
from conftest import ROOT

DEFAULT_CONF = os.path.join(ROOT, "conf", "cgigate.toml")


def cgigate(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "cgigate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=30)


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_default_config_documents_every_setting():
    with open(DEFAULT_CONF, "rb") as f:
        data = tomllib.load(f)
    for setting in config.SETTINGS:
        assert setting.key in data.get(setting.section, {}), \
            f"conf/cgigate.toml does not show [{setting.section}] {setting.key}"
        value = setting.convert(data[setting.section][setting.key])
        assert value == setting.convert(setting.default) or setting.name == "cgi.interpreters", \
            f"conf/cgigate.toml shows {setting.name} = {value!r}, but the built-in default is {setting.default!r}"


def test_default_config_loads():
    loaded = config.load(DEFAULT_CONF)
    assert sorted((r.prefix, r.kind) for r in loaded.routes) == [
        ("/app/", "app"), ("/cgi-bin/", "cgi"), ("/flup/", "fastcgi"), ("/ping/", "return")]
    cgi_route = next(r for r in loaded.routes if r.kind == "cgi")
    assert cgi_route.cgi_dir == os.path.realpath(os.path.join(ROOT, "cgi-bin"))
    assert str(loaded.binds[0]) == "127.0.0.1:8080"


@pytest.mark.parametrize("text,key,reason", [
    ("[cgi]\ntimout = 3\n", "[cgi] timout", "did you mean 'timeout'"),
    ("[cgi]\ntimeout = \"soon\"\n", "[cgi] timeout", "number of seconds"),
    ("[cgi]\ntimeout = -1\n", "[cgi] timeout", "positive"),
    ("[server]\nmax_body_size = \"lots\"\n", "[server] max_body_size", "size such as"),
    ("[server]\nbind = [\"nowhere\"]\n", "[server] bind", "HOST:PORT"),
    ("[server]\nlog_level = \"loud\"\n", "[server] log_level", "one of debug"),
    ("[srv]\n", "srv", "unknown section"),
    ("[[route]]\nprefix = \"/x/\"\n", "[[route]] #1", "exactly one of cgi_dir, fastcgi, app or return"),
    ("[[route]]\nprefix = \"/x/\"\ncgi_dir = \".\"\napp = \"a:b\"\n", "[[route]] #1", "it has cgi_dir, app"),
    ("[[route]]\nprefix = \"/x/\"\nfastcgi = \"nowhere\"\n", "[[route]] #1 fastcgi", ""),
    ("[[route]]\nprefix = \"/x/\"\napp = \"no_colon\"\n", "[[route]] #1 app", "MODULE:CALLABLE"),
    ("[[route]]\ncgi_dir = \".\"\n", "[[route]] #1 prefix", "missing"),
    ("[[route]]\nprefix = \"x/\"\ncgi_dir = \".\"\n", "[[route]] #1", "must start with '/'"),
    ("[[route]]\nprefix = \"/x/\"\ncgi_dir = \"no-such-dir\"\n", "cgi_dir", "is not a directory"),
    ("[cgi]\ninterpreters = { \".zz\" = \"no-such-interpreter-xyz\" }\n", "interpreters", "not found on PATH"),
    ("[cgi]\ninterpreters = { \"py\" = \"python3\" }\n", "interpreters", "must start with '.'"),
    ("this is not toml", "", "not valid TOML"),
])
def test_bad_values_are_named(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(path) and key in message and reason in message


def test_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "scripts").mkdir()
    path = write(tmp_path, "[[route]]\nprefix = \"/s\"\ncgi_dir = \"scripts\"\ntimeout = 3\n")
    loaded = config.load(path)
    assert loaded.routes[0].cgi_dir == str(tmp_path / "scripts")
    assert loaded.routes[0].prefix == "/s/"
    assert loaded.routes[0].timeout == 3


def test_cli_overrides_file(tmp_path):
    path = write(tmp_path, "[cgi]\ntimeout = 9\nmax_children = 3\n")
    loaded = config.load(path, {"cgi.timeout": "4"}, [{"prefix": "/cgi-bin/", "cgi_dir": str(tmp_path)}])
    assert loaded.cgi.timeout == 4 and loaded.cgi.max_children == 3
    assert loaded.routes[0].cgi_dir == str(tmp_path)


@pytest.mark.parametrize("text,value", [("64k", 65536), ("1M", 1024**2), ("2g", 2 * 1024**3),
                                        ("10", 10), (7, 7), ("3MiB", 3 * 1024**2)])
def test_sizes(text, value):
    assert config.to_size(text) == value


def test_check_config_command(tmp_path):
    ok = cgigate("check-config", "-c", DEFAULT_CONF)
    assert ok.returncode == 0, ok.stderr
    assert "/cgi-bin/" in ok.stdout and "config OK" in ok.stdout
    bad = cgigate("check-config", "-c", write(tmp_path, "[cgi]\nmax_children = 0\n"))
    assert bad.returncode != 0
    assert "[cgi] max_children" in bad.stderr and ">= 1" in bad.stderr
    missing = cgigate("check-config", "-c", str(tmp_path / "nope.toml"))
    assert missing.returncode != 0 and "no such file" in missing.stderr


def test_version_and_help():
    version = cgigate("--version")
    assert version.returncode == 0 and __version__ in version.stdout
    help_text = cgigate("serve", "--help").stdout
    fcgi_help = cgigate("fcgi", "--help").stdout
    for setting in config.SETTINGS:
        if setting.flag:
            assert setting.flag in (fcgi_help if setting.section == "fcgi" else help_text), setting.name
            assert setting.help.split()[0] in (fcgi_help if setting.section == "fcgi" else help_text)
    for flag in ("--config", "--cgi-dir", "--cgi-prefix"):
        assert flag in help_text
    assert "--error-log" in fcgi_help and "--cgi-prefix" not in fcgi_help
    for flag in ("--cgi-dir", "--timeout", "--max-children", "--allowed-clients", "--socket-group"):
        assert flag in fcgi_help


def test_serve_with_nothing_to_serve_explains():
    result = cgigate("serve", "--bind", "127.0.0.1:0")
    assert result.returncode == 2 and "--cgi-dir" in result.stderr


def test_serve_with_bad_flag_value():
    result = cgigate("serve", "--cgi-dir", "cgi-bin", "--timeout", "never")
    assert result.returncode == 2
    assert "--timeout" in result.stderr and "number of seconds" in result.stderr
