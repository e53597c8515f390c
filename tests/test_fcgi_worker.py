"""`cgigate fcgi`: real worker processes, driven over real sockets by a FastCGI
client built on cgigate's own ClientConnection, by libfcgi's cgi-fcgi and by
flup's FastCGI client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from cgigate.fastcgi import ClientConnection
from cgigate.fastcgi import events as ev
from cgigate.fastcgi import records as r
from conftest import ROOT, children_of, require_program

APPS = "tests.peers.wsgi_apps:router"


class FcgiDaemon:
    def __init__(self, *args, env=None):
        self.dir = tempfile.mkdtemp(prefix="cgigate-fcgi-")
        self.socket = os.path.join(self.dir, "fcgi.sock")
        self.error_log = os.path.join(self.dir, "error.log")
        full_env = dict(os.environ, CGIGATE_TEST_MARKERS=self.dir, **(env or {}))
        what = [] if "--cgi-dir" in args or "--app" in args else ["--app", APPS]
        command = [sys.executable, "-m", "cgigate", "fcgi", *what, "--error-log", self.error_log, *args]
        if "--bind" not in args:
            command += ["--bind", f"unix:{self.socket}"]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=full_env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            m = re.search(r"listening on (\S+) \(FastCGI\)", self.log())
            if m and len(re.findall(r"worker \d+ started", self.log())) >= 1:
                self.address = m.group(1)
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"cgigate fcgi exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        else:
            raise RuntimeError("cgigate fcgi did not start: " + self.log())

    def log(self) -> str:
        try:
            with open(self.error_log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} in:\n{self.log()}")

    def connect(self) -> socket.socket:
        if self.address.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(self.address[5:])
        else:
            host, port = self.address.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)))
        sock.settimeout(10)
        return sock

    def workers(self) -> list[int]:
        return [pid for pid, state in children_of(self.proc.pid) if state != "Z"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture
def fcgi():
    started = []

    def start(*args, env=None):
        d = FcgiDaemon(*args, env=env)
        started.append(d)
        return d
    yield start
    for d in started:
        assert d.stop() == 0, d.log()
        assert not children_of(d.proc.pid)


class Client:
    """A FastCGI web-server side over a real socket, built on ClientConnection."""

    def __init__(self, daemon: FcgiDaemon, max_requests: int = 64):
        self.sock = daemon.connect()
        self.conn = ClientConnection(max_requests)
        self.pending: list = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start(self, path="/environ", method="GET", body=b"", query="", keep_conn=True, rid=None,
              extra=(), send_body=True) -> int:
        rid = rid or self.conn.new_request_id()
        params = [(b"REQUEST_METHOD", method.encode()), (b"SCRIPT_NAME", b""), (b"PATH_INFO", path.encode()),
                  (b"QUERY_STRING", query.encode()), (b"SERVER_NAME", b"test"), (b"SERVER_PORT", b"80"),
                  (b"SERVER_PROTOCOL", b"HTTP/1.1"), (b"CONTENT_LENGTH", str(len(body)).encode()), *extra]
        wire = self.conn.begin_request(rid, params, keep_conn=keep_conn)
        if send_body:
            wire += self.conn.send_stdin(rid, body) + self.conn.end_stdin(rid)
        self.send(wire)
        return rid

    def events(self, until, timeout: float = 15.0, must: bool = True) -> list:
        """Read until `until(events)` holds or the worker closes; past `timeout`
        that is a failure, unless `must` is false (then: whatever came)."""
        deadline = time.monotonic() + timeout
        while not until(self.pending):
            if time.monotonic() > deadline:
                if not must:
                    break
                raise AssertionError(f"timed out; events so far: {self.pending[-5:]}")
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                self.closed = True
                break
            self.pending += self.conn.receive_data(data)
        return self.pending

    def response(self, rid: int) -> tuple[int, dict, bytes, bytes, ev.EndRequest]:
        self.events(lambda evs: any(isinstance(e, ev.EndRequest) and e.request_id == rid for e in evs))
        mine = [e for e in self.pending if e.request_id == rid]
        self.pending = [e for e in self.pending if e.request_id != rid]
        stdout = b"".join(e.data for e in mine if isinstance(e, ev.StdoutData))
        stderr = b"".join(e.data for e in mine if isinstance(e, ev.StderrData))
        end = [e for e in mine if isinstance(e, ev.EndRequest)]
        assert len(end) == 1, mine
        head, _, body = stdout.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n") if head else []
        headers = dict(line.split(": ", 1) for line in lines)
        status = int(headers.pop("Status", "0 x").split()[0]) if headers else 0
        return status, headers, body, stderr, end[0]

    def get(self, path, **kw):
        return self.response(self.start(path, **kw))


# --- PEP 3333 through a real worker ---

def test_environ_and_hello(fcgi):
    d = fcgi("--workers", "1")
    c = Client(d)
    status, headers, body, _, end = c.get("/environ", query="a=1",
                                          extra=[(b"HTTP_X_TEST", b"caf\xc3\xa9"), (b"HTTPS", b"on")])
    environ = json.loads(body)
    assert status == 200 and end.app_status == 0 and end.protocol_status == r.REQUEST_COMPLETE
    assert environ["QUERY_STRING"] == "a=1" and environ["PATH_INFO"] == "/environ"
    assert environ["HTTP_X_TEST"] == "caf\xc3\xa9"                # latin-1 round trip
    assert environ["wsgi.url_scheme"] == "https" and environ["wsgi.version"] == [1, 0]
    assert environ["wsgi.multithread"] is False and environ["wsgi.run_once"] is False


def test_no_path_info_from_the_web_server(fcgi):
    """nginx's stock fastcgi_params send SCRIPT_NAME but no PATH_INFO."""
    d = fcgi("--workers", "1")
    c = Client(d)
    rid = c.conn.new_request_id()
    c.send(c.conn.begin_request(rid, [(b"REQUEST_METHOD", b"GET"), (b"SCRIPT_NAME", b"/environ")])
           + c.conn.end_stdin(rid))
    _, _, body, _, _ = c.response(rid)
    environ = json.loads(body)
    assert environ["PATH_INFO"] == "/environ" and environ["SCRIPT_NAME"] == ""


