"""Answering one request with one CGI script (RFC 3875).

The steps, in order:

1. find the script (`script.locate`) and build its meta-variables
   (`environ.meta_variables`) and command line;
2. a chunked request body is read into a spool (memory, then a temporary
   file) so that CONTENT_LENGTH can be its decoded length (section 4.1.2);
3. wait for one of `max_children` slots (`ChildLimiter`; 503 when the
   queue is full or the wait too long);
4. spawn the script, then at the same time feed the body to its stdin and
   read its stdout, so neither side can fill a pipe and block the other;
5. parse the response header (`response.ResponseHeadParser`), then stream
   the body to the client as the script writes it; `nph-` scripts are
   passed through untouched;
6. a local redirect is handed back to the front, which dispatches the new
   path as a GET.

Every way out (done, timeout, client gone, error) goes through one
`finally` that kills the script's process group if it is still running;
the pidfd reaper collects it whatever happens.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import resource
import signal
import time

from cgigate.cgi.environ import meta_variables, to_environb
from cgigate.cgi.response import CGIResponseError, ResponseHeadParser
from cgigate.cgi.script import Script, command_line, locate
from cgigate.cgi.spawn import EXIT_LINGER, ChildProcess, rlimits_preexec, spawn
from cgigate.errors import ClientDisconnected, HTTPError
from cgigate.front.request import spooled_if_chunked

log = logging.getLogger("cgigate.error")

READ_SIZE = 65536


class LocalRedirect:
    """RFC 3875 section 6.2.2: the front should serve `target` instead."""

    def __init__(self, target: bytes):
        self.target = target


class ChildLimiter:
    """At most `limit` scripts at once; up to `queue_size` requests wait, in order,
    for at most `queue_timeout` seconds.  Past either bound: 503."""

    def __init__(self, limit: int, queue_size: int, queue_timeout: float):
        self.limit = limit
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        # for the status page: the CGI side of the daemon
        self.spawned = 0
        self.killed_on_timeout = 0
        self.peak_waiting = 0
        self.refused = 0                # 503: queue full, or waited too long

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.limit and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.queue_size:
            self.refused += 1
            raise HTTPError(503, f"{self.running} scripts running and {len(self._waiters)} waiting "
                            "(cgi.max_children, cgi.queue_size)", headers=(("Retry-After", "1"),))
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        self.peak_waiting = max(self.peak_waiting, len(self._waiters))
        timer = loop.call_later(self.queue_timeout, self._expire, waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # the slot arrived just as we gave up: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        finally:
            timer.cancel()

    def _expire(self, waiter: asyncio.Future) -> None:
        if not waiter.done():
            self._waiters.remove(waiter)
            self.refused += 1
            waiter.set_exception(HTTPError(503, f"waited {self.queue_timeout:g}s for a free CGI slot "
                                           "(cgi.queue_timeout)", headers=(("Retry-After", "1"),)))

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self.running -= 1


class CGIHandler:
    """Serves one [[route]] of CGI scripts."""

    def __init__(self, route, config, limiter: ChildLimiter):
        self.route = route
        self.prefix = route.prefix
        self.root = os.fsencode(route.cgi_dir)
        self.cgi = config.cgi
        self.server_config = config.server
        self.interpreters = config.interpreters
        self.limiter = limiter
        self.timeout = route.timeout if route.timeout is not None else config.cgi.timeout
        self.label = f"cgi:{route.prefix}"
        document_root = config.cgi.document_root or route.cgi_dir
        self.document_root = os.fsencode(document_root).decode("latin-1")
        self.base_env = self._base_environment(config)
        limits = []
        if config.cgi.limit_cpu_seconds:
            limits.append((resource.RLIMIT_CPU, config.cgi.limit_cpu_seconds))
        if config.cgi.limit_address_space:
            limits.append((resource.RLIMIT_AS, config.cgi.limit_address_space))
        if config.cgi.limit_open_files:
            limits.append((resource.RLIMIT_NOFILE, config.cgi.limit_open_files))
        self.preexec = rlimits_preexec(limits)

    @staticmethod
    def _base_environment(config) -> dict[bytes, bytes]:
        env = {}
        for name in config.cgi.env_pass:
            value = os.environb.get(name.encode())
            if value is not None:
                env[name.encode()] = value
        for name, value in config.cgi.env.items():
            env[name.encode()] = value.encode()
        return env

    async def handle(self, request, response, segments: list[bytes]):
        script = locate(self.root, self.prefix, segments, self.interpreters)
        return await self.run_script(request, response, script)

    async def run_script(self, request, response, script: Script):
        """Steps 2 to 6 for a script already found."""
        async with spooled_if_chunked(request.body, self.server_config.max_body_size) as (spool, length):
            await self.limiter.acquire()
            try:
                return await self._run(request, response, script, spool, length)
            finally:
                self.limiter.release()

    def _environment(self, request, script: Script, content_length) -> dict[bytes, bytes]:
        env = meta_variables(
            request, script_name=script.script_name, path_info=script.path_info,
            script_filename=script.filename.decode("latin-1"), document_root=self.document_root,
            default_server_name=self.server_config.server_name,
            content_length=content_length, pass_authorization=self.cgi.pass_authorization)
        environb = dict(self.base_env)
        environb.update(to_environb(env))
        return environb

    async def _run(self, request, response, script: Script, spool, content_length):
        rid = request.request_id
        name = os.fsdecode(script.filename)

        def tag() -> str:
            return f"rid={rid} script={name}"

        argv = command_line(script, request.query, self.cgi.isindex_argv)
        env = self._environment(request, script, content_length)
        started = time.perf_counter()
        with_stdin = request.body is not None
        try:
            child = spawn(argv, env, script.directory, tag, with_stdin, self.cgi.kill_grace, self.preexec,
                          self.stderr_copy(request))
        except MemoryError:
            raise HTTPError(503, f"cannot fork for {name}: out of memory", headers=(("Retry-After", "1"),))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ENOMEM):
                raise HTTPError(503, f"cannot fork for {name}: {e.strerror}",
                                headers=(("Retry-After", "1"),)) from None
            hint = " (missing or wrong #! line?)" if e.errno in (errno.ENOENT, errno.ENOEXEC) else ""
            raise HTTPError(502, f"cannot execute {name}: {e.strerror}{hint}") from None
        self.limiter.spawned += 1
        loop = asyncio.get_running_loop()
        feeder = loop.create_task(self._feed(child, request.body, spool)) if with_stdin else None
        child.exited.add_done_callback(lambda f: _log_exit(f, tag))
        outcome = "client gone"
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                result = await self._relay(request, response, script, child, tag, feeder)
            outcome = "done"
            return result
        except TimeoutError:
            outcome = "timeout"
            child.kill_group()
            self.limiter.killed_on_timeout += 1
            message = (f"ran over its {self.timeout:g}s timeout; process group killed "
                       f"(SIGTERM, SIGKILL after {self.cgi.kill_grace:g}s)")
            if not response.started:
                raise HTTPError(504, f"script={name} {message}") from None
            log.error("%s %s; response cut short", tag(), message)
            request.connection.close()
            raise ClientDisconnected() from None
        except HTTPError:
            outcome = "error"
            body_error = _body_error(feeder)
            if isinstance(body_error, HTTPError):
                raise body_error from None  # the client's fault (408, 400) explains the script's end
            raise
        finally:
            if feeder is not None:
                feeder.cancel()
            child.close_pipes()
            # stderr stays open to the end of the script's own output, but a
            # background process must not hold it (and a descriptor) forever.
            loop.call_later(EXIT_LINGER + self.cgi.kill_grace, child.stderr.close)
            if child.returncode is None:
                if outcome == "done":
                    # Output is complete; the script may still be tidying up.  It
                    # keeps its deadline, but no longer holds up the client.
                    child.kill_group_at(deadline)
                else:
                    child.kill_group()
                    if outcome == "client gone" and not response.finished:
                        log.warning("%s client went away; process group killed", tag())
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s finished in %.6fs (%s)", tag(), time.perf_counter() - started, outcome)

    def stderr_copy(self, request):
        """Where a copy of the script's stderr goes besides the error log (None: nowhere)."""
        return None

    async def _feed(self, child: ChildProcess, body, spool) -> Exception | None:
        """Give the body to stdin, then close it.  If the script stops reading,
        the rest of the body is still read from the client and dropped, so the
        connection stays in step.  Returns the client's error, if the body failed."""
        writer = child.stdin
        try:
            if spool is not None:
                while data := spool.read(READ_SIZE):
                    await writer.write(data)
            elif body is not None:
                while data := await body.read():
                    await writer.write(data)
        except (BrokenPipeError, ConnectionResetError):
            if body is not None and spool is None:
                try:
                    while await body.read():
                        pass
                except (HTTPError, ClientDisconnected) as e:
                    return e
        except (HTTPError, ClientDisconnected) as e:
            # The client stalled or left mid-body: the script gets no more.
            child.kill_group()
            return e
        finally:
            writer.close()
        return None

    async def _relay(self, request, response, script: Script, child: ChildProcess, tag, feeder):
        stdout = child.stdout
        where = f"script={os.fsdecode(script.filename)}"   # HTTPError lines carry the rid already

        if script.is_nph:
            first = True
            while data := await stdout.read():
                await response.write_raw(data)
                if first:
                    first = False
                    status_line = data.split(b"\n", 1)[0].split()
                    if len(status_line) >= 2 and status_line[1].isdigit():
                        response.status = int(status_line[1])  # for the access log only
            await response.end()
            return None

        parser = ResponseHeadParser(self.cgi.max_response_header_size)
        head = None
        while head is None:
            data = await stdout.read()
            if not data:
                try:
                    parser.eof()
                except CGIResponseError as e:
                    code = await self._exit_code(child)
                    raise HTTPError(502, f"{where} {e.detail}; {_describe_exit(code)}") from None
            try:
                head = parser.feed(data)
            except CGIResponseError as e:
                raise HTTPError(502, f"{where} {e.detail}") from None
        warn_dropped(head, tag())
        if head.kind == "local-redirect":
            return LocalRedirect(head.location)
        await relay_document(response, head, stdout.read)
        body_error = _body_error(feeder)
        if body_error is not None:
            # The script was stopped because the request body failed: what it
            # wrote is not a whole response, and must not be framed as one.
            raise body_error
        await response.end()
        return None

    async def _exit_code(self, child: ChildProcess) -> int | None:
        try:
            async with asyncio.timeout(EXIT_LINGER):
                return await asyncio.shield(child.exited)
        except TimeoutError:
            return None


def warn_dropped(head, tag: str) -> None:
    """One log line for the hop-by-hop fields a backend sent (the front frames itself)."""
    if head.dropped:
        log.warning("%s hop-by-hop response headers dropped: %s", tag,
                    ", ".join(n.decode("latin-1") for n in head.dropped))


async def relay_document(response, head, read) -> None:
    """Send a CGI document response (RFC 3875 section 6.2.1): its status and
    headers, what followed the blank line, then `read()` until it returns b"".
    Shared by CGI scripts and FastCGI responders, whose STDOUT is the same."""
    response.start(head.status, head.headers, head.reason)
    if head.body:
        await response.write(head.body)
    while data := await read():
        await response.write(data)


def _body_error(feeder: asyncio.Task | None) -> Exception | None:
    if feeder is None or not feeder.done() or feeder.cancelled():
        return None
    return feeder.result()


def _log_exit(exited: asyncio.Future, tag) -> None:
    """Runs when the script exits: a failure, even after its output began, is worth a line."""
    if exited.cancelled():
        return
    code = exited.result()
    if code:
        log.warning("%s %s", tag(), _describe_exit(code))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"

