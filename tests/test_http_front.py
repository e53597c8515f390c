"""End-to-end tests of the HTTP/1.1 front (cgigate.front), against the real daemon.

Every test talks to a `cgigate serve` subprocess (see conftest.py) over
loopback.  Where framing matters the tests use raw sockets and a small
response reader (`Conn`) that understands Content-Length, chunked and
close-delimited bodies; elsewhere `requests`.

Rules kept throughout: every socket has a short timeout, so a hung daemon
fails a test instead of hanging the suite, and no test asserts how long
something took -- only order, status and content.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time

import pytest
import requests

from conftest import (SAMPLE_CGI_BIN, TEST_CGI_BIN, children_of, open_fds, process_gone, raw_request,
                      rss_kib)

HOST = b"Host: test.invalid\r\n"


# --- helpers -----------------------------------------------------------------

class Response:
    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], head: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers            # (lower-case name, value)
        self.head = head                  # the raw head, CRLFCRLF included
        self.body = b""
        self.framing = "none"             # "length", "chunked", "close" or "none"

    def header(self, name: str) -> bytes | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v
        return None

    def header_all(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for k, v in self.headers if k == key]

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.framing} {self.head!r} body={self.body[:200]!r}>"


class Conn:
    """A raw client connection with a read buffer."""

    def __init__(self, d, timeout: float = 5.0):
        self.sock = d.connect()
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.received = bytearray()      # every byte ever read, for "was X ever sent?" checks
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        if self.eof:
            raise EOFError("server closed the connection")
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            raise EOFError("server closed the connection")
        self.buf += chunk
        self.received += chunk

    def read_until(self, marker: bytes) -> bytes:
        while True:
            index = self.buf.find(marker)
            if index >= 0:
                data = bytes(self.buf[:index + len(marker)])
                del self.buf[:index + len(marker)]
                return data
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_to_eof(self) -> bytes:
        """Everything until the server closes; fails (socket.timeout) if it never does."""
        while not self.eof:
            try:
                self._fill()
            except EOFError:
                break
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def read_head(self) -> Response:
        head = self.read_until(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        m = re.match(rb"HTTP/1\.[01] (\d{3}) ?(.*)$", lines[0])
        assert m, f"not a status line: {lines[0]!r} (head {head!r})"
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        return Response(int(m.group(1)), m.group(2), headers, head)

    def read_response(self, method: str = "GET") -> Response:
        """The next final response (1xx heads are skipped but stay in `received`)."""
        while True:
            r = self.read_head()
            if r.status >= 200:
                break
        if method == "HEAD" or r.status in (204, 304):
            return r
        te = r.header("transfer-encoding")
        if te is not None:
            assert te.lower() == b"chunked", r
            r.framing = "chunked"
            parts = []
            while True:
                size_line = self.read_until(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.read_until(b"\r\n") != b"\r\n":   # trailers
                        pass
                    break
                parts.append(self.read_exact(size))
                assert self.read_exact(2) == b"\r\n"
            r.body = b"".join(parts)
        elif r.header("content-length") is not None:
            r.framing = "length"
            r.body = self.read_exact(int(r.header("content-length")))
        else:
            r.framing = "close"
            r.body = self.read_to_eof()
        return r

    def closed_by_server(self) -> bool:
        """True when the server closes the connection (EOF or reset) before the
        socket timeout, with no further bytes; False on timeout."""
        if self.buf:
            return False
        if self.eof:
            return True
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        if chunk:
            self.buf += chunk
            self.received += chunk
            return False
        self.eof = True
        return True


def get(path: str, *extra: bytes, version: str = "1.1", method: str = "GET") -> bytes:
    return (f"{method} {path} HTTP/{version}\r\n".encode() + (HOST if version == "1.1" else b"")
            + b"".join(extra) + b"\r\n")


def write_config(tmp_path, server: str = "", timeout: float = 5) -> str:
    """The `cgi` fixture's config, with extra [server] lines and a script timeout."""
    path = tmp_path / "cgigate.toml"
    path.write_text(f"""
[server]
{server}

[cgi]
timeout = {timeout}
kill_grace = 0.5
interpreters = {{ ".py" = "{sys.executable}" }}

[[route]]
prefix = "/cgi-bin/"
cgi_dir = "{SAMPLE_CGI_BIN}"

[[route]]
prefix = "/t/"
cgi_dir = "{TEST_CGI_BIN}"
""")
    return str(path)


