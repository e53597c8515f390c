"""`cgigate fcgi --cgi-dir`: a FastCGI responder that runs CGI scripts, as fcgiwrap does.

A web server (nginx's `fastcgi_pass`) names the script in the SCRIPT_FILENAME
param (else DOCUMENT_ROOT + SCRIPT_NAME); each request forks that script
with everything cgigate's own CGI routes do (`cgigate.cgi.handler`): a
clean environment, the wall-clock timeout that kills the process group, the
`max_children` limit with its queue, resource limits, stderr to the log,
stdin and stdout pumped together with back-pressure.  What differs from
fcgiwrap, on purpose:

- the script must lie inside `--cgi-dir` once `..` and symlinks are
  resolved (403 otherwise: nothing else ever runs), and a path going on
  past the script becomes PATH_INFO (`script.locate_file`);
- only meta-variables and HTTP_* params reach the script, never PATH,
  LD_PRELOAD or BASH_ENV (`environ.params_variables`);
- the script's response is parsed (RFC 3875 section 6) and sent on as a
  clean CGI response, so a broken script gets a 502 and a log line that
  says why, not nginx's "upstream sent invalid header"; output is passed on
  as it comes, never held back in an 8 KiB buffer;
- a local redirect (`Location: /path` alone) also carries
  `X-Accel-Redirect: /path`, which nginx serves internally as a GET, the
  behaviour section 6.2.2 asks of the server; Apache's mod_proxy_fcgi acts on
  the Location itself;
- an `nph-` script's status line becomes a `Status:` header (a FastCGI
  response has no status line) and the rest passes through unparsed;
- the response is held back (in memory up to 1 MiB, then in a temporary
  file) until the request's STDIN has all arrived: nginx stops sending the
  request body once it has passed a response header on (ngx_http_upstream's
  `header_sent` check), so a script that answers before it has read its
  input would wait forever for the rest.  fcgiwrap avoids this by writing
  the whole body before reading any output, which deadlocks a script that
  writes much before it reads; holding the output avoids both;
- errors are answered in-band with `Status: NNN`; a response that fails
  after it began is cut by closing the connection without END_REQUEST,
  the only way FastCGI has to say "incomplete".

One event loop per worker process serves every connection: requests
multiplexed on one connection run concurrently (FCGI_MPXS_CONNS=1), each in
its own task.  STDIN is streamed to the script through `RequestBody`,
which stops reading the connection while 256 KiB wait unread, so a body is
never held whole in memory.  FCGI_ABORT_REQUEST, or the web server closing
the connection (nginx's way), cancels the request and kills the script.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import tempfile
from collections.abc import Iterable

from cgigate.cgi.environ import params_variables, to_environb
from cgigate.cgi.handler import CGIHandler, ChildLimiter, LocalRedirect
from cgigate.cgi.script import Script, locate_file
from cgigate.config import Route
from cgigate.errors import ClientDisconnected, HTTPError, reason_phrase
from cgigate.fastcgi import ProtocolError, ServerConnection
from cgigate.fastcgi import events as ev
from cgigate.front.request import RequestBody
from cgigate.listeners import AllowList

log = logging.getLogger("cgigate.error")

_BOOT = os.urandom(2).hex()
NPH_HEAD_LIMIT = 8192
HOLD_IN_MEMORY = 1 << 20
SEND_SIZE = 65536
HANGUP_CHECK = 1.0      # seconds between looks for a hang-up while reading is paused


def _param(params: dict[bytes, bytes], name: bytes) -> bytes:
    return params.get(name, b"")


class ScriptRequest:
    """One FastCGI request, in the shape `CGIHandler` reads a request."""

    def __init__(self, connection: "FastCGIConnection", fcgi_id: int, request_id: str):
        self.connection = connection
        self.fcgi_id = fcgi_id
        self.request_id = request_id
        self.params: dict[bytes, bytes] = {}
        self.method = "GET"
        self.query = b""
        self.body: RequestBody | None = None
        self.remaining: int | None = None       # STDIN bytes still wanted (CONTENT_LENGTH)
        self.task: asyncio.Task | None = None
        self.error: HTTPError | None = None     # the params themselves were bad
        self.excess_dropped = False             # STDIN past CONTENT_LENGTH was seen (and logged)
        self.ended = False
        self.input_done = asyncio.Event()       # STDIN has all arrived (or is no longer wanted)
        self.stderr_dropped = False
        self.response: StdoutResponse | None = None

    def begin(self, params: Iterable[tuple[bytes, bytes]]) -> None:
        self.params = dict(params)           # a repeated name: the last wins
        self.method = _param(self.params, b"REQUEST_METHOD").decode("latin-1") or "GET"
        self.query = _param(self.params, b"QUERY_STRING")
        length = _param(self.params, b"CONTENT_LENGTH").strip()
        if length.isdigit():
            self.remaining = int(length)
            if self.remaining:
                self.body = RequestBody(self.connection, self.remaining, chunked=False)
        elif not length:
            # No length from the web server (nginx with fastcgi_request_buffering
            # off and a chunked upload): the body is spooled, to learn it.
            self.body = RequestBody(self.connection, None, chunked=True)
        else:
            raise HTTPError(400, f"CONTENT_LENGTH {length[:40]!r} is not a number")

    def stdin(self, data: bytes) -> None:
        if self.remaining is not None and len(data) > self.remaining:
            if not self.excess_dropped:
                self.excess_dropped = True
                log.warning("rid=%s STDIN beyond CONTENT_LENGTH dropped", self.request_id)
            data = data[:self.remaining]
        if not data or self.body is None or self.body.complete:
            return
        self.body.feed(data)
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining == 0:
                self.body.finish()
                self._input_complete()

    def stdin_end(self) -> None:
        body = self.body
        if body is not None and not body.complete:
            body.finish()
            if body.chunked and not body.received:
                self.body = None   # nginx's GET: CONTENT_LENGTH "" and an empty STDIN; stdin is /dev/null
        self._input_complete()

    def _input_complete(self) -> None:
        if not self.input_done.is_set():
            self.input_done.set()
            if self.response is not None and self.response.holding:
                asyncio.get_running_loop().create_task(self.response.release())

    @property
    def target(self) -> str:
        uri = _param(self.params, b"REQUEST_URI") or _param(self.params, b"SCRIPT_NAME")
        return uri.decode("latin-1")[:200]


class StdoutResponse:
    """A CGI response for the web server, written as FCGI_STDOUT: the same calls
    as the front's `Response`, with `Status:` where HTTP has a status line."""

    def __init__(self, request: ScriptRequest):
        self.request = request
        self.started = False
        self.finished = False
        self.status = 0
        self.body_bytes = 0
        self._head: bytes | None = None
        self._nph: bytearray | None = None
        self._held: tempfile.SpooledTemporaryFile | None = None
        self._sending = asyncio.Lock()
        self._hold = True     # a script's output; not an answer of cgigate's own

    @property
    def holding(self) -> bool:
        return self._held is not None

    def start(self, status: int, headers: Iterable[tuple[bytes, bytes]], reason: str | None = None) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        lines = [b"Status: %d %s\r\n" % (status, (reason or reason_phrase(status)).encode("latin-1"))]
        lines.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
        lines.append(b"\r\n")
        self._head = b"".join(lines)

    async def write(self, data: bytes) -> None:
        head, self._head = self._head, None
        if head:
            data = head + data
        if not data:
            return
        self.body_bytes += len(data)
        request = self.request
        if self._hold and not request.input_done.is_set():
            if self._held is None:
                self._held = tempfile.SpooledTemporaryFile(max_size=HOLD_IN_MEMORY)
            self._held.write(data)
            return
        if self._held is not None or self._sending.locked():
            await self.release()
        await request.connection.send(request, data)

    async def release(self) -> None:
        """Send what was held back while the input arrived."""
        async with self._sending:
            held, self._held = self._held, None
            if held is None:
                return
            try:
                held.seek(0)
                while data := held.read(SEND_SIZE):
                    await self.request.connection.send(self.request, data)
            except ClientDisconnected:
                pass    # the request's own task learns it on its next write
            finally:
                held.close()

    async def finish_held(self) -> None:
        """At the end: wait for the input to finish arriving, then send the rest."""
        if self._held is not None or self._sending.locked():
            await self.request.input_done.wait()
            await self.release()

    async def write_raw(self, data: bytes) -> None:
        """nph- output: its `HTTP/1.x NNN reason` line becomes `Status: NNN reason`."""
        if self._nph is None:
            await self.write(data)
            return
        self._nph += data
        line, sep, rest = bytes(self._nph).partition(b"\n")
        if not sep:
            if len(self._nph) > NPH_HEAD_LIMIT:
                raise HTTPError(502, f"nph- script wrote {len(self._nph)} bytes without a status line")
            return
        self._nph = None
        parts = line.rstrip(b"\r").split(None, 1)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise HTTPError(502, f"nph- script's first line {line[:80]!r} is not an HTTP status line")
        self.status = int(parts[1][:3]) if parts[1][:3].isdigit() else 0
        self.started = True
        await self.write(b"Status: " + parts[1] + b"\r\n" + rest)

    def drop_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def expect_nph(self) -> None:
        self._nph = bytearray()

    async def end(self) -> None:
        if self._nph is not None:
            raise HTTPError(502, "nph- script ended before the end of its status line")
        if not self.finished:
            self.finished = True
            if self._head:
                await self.write(b"")
            await self.finish_held()

    async def local_redirect(self, target: bytes, accel: bool) -> None:
        self._hold = False
        self.started = True
        self.status = 302
        head = b"Location: %s\r\n" % target
        if accel:
            head += b"X-Accel-Redirect: %s\r\n" % target
        await self.write(head + b"\r\n")
        await self.end()

    async def send_simple(self, status: int, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        body = b"%d %s\n" % (status, reason_phrase(status).encode())
        self._hold = False
        self.start(status, [(b"Content-Type", b"text/plain; charset=utf-8"),
                            (b"Content-Length", b"%d" % len(body)), *headers])
        await self.write(body)
        await self.end()


class ScriptHandler(CGIHandler):
    """`CGIHandler` for requests that come as FastCGI params rather than HTTP."""

    def __init__(self, config, limiter: ChildLimiter):
        super().__init__(Route(prefix="/", cgi_dir=config.fcgi.cgi_dir), config, limiter)
        self.pass_params = frozenset(name.encode() for name in config.fcgi.pass_params)
        self.label = f"cgi:{config.fcgi.cgi_dir}"

    async def serve(self, request: ScriptRequest, response: StdoutResponse):
        params = request.params
        filename = _param(params, b"SCRIPT_FILENAME")
        if not filename:
            root = _param(params, b"DOCUMENT_ROOT").rstrip(b"/")
            name = _param(params, b"SCRIPT_NAME")
            if not root or not name:
                raise HTTPError(400, "no SCRIPT_FILENAME, and no DOCUMENT_ROOT and SCRIPT_NAME to "
                                "build it from (nginx: fastcgi_param SCRIPT_FILENAME "
                                "$document_root$fastcgi_script_name;)")
            filename = root + name
        real, rest, interpreter = locate_file(self.root, filename, self.interpreters)
        script_name = _param(params, b"SCRIPT_NAME")
        path_info = _param(params, b"PATH_INFO")
        if rest and not path_info:
            # The web server did not split the path: what lies past the script
            # is PATH_INFO, and not part of SCRIPT_NAME (RFC 3875 4.1.5, 4.1.13).
            path_info = rest
            if script_name.endswith(rest):
                script_name = script_name[:-len(rest)]
        if any(c < 0x20 or c == 0x7F for c in path_info):
            raise HTTPError(400, f"control character in PATH_INFO {path_info[:200]!r}")
        script = Script(filename=real, directory=os.path.dirname(real),
                        script_name=script_name.decode("latin-1"), path_info=path_info.decode("latin-1"),
                        interpreter=interpreter)
        if script.is_nph:
            response.expect_nph()
        return await self.run_script(request, response, script)

    def _environment(self, request: ScriptRequest, script: Script, content_length) -> dict[bytes, bytes]:
        env, dropped = params_variables(request.params.items(), pass_authorization=self.cgi.pass_authorization,
                                        extra=self.pass_params)
        if dropped and log.isEnabledFor(logging.DEBUG):
            log.debug("rid=%s params not passed to the script: %s", request.request_id, ", ".join(dropped))
        env["SCRIPT_FILENAME"] = script.filename.decode("latin-1")
        env["SCRIPT_NAME"] = script.script_name
        env.setdefault("GATEWAY_INTERFACE", "CGI/1.1")
        env.setdefault("QUERY_STRING", "")
        if script.path_info:
            if env.get("PATH_INFO") != script.path_info:
                env["PATH_INFO"] = script.path_info
                root = env.get("DOCUMENT_ROOT")
                if root:
                    env["PATH_TRANSLATED"] = root.rstrip("/") + script.path_info
        if content_length:
            env["CONTENT_LENGTH"] = str(content_length)
        environb = dict(self.base_env)
        environb.update(to_environb(env))
        return environb

    def stderr_copy(self, request: ScriptRequest):
        connection = request.connection
        return lambda data: connection.send_stderr(request, data)


class FastCGIConnection(asyncio.Protocol):
    """One web server connection: records in, per-request tasks, records out."""

    def __init__(self, server: "ScriptServer"):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "unix"
        self.fcgi = ServerConnection(multiplex=True, max_requests=server.max_requests,
                                     max_conns=server.max_conns)
        self.requests: dict[int, ScriptRequest] = {}
        self.closed = False
        self.read_timeout = server.idle_timeout      # for RequestBody: a stalled STDIN
        self._paused_by = 0
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = None
        self._last_data = 0.0                        # loop time of the last bytes received

    # --- asyncio.Protocol ---

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
            if not self.server.allow.allows(peer):
                log.warning("fastcgi connection from %s refused: not in [fcgi] allowed_clients", self.peer)
                self.closed = True
                transport.abort()
                return
        self.server.connections.add(self)
        log.debug("fastcgi connection opened from %s", self.peer)
        self._last_data = self._loop.time()
        self._idle = self._loop.call_later(self.server.idle_timeout, self._idle_check)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        for request in list(self.requests.values()):
            request.ended = True
            request.input_done.set()
            if request.response is not None:
                request.response.drop_held()
            request.response = None
            if request.body is not None:
                request.body.fail(ClientDisconnected())
            if request.task is not None:
                request.task.cancel()
                request.task = None
        self.requests.clear()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ClientDisconnected())
        self._drain_waiters.clear()
        log.debug("fastcgi connection from %s closed", self.peer)

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()    # what the idle timer looks at; no timer per read
        try:
            found = self.fcgi.receive_data(data)
        except ProtocolError as e:
            log.error("fastcgi protocol error from %s: %s; connection closed", self.peer, e)
            self.close()
            return
        reply = self.fcgi.data_to_send()
        if reply:
            self.transport.write(reply)
        for event in found:
            self._dispatch(event)
        if self.fcgi.close_after and not self.requests:
            self.close()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- events ---

    def _dispatch(self, event) -> None:
        fid = event.request_id
        if isinstance(event, ev.BeginRequest):
            self.server.count += 1
            self.requests[fid] = ScriptRequest(self, fid, f"{_BOOT}{os.getpid() % 0x10000:04x}"
                                                          f"{self.server.count:06x}")
            return
        request = self.requests.get(fid)
        if isinstance(event, ev.RequestRejected):
            log.warning("fastcgi request %d from %s refused: %s", fid, self.peer, event.reason)
            if request is not None:       # refused after BEGIN_REQUEST (params too large)
                self.requests.pop(fid, None)
                request.ended = True
        elif request is None:
            return
        elif isinstance(event, ev.Params):
            try:
                request.begin(event.params)
            except HTTPError as e:
                request.error = e
            request.task = asyncio.get_running_loop().create_task(self.server.run(request))
        elif isinstance(event, ev.StdinData):
            request.stdin(event.data)
        elif isinstance(event, ev.StdinEnd):
            request.stdin_end()
        elif isinstance(event, ev.AbortRequest):
            log.info("rid=%s %s %s: aborted by the web server", request.request_id, request.method,
                     request.target)
            if request.task is not None:
                request.task.cancel()
            self.end(request)

    # --- what requests send ---

    async def send(self, request: ScriptRequest, data: bytes) -> None:
        if self.closed or request.ended:
            raise ClientDisconnected()
        self.transport.write(self.fcgi.send_stdout(request.fcgi_id, data))
        if self._write_paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def send_stderr(self, request: ScriptRequest, data: bytes) -> None:
        """A copy of the script's stderr for the web server.  It has no back-pressure
        of its own (the script is not stopped for it), so while the web server is
        not reading, the copy is dropped; the error log still gets every line."""
        if self.closed or request.ended:
            return
        if self._write_paused:
            if not request.stderr_dropped:
                request.stderr_dropped = True
                log.warning("rid=%s web server not reading: stderr no longer copied to FCGI_STDERR "
                            "(the error log has it)", request.request_id)
            return
        self.transport.write(self.fcgi.send_stderr(request.fcgi_id, data))

    def end(self, request: ScriptRequest, app_status: int = 0) -> None:
        """END_REQUEST, once; the request's unread STDIN no longer holds the connection."""
        if request.ended:
            return
        request.ended = True
        self.requests.pop(request.fcgi_id, None)
        if request.body is not None:
            request.body.discard()
        request.input_done.set()
        if request.response is not None:
            request.response.drop_held()
        request.response = request.task = None    # no reference cycles left for the collector
        if self.closed:
            return
        self.transport.write(self.fcgi.end_request(request.fcgi_id, app_status))
        if self.fcgi.close_after and not self.requests:
            self.close()

    # --- what RequestBody calls ---

    def pause_reading(self, reason: str) -> None:
        self._paused_by += 1
        if self._paused_by == 1 and not self.closed:
            self.transport.pause_reading()
            self._watch_hangup()

    def _watch_hangup(self) -> None:
        """While reading is paused the transport cannot see the web server leave
        (nginx aborts by closing), so a script not reading its stdin would run
        on to its timeout: look for the hang-up once a second."""
        if self.closed or not self._paused_by:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLRDHUP)
            if poller.poll(0):
                log.info("fastcgi connection from %s closed by the web server while its input was "
                         "paused", self.peer)
                self.transport.abort()
                return
        asyncio.get_running_loop().call_later(HANGUP_CHECK, self._watch_hangup)

    def resume_reading(self, reason: str) -> None:
        self._paused_by -= 1
        if self._paused_by == 0 and not self.closed:
            self.transport.resume_reading()

    def send_continue(self) -> None:
        pass

    def close(self) -> None:
        """Close the connection; a request still running is cut short."""
        if not self.closed:
            self.closed = True
            self.transport.close()

    def _idle_check(self) -> None:
        """Close the connection once it has received nothing for idle_timeout
        seconds and runs no request (running requests keep it alive)."""
        timeout = self.server.idle_timeout
        quiet = self._loop.time() - self._last_data
        if self.requests or quiet < timeout:
            wait = timeout if self.requests else timeout - quiet
            self._idle = self._loop.call_later(wait, self._idle_check)
            return
        if self.fcgi.pending_input:
            log.warning("fastcgi connection from %s sent half a record and stalled for %gs; closed",
                        self.peer, self.server.idle_timeout)
        self.close()