@pytest.mark.parametrize("how,parts,extra", [
    ("read", ["line one\nline two\nlast"], ""),
    ("read3", ["lin", "e o", "ne\n", "lin", "e t", "wo\n", "las", "t"], ""),
    ("readline", ["line one\n", "line two\n", "last"], ""),
    ("readline2", ["li", "ne one\n"], "line two\nlast"),
    ("readlines", ["line one\n", "line two\n", "last"], ""),
    ("iter", ["line one\n", "line two\n", "last"], ""),
])
def test_wsgi_input(fcgi, how, parts, extra):
    d = fcgi("--workers", "1")
    c = Client(d)
    # more bytes on the wire than CONTENT_LENGTH says: the app must not see them
    rid = c.start("/input", method="POST", query=how, body=b"line one\nline two\nlast", send_body=False)
    c.send(c.conn.send_stdin(rid, b"line one\nline two\nlast" + b"BEYOND") + c.conn.end_stdin(rid))
    status, _, body, _, _ = c.response(rid)
    assert status == 200 and json.loads(body) == {"parts": parts, "extra": extra}


def test_large_body_streams_both_ways(fcgi):
    d = fcgi("--workers", "1")
    c = Client(d)
    data = os.urandom(3 * 1024 * 1024 + 17)
    rid = c.start("/echo", method="POST", body=b"", send_body=False,
                  extra=[(b"CONTENT_LENGTH", str(len(data)).encode())])
    sender = threading.Thread(target=lambda: c.send(c.conn.send_stdin(rid, data) + c.conn.end_stdin(rid)))
    sender.start()
    status, headers, body, _, _ = c.response(rid)
    sender.join()
    assert status == 200 and body == data


def test_write_callable_close_and_file_wrapper(fcgi):
    d = fcgi("--workers", "1")
    c = Client(d)
    assert c.get("/write")[2] == b"written, then returned"
    assert c.get("/close", query="closed-1")[2] == b"ab"
    with open(os.path.join(d.dir, "closed-1")) as f:
        assert f.read() == "closed\n"
    with open(os.path.join(ROOT, "tests", "peers", "wsgi_apps.py"), "rb") as f:
        assert c.get("/file")[2] == f.read()


def test_app_errors_give_500_and_the_worker_keeps_serving(fcgi):
    d = fcgi("--workers", "1")
    c = Client(d)
    status, _, body, stderr, end = c.get("/fail")
    assert status == 500 and body == b"500 Internal Server Error\n" and end.app_status == 1
    assert b"RuntimeError: the app broke" in stderr            # traceback to wsgi.errors, not the client
    for path in ("/bad-header", "/hop-header"):
        assert c.get(path)[0] == 500
    status, _, body, _, _ = c.get("/exc-info")
    assert status == 503 and body == b"recovered"
    assert c.get("/pid")[0] == 200                              # same connection, still serving