def wait_until(predicate, timeout: float = 10.0, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message}")


def descendants(pid: int) -> list[int]:
    found = []
    for child, _ in children_of(pid):
        found.append(child)
        found.extend(descendants(child))
    return found


HELLO = b"Hello, world!\n"


# --- 1. keep-alive -------------------------------------------------------------

def test_two_requests_on_one_connection(cgi):
    c = Conn(cgi)
    c.send(get("/cgi-bin/hello.sh"))
    first = c.read_response()
    assert (first.status, first.framing, first.body) == (200, "chunked", HELLO)
    assert first.header("connection") is None
    c.send(get("/cgi-bin/env.py?second=1"))
    second = c.read_response()
    assert second.status == 200
    assert second.json()["environ"]["QUERY_STRING"] == "second=1"
    c.close()


def test_http10_without_keepalive_is_close_delimited(cgi):
    c = Conn(cgi)
    c.send(get("/cgi-bin/hello.sh", version="1.0"))
    r = c.read_response()
    assert r.status == 200
    assert r.framing == "close"
    assert r.header("transfer-encoding") is None
    assert r.header("connection").lower() == b"close"
    assert r.body == HELLO
    assert c.eof


def test_http10_keepalive_with_unknown_length_still_closes(cgi):
    c = Conn(cgi)
    c.send(get("/cgi-bin/hello.sh", b"Connection: keep-alive\r\n", version="1.0"))
    r = c.read_response()
    assert r.status == 200
    assert r.framing == "close", r       # HTTP/1.0 has no chunked: the close ends the body
    assert r.header("transfer-encoding") is None
    assert r.header("connection").lower() == b"close"
    assert r.body == HELLO
    assert c.eof


def test_http10_keepalive_with_known_length_stays_open(cgi):
    c = Conn(cgi)
    c.send(get("/cgi-bin/no-such-script", b"Connection: keep-alive\r\n", version="1.0"))
    r = c.read_response()
    assert r.status == 404 and r.framing == "length"
    assert r.header("connection").lower() == b"keep-alive"
    c.send(get("/cgi-bin/hello.sh", version="1.0"))
    r = c.read_response()
    assert (r.status, r.body) == (200, HELLO)
    c.close()


# --- 2. pipelining -------------------------------------------------------------

def test_pipelined_requests_answered_in_order(cgi):
    c = Conn(cgi)
    c.send(get("/cgi-bin/env.py?seq=1") + get("/cgi-bin/hello.sh")
           + get("/cgi-bin/env.py?seq=3", b"Connection: close\r\n"))
    first, second, third = c.read_response(), c.read_response(), c.read_response()
    assert first.status == 200 and first.json()["environ"]["QUERY_STRING"] == "seq=1"
    assert (second.status, second.body) == (200, HELLO)
    assert third.status == 200 and third.json()["environ"]["QUERY_STRING"] == "seq=3"
    assert third.header("connection").lower() == b"close"
    assert c.closed_by_server()


# --- 3. chunked request body ---------------------------------------------------

def test_chunked_request_body_reaches_script_decoded(cgi):
    body = (b"5;name=value\r\nhello\r\n"          # a chunk extension
            b"1A\r\n" + b"abcdefghijklmnopqrstuvwxyz" + b"\r\n"   # upper-case hex size
            b"0\r\n\r\n")
    c = Conn(cgi)
    c.send(b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
           b"Content-Type: text/plain\r\n\r\n" + body)
    r = c.read_response()
    assert r.status == 200, r
    out = r.json()
    assert out["environ"]["CONTENT_LENGTH"] == str(5 + 26)
    assert out["stdin_length"] == 31
    assert out["stdin"] == "hello" + "abcdefghijklmnopqrstuvwxyz"
    # the connection stays usable after a chunked body
    c.send(get("/cgi-bin/hello.sh"))
    assert c.read_response().body == HELLO
    c.close()


