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
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from cgigate.fastcgi import ProtocolError, ServerConnection
from cgigate.fastcgi import events as ev
from cgigate.worker.wsgi import (ErrorStream, InputStream, ResponseCut, build_environ,
                                 content_length_of, run_app)

log = logging.getLogger("cgigate.error")

READ_SIZE = 65536


class _Request:
    __slots__ = ("request_id", "stdin", "params", "aborted", "ended")

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.stdin: InputStream | None = None
        self.params = None
        self.aborted = False
        self.ended = False


class Connection:
    def __init__(self, worker: "Worker", sock: socket.socket, peer):
        self.worker = worker
        self.sock = sock
        self.peer = peer
        self.fcgi = ServerConnection(multiplex=worker.threads > 1, max_requests=worker.threads,
                                     max_conns=worker.max_conns)
        self.lock = threading.Lock()
        self.requests: dict[int, _Request] = {}
        self.closed = False

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
                if self.fcgi.close_after and not self.requests:
                    break
        finally:
            self.close()

    def dispatch(self, event, ready: list) -> None:
        """Act on one event; a request whose PARAMS are complete goes on `ready`."""
        rid = event.request_id
        if isinstance(event, ev.BeginRequest):
            self.requests[rid] = _Request(rid)
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
            if self.requests.get(request.request_id) is request:
                del self.requests[request.request_id]
            if self.closed:
                return
            try:
                self.sock.sendall(self.fcgi.end_request(request.request_id, app_status))
            except OSError:
                self._close_locked()
                return
            if self.fcgi.close_after and not self.requests:
                self._close_locked()

    def send(self, request: _Request, data: bytes, stream: str = "stdout") -> None:
        with self.lock:
            if request.ended or self.closed:
                return
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
                self._run(request)
        finally:
            with self.worker.busy:
                self.worker.running -= 1
                self.worker.busy.notify_all()

    def _run(self, request: _Request) -> None:
        worker = self.worker
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


class Worker:
    """Serves a listening socket until `stop()`; in-flight requests finish first."""

    def __init__(self, app, threads: int = 1, max_conns: int = 64, multiprocess: bool = False,
                 idle_timeout: float = 60.0, allow=None):
        self.app = app
        self.allow = allow            # a listeners.AllowList for TCP peers; None: everyone
        self.threads = threads
        self.max_conns = max_conns
        self.multiprocess = multiprocess
        self.idle_timeout = idle_timeout
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")
        self.connections: set[Connection] = set()
        self.running = 0                     # requests between PARAMS and END_REQUEST
        self.app_slots = threading.BoundedSemaphore(threads)
        self.busy = threading.Condition()
        self._slots = threading.BoundedSemaphore(max_conns)
        self._stopping = threading.Event()

    def serve_forever(self, listener: socket.socket) -> None:
        """Accept from `listener` until stop(); run one such thread per listener."""
        listener.settimeout(0.5)
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=0.5):
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

    def _serve_connection(self, conn: Connection) -> None:
        try:
            conn.serve()
        finally:
            self.connections.discard(conn)
            self._slots.release()

    def stop(self, grace: float) -> None:
        """Stop accepting, let running requests finish for up to `grace` seconds."""
        self._stopping.set()
        with self.busy:
            if not self.busy.wait_for(lambda: self.running == 0, timeout=grace):
                log.warning("graceful timeout: %d request(s) still running are cut", self.running)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for conn in list(self.connections):
            conn.close()
