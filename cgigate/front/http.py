"""The HTTP/1.1 connection: httptools parses, this glue queues and answers.

How it works: `data_received` feeds the socket's bytes to an httptools
parser whose callbacks build `Request` objects.  Requests are answered one
after another in arrival order (pipelining) by a single task per
connection, `_serve`; while a request is being answered the parser may
already be reading the next one, so reading pauses once `PIPELINE_DEPTH`
requests wait.  A request body goes to its `RequestBody`, which pauses
reading above its high-water mark.  Writes wait in `drain()` while the
transport's buffer is full, so a slow reader never makes the daemon buffer
a whole response.

Framing is strict, as RFC 9112 section 6 asks of a server in front of
something else: both Content-Length and Transfer-Encoding, a transfer coding
other than a lone final "chunked", a bad chunk, two Host fields or none on
HTTP/1.1 all get 400 and the connection closes, so nothing can be smuggled
past the parser.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import TYPE_CHECKING

import httptools

from cgigate.errors import ClientDisconnected, HTTPError
from cgigate.front.request import Request, RequestBody, Response

if TYPE_CHECKING:
    from cgigate.front.server import Server

log = logging.getLogger("cgigate.error")

PIPELINE_DEPTH = 4
LINGER_SECONDS = 2.0
_BOOT = os.urandom(2).hex()


class HTTPConnection(asyncio.Protocol):
    def __init__(self, server: "Server"):
        self.server = server
        limits = server.config.server
        self.read_timeout = limits.read_timeout
        self.keepalive_timeout = limits.keepalive_timeout
        self.max_header_size = limits.max_header_size
        self.max_headers = limits.max_headers
        self.max_request_line = limits.max_request_line
        self.max_body_size = limits.max_body_size
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.client = None
        self.sockname = None
        self.pipeline: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task | None = None
        self._pause_reasons: set[str] = set()
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._timer: asyncio.TimerHandle | None = None
        self._stop_parsing = False
        # the request being parsed
        self._in_head = False
        self._in_message = False   # a request began and its last byte has not arrived
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._current: Request | None = None
        self._continue_sent = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport):
        self.transport = transport
        self.client = transport.get_extra_info("peername") or None
        self.sockname = transport.get_extra_info("sockname")
        server = self.server
        server.connections.add(self)
        if len(server.connections) > server.config.server.max_connections:
            log.warning("connection from %s refused: %d connections open (server.max_connections)",
                        _peer(self.client), len(server.connections) - 1)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\n\r\n")
            self.close()
            return
        self._arm(self.read_timeout, self._head_timed_out)

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        self._cancel_timer()
        lost = ClientDisconnected()
        if self._current is not None and self._current.body is not None:
            self._current.body.fail(lost)
        for request in self.pipeline:
            if request.body is not None:
                request.body.fail(lost)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(lost)
        self._drain_waiters.clear()

    def data_received(self, data: bytes):
        if self._stop_parsing:
            return  # lingering close, or after a parse error: discard
        if not self._in_head and not self._current and not self.pipeline:
            self._cancel_timer()  # bytes of a new request on an idle connection
            self._arm(self.read_timeout, self._head_timed_out)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # RFC 9110 section 7.8: a server may ignore Upgrade.  The parser
            # stops at the upgrade, so this request is the connection's last.
            self._stop_parsing = True
            if self.pipeline:
                self.pipeline[-1].keep_alive = False
            return
        except httptools.HttpParserInvalidMethodError:
            self._parse_failed(HTTPError(501, "unknown request method", close=True))
            return
        except httptools.HttpParserCallbackError as e:
            error = e.__context__ if isinstance(e.__context__, HTTPError) else HTTPError(400, str(e), close=True)
            self._parse_failed(error)
            return
        except httptools.HttpParserError as e:
            self._parse_failed(HTTPError(400, f"malformed request: {e}", close=True))
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_size:
                self._parse_failed(HTTPError(431, f"request head over {self.max_header_size} bytes "
                                                  "(server.max_header_size)", close=True))

    def pause_writing(self):
        self._write_paused = True

    def resume_writing(self):
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- httptools callbacks ---

    def on_message_begin(self):
        self._in_head = True
        self._in_message = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes):
        self._url += url
        if len(self._url) > self.max_request_line:
            raise HTTPError(414, f"request target over {self.max_request_line} bytes "
                                 "(server.max_request_line)", close=True)

    def on_header(self, name: bytes, value: bytes):
        if not self._in_head:
            return  # a trailer field after a chunked body: not passed on
        self._headers.append((name.lower(), value))
        if len(self._headers) > self.max_headers:
            raise HTTPError(431, f"more than {self.max_headers} header fields (server.max_headers)",
                            close=True)

    def on_headers_complete(self):
        self._in_head = False
        # The head may have arrived in one read, before data_received could
        # count it: measure what was parsed (request line, fields, CRLFs).
        head_size = len(self._url) + 16 + sum(len(n) + len(v) + 4 for n, v in self._headers)
        if head_size > self.max_header_size:
            raise HTTPError(431, f"request head over {self.max_header_size} bytes "
                                 "(server.max_header_size)", close=True)
        self.server.request_count += 1
        request_id = f"{_BOOT}{self.server.request_count:06x}"
        parser = self.parser
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            url = None
        version = parser.get_http_version()
        request = Request(method=parser.get_method().decode("ascii"), target=self._url,
                          path=(url.path or b"") if url else b"", query=(url.query or b"") if url else b"",
                          version=version, headers=self._headers,
                          keep_alive=parser.should_keep_alive(), client=self.client,
                          server=self.sockname, request_id=request_id, connection=self,
                          authority=url.host if url is not None and url.schema else None)
        try:
            self._check_head(request, url)
        except HTTPError as e:
            request.error = e
            request.keep_alive = False
            self._stop_parsing = True
        if request.body is not None:
            self._current = request
        self._enqueue(request)

    def on_body(self, body: bytes):
        request = self._current
        if request is not None and request.body is not None:
            request.body.feed(body)

    def on_message_complete(self):
        self._in_message = False
        request = self._current
        if request is not None and request.body is not None:
            request.body.finish()
        self._current = None

    # --- checks on a request head (RFC 9112, RFC 9110) ---

    def _check_head(self, request: Request, url) -> None:
        if request.version not in ("1.1", "1.0"):
            raise HTTPError(505, f"HTTP/{request.version} is not supported", close=True)
        if url is None or not (request.path.startswith(b"/") or (request.target == b"*")):
            raise HTTPError(400, f"request target {request.target[:200]!r} is not a path", close=True)
        hosts = 0
        transfer_encoding = None
        content_length = None
        for name, value in request.headers:
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding":
                if transfer_encoding is not None:
                    raise HTTPError(400, "Transfer-Encoding given twice", close=True)
                transfer_encoding = value
            elif name == b"content-length":
                content_length = int(value)  # the parser has checked its digits
            elif name == b"expect":
                if value.lower() != b"100-continue":
                    raise HTTPError(417, f"unsupported Expect: {value[:100]!r}", close=True)
                request.expect_continue = request.version == "1.1"
        if request.version == "1.1" and hosts != 1:
            raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header"
                            f" (got {hosts})", close=True)
        chunked = False
        if transfer_encoding is not None:
            if content_length is not None:
                raise HTTPError(400, "both Content-Length and Transfer-Encoding", close=True)
            codings = [c.strip().lower() for c in transfer_encoding.split(b",")]
            if codings != [b"chunked"]:
                status = 501 if codings[-1] == b"chunked" else 400
                raise HTTPError(status, f"unsupported Transfer-Encoding {transfer_encoding[:100]!r}",
                                close=True)
            chunked = True
        if content_length is not None and content_length > self.max_body_size:
            raise HTTPError(413, f"Content-Length {content_length} over {self.max_body_size} bytes "
                            "(server.max_body_size)", close=True)
        if chunked or (content_length or 0) > 0:
            request.body = RequestBody(self, content_length, chunked)

    # --- serving the pipeline ---

    def _enqueue(self, request: Request) -> None:
        self.pipeline.append(request)
        self._cancel_timer()
        if len(self.pipeline) >= PIPELINE_DEPTH:
            self.pause_reading("pipeline")
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while self.pipeline and not self.closed:
                request = self.pipeline[0]
                self._continue_sent = False
                response = Response(request, self)
                await self.server.dispatch(request, response)
                self.pipeline.popleft()
                self.resume_reading("pipeline")
                if self.closed:
                    return
                body = request.body
                if not response.keeps_alive or not request.keep_alive or request.error is not None:
                    self._close_after()
                    return
                if body is not None and not body.complete:
                    # The handler did not read the whole body: its remaining
                    # bytes cannot be told apart from the next request.
                    self._close_after()
                    return
                if self.server.shutting_down:
                    self.close()
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self.task = None
        if not self.closed and not self.pipeline and not self._in_head:
            self._arm(self.keepalive_timeout, self.close)

    def _close_after(self) -> None:
        """Close after a response.  When the client may still be sending a body,
        half-close and read a little longer so that it sees the response rather
        than a reset (a lingering close)."""
        transport = self.transport
        if self._in_message and not self._in_head and transport.can_write_eof():
            self._stop_parsing = True
            self._pause_reasons.clear()
            transport.resume_reading()
            try:
                transport.write_eof()
            except OSError:
                pass
            self._arm(LINGER_SECONDS, self.close)
        else:
            self.close()

    def _parse_failed(self, error: HTTPError) -> None:
        self._stop_parsing = True
        self._in_head = False
        current = self._current
        if current is not None and current.body is not None and not current.body.complete:
            current.body.fail(error)  # a bad chunk: the handler reading it gets the error
            current.keep_alive = False
            return
        request = Request(method="-", target=b"", path=b"", query=b"", version="1.1", headers=[],
                          keep_alive=False, client=self.client, server=self.sockname,
                          request_id=f"{_BOOT}{self.server.request_count:06x}-err", connection=self)
        request.error = error
        self._enqueue(request)

    def _head_timed_out(self) -> None:
        if self.task is not None or self.pipeline:
            return
        if self._in_head:
            self._parse_failed(HTTPError(408, f"request head not received within {self.read_timeout:g}s "
                                              "(server.read_timeout)", close=True))
        else:
            self.close()

    # --- for Request, RequestBody and Response ---

    @property
    def shutting_down(self) -> bool:
        return self.server.shutting_down

    def send_continue(self) -> None:
        request = self.pipeline[0] if self.pipeline else None
        if (request is not None and request.expect_continue and not self._continue_sent
                and not self.closed):
            self._continue_sent = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def pause_reading(self, reason: str) -> None:
        if not self._pause_reasons and not self.closed:
            self.transport.pause_reading()
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and not self.closed:
                self.transport.resume_reading()

    async def drain(self) -> None:
        if self.closed:
            raise ClientDisconnected()
        if self._write_paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def log_warning(self, request: Request, message: str) -> None:
        log.warning("rid=%s %s %s: %s", request.request_id, request.method,
                    request.target.decode("latin-1")[:200], message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            self.transport.close()

    def _arm(self, seconds: float, callback) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _peer(client) -> str:
    if isinstance(client, tuple) and client:
        return f"{client[0]}:{client[1]}"
    return "unix"