def test_failure_after_the_response_began_cuts_the_connection(fcgi):
    d = fcgi("--workers", "1")
    c = Client(d)
    c.start("/fail-after", query="closed-2")
    c.events(lambda evs: False, timeout=10, must=False)       # until the worker closes
    assert c.closed
    assert b"partial" in b"".join(e.data for e in c.pending if isinstance(e, ev.StdoutData))
    assert not any(isinstance(e, ev.EndRequest) for e in c.pending)   # never framed as complete
    with open(os.path.join(d.dir, "closed-2")) as f:
        assert f.read() == "closed\n"
    assert Client(d).get("/pid")[0] == 200


def test_stderr_records(fcgi):
    d = fcgi("--workers", "1")
    _, _, body, stderr, _ = Client(d).get("/stderr")
    assert body == b"ok" and stderr == b"a line for the log\n"


# --- the FastCGI protocol, at the worker ---

@pytest.mark.parametrize("threads,mpxs", [(1, b"0"), (4, b"1")])
def test_get_values_truthfully(fcgi, threads, mpxs):
    # FCGI_MAX_CONNS is the whole pool's: each of the 3 workers takes 8 x `threads` connections
    d = fcgi("--workers", "3", "--threads", str(threads))
    c = Client(d)
    c.send(c.conn.get_values([r.MAX_CONNS, r.MAX_REQS, r.MPXS_CONNS, b"FCGI_NOT_A_VARIABLE"]))
    found = c.events(lambda evs: any(isinstance(e, ev.ValuesResult) for e in evs))
    assert found[0] == ev.ValuesResult(0, ((r.MAX_CONNS, str(3 * 8 * threads).encode()),
                                           (r.MAX_REQS, str(threads).encode()), (r.MPXS_CONNS, mpxs)))
    c.send(r.encode_record(42, 0, b"?"))
    found = c.events(lambda evs: any(isinstance(e, ev.UnknownTypeReply) for e in evs))
    assert ev.UnknownTypeReply(0, 42) in found


def test_keep_conn_reuses_id_1_and_without_it_the_worker_closes(fcgi):
    d = fcgi("--workers", "1")
    c = Client(d)
    for _ in range(5):
        rid = c.start("/pid", rid=1)                          # nginx's way: always id 1
        assert c.response(rid)[0] == 200
    c.start("/pid", rid=1, keep_conn=False)
    assert c.response(1)[0] == 200
    c.events(lambda evs: False, timeout=5, must=False)
    assert c.closed


def test_unknown_role_and_busy_connection(fcgi):
    d = fcgi("--workers", "1")
    c = Client(d)
    c.send(c.conn.begin_request(3, [], role=r.AUTHORIZER))
    found = c.events(lambda evs: any(isinstance(e, ev.EndRequest) for e in evs))
    assert ev.EndRequest(3, 0, r.UNKNOWN_ROLE) in found
    c.pending.clear()
    # Both requests in one write, so the worker sees the second while the first
    # is active (a worker with one thread may run a request before reading on).
    sent = []
    real_send, c.send = c.send, sent.append
    first = c.start("/slow", query="0.5")
    second = c.start("/pid")
    c.send = real_send
    c.send(b"".join(sent))
    assert c.response(second)[4].protocol_status == r.CANT_MPX_CONN
    assert c.response(first)[0] == 200


def test_multiplexed_requests_run_concurrently_on_one_connection(fcgi):
    d = fcgi("--workers", "1", "--threads", "4")
    c = Client(d)
    rids = [c.start("/slow", query="0.6") for _ in range(4)]
    results = [json.loads(c.response(rid)[2]) for rid in rids]
    assert max(result["max_running"] for result in results) == 4


def test_abort_request_ends_it_once(fcgi):
    d = fcgi("--workers", "1", "--threads", "2")
    c = Client(d)
    slow = c.start("/slow", query="1")
    c.send(c.conn.abort_request(slow))
    _, _, _, _, end = c.response(slow)                        # exactly one END_REQUEST (asserted inside)
    assert end.protocol_status == r.REQUEST_COMPLETE
    assert c.get("/pid")[0] == 200
    time.sleep(1.2)                                            # the aborted app thread finishes...
    c.events(lambda evs: False, timeout=0.5, must=False)
    assert not [e for e in c.pending if e.request_id == slow]  # ...and nothing more comes of it