# --- 4. Expect: 100-continue ----------------------------------------------------

def test_expect_100_continue_before_body(cgi):
    c = Conn(cgi)
    c.send(b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST + b"Content-Length: 11\r\n"
           b"Expect: 100-continue\r\n\r\n")
    interim = c.read_head()          # before any body byte was sent
    assert interim.status == 100, interim
    assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"hello world")
    r = c.read_response()
    assert r.status == 200
    assert r.json()["stdin"] == "hello world"
    assert bytes(c.received).count(b"100 Continue") == 1
    # and not again for the next request on the connection (which has no Expect)
    c.send(get("/cgi-bin/hello.sh"))
    assert c.read_response().body == HELLO
    assert bytes(c.received).count(b"100 Continue") == 1
    c.close()


def test_expect_100_continue_on_404_gets_no_100(cgi):
    c = Conn(cgi)
    c.send(b"POST /cgi-bin/no-such-script.py HTTP/1.1\r\n" + HOST + b"Content-Length: 11\r\n"
           b"Expect: 100-continue\r\n\r\n")
    r = c.read_response()
    assert r.status == 404
    assert b"100 Continue" not in bytes(c.received)
    c.close()


# --- 5. HEAD --------------------------------------------------------------------

def test_head_sends_no_body_and_keeps_connection(cgi):
    c = Conn(cgi)
    c.send(get("/cgi-bin/hello.sh", method="HEAD"))
    r = c.read_response(method="HEAD")
    assert r.status == 200
    assert r.header("content-type") == b"text/plain"
    c.send(get("/cgi-bin/hello.sh", b"Connection: close\r\n"))
    # If the HEAD response had any body bytes, they would come before this
    # status line and read_head would fail on them.
    second = c.read_response()
    assert (second.status, second.body) == (200, HELLO)
    assert c.closed_by_server()
    assert bytes(c.received).count(HELLO) == 1


# --- 6. Date, Server, Connection: close ----------------------------------------

def test_date_and_server_headers(cgi):
    r = requests.get(cgi.url + "/cgi-bin/hello.sh", timeout=10)
    assert r.status_code == 200 and r.text == "Hello, world!\n"
    date = email.utils.parsedate_to_datetime(r.headers["Date"])
    assert date.tzinfo is not None
    assert r.headers["Date"].endswith(" GMT")
    assert r.headers["Server"].startswith("cgigate/")
    # error pages carry them too
    r = requests.get(cgi.url + "/nowhere", timeout=10)
    assert r.status_code == 404
    assert "Date" in r.headers and r.headers["Server"].startswith("cgigate/")


def test_connection_close_request_closes(cgi):
    c = Conn(cgi)
    c.send(get("/cgi-bin/hello.sh", b"Connection: close\r\n"))
    r = c.read_response()
    assert (r.status, r.body) == (200, HELLO)
    assert r.header("connection").lower() == b"close"
    assert c.closed_by_server()


# --- 7. smuggling and framing ---------------------------------------------------

SMUGGLED = b"GET /cgi-bin/hello.sh HTTP/1.1\r\nHost: smuggled.invalid\r\n\r\n"

