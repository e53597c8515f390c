"""The FastCGI upstream (cgigate.upstream) end to end, against real peers.

The application side is real: flup's threaded WSGIServer in a subprocess
(tests/peers/flup_app.py; it does not multiplex and answers FCGI_GET_VALUES
with nothing), and, for multiplexing, `MuxPeer` below:
`cgigate.fastcgi.ServerConnection(multiplex=True, max_requests=8)` driven by
asyncio over a real unix socket in the test's own event loop.  The HTTP
side is in memory: a real `Request` and `RequestBody` on a fake connection,
and a `FakeResponse` that records what the handler wrote, so these test the
glue between the two, not the front.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from cgigate import config as configuration
from cgigate.cgi.handler import LocalRedirect
from cgigate.errors import HTTPError
from cgigate.fastcgi import ProtocolError, ServerConnection
from cgigate.fastcgi import events as ev
from cgigate.fastcgi.records import OVERLOADED, STDOUT, encode_record
from cgigate.front.paths import decode_segments
from cgigate.front.request import Request, RequestBody
from cgigate.upstream import FastCGIHandler, Pool
from cgigate.upstream.pool import HIGH_WATER, READ_SIZE
from conftest import ROOT, require_module

PEERS = os.path.join(ROOT, "tests", "peers")
PREFIX = "/app/"
CONFIG = configuration.load()


def run(coroutine, loop: str = "asyncio"):
    async def bounded():
        async with asyncio.timeout(20):
            return await coroutine
    if loop == "uvloop":
        import uvloop
        return uvloop.run(bounded())
    return asyncio.run(bounded())


async def until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- the HTTP side, in memory ---

class FakeHTTPConnection:
    """What Request and RequestBody need of cgigate.front.http.HTTPConnection."""

    read_timeout = 10.0

    def __init__(self):
        self.closed = False
        self.paused = False
        self.resumed = asyncio.Event()

    def pause_reading(self, reason):
        self.paused = True
        self.resumed.clear()

    def resume_reading(self, reason):
        self.paused = False
        self.resumed.set()

    def send_continue(self):
        pass

    def close(self):
        self.closed = True


class FakeResponse:
    """Records what the handler starts and writes.  `stall` holds up the first
    write, as a slow client would."""

    def __init__(self, stall: float = 0.0):
        self.started = False
        self.finished = False
        self.status = 0
        self.reason = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.stall = stall

    def start(self, status, headers, reason=None):
        assert not self.started
        self.started, self.status, self.headers, self.reason = True, status, list(headers), reason

    async def write(self, data):
        assert self.started and not self.finished
        if self.stall and not self.body:
            await asyncio.sleep(self.stall)
        self.body += data

    async def end(self):
        self.finished = True

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


_serial = 0


def make_request(target: bytes, method="GET", headers=(), body: bytes | None = None, chunked=False):
    global _serial
    _serial += 1
    conn = FakeHTTPConnection()
    path, _, query = target.partition(b"?")
    all_headers = [(b"host", b"example.test"), *headers]
    if body is not None:
        all_headers.append((b"transfer-encoding", b"chunked") if chunked
                           else (b"content-length", b"%d" % len(body)))
    request = Request(method=method, target=target, path=path, query=query, version="1.1",
                      headers=all_headers, keep_alive=True, client=("192.0.2.7", 50123),
                      server=("127.0.0.1", 8080), request_id=f"test{_serial:06x}", connection=conn)
    if body is not None:
        request.body = RequestBody(conn, None if chunked else len(body), chunked)
    return request


async def _feed_body(request, data: bytes) -> None:
    """The connection's side of RequestBody: feed 64 KiB at a time, honouring its pauses."""
    conn = request.connection
    for i in range(0, len(data), 65536):
        while conn.paused:
            await conn.resumed.wait()
        request.body.feed(data[i:i + 65536])
        await asyncio.sleep(0)
    request.body.finish()


async def call(handler, target: bytes, method="GET", headers=(), body=None, chunked=False,
               response=None, request=None):
    """Run handler.handle as the front would; returns (request, response, result)."""
    request = request or make_request(target, method, headers, body, chunked)
    response = response or FakeResponse()
    segments = decode_segments(request.path)[len(PREFIX.strip("/").split("/")):]
    feeder = asyncio.create_task(_feed_body(request, body)) if body is not None else None
    try:
        result = await handler.handle(request, response, segments)
    finally:
        if feeder is not None:
            feeder.cancel()
    return request, response, result


