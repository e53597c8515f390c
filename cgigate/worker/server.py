"""One FastCGI worker process: accept connections, run WSGI requests in threads.

How it works: the main thread accepts on the listening socket it shares with
the other workers.  Each connection gets a reader thread, which feeds the
socket's bytes to a sans-I/O `ServerConnection` and acts on its events:
a request whose PARAMS are complete is handed to a pool of `threads`
application threads; its STDIN records are fed to its `InputStream`.
Writes from application threads go through one lock per connection, so
records of different requests never interleave mid-record.

With more than one thread the worker multiplexes (FCGI_MPXS_CONNS=1, up to
`threads` requests on one connection, FastCGI section 3.3); with one it
does not, and a second request on a busy connection gets
END_REQUEST(CANT_MPX_CONN) from the connection object.

FCGI_ABORT_REQUEST (section 5.4) ends the request at once with exactly one
END_REQUEST; whatever its application thread still writes is dropped.  A
web server that closes the connection (nginx's way of aborting) aborts every
request on it.  A connection that sends half a record and then nothing is
closed after `idle_timeout` seconds; so is one idle between requests.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cgigate.fastcgi import ProtocolError, ServerConnection
from cgigate.fastcgi import events as ev
from cgigate.worker.wsgi import (ErrorStream, InputStream, ResponseCut, build_environ,
                                 content_length_of, run_app)

log = logging.getLogger("cgigate.error")

READ_SIZE = 65536


class _Request:
    __slots__ = ("request_id", "stdin", "params", "aborted", "ended", "answered", "connection",
                 "thread", "started", "slow_logged", "stuck")

    def __init__(self, request_id: int, connection: "Connection"):
        self.request_id = request_id
        self.connection = connection
        self.stdin: InputStream | None = None
        self.params = None
        self.aborted = False
        self.ended = False
        self.answered = False       # some STDOUT went out
        self.thread = 0             # the thread running the app for it (for its stack)
        self.started = 0.0          # time.monotonic() when the app was called
        self.slow_logged = False
        self.stuck = False          # timed out, its app call still running

    def describe(self) -> str:
        params = dict(self.params or ())
        method = params.get(b"REQUEST_METHOD", b"-").decode("latin-1")
        uri = params.get(b"REQUEST_URI") or params.get(b"SCRIPT_NAME", b"") + params.get(b"PATH_INFO", b"")
        return f"{method} {uri.decode('latin-1')}"


class Connection:
    def __init__(self, worker: "Worker", sock: socket.socket, peer):
        self.worker = worker
        self.sock = sock
        self.peer = peer
        self.fcgi = ServerConnection(multiplex=worker.threads > 1, max_requests=worker.threads,
                                     max_conns=worker.advertised_conns)
        self.lock = threading.Lock()
        self.requests: dict[int, _Request] = {}
        self.closed = False
        self.last_used = time.monotonic()
        self.used = False                    # has a request begun on it?

    def serve(self) -> None:
        self.sock.settimeout(self.worker.idle_timeout)
        try:
            while not self.closed:
                try:
                    data = self.sock.recv(READ_SIZE)
                except socket.timeout:
                    if self.requests:
                        continue   # requests still running: their output keeps it alive
                    if self.fcgi.pending_input:
                        log.warning("fastcgi connection from %s sent half a record and stalled "
                                    "for %gs; closed", self.peer, self.worker.idle_timeout)
                    break
                except OSError:
                    break
                if not data:
                    break
                try:
                    with self.lock:
                        found = self.fcgi.receive_data(data)
                        reply = self.fcgi.data_to_send()
                        if reply:
                            self.sock.sendall(reply)
                except ProtocolError as e:
                    log.error("fastcgi protocol error from %s: %s; connection closed", self.peer, e)
                    break
                except OSError:
                    break
                ready: list[_Request] = []
                for event in found:
                    self.dispatch(event, ready)
                for request in ready:
                    with self.worker.busy:
                        self.worker.running += 1     # counted from here, so stop() waits for it
                    if self.worker.threads == 1 and request.stdin.complete:
                        # Its whole input is here and nothing else can run on this
                        # connection meanwhile: run it right here, no thread hop.
                        self.run(request)
                    else:
                        self.worker.pool.submit(self.run, request)
                # stopping: a connection goes once its requests are done; one that has
                # had none yet (a web server asking FCGI_GET_VALUES first) waits for it
                if not self.requests and (self.fcgi.close_after or (self.worker.stopping and self.used)):
                    break
        finally:
            self.close()

    def dispatch(self, event, ready: list) -> None:
        """Act on one event; a request whose PARAMS are complete goes on `ready`."""
        rid = event.request_id
        if isinstance(event, ev.BeginRequest):
            self.used = True
            self.requests[rid] = _Request(rid, self)
        elif isinstance(event, ev.Params):
            request = self.requests.get(rid)
            if request is None:
                return
            request.params = event.params
            request.stdin = InputStream(content_length_of(event.params))
            ready.append(request)
        elif isinstance(event, ev.StdinData):
            request = self.requests.get(rid)
            if request is not None and request.stdin is not None:
                request.stdin.feed(event.data)    # may block: back-pressure on this connection
        elif isinstance(event, ev.StdinEnd):
            request = self.requests.get(rid)
            if request is not None and request.stdin is not None:
                request.stdin.finish()
        elif isinstance(event, ev.AbortRequest):
            request = self.requests.get(rid)
            if request is not None:
                self.abort(request)
        elif isinstance(event, ev.RequestRejected):
            log.warning("fastcgi request %d from %s refused: %s", rid, self.peer, event.reason)

    def abort(self, request: _Request) -> None:
        request.aborted = True
        if request.stdin is not None:
            request.stdin.abort()
        self.end(request, 0)

    def end(self, request: _Request, app_status: int) -> None:
        with self.lock:
            if request.ended:
                return
            request.ended = True
            self.last_used = time.monotonic()
            if self.requests.get(request.request_id) is request:
                del self.requests[request.request_id]
            if self.closed:
                return
            try:
                self.sock.sendall(self.fcgi.end_request(request.request_id, app_status))
            except OSError:
                self._close_locked()
                return
            if not self.requests and (self.fcgi.close_after or self.worker.stopping
                                      or self.worker.should_give_back()):
                self._close_locked()

    def idle(self) -> bool:
        """No request on it, and none arriving: closing it loses nothing.  (A
        request already in its socket, unread, would be reset with it: the
        reader thread takes that one, and closes the connection after it.  A
        connection just accepted has its first request on the way: a web
        server connects, then writes.)"""
        if self.requests or self.closed:
            return False
        if not self.used and time.monotonic() - self.last_used < FIRST_REQUEST_WAIT:
            return False
        try:
            return not select.select([self.sock], [], [], 0)[0]
        except (OSError, ValueError):
            return True

    def close_if_idle(self) -> None:
        with self.lock:
            if self.idle():
                self._close_locked()

    def answer_instead(self, request: _Request, status: str, text: str) -> bool:
        """End `request` with this answer from the worker itself (its app thread is
        stuck); False when the app had already begun its own answer."""
        with self.lock:
            if request.ended or self.closed or request.answered:
                return False
            body = text.encode()
            head = (f"Status: {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            try:
                self.sock.sendall(self.fcgi.send_stdout(request.request_id, head + body))
            except OSError:
                self._close_locked()
                return False
        self.end(request, 0)
        return True

    def send(self, request: _Request, data: bytes, stream: str = "stdout") -> None:
        with self.lock:
            if request.ended or self.closed:
                return
            if stream == "stdout":
                request.answered = True
            encode = self.fcgi.send_stdout if stream == "stdout" else self.fcgi.send_stderr
            try:
                self.sock.sendall(encode(request.request_id, data))
            except OSError:
                self._close_locked()

    def run(self, request: _Request) -> None:
        """One request from PARAMS to END_REQUEST (in an application thread, or
        in the reader thread itself when nothing else can use the connection)."""
        try:
            # At most `threads` app calls at once in this process, whichever
            # thread runs them: wsgi.multithread is False when threads is 1.
            with self.worker.app_slots:
                self.worker.began(request)
                try:
                    self._run(request)
                finally:
                    self.worker.finished(request)
        finally:
            with self.worker.busy:
                self.worker.running -= 1
                self.worker.busy.notify_all()

    def _run(self, request: _Request) -> None:
        worker = self.worker
        if worker.special is not None:
            answer = worker.special(dict(request.params))
            if answer is not None:
                status, content_type, body = answer
                self.send(request, b"Status: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                                   b"Cache-Control: no-store\r\n\r\n%s"
                          % (status.encode(), content_type, len(body), body))
                self.end(request, 0)
                return
        errors = ErrorStream(lambda data: self.send(request, data, "stderr"))
        environ = build_environ(request.params, request.stdin, errors, worker.threads > 1,
                                worker.multiprocess)
        try:
            app_status = run_app(worker.app, environ, lambda data: self.send(request, data))
        except ResponseCut:
            # The only way to tell a web server that a started response is not
            # whole: end the connection without END_REQUEST.
            log.error("app failed after its response began (%s %s); fastcgi connection from %s "
                      "closed", environ.get("REQUEST_METHOD"), environ.get("REQUEST_URI", ""), self.peer)
            self.close()
            return
        except BaseException:
            log.exception("fastcgi request %d failed in the worker", request.request_id)
            app_status = 1
        self.end(request, app_status)

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            for request in list(self.requests.values()):
                request.aborted = request.ended = True
                if request.stdin is not None:
                    request.stdin.abort()
            self.requests.clear()

    def close(self) -> None:
        with self.lock:
            self._close_locked()


# Connections a worker takes per application thread.  Web servers keep
# connections open (nginx's keepalive, cgigate's front), one request at a time
# on each: with one per thread, as php-fpm's children, the rest wait unaccepted
# (measured here: behind nginx with keepalive, requests stalled for seconds;
# behind cgigate's front, which then queues them itself, 0.71x of flup).  So a
# worker takes several, but an idle worker gets a new connection first (a busy
# one waits IDLE_FIRST before taking it), and a worker holding more than its
# threads gives a connection back, after its request, while another is idle.
CONNECTIONS_PER_THREAD = 8
IDLE_FIRST = 0.01
FIRST_REQUEST_WAIT = 1.0     # a new connection is not idle before its first request, or this long


def _waiting(listener: socket.socket, timeout: float = 0) -> bool:
    """Does a connection wait to be accepted (within `timeout` seconds)?"""
    try:
        return bool(select.select([listener], [], [], timeout)[0])
    except (OSError, ValueError):
        return False


class Worker:
    """Serves a listening socket until `stop()`; in-flight requests finish first.

    It accepts up to CONNECTIONS_PER_THREAD x `threads` connections (a web
    server that does not multiplex puts one request at a time on each), idle
    workers first, and gives connections back while others are idle (see
    CONNECTIONS_PER_THREAD); when it is full and a connection waits, it closes
    its idlest connection that carries no request.  FCGI_MAX_CONNS tells the
    web server how many the whole pool takes (`advertised_conns`).
    `tracker` (a watchdog.RequestTracker) hears of every request's start and
    end: the scoreboard, recycling and timeouts hang on it."""

    def __init__(self, app, threads: int = 1, max_conns: int | None = None, multiprocess: bool = False,
                 idle_timeout: float = 60.0, allow=None, advertised_conns: int | None = None,
                 tracker=None, special=None):
        self.app = app
        self.allow = allow            # a listeners.AllowList for TCP peers; None: everyone
        self.threads = threads
        self.max_conns = max_conns or CONNECTIONS_PER_THREAD * threads
        self.advertised_conns = advertised_conns or self.max_conns
        self.multiprocess = multiprocess
        self.idle_timeout = idle_timeout
        self.tracker = tracker
        self.special = special        # params -> (status, content type, body) or None: answers not the app's
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")
        self.connections: set[Connection] = set()
        self.listeners: list[socket.socket] = []
        self._accepting = 0                  # accept threads still running
        self.running = 0                     # requests between PARAMS and END_REQUEST
        self.stuck = 0                       # of those, timed out with their app call still running
        self.active: dict[int, _Request] = {}   # id() -> request, while the app runs it
        self.app_slots = threading.BoundedSemaphore(threads)
        self.busy = threading.Condition()
        self._slots = threading.BoundedSemaphore(self.max_conns)
        self._stopping = threading.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def began(self, request: _Request) -> None:
        request.thread = threading.get_ident()
        request.started = time.monotonic()
        with self.busy:
            self.active[id(request)] = request
        if self.tracker is not None:
            self.tracker.began(request)

    def finished(self, request: _Request) -> None:
        with self.busy:
            self.active.pop(id(request), None)
            if request.stuck:
                request.stuck = False
                self.stuck -= 1
        if self.tracker is not None:
            self.tracker.finished(request)

    def serve_forever(self, listener: socket.socket) -> None:
        """Accept from `listener` until stop(); run one such thread per listener."""
        self.listeners.append(listener)
        with self.busy:
            self._accepting += 1
        try:
            self._accept_loop(listener)
        finally:
            with self.busy:
                self._accepting -= 1
                self.busy.notify_all()

    def _accept_loop(self, listener: socket.socket) -> None:
        listener.settimeout(0.5)
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=0.2):
                # Full.  A web server that keeps idle connections open (fastcgi_keep_conn,
                # or more of them than the pool has workers) must not leave a new one
                # waiting behind them: close our idlest to take it.
                if _waiting(listener):
                    self._reclaim_idle()
                continue
            if self._busy() and not self._left_over(listener):
                self._slots.release()
                continue
            try:
                sock, peer = listener.accept()
            except (socket.timeout, BlockingIOError, InterruptedError):
                self._slots.release()
                continue
            except OSError as e:
                self._slots.release()
                if self._stopping.is_set():
                    break
                log.error("accept failed: %s", e)
                continue
            if self.allow is not None and not self.allow.allows(peer):
                log.warning("fastcgi connection from %s:%s refused: not in [fcgi] allowed_clients", *peer[:2])
                sock.close()
                self._slots.release()
                continue
            sock.setblocking(True)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{peer[0]}:{peer[1]}"
            conn = Connection(self, sock, peer if peer else "unix")
            log.debug("fastcgi connection opened from %s", conn.peer)
            self.connections.add(conn)
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                             name=f"fcgi-conn-{sock.fileno()}").start()

    def should_give_back(self) -> bool:
        """More connections than threads while another worker is idle: the web
        server's next connection will find that one (see CONNECTIONS_PER_THREAD)."""
        tracker = self.tracker
        return (len(self.connections) > self.threads and tracker is not None and tracker.board is not None
                and tracker.board.idle_workers() > 0)

    def _busy(self) -> bool:
        return self.running > 0 and len(self.connections) >= self.threads

    @staticmethod
    def _left_over(listener: socket.socket) -> bool:
        """For a busy worker: a connection that no idle worker took within IDLE_FIRST?"""
        if not _waiting(listener, 0.2):
            return False
        time.sleep(IDLE_FIRST)
        return _waiting(listener)

    def _reclaim_idle(self) -> None:
        idle = [conn for conn in list(self.connections) if not conn.requests and not conn.closed]
        if idle:
            conn = min(idle, key=lambda c: c.last_used)
            log.debug("closing an idle fastcgi connection from %s: another one waits", conn.peer)
            conn.close_if_idle()

    def _serve_connection(self, conn: Connection) -> None:
        try:
            conn.serve()
        finally:
            self.connections.discard(conn)
            self._slots.release()

    def drain(self) -> None:
        """Stop accepting and taking new requests at once; the requests running
        finish (a worker retiring itself: stop() follows from its main thread)."""
        self._stopping.set()
        for conn in list(self.connections):
            conn.close_if_idle()

    def stop(self, grace: float) -> None:
        """Stop accepting, let running requests finish for up to `grace` seconds.
        A connection with no request on it is closed at once, one with a request
        when that ends (a web server reusing it then sees it closed before any
        answer, and tries another)."""
        self.drain()
        deadline = time.monotonic() + grace
        with self.busy:
            # an accept in progress may still hand over a connection: wait for it
            self.busy.wait_for(lambda: self._accepting == 0, timeout=2.0)
        while True:
            # a connection accepted just before, its request still unread, is
            # waited for too: closing it would reset a request nobody answered
            arriving = [conn for conn in list(self.connections) if not conn.closed and not conn.requests
                        and not conn.idle()]
            with self.busy:
                if self.running - self.stuck <= 0 and not arriving:
                    break
                if time.monotonic() >= deadline:
                    log.warning("graceful timeout: %d request(s) still running are cut", self.running)
                    break
                self.busy.wait(0.05)
            self.drain()     # the connections that have become idle meanwhile
        self.pool.shutdown(wait=False, cancel_futures=True)
        for conn in list(self.connections):
            conn.close()