BAD_FRAMING = {
    "cl-and-te": (b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
    "te-chunked-identity": (b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST +
                            b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
    "te-xchunked": (b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST +
                    b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
    "two-content-lengths": (b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST + b"Content-Length: 0\r\n"
                            b"Content-Length: 5\r\n\r\nhello" + SMUGGLED, 400),
    "content-length-plus": (b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST +
                            b"Content-Length: +5\r\n\r\nhello" + SMUGGLED, 400),
    "content-length-hex": (b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST +
                           b"Content-Length: 0x10\r\n\r\n0123456789abcdef" + SMUGGLED, 400),
    "obs-fold": (b"GET /cgi-bin/hello.sh HTTP/1.1\r\n" + HOST +
                 b"X-Folded: first\r\n second\r\n\r\n" + SMUGGLED, 400),
    "nul-in-header-value": (b"GET /cgi-bin/hello.sh HTTP/1.1\r\n" + HOST +
                            b"X-Nul: a\x00b\r\n\r\n" + SMUGGLED, 400),
    "bad-chunk-size": (b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST +
                       b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n" + SMUGGLED, 400),
    "http11-without-host": (b"GET /cgi-bin/hello.sh HTTP/1.1\r\n\r\n" + SMUGGLED, 400),
    "two-hosts": (b"GET /cgi-bin/hello.sh HTTP/1.1\r\nHost: a.invalid\r\nHost: b.invalid\r\n\r\n"
                  + SMUGGLED, 400),
    "te-gzip-chunked": (b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST +
                        b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, 501),
}


@pytest.mark.parametrize("name", list(BAD_FRAMING))
def test_bad_framing_is_rejected_and_closed(cgi, name):
    request, status = BAD_FRAMING[name]
    c = Conn(cgi)
    c.send(request)
    r = c.read_response()
    assert r.status == status, r
    assert r.header("connection").lower() == b"close"
    assert c.closed_by_server(), "the connection should close after a framing error"
    # nothing after the bad request was answered: no smuggled second response
    assert bytes(c.received).count(b"HTTP/1.") == 1, bytes(c.received)
    assert HELLO not in bytes(c.received)


# --- 8. limits ------------------------------------------------------------------

@pytest.fixture
def limited(daemon, tmp_path):
    config = write_config(tmp_path, server="max_headers = 10\nmax_header_size = 8192\n"
                                           "max_request_line = 1024\n")
    return daemon("-c", config, "--max-body-size", "1000")


def test_too_many_headers_431(limited):
    headers = b"".join(b"X-Field-%d: %d\r\n" % (i, i) for i in range(20))
    c = Conn(limited)
    c.send(get("/cgi-bin/hello.sh", headers))
    r = c.read_response()
    assert r.status == 431
    assert c.closed_by_server()


def test_ten_headers_are_fine(limited):
    headers = b"".join(b"X-Field-%d: %d\r\n" % (i, i) for i in range(9))   # + Host = 10
    c = Conn(limited)
    c.send(get("/cgi-bin/hello.sh", headers))
    assert c.read_response().status == 200
    c.close()


def send_in_thread(sock: socket.socket, data: bytes, pieces: int = 1) -> threading.Thread:
    def run():
        step = max(1, len(data) // pieces)
        try:
            for i in range(0, len(data), step):
                sock.sendall(data[i:i + step])
        except OSError:
            pass  # the server may close before it has read everything
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("pieces", [1, 16], ids=["one-write", "16-writes"])
def test_huge_header_431(limited, pieces):
    # one-write: the whole 100 KiB head usually reaches the daemon in a single read;
    # 16-writes: it arrives in several reads
    big = b"X-Big: " + b"a" * (100 * 1024) + b"\r\n"
    c = Conn(limited)
    sender = send_in_thread(c.sock, get("/cgi-bin/hello.sh", big), pieces)
    r = c.read_response()
    assert r.status == 431, r
    assert c.closed_by_server()
    sender.join(5)
    # the daemon is fine afterwards
    assert requests.get(limited.url + "/cgi-bin/hello.sh", timeout=10).status_code == 200


def test_long_request_target_414(limited):
    c = Conn(limited)
    c.send(get("/cgi-bin/hello.sh?" + "a" * 2000))
    r = c.read_response()
    assert r.status == 414
    assert c.closed_by_server()


def test_content_length_over_max_body_413_without_body(limited):
    c = Conn(limited)
    c.send(b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST + b"Content-Length: 1001\r\n\r\n")
    r = c.read_response()        # answered although no body byte was sent
    assert r.status == 413
    assert r.header("connection").lower() == b"close"
    assert c.closed_by_server()


def test_content_length_at_max_body_accepted(limited):
    r = requests.post(limited.url + "/cgi-bin/env.py", data=b"x" * 1000, timeout=10)
    assert r.status_code == 200 and r.json()["stdin_length"] == 1000


def test_chunked_body_over_max_413(limited):
    chunk = b"1F4\r\n" + b"y" * 500 + b"\r\n"
    c = Conn(limited)
    c.send(b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
           + chunk * 3 + b"0\r\n\r\n")
    r = c.read_response()
    assert r.status == 413
    assert r.header("connection").lower() == b"close"
    assert c.closed_by_server()
    limited.wait_no_children()


# --- 9. slow clients ------------------------------------------------------------

@pytest.fixture
def impatient(daemon, tmp_path):
    return daemon("-c", write_config(tmp_path), "--read-timeout", "1")


def test_slow_head_gets_408(impatient):
    c = Conn(impatient, timeout=10)
    c.send(b"GET /cgi-bin/hello.sh HTTP/1.1\r\n" + HOST + b"X-Slow: ")
    stop = threading.Event()

    def trickle():
        for _ in range(40):
            if stop.wait(0.3):
                return
            try:
                c.sock.send(b"a")
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        r = c.read_response()
        assert r.status == 408, r
        assert c.closed_by_server()
    finally:
        stop.set()
        t.join(5)
    assert requests.get(impatient.url + "/cgi-bin/hello.sh", timeout=10).status_code == 200


def test_stalled_body_gets_408_and_others_are_served(impatient):
    c = Conn(impatient, timeout=10)
    c.send(b"POST /cgi-bin/env.py HTTP/1.1\r\n" + HOST + b"Content-Length: 10\r\n\r\nabc")
    # meanwhile, other clients are answered
    for _ in range(3):
        r = requests.get(impatient.url + "/cgi-bin/hello.sh", timeout=10)
        assert (r.status_code, r.text) == (200, "Hello, world!\n")
    try:
        r = c.read_response()
    except EOFError:
        r = None     # closed without a response: acceptable
    if r is not None:
        assert r.status == 408, r
        assert c.closed_by_server()
    impatient.wait_no_children()


def test_stalled_body_to_streaming_script_is_not_framed_complete(impatient):
    """echo.py starts its response before the body is in; when the body stalls the
    response cannot become a 408, but it must not end like a complete one either
    (a chunked response cut short needs the connection closed without the last chunk)."""
    c = Conn(impatient, timeout=10)
    c.send(b"POST /cgi-bin/echo.py HTTP/1.1\r\n" + HOST + b"Content-Length: 10\r\n\r\nabc")
    head = c.read_head()
    assert head.status == 200
    data = c.read_to_eof()
    assert not data.endswith(b"0\r\n\r\n"), (
        f"a response cut short by the 408 was terminated like a complete one: {data!r}")
    impatient.wait_no_children()


# --- 10. idle keep-alive ----------------------------------------------------------

def test_idle_keepalive_connection_closed(daemon, tmp_path):
    d = daemon("-c", write_config(tmp_path), "--keepalive-timeout", "1")
    c = Conn(d, timeout=5)
    c.send(get("/cgi-bin/hello.sh"))
    assert c.read_response().status == 200
    assert c.closed_by_server(), "idle keep-alive connection not closed by the server"


# --- 11. max connections -----------------------------------------------------------

def test_max_connections(daemon, tmp_path):
    d = daemon("-c", write_config(tmp_path), "--max-connections", "2")
    first, second = Conn(d), Conn(d)
    for c in (first, second):      # both accepted and counted before the third arrives
        c.send(get("/cgi-bin/hello.sh"))
        assert c.read_response().status == 200
    third = Conn(d)
    r = third.read_response()
    assert r.status == 503
    assert r.header("connection").lower() == b"close"
    assert third.closed_by_server()
    for c in (first, second):
        c.send(get("/cgi-bin/hello.sh"))
        r = c.read_response()
        assert (r.status, r.body) == (200, HELLO)
        c.close()
    d.wait_for_log(r"refused: 2 connections open")


# --- 12. request line ---------------------------------------------------------------

def test_unknown_method_501(cgi):
    c = Conn(cgi)
    c.send(get("/cgi-bin/hello.sh", method="FOO"))
    r = c.read_response()
    assert r.status == 501
    assert c.closed_by_server()


def test_http2_version_rejected(cgi):
    # httptools (llhttp) accepts the version "2.0" on a request line, so the
    # front's own check answers 505 HTTP Version Not Supported (a version the
    # parser itself refused would be a 400).
    c = Conn(cgi)
    c.send(b"GET /cgi-bin/hello.sh HTTP/2.0\r\n" + HOST + b"\r\n")
    r = c.read_response()
    assert r.status in (505, 400), r
    assert r.status == 505, "see the comment: llhttp passes 2.0 through, the front says 505"
    assert c.closed_by_server()


def test_absolute_form_target(cgi):
    c = Conn(cgi)
    c.send(b"GET http://example.com/cgi-bin/env.py?x=1 HTTP/1.1\r\nHost: other.invalid\r\n"
           b"Connection: close\r\n\r\n")
    r = c.read_response()
    assert r.status == 200, r
    env = r.json()["environ"]
    assert env["SERVER_NAME"] == "example.com"
    assert env["SCRIPT_NAME"] == "/cgi-bin/env.py"
    assert env["QUERY_STRING"] == "x=1"


# --- 13. streaming ------------------------------------------------------------------

def test_response_streams_before_script_ends(cgi):
    c = Conn(cgi)
    c.send(get("/t/front_slow_lines.sh"))
    head = c.read_head()
    assert head.status == 200 and head.header("transfer-encoding") == b"chunked"
    while b"line 1\n" not in c.buf:
        c._fill()
    early = bytes(c.buf)
    assert b"line 5" not in early and b"0\r\n\r\n" not in early, early
    assert children_of(cgi.pid), "the script should still be running when line 1 arrives"
    # put the head back in front of the buffer and read the whole response: all lines, in order
    c.buf[:0] = head.head
    r = c.read_response()
    assert r.body == b"".join(b"line %d\n" % i for i in range(1, 6))
    c.close()


# --- 14. backpressure -----------------------------------------------------------------

def test_100mb_echo_byte_exact_with_bounded_memory(daemon, tmp_path):
    # --graceful-timeout 2: if the transfer gets stuck, teardown's SIGTERM still ends it quickly
    d = daemon("-c", write_config(tmp_path, timeout=60), "--graceful-timeout", "2")
    total_blocks, block_size = 100, 1024 * 1024
    block = os.urandom(block_size)
    sent_hash = hashlib.sha256()
    c = Conn(d, timeout=10)
    c.send(b"POST /cgi-bin/echo.py HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n"
           b"Connection: close\r\n\r\n" % (total_blocks * block_size))

    baseline = rss_kib(d.pid)
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], rss_kib(d.pid))
            except (OSError, RuntimeError):
                return
            time.sleep(0.01)

    errors = []
    sent = [0]

    def send():
        try:
            for i in range(total_blocks):
                piece = i.to_bytes(8, "big") + block[8:]
                sent_hash.update(piece)
                c.sock.sendall(piece)
                sent[0] += len(piece)
        except OSError as e:
            errors.append(e)

    sampler = threading.Thread(target=sample, daemon=True)
    sender = threading.Thread(target=send, daemon=True)
    sampler.start()
    sender.start()
    received = 0
    try:
        head = c.read_head()
        assert head.status == 200, head
        received_hash = hashlib.sha256()
        chunked = head.header("transfer-encoding") == b"chunked"
        if chunked:
            while True:
                size = int(c.read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    c.read_until(b"\r\n")
                    break
                while len(c.buf) < size + 2:
                    c._fill()
                received_hash.update(memoryview(c.buf)[:size])
                received += size
                assert c.buf[size:size + 2] == b"\r\n"
                del c.buf[:size + 2]
        else:
            while True:
                received_hash.update(c.buf)
                received += len(c.buf)
                c.buf.clear()
                try:
                    c._fill()
                except EOFError:
                    break
    except socket.timeout:
        raise AssertionError(f"the echo stalled: nothing from the daemon for 10 s after {received} "
                             f"bytes back, {sent[0]} of {total_blocks * block_size} sent") from None
    finally:
        stop.set()
        sender.join(20)
        sampler.join(5)
    assert not errors, errors
    assert received == total_blocks * block_size
    assert received_hash.hexdigest() == sent_hash.hexdigest()
    growth = peak[0] - baseline
    print(f"daemon RSS: {baseline} KiB before, {peak[0]} KiB at most during the echo")
    assert growth < 16 * 1024, f"daemon RSS grew by {growth} KiB during a 100 MB echo"


# --- 15. graceful stop ------------------------------------------------------------------

def test_sigterm_lets_in_flight_request_finish(cgi):
    c = Conn(cgi, timeout=10)
    c.send(get("/t/front_sleep_then_answer.sh"))
    wait_until(lambda: children_of(cgi.pid), message="the script to start")
    os.kill(cgi.pid, signal.SIGTERM)
    cgi.wait_for_log(r"stopped accepting")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((cgi.host, cgi.port), timeout=5).close()
    r = c.read_response()
    assert r.status == 200, r
    assert r.body == b"answered after 1.5 s\n"
    assert r.header("connection").lower() == b"close"
    assert c.closed_by_server()
    assert cgi.proc.wait(15) == 0


def test_sigterm_graceful_timeout_cuts_long_script(daemon, tmp_path):
    d = daemon("-c", write_config(tmp_path, timeout=60), "--graceful-timeout", "1")
    c = Conn(d, timeout=10)
    c.send(get("/t/front_sleep_then_answer.sh?30"))
    script = wait_until(lambda: children_of(d.pid), message="the script to start")[0][0]
    wait_until(lambda: children_of(script), message="the script's sleep to start")
    processes = [script] + descendants(script)
    os.kill(d.pid, signal.SIGTERM)
    assert d.proc.wait(10) == 0, d.error_text()
    for pid in processes:
        wait_until(lambda: process_gone(pid), timeout=5, message=f"process {pid} of the script to go")
    data = c.read_to_eof()
    assert not data.startswith(b"HTTP/1.1 200"), data
    assert "graceful timeout" in d.error_text()


def test_sigterm_graceful_timeout_kills_script_ignoring_sigterm(daemon, tmp_path):
    """The same cut, with a script that ignores SIGTERM: only SIGKILL ends it, and it
    must not outlive the daemon."""
    d = daemon("-c", write_config(tmp_path, timeout=60), "--graceful-timeout", "1")
    c = Conn(d, timeout=10)
    c.send(get("/t/front_ignore_term.sh"))
    script = wait_until(lambda: children_of(d.pid), message="the script to start")[0][0]
    wait_until(lambda: children_of(script), message="the script's sleep to start")
    processes = [script] + descendants(script)
    try:
        os.kill(d.pid, signal.SIGTERM)
        assert d.proc.wait(10) == 0, d.error_text()
        try:
            wait_until(lambda: all(process_gone(pid) for pid in processes), timeout=3,
                       message="the script's processes to go")
        except AssertionError:
            pass
        left = [pid for pid in processes if not process_gone(pid)]
        assert not left, f"script processes {left} outlived the daemon (they ignore SIGTERM)"
    finally:
        for pid in processes:       # do not leave them running for 30 s
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        c.close()


# --- 16. file descriptors -----------------------------------------------------------------

def assert_alive(d, when: str) -> None:
    # conftest's teardown skips its checks for a daemon that already exited,
    # so a crash has to be caught here
    code = d.proc.poll()
    assert code is None, f"the daemon died (exit status {code}) {when}:\n{d.error_text()[-3000:]}"


def test_no_fd_leak(cgi):
    def batch(rounds: int):
        with requests.Session() as s:
            for i in range(rounds):
                assert s.get(cgi.url + "/cgi-bin/hello.sh", timeout=10).status_code == 200
                assert s.get(cgi.url + "/cgi-bin/nope-%d" % i, timeout=10).status_code == 404
        for _ in range(rounds // 2):
            assert raw_request(cgi, b"GET /cgi-bin/hello.sh HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
        slow = [Conn(cgi) for _ in range(rounds // 2)]  # gone in the middle of the response
        for c in slow:
            c.send(get("/t/front_slow_lines.sh"))
        for c in slow:
            while b"line 1" not in c.buf:
                c._fill()
            c.close()
        assert_alive(cgi, "after clients left in the middle of responses")
        for _ in range(rounds // 2):        # gone right after sending the request
            c = Conn(cgi)
            c.send(get("/cgi-bin/env.py"))
            c.close()
        time.sleep(0.5)
        assert_alive(cgi, "after clients left right after sending their requests")

    batch(4)                       # warm up: whatever the daemon opens once is open now
    cgi.wait_no_children()
    before = open_fds(cgi.pid)
    batch(80)                      # 80 200s + 80 404s + 40 400s + 40 + 40 disconnects
    assert_alive(cgi, "after the 200 requests")
    cgi.wait_no_children()
    try:
        wait_until(lambda: open_fds(cgi.pid) <= before + 5, timeout=5, message="fds to be closed")
    except AssertionError:
        pass
    assert_alive(cgi, "at the end")
    after = open_fds(cgi.pid)
    assert after <= before + 5, f"{after - before} more fds after the requests: {os.listdir(f'/proc/{cgi.pid}/fd')}"


def test_clients_leaving_right_after_the_request(cgi):
    """Clients that send a request for a script and close at once (the request is
    cancelled while its script is being started) leave the daemon healthy: alive,
    answering, no zombie or leftover children, no extra fds."""
    requests.get(cgi.url + "/cgi-bin/env.py", timeout=10)
    cgi.wait_no_children()
    before = open_fds(cgi.pid)
    for _ in range(40):
        c = Conn(cgi)
        c.send(get("/cgi-bin/env.py"))
        c.close()
    time.sleep(1)
    assert_alive(cgi, "after 40 clients left right after sending GET /cgi-bin/env.py")
    r = requests.get(cgi.url + "/cgi-bin/hello.sh", timeout=10)
    assert (r.status_code, r.text) == (200, "Hello, world!\n")
    cgi.wait_no_children()
    try:
        wait_until(lambda: open_fds(cgi.pid) <= before + 5, timeout=5, message="fds to be closed")
    except AssertionError:
        pass
    assert open_fds(cgi.pid) <= before + 5
    assert "Traceback" not in cgi.error_text()
    assert "Traceback" not in b"".join(cgi._stderr).decode("utf-8", "replace")


# --- 17. logs ---------------------------------------------------------------------------

ACCESS_LINE = re.compile(
    r'^127\.0\.0\.1 - - \[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] '
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+|-) "(?P<referer>[^"]*)" '
    r'"(?P<agent>[^"]*)" (?P<time>\d+\.\d+) (?P<backend>\S+) rid=(?P<rid>\S+)$')


def test_access_log_combined_format(cgi):
    headers = {"Referer": "http://ref.example/page", "User-Agent": "front-test/1.0"}
    for _ in range(3):
        r = requests.get(cgi.url + "/cgi-bin/hello.sh", headers=headers, timeout=10)
        assert r.status_code == 200
    r = requests.get(cgi.url + "/cgi-bin/env.py?q=1", timeout=10)
    assert r.status_code == 200
    lines = wait_until(lambda: (lambda t: t if len(t) >= 4 else None)(cgi.access_text().splitlines()),
                       message="4 access log lines")
    assert len(lines) == 4, lines
    matches = [ACCESS_LINE.match(line) for line in lines]
    assert all(matches), lines
    for m in matches[:3]:
        assert m["request"] == "GET /cgi-bin/hello.sh HTTP/1.1"
        assert m["status"] == "200" and m["bytes"] == "14"
        assert m["referer"] == "http://ref.example/page" and m["agent"] == "front-test/1.0"
        assert m["backend"] == "cgi:/cgi-bin/"
    assert matches[3]["request"] == "GET /cgi-bin/env.py?q=1 HTTP/1.1"
    assert len({m["rid"] for m in matches}) == 4, "request ids should be unique"


def test_error_log_names_status_and_reason_for_400(cgi):
    data = raw_request(cgi, b"GET /cgi-bin/hello.sh HTTP/1.1\r\nUser-Agent: no-host\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    m = cgi.wait_for_log(r"rid=(\S+) GET /cgi-bin/hello.sh -> 400: (.*Host.*)")
    rid = m.group(1)
    access = wait_until(lambda: [line for line in cgi.access_text().splitlines() if f"rid={rid}" in line],
                        message="the access log line of the 400")
    assert len(access) == 1
    am = ACCESS_LINE.match(access[0])
    assert am and am["status"] == "400" and am["agent"] == "no-host", access
