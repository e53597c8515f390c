"""One HTTP request and its response, as handlers see them.

`Request` is what was parsed; `RequestBody` hands out the decoded body with
flow control (the connection stops reading from the socket while more than
`HIGH_WATER` bytes wait unread, the uvicorn `flow_control.py` habit);
`Response` frames what a handler writes: Content-Length when the handler
knows it, chunked for HTTP/1.1 when it does not, close-delimited for
HTTP/1.0, nothing at all for HEAD, 204 and 304 (RFC 9112 section 6.3).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import tempfile
import time
from typing import TYPE_CHECKING, Iterable

from cgigate import SERVER_SOFTWARE
from cgigate.errors import ClientDisconnected, HTTPError, reason_phrase

if TYPE_CHECKING:
    from cgigate.front.http import HTTPConnection

HIGH_WATER = 256 * 1024
SPOOL_IN_MEMORY = 1024 * 1024
LOW_WATER = 64 * 1024

# Hop-by-hop fields (RFC 9110 section 7.6.1) belong to one connection; a handler
# never sets them, the front does.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"te", b"trailer", b"upgrade"})


class _DateCache:
    """The Date header changes once a second; format it once a second."""

    def __init__(self):
        self.second = 0
        self.value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = email.utils.formatdate(now, usegmt=True).encode()
        return self.value


DATE = _DateCache()


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "keep_alive",
                 "expect_continue", "body", "client", "server", "request_id", "start_time",
                 "authority", "connection", "redirects", "error")

    def __init__(self, *, method: str, target: bytes, path: bytes, query: bytes, version: str,
                 headers: list[tuple[bytes, bytes]], keep_alive: bool, client, server,
                 request_id: str, connection: "HTTPConnection | None" = None,
                 authority: bytes | None = None):
        self.method = method
        self.target = target          # as sent, for REQUEST_URI
        self.path = path              # raw, still percent-encoded
        self.query = query            # raw, for QUERY_STRING
        self.version = version        # "1.0" or "1.1"
        self.headers = headers        # (lower-case name, value), in order
        self.keep_alive = keep_alive
        self.expect_continue = False
        self.body: RequestBody | None = None
        self.client = client          # (host, port) or None for a unix socket
        self.server = server          # (host, port) or the socket path
        self.request_id = request_id
        self.start_time = time.perf_counter()
        self.authority = authority    # the host of an absolute-form target
        self.connection = connection
        self.redirects = 0
        self.error: HTTPError | None = None  # set when the head itself was bad

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def redirected(self, target: bytes) -> "Request":
        """The request as RFC 3875 section 6.2.2 re-dispatches it: a GET of `target`
        with the original headers but no body."""
        path, _, query = target.partition(b"?")
        headers = [(k, v) for k, v in self.headers if k not in (b"content-length", b"content-type")]
        new = Request(method="GET", target=target, path=path, query=query, version=self.version,
                      headers=headers, keep_alive=self.keep_alive, client=self.client,
                      server=self.server, request_id=self.request_id, connection=self.connection,
                      authority=self.authority)
        new.start_time = self.start_time
        new.redirects = self.redirects + 1
        return new


class RequestBody:
    """The decoded body of one request, fed by the connection, read by a handler."""

    __slots__ = ("connection", "content_length", "chunked", "received", "complete", "_chunks",
                 "_buffered", "_error", "_waiter", "_read_started", "_paused")

    def __init__(self, connection: "HTTPConnection", content_length: int | None, chunked: bool):
        self.connection = connection
        self.content_length = content_length
        self.chunked = chunked
        self.received = 0
        self.complete = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._read_started = False
        self._paused = False

    # --- the connection's side ---

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self.connection.pause_reading("body")
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.complete and self._error is None:
            self._error = exc
            self._wake()

    def discard(self) -> None:
        """The handler is done with the body: drop what waits unread, and stop
        holding the connection's reading for it."""
        self._chunks.clear()
        self._buffered = 0
        self.complete = True
        if self._paused:
            self._paused = False
            self.connection.resume_reading("body")

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the handler's side ---

    @property
    def done(self) -> bool:
        """Every byte of the body was received and handed out."""
        return self.complete and not self._chunks

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end.  Raises HTTPError(408) when
        the client stalls, ClientDisconnected when it leaves mid-body."""
        if not self._read_started:
            self._read_started = True
            self.connection.send_continue()
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._paused and self._buffered <= LOW_WATER:
                    self._paused = False
                    self.connection.resume_reading("body")
                return data
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(self.connection.read_timeout, self._stalled, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def _stalled(self, waiter: asyncio.Future) -> None:
        if not waiter.done():
            self._error = HTTPError(408, f"client sent no body data for {self.connection.read_timeout:g}s",
                                    close=True)
            waiter.set_result(None)

    async def spool(self, limit: int):
        """Read the whole body into a temporary file (in memory up to 1 MiB), so
        that its decoded length is known before a backend starts (RFC 3875
        section 4.1.2 CONTENT_LENGTH for a chunked body).  Returns (file, size)."""
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        size = 0
        try:
            while data := await self.read():
                size += len(data)
                if size > limit:
                    raise HTTPError(413, f"chunked body over {limit} bytes (server.max_body_size)",
                                    close=True)
                spool.write(data)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool, size


@contextlib.asynccontextmanager
async def spooled_if_chunked(body: RequestBody | None, limit: int):
    """(spool, decoded length) of a chunked body for as long as the backend runs,
    closed after; (None, None) when the body is absent or has a Content-Length
    (it is then streamed).  What both the CGI and the FastCGI handler need."""
    if body is None or not body.chunked:
        yield None, None
        return
    spool, length = await body.spool(limit)
    try:
        yield spool, length
    finally:
        spool.close()


class Response:
    """Frames and sends one response on the request's connection."""

    __slots__ = ("request", "connection", "started", "finished", "status", "body_bytes",
                 "_chunked", "_no_body", "_remaining", "_pending", "_close", "raw")

    def __init__(self, request: Request, connection: "HTTPConnection"):
        self.request = request
        self.connection = connection
        self.started = False
        self.finished = False
        self.status = 0
        self.body_bytes = 0
        self.raw = False
        self._chunked = False
        self._no_body = False
        self._remaining: int | None = None   # declared Content-Length not yet sent
        self._pending: bytes | None = None   # the head, held back to go out with the first body bytes
        self._close = not request.keep_alive

    def will_close(self) -> None:
        """Ask for `Connection: close` (only has an effect before start)."""
        self._close = True

    @property
    def keeps_alive(self) -> bool:
        return not self._close

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]], reason: str | None = None) -> None:
        """Queue the status line and headers.  `headers` must not hold hop-by-hop
        fields; a Content-Length among them fixes the body length."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        request = self.request
        conn = self.connection
        if conn.shutting_down:
            self._close = True
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, (reason or reason_phrase(status)).encode("latin-1"))]
        length = None
        for name, value in headers:
            if name.lower() == b"content-length":
                length = int(value)
            lines.append(b"%s: %s\r\n" % (name, value))
        self._no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        if status in (204, 304) or status < 200:
            lines = [line for line in lines if not line.lower().startswith(b"content-length:")]
            length = None
        if length is not None:
            self._remaining = length
        elif not self._no_body:
            if request.version == "1.1":
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self._close = True  # HTTP/1.0: the end of the body is the end of the connection
        if self._close:
            lines.append(b"Connection: close\r\n")
        elif request.version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"Date: %s\r\nServer: %s\r\n\r\n" % (DATE.get(), SERVER_SOFTWARE.encode()))
        self._pending = b"".join(lines)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self._no_body:
            return
        if self._remaining is not None:
            if len(data) > self._remaining:
                data = data[:self._remaining]
                self.connection.log_warning(self.request, "handler wrote more than its Content-Length; "
                                            "the excess was dropped")
            self._remaining -= len(data)
        self.body_bytes += len(data)
        transport = self.connection.transport
        if self.connection.closed:
            raise ClientDisconnected()
        pending, self._pending = self._pending, None
        if self._chunked:
            parts = [b"%x\r\n" % len(data), data, b"\r\n"]
            if pending:
                parts.insert(0, pending)
            transport.writelines(parts)
        elif pending:
            transport.writelines((pending, data))
        else:
            transport.write(data)
        await self.connection.drain()

    async def write_raw(self, data: bytes) -> None:
        """Pass bytes through unframed (nph- scripts write their own response)."""
        if not self.started:
            self.started, self.raw, self._close, self.status = True, True, True, 0
        if self.connection.closed:
            raise ClientDisconnected()
        self.body_bytes += len(data)
        self.connection.transport.write(data)
        await self.connection.drain()

    async def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.raw:
            return
        transport = self.connection.transport
        if self.connection.closed:
            raise ClientDisconnected()
        tail = b"0\r\n\r\n" if self._chunked else b""
        if self._pending:
            tail = self._pending + tail
            self._pending = None
        if tail:
            transport.write(tail)
        if self._remaining and not self._no_body:
            # Fewer bytes than the declared Content-Length: the client would wait
            # for the rest, so the only honest end is closing the connection.
            self.connection.log_warning(self.request, f"handler ended {self._remaining} bytes short of "
                                        "its Content-Length; closing the connection")
            self._close = True
        await self.connection.drain()

    async def send_simple(self, status: int, body: bytes | None = None,
                          headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """A complete small response, such as an error page."""
        if body is None:
            body = b"%d %s\n" % (status, reason_phrase(status).encode())
        all_headers = [(b"Content-Type", b"text/plain; charset=utf-8"),
                       (b"Content-Length", b"%d" % len(body)), *headers]
        self.start(status, all_headers)
        await self.write(body)
        await self.end()