def test_half_a_record_then_silence_is_timed_out(fcgi, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[fcgi]\nidle_timeout = 1\n")
    d = fcgi("-c", str(conf), "--workers", "1")
    c = Client(d)
    c.send(r.encode_begin_request(1)[:5])
    c.events(lambda evs: False, timeout=8, must=False)
    assert c.closed
    d.wait_for_log(r"sent half a record and stalled for 1s; closed")


def test_protocol_error_closes_only_that_connection(fcgi):
    d = fcgi("--workers", "1")
    bad = Client(d)
    bad.send(b"\x02" + b"\x00" * 15)                           # FastCGI version 2
    bad.events(lambda evs: False, timeout=5, must=False)
    assert bad.closed
    d.wait_for_log(r"unsupported FastCGI version 2")
    assert Client(d).get("/pid")[0] == 200


def test_sustained_multiplexed_load(fcgi):
    """flup's multiplexed mode wedges after about 2,500 requests; this must not."""
    d = fcgi("--workers", "2", "--threads", "4")
    clients = [Client(d) for _ in range(4)]
    done = [0] * len(clients)

    def drive(i):
        c = clients[i]
        for _ in range(200):
            rids = [c.start("/pid") for _ in range(4)]           # FCGI_MAX_REQS of --threads 4
            for rid in rids:
                assert c.response(rid)[0] == 200
                done[i] += 1
    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(done) == 4 * 200 * 4


# --- supervision ---

def test_dead_worker_is_replaced_and_sigterm_is_graceful(fcgi):
    d = fcgi("--workers", "2")
    deadline = time.monotonic() + 10
    while len(d.workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = set()
    while len(pids) < 2 and time.monotonic() < deadline:   # both ready: each has answered
        pids.add(Client(d).get("/pid")[2])
    victim = d.workers()[0]
    os.kill(victim, signal.SIGKILL)
    d.wait_for_log(rf"worker \d \(pid {victim}\) died: killed by SIGKILL; starting another")
    c = Client(d)
    rid = c.start("/slow", query="1")
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGTERM)
    assert c.response(rid)[0] == 200                           # the in-flight request finished
    assert d.proc.wait(30) == 0


def test_bad_app_exits_at_once_with_a_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cgigate", "fcgi", "--app", "no.such.module:app",
                             "--bind", f"unix:{tmp_path}/s.sock"], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "cannot import no.such.module" in result.stderr
    result = subprocess.run([sys.executable, "-m", "cgigate", "fcgi", "--bind", f"unix:{tmp_path}/s.sock"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--app" in result.stderr


# --- real peers ---

def test_libfcgi_cgi_fcgi(fcgi):
    tool = require_program("cgi-fcgi")
    d = fcgi("--workers", "1")
    env = {"REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": "/echo", "CONTENT_LENGTH": "11",
           "SERVER_NAME": "t", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "QUERY_STRING": ""}
    result = subprocess.run([tool, "-bind", "-connect", d.address[5:]], input=b"hello world",
                            capture_output=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Status: 200 OK\r\n") and result.stdout.endswith(b"\r\n\r\nhello world")


def test_flup_client(fcgi, monkeypatch):
    try:
        from flup.client.fcgi_app import FCGIApp
    except ImportError:
        pytest.fail("flup is not installed (pip install flup==1.0.3; it is in setup.cfg's test extra)")
    import types
    # flup 1.0.3's client still names types.StringTypes, which Python 3 no longer has
    monkeypatch.setattr(types, "StringTypes", (str,), raising=False)
    d = fcgi("--workers", "1")
    app = FCGIApp(connect=d.address[5:])
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"], captured["headers"] = status, headers

    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/environ", "QUERY_STRING": "q=1",
               "SERVER_NAME": "t", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.input": __import__("io").BytesIO(b""), "wsgi.errors": sys.stderr, "CONTENT_LENGTH": "0"}
    body = b"".join(app(environ, start_response))
    assert captured["status"] == b"200 OK"           # flup 1.0.3 hands back bytes here
    assert json.loads(body)["QUERY_STRING"] == "q=1"


def test_one_thread_means_one_app_call_at_a_time(fcgi):
    """wsgi.multithread is False with --threads 1: requests on different
    connections must not run the app at the same time."""
    d = fcgi("--workers", "1", "--threads", "1")
    clients = [Client(d) for _ in range(3)]
    rids = [c.start("/slow", query="0.4") for c in clients]
    results = [json.loads(c.response(rid)[2]) for c, rid in zip(clients, rids)]
    assert max(result["max_running"] for result in results) == 1