class ScriptServer:
    """The CGI scripts one worker process runs for its FastCGI connections."""

    def __init__(self, config, max_children: int, queue_size: int):
        settings = config.fcgi
        self.limiter = ChildLimiter(max_children, queue_size, config.cgi.queue_timeout)
        self.handler = ScriptHandler(config, self.limiter)
        self.accel = settings.x_accel_redirect
        self.allow = AllowList(settings.allowed_clients)
        self.max_conns = settings.max_conns
        self.max_requests = max(1, max_children + queue_size)
        self.idle_timeout = settings.idle_timeout
        self.connections: set[FastCGIConnection] = set()
        self.count = 0
        self.running = 0

    async def run(self, request: ScriptRequest) -> None:
        response = request.response = StdoutResponse(request)
        connection = request.connection
        self.running += 1
        try:
            if request.error is not None:
                raise request.error
            result = await self.handler.serve(request, response)
            if isinstance(result, LocalRedirect):
                await response.local_redirect(result.target, self.accel)
        except HTTPError as e:
            level = logging.INFO if e.status < 500 else logging.WARNING if e.status == 503 else logging.ERROR
            log.log(level, "rid=%s %s %s -> %d: %s", request.request_id, request.method, request.target,
                    e.status, e.detail)
            if response.started:
                connection.close()   # cut: no END_REQUEST, so the web server knows
                return
            try:
                await response.send_simple(e.status, [(k.encode(), v.encode()) for k, v in e.headers])
            except ClientDisconnected:
                return
        except ClientDisconnected:
            return
        except Exception:
            log.exception("rid=%s %s %s -> 500: unexpected error", request.request_id, request.method,
                          request.target)
            if response.started:
                connection.close()
                return
            try:
                await response.send_simple(500)
            except ClientDisconnected:
                return
        finally:
            self.running -= 1
        connection.end(request)