def new_handler(address: str, timeout: float = 10.0, **options) -> FastCGIHandler:
    return FastCGIHandler(address, PREFIX, CONFIG, timeout, **options)


@pytest.fixture
def errors():
    """Lines logged to cgigate.error while the test runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("cgigate.error")
    handler = Collect(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# --- flup, a real threaded FastCGI server that does not multiplex ---

@pytest.fixture(scope="module")
def flup():
    """The address of a running flup server (tests/peers/flup_app.py)."""
    require_module("flup", "flup")
    directory = tempfile.mkdtemp(prefix="cgigate-flup-")
    path = os.path.join(directory, "app.sock")
    log_path = os.path.join(directory, "flup.log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, os.path.join(PEERS, "flup_app.py"), path],
                                stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                with open(log_path, errors="replace") as f:
                    raise RuntimeError(f"flup exited with {proc.returncode}: {f.read()}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("flup did not listen within 15s")
                time.sleep(0.02)
        yield f"unix:{path}"
    finally:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()     # threads still sleeping in /partial keep flup from exiting
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_get_params_reach_the_application(flup):
    async def main():
        handler = new_handler(flup)
        try:
            target = b"/app/environ/a%20b/?a=1&b=%20x"
            _, response, result = await call(handler, target, headers=[
                (b"x-custom", b"yes"), (b"user-agent", b"test/1"), (b"proxy", b"evil"),
                (b"authorization", b"Bearer t0ken")])
            assert result is None
            assert response.status == 200 and response.finished
            return json.loads(response.body), handler.pool
        finally:
            handler.pool.close()

    env, pool = run(main())
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == "/app"
    assert env["PATH_INFO"] == "/environ/a b/"      # decoded, trailing slash kept
    assert env["QUERY_STRING"] == "a=1&b=%20x"
    assert env["REQUEST_URI"] == "/app/environ/a%20b/?a=1&b=%20x"
    assert env["HTTP_X_CUSTOM"] == "yes"
    assert env["HTTP_USER_AGENT"] == "test/1"
    assert env["HTTP_HOST"] == "example.test"
    assert "HTTP_PROXY" not in env                   # httpoxy
    assert env["HTTP_AUTHORIZATION"] == "Bearer t0ken"   # applications authenticate themselves
    assert env["SERVER_NAME"] == "example.test" and env["SERVER_PORT"] == "8080"
    assert env["REMOTE_ADDR"] == "192.0.2.7" and env["REMOTE_PORT"] == "50123"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["SCRIPT_FILENAME"] == "/app"
    assert "CONTENT_LENGTH" not in env
    # flup answers FCGI_GET_VALUES with no variables: one request per connection
    assert pool.multiplexed is False and pool.per_connection == 1


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_post_of_5_mb_is_echoed_byte_exact_with_bounded_buffers(flup, loop):
    data = os.urandom(5 * 1024 * 1024)

    async def main():
        handler = new_handler(flup)
        try:
            # The client stalls on the first write, so the application's output
            # piles up against the upstream's read buffer.
            _, response, _ = await call(handler, b"/app/echo", method="POST", body=data,
                                        response=FakeResponse(stall=0.3))
            return response, handler.pool.stats
        finally:
            handler.pool.close()

    response, stats = run(main(), loop)
    assert response.status == 200 and response.finished
    assert response.header(b"content-length") == b"%d" % len(data)
    assert bytes(response.body) == data
    assert 0 < stats.peak_buffered <= HIGH_WATER + READ_SIZE


def test_chunked_body_is_spooled_and_sent_with_its_length(flup):
    data = os.urandom(300_000)

    async def main():
        handler = new_handler(flup)
        try:
            _, echoed, _ = await call(handler, b"/app/echo", method="POST", body=data, chunked=True)
            _, environ, _ = await call(handler, b"/app/environ", method="POST", body=b"x" * 1000,
                                       chunked=True)
            return echoed, json.loads(environ.body)
        finally:
            handler.pool.close()

    echoed, env = run(main())
    assert bytes(echoed.body) == data
    assert env["CONTENT_LENGTH"] == "1000"
    assert "HTTP_TRANSFER_ENCODING" not in env


def test_stderr_lines_are_logged_with_the_request_id(flup, errors):
    async def main():
        handler = new_handler(flup)
        try:
            request, response, _ = await call(handler, b"/app/stderr")
            return request, response
        finally:
            handler.pool.close()

    request, response = run(main())
    assert bytes(response.body) == b"ok"
    tag = f"rid={request.request_id} fastcgi={flup} stderr: "
    assert tag + "first problem" in errors
    assert tag + "second problem" in errors


def test_an_application_over_the_timeout_gets_504_and_the_pool_recovers(flup, errors):
    async def main():
        handler = new_handler(flup, timeout=0.5)
        try:
            with pytest.raises(HTTPError) as caught:
                await call(handler, b"/app/sleep?3")
            assert not handler.pool.connections      # not multiplexed: the connection was closed
            _, response, _ = await call(handler, b"/app/environ")
            return caught.value, response
        finally:
            handler.pool.close()

    error, response = run(main())
    assert error.status == 504
    assert f"fastcgi={flup}" in error.detail and "timeout" in error.detail
    assert response.status == 200


def test_backend_not_running_is_502_naming_the_address():
    directory = tempfile.mkdtemp(prefix="cgigate-none-")
    missing = f"unix:{directory}/nobody.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{s.getsockname()[1]}"   # closed again: nothing listens

    async def main():
        found = []
        for address in (missing, refused):
            handler = new_handler(address)
            try:
                with pytest.raises(HTTPError) as caught:
                    await call(handler, b"/app/x")
                found.append(caught.value)
            finally:
                handler.pool.close()
        return found

    try:
        no_socket, no_listener = run(main())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert no_socket.status == 502 and missing in no_socket.detail
    assert "No such file" in no_socket.detail
    assert no_listener.status == 502 and refused in no_listener.detail
    assert "refused" in no_listener.detail


def test_connections_are_reused(flup):
    async def accepted(handler) -> int:
        _, response, _ = await call(handler, b"/app/connections")
        return int(response.body)

    async def main():
        handler = new_handler(flup, max_idle=2)
        pool = handler.pool
        try:
            before = await accepted(handler)
            for _ in range(20):
                _, response, _ = await call(handler, b"/app/environ")
                assert response.status == 200
            after_sequential = await accepted(handler)
            opened_sequential = pool.stats.connections_opened
            # Four at once need four connections (one request each) ...
            results = await asyncio.gather(*(call(handler, b"/app/sleep?0.2") for _ in range(4)))
            assert all(r[1].body == b"slept" for r in results)
            peak = pool.stats.peak_connections
            # ... of which max_idle stay open, and serve what follows.
            idle_after = len(pool.connections)
            opened = pool.stats.connections_opened
            for _ in range(10):
                await call(handler, b"/app/environ")
            return (before, after_sequential, opened_sequential, peak, idle_after, opened,
                    pool.stats.connections_opened)
        finally:
            pool.close()

    before, after_sequential, opened_sequential, peak, idle_after, opened, opened_end = run(main())
    assert after_sequential == before                # 20 requests, no new connection accepted
    assert opened_sequential == 1
    assert 1 < peak <= 4
    assert idle_after <= 2
    assert opened_end == opened


def test_idle_connections_are_closed_after_the_idle_timeout(flup):
    async def main():
        handler = new_handler(flup, idle_timeout=0.2)
        try:
            await call(handler, b"/app/environ")
            await until(lambda: not handler.pool.connections, "the idle connection to close")
            _, response, _ = await call(handler, b"/app/environ")   # and a new one opens
            return response, handler.pool.stats
        finally:
            handler.pool.close()

    response, stats = run(main())
    assert response.status == 200 and stats.connections_opened == 2


def test_client_going_away_closes_the_connection_and_leaves_the_pool_usable(flup, errors):
    async def main():
        handler = new_handler(flup)
        pool = handler.pool
        try:
            response = FakeResponse()
            task = asyncio.create_task(call(handler, b"/app/partial", response=response))
            await until(lambda: bool(response.body), "the first part of the response")
            assert response.body == b"first" and pool.active == 1
            task.cancel()                            # what the front does when the client leaves
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.active == 0 and not pool.connections
            _, again, _ = await call(handler, b"/app/environ")
            return again, pool.stats
        finally:
            pool.close()

    again, stats = run(main())
    assert again.status == 200
    assert stats.connections_opened == 2
    assert any("client went away; connection to the application closed" in line for line in errors)


# --- a multiplexing application: cgigate's own ServerConnection over a real socket ---

class MuxPeer:
    """A FastCGI application that multiplexes, in the test's event loop.

    PATH_INFO decides: /together answers only once `together` requests are
    running at once; /hang never answers (until aborted); /overloaded ends
    with FCGI_OVERLOADED; /garbage sends STDOUT for a request id that is not
    active; /die sends a header and part of a body, then closes; /redirect is
    a local redirect; anything else is "hello".  With `close_on_second`, a
    connection is closed when its second BEGIN_REQUEST arrives."""

    def __init__(self, path: str | None, together: int = 4, close_on_second: bool = False):
        self.path = path            # None: TCP on 127.0.0.1
        self.address = f"unix:{path}" if path else ""
        self.together = together
        self.close_on_second = close_on_second
        self.accepted = 0
        self.started: list[tuple[int, bytes]] = []   # (request id, PATH_INFO)
        self.aborted: list[bytes] = []
        self.all_here = asyncio.Event()
        self.transports = []
        self.server = None

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        if self.path:
            self.server = await loop.create_unix_server(lambda: _MuxConnection(self), self.path)
        else:
            self.server = await loop.create_server(lambda: _MuxConnection(self), "127.0.0.1", 0)
            self.address = "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for transport in self.transports:
            transport.abort()
        await asyncio.sleep(0)


class _MuxConnection(asyncio.Protocol):
    def __init__(self, peer: MuxPeer):
        self.peer = peer
        self.fcgi = ServerConnection(multiplex=True, max_requests=8)
        self.params: dict[int, dict[bytes, bytes]] = {}
        self.stdin: dict[int, bytearray] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.begun = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.peer.accepted += 1
        self.peer.transports.append(transport)

    def data_received(self, data):
        try:
            events = self.fcgi.receive_data(data)
        except ProtocolError:
            self.transport.abort()
            return
        self.write(self.fcgi.data_to_send())
        for event in events:
            rid = event.request_id
            if isinstance(event, ev.BeginRequest):
                self.begun += 1
                if self.peer.close_on_second and self.begun == 2:
                    self.transport.abort()
                    return
            elif isinstance(event, ev.Params):
                self.params[rid] = dict(event.params)
            elif isinstance(event, ev.StdinData):
                self.stdin.setdefault(rid, bytearray()).extend(event.data)
            elif isinstance(event, ev.StdinEnd):
                self.tasks[rid] = asyncio.get_running_loop().create_task(self.answer(rid))
            elif isinstance(event, ev.AbortRequest):
                self.peer.aborted.append(self.params[rid].get(b"PATH_INFO", b""))
                task = self.tasks.pop(rid, None)
                if task is not None:
                    task.cancel()
                self.write(self.fcgi.end_request(rid, 1))

    def write(self, data: bytes) -> None:
        if data and not self.transport.is_closing():
            self.transport.write(data)

    async def answer(self, rid: int) -> None:
        peer, fcgi = self.peer, self.fcgi
        path = self.params[rid].get(b"PATH_INFO", b"")
        peer.started.append((rid, path))
        head = b"Content-Type: text/plain\r\n\r\n"
        if path == b"/together":
            if sum(1 for _, p in peer.started if p == b"/together") >= peer.together:
                peer.all_here.set()
            await peer.all_here.wait()
            self.write(fcgi.send_stdout(rid, head + b"rid=%d" % rid) + fcgi.end_request(rid))
        elif path == b"/hang":
            await asyncio.Event().wait()
        elif path == b"/overloaded":
            self.write(fcgi.end_request(rid, 0, OVERLOADED))
        elif path == b"/garbage":
            self.write(encode_record(STDOUT, rid + 100, b"stray"))
        elif path == b"/die":
            self.write(fcgi.send_stdout(rid, head + b"partial"))
            await asyncio.sleep(0.05)
            self.transport.close()
        elif path == b"/redirect":
            self.write(fcgi.send_stdout(rid, b"Location: /elsewhere?x=1\r\n\r\nignored")
                       + fcgi.end_request(rid))
        elif path == b"/echo":
            self.write(fcgi.send_stdout(rid, head + bytes(self.stdin.get(rid, b""))) + fcgi.end_request(rid))
        else:
            self.write(fcgi.send_stdout(rid, head + b"hello") + fcgi.end_request(rid))


@pytest.fixture
def socket_dir():
    directory = tempfile.mkdtemp(prefix="cgigate-mux-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_multiplexed_requests_run_at_once_on_one_connection(socket_dir, loop):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock"), together=4) as peer:
            handler = new_handler(peer.address)
            try:
                results = await asyncio.gather(*(call(handler, b"/app/together") for _ in range(4)))
                bodies = sorted(bytes(r[1].body) for r in results)
                return bodies, peer.accepted, handler.pool
            finally:
                handler.pool.close()

    bodies, accepted, pool = run(main(), loop)
    assert bodies == [b"rid=1", b"rid=2", b"rid=3", b"rid=4"]   # lowest free ids, all at once
    assert accepted == 1
    assert pool.multiplexed is True
    assert pool.per_connection == 8 and pool.connection_limit == 1   # FCGI_MAX_REQS, FCGI_MAX_CONNS


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_multiplexing_over_tcp(loop):
    data = os.urandom(200_000)

    async def main():
        async with MuxPeer(None, together=3) as peer:
            handler = new_handler(peer.address)
            try:
                results = await asyncio.gather(
                    call(handler, b"/app/together"), call(handler, b"/app/together"),
                    call(handler, b"/app/together"),
                    call(handler, b"/app/echo", method="POST", body=data))
                return [bytes(r[1].body) for r in results], peer.accepted
            finally:
                handler.pool.close()

    bodies, accepted = run(main(), loop)
    assert len(set(bodies[:3])) == 3 and all(b.startswith(b"rid=") for b in bodies[:3])
    assert bodies[3] == data and accepted == 1


def test_requests_past_the_per_connection_cap_wait_their_turn(socket_dir):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock"), together=2) as peer:
            handler = new_handler(peer.address, max_requests=2)
            try:
                results = await asyncio.gather(*(call(handler, b"/app/together") for _ in range(6)))
                return [bytes(r[1].body) for r in results], peer.accepted, handler.pool.stats
            finally:
                handler.pool.close()

    bodies, accepted, stats = run(main())
    assert sorted(set(bodies)) == [b"rid=1", b"rid=2"]     # ids are reused, never more than 2 at once
    assert len(bodies) == 6 and accepted == 1 and stats.peak_connections == 1


def test_a_full_queue_is_503(socket_dir):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock")) as peer:
            handler = new_handler(peer.address, max_requests=1, queue_size=0)
            try:
                hanging = asyncio.create_task(call(handler, b"/app/hang"))
                await until(lambda: peer.started, "the first request to start")
                with pytest.raises(HTTPError) as caught:
                    await call(handler, b"/app/plain")
                hanging.cancel()
                await asyncio.gather(hanging, return_exceptions=True)
                return caught.value
            finally:
                handler.pool.close()

    error = run(main())
    assert error.status == 503 and "queue full" in error.detail


def test_client_going_away_sends_abort_request_and_keeps_the_connection(socket_dir, errors):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock")) as peer:
            handler = new_handler(peer.address)
            pool = handler.pool
            try:
                task = asyncio.create_task(call(handler, b"/app/hang"))
                await until(lambda: peer.started, "the application to start the request")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await until(lambda: peer.aborted, "FCGI_ABORT_REQUEST at the application")
                await until(lambda: pool.active == 0, "END_REQUEST for the aborted request")
                _, response, _ = await call(handler, b"/app/plain")
                return peer.aborted, peer.accepted, response, pool.stats
            finally:
                pool.close()

    aborted, accepted, response, stats = run(main())
    assert aborted == [b"/hang"]
    assert bytes(response.body) == b"hello"
    assert accepted == 1 and stats.connections_opened == 1 and stats.aborts == 1
    assert any("client went away; FCGI_ABORT_REQUEST sent" in line for line in errors)


def test_timeout_on_a_multiplexed_connection_aborts_the_request(socket_dir):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock")) as peer:
            handler = new_handler(peer.address, timeout=0.3)
            try:
                with pytest.raises(HTTPError) as caught:
                    await call(handler, b"/app/hang")
                await until(lambda: peer.aborted, "FCGI_ABORT_REQUEST at the application")
                _, response, _ = await call(handler, b"/app/plain")
                return caught.value, response, peer.accepted
            finally:
                handler.pool.close()

    error, response, accepted = run(main())
    assert error.status == 504
    assert bytes(response.body) == b"hello" and accepted == 1


def test_overloaded_is_503(socket_dir):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock")) as peer:
            handler = new_handler(peer.address)
            try:
                with pytest.raises(HTTPError) as caught:
                    await call(handler, b"/app/overloaded")
                return caught.value
            finally:
                handler.pool.close()

    error = run(main())
    assert error.status == 503 and "FCGI_OVERLOADED" in error.detail
    assert ("Retry-After", "1") in error.headers


def test_protocol_error_is_502_and_only_that_connection_is_lost(socket_dir):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock"), together=2) as peer:
            handler = new_handler(peer.address)
            try:
                with pytest.raises(HTTPError) as caught:
                    await call(handler, b"/app/garbage")
                _, response, _ = await call(handler, b"/app/plain")
                return caught.value, response, peer.accepted
            finally:
                handler.pool.close()

    error, response, accepted = run(main())
    assert error.status == 502 and "protocol" in error.detail
    assert bytes(response.body) == b"hello" and accepted == 2


def test_backend_closing_mid_response_cuts_the_client_connection(socket_dir):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock")) as peer:
            handler = new_handler(peer.address)
            try:
                request = make_request(b"/app/die")
                response = FakeResponse()
                with pytest.raises(HTTPError) as caught:
                    await call(handler, b"/app/die", request=request, response=response)
                return caught.value, request, response
            finally:
                handler.pool.close()

    error, request, response = run(main())
    assert error.status == 502
    assert response.started and not response.finished and response.body == b"partial"
    assert request.connection.closed      # the response cannot look complete


def test_local_redirect_is_returned_and_the_connection_kept(socket_dir):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock")) as peer:
            handler = new_handler(peer.address)
            try:
                _, response, result = await call(handler, b"/app/redirect")
                _, after, _ = await call(handler, b"/app/plain")
                return response, result, after, peer.accepted
            finally:
                handler.pool.close()

    response, result, after, accepted = run(main())
    assert isinstance(result, LocalRedirect) and result.target == b"/elsewhere?x=1"
    assert not response.started
    assert bytes(after.body) == b"hello" and accepted == 1


def test_a_get_is_retried_once_when_a_reused_connection_closes_unanswered(socket_dir, errors):
    async def main():
        async with MuxPeer(os.path.join(socket_dir, "mux.sock"), close_on_second=True) as peer:
            handler = new_handler(peer.address)
            try:
                _, first, _ = await call(handler, b"/app/plain")
                _, second, _ = await call(handler, b"/app/plain")    # its connection dies: retried
                with pytest.raises(HTTPError) as caught:               # a POST is not retried
                    await call(handler, b"/app/echo", method="POST", body=b"data")
                return first, second, caught.value, peer.accepted
            finally:
                handler.pool.close()

    first, second, error, accepted = run(main())
    assert bytes(first.body) == b"hello" and bytes(second.body) == b"hello"
    assert error.status == 502
    assert accepted == 2
    assert any("retrying on another" in line for line in errors)


def test_pool_parses_addresses():
    assert Pool("unix:/run/app.sock").target == "/run/app.sock"
    assert Pool("127.0.0.1:9000").target == ("127.0.0.1", 9000)
    assert Pool("[::1]:9000").target == ("::1", 9000)
    for bad in ("unix:", "nohost", "host:0", "host:99999"):
        with pytest.raises(ValueError):
            Pool(bad)
