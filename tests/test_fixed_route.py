"""`[[route]] return = "TEXT"`: the front answers by itself (the demo's floor)."""

import os

import pytest
import requests

from cgigate import config as cfg
from conftest import children_of, raw_request


@pytest.fixture
def fixed(daemon, tmp_path):
    path = tmp_path / "cgigate.toml"
    path.write_text('[[route]]\nprefix = "/floor/"\nreturn = "Hello, world!\\n"\n')
    return daemon("-c", str(path))


def test_answers_with_its_text_and_no_process(fixed):
    with requests.Session() as s:
        for _ in range(20):
            r = s.get(fixed.url + "/floor/anything?x=1")
            assert r.status_code == 200
            assert r.text == "Hello, world!\n"
            assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert r.headers["Content-Length"] == "14"
    assert children_of(fixed.pid) == []
    assert "return:/floor/" in fixed.wait_for_log(r"return:/floor/", access=True).group(0)


def test_head_and_post_keep_the_connection_usable(fixed):
    # A POST body is read and dropped, so the next request on the connection parses.
    data = (b"POST /floor/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"HEAD /floor/ HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /floor/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = raw_request(fixed, data)
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert reply.count(b"Hello, world!\n") == 2   # HEAD has no body
    assert reply.endswith(b"Hello, world!\n")


def test_other_paths_are_not_routed(fixed):
    assert requests.get(fixed.url + "/other").status_code == 404


def test_return_and_another_kind_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[[route]]\nprefix = "/"\nreturn = "x"\ncgi_dir = "{os.getcwd()}"\n')
    with pytest.raises(cfg.ConfigError, match="exactly one of cgi_dir, fastcgi, app or return"):
        cfg.load(str(path))
    path.write_text('[[route]]\nprefix = "/"\nreturn = 200\n')
    with pytest.raises(cfg.ConfigError, match="return"):
        cfg.load(str(path))


def test_described_by_check_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[route]]\nprefix = "/health/"\nreturn = "ok"\n')
    assert "route: /health/ -> the front itself, answering 'ok'" in cfg.describe(cfg.load(str(path)))
