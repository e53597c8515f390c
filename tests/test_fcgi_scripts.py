"""`cgigate fcgi --cgi-dir`: the fcgiwrap mode, with real worker processes and
real CGI children, driven by cgigate's own FastCGI client (which can
multiplex and abort), by libfcgi's cgi-fcgi and by spawn-fcgi."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from cgigate.fastcgi import events as ev
from cgigate.fastcgi import records as r
from conftest import (ROOT, SAMPLE_CGI_BIN, TEST_CGI_BIN, children_of, open_fds, require_program, rss_kib,
                      wait_gone)
from test_fcgi_worker import Client, FcgiDaemon, fcgi  # noqa: F401  (fcgi is a fixture)


@pytest.fixture
def cgi_dir(tmp_path):
    """The sample scripts, and the test fixtures under t/, in a directory of their own."""
    root = tmp_path / "www" / "cgi-bin"
    shutil.copytree(SAMPLE_CGI_BIN, root)
    shutil.copytree(TEST_CGI_BIN, root / "t")
    (tmp_path / "markers").mkdir()
    return root


@pytest.fixture
def scripts(fcgi, cgi_dir, tmp_path):
    """Start `cgigate fcgi --cgi-dir` on the fixture directory, with extra flags."""
    conf = tmp_path / "fcgi.toml"
    conf.write_text(f'[cgi]\nkill_grace = 0.5\ninterpreters = {{ ".py" = "{sys.executable}" }}\n')

    def start(*args):
        return fcgi("-c", str(conf), "--cgi-dir", str(cgi_dir), *args)
    return start


class ScriptClient(Client):
    """The params nginx's fastcgi_params and SCRIPT_FILENAME line send."""

    def __init__(self, daemon, cgi_dir):
        super().__init__(daemon)
        self.root = cgi_dir

    def run(self, name: str, *, filename: bytes | None = None, path_info: bytes | None = None,
            params=(), **kw) -> int:
        script_name = b"/cgi-bin/" + name.encode()
        extra = [(b"SCRIPT_FILENAME", filename if filename is not None else os.fsencode(self.root) + b"/" +
                  name.encode()),
                 (b"SCRIPT_NAME", script_name), (b"DOCUMENT_ROOT", os.fsencode(self.root.parent)),
                 (b"REQUEST_URI", script_name), (b"PATH_INFO", path_info or b""), *params]
        return self.start("", extra=extra, **kw)

    def call(self, name: str, **kw):
        return self.response(self.run(name, **kw))


def env_of(body: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)


def only_worker(d: FcgiDaemon) -> int:
    deadline = time.monotonic() + 10
    while not d.workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    return d.workers()[0]


def wait_no_scripts(worker: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while children_of(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not children_of(worker), children_of(worker)


# --- what runs, and with what environment ---

def test_hello_and_a_posted_body(scripts, cgi_dir):
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    status, headers, body, _, end = c.call("hello.sh")
    assert (status, body) == (200, b"Hello, world!\n") and headers["Content-Type"] == "text/plain"
    assert end.protocol_status == r.REQUEST_COMPLETE
    status, _, body, _, _ = c.call("echo.py", method="POST", body=b"x=1&y=2")
    assert (status, body) == (200, b"x=1&y=2")


def test_script_filename_outside_the_directory_never_runs(scripts, cgi_dir, tmp_path):
    marker = tmp_path / "ran"
    outside = tmp_path / "www" / "evil.sh"
    outside.write_text(f"#!/bin/sh\ntouch {marker}\nprintf 'Content-Type: text/plain\\r\\n\\r\\nowned\\n'\n")
    outside.chmod(0o755)
    (cgi_dir / "link.sh").symlink_to(outside)
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    root = os.fsencode(cgi_dir)
    for filename in (b"/etc/passwd", root + b"/../evil.sh", root + b"/t/../../evil.sh", root + b"/link.sh",
                     root + b"/link.sh/more/path", b"/bin/sh"):
        status, _, body, _, _ = c.call("x", filename=filename)
        assert status == 403 and b"owned" not in body, filename
    assert not marker.exists()
    d.wait_for_log(r"-> 403: .*evil\.sh.*outside the CGI directory")
    assert c.call("hello.sh")[0] == 200


@pytest.mark.parametrize("filename, status", [
    (b"/hello.sh\nX-Injected: 1", 400), (b"/env.sh\r", 400), (b"relative/hello.sh", 400),
    (b"/no-such.sh", 404), (b"/t/readme.txt", 403), (b"/t", 403), (b"/t/sub/", 403),
])
def test_bad_script_filenames(scripts, cgi_dir, filename, status):
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    full = filename if not filename.startswith(b"/") else os.fsencode(cgi_dir) + filename
    assert c.call("x", filename=full)[0] == status


def test_document_root_and_script_name_when_there_is_no_script_filename(scripts, cgi_dir):
    d = scripts("--workers", "1")
    c = Client(d)
    rid = c.start("", extra=[(b"DOCUMENT_ROOT", os.fsencode(cgi_dir.parent)),
                             (b"SCRIPT_NAME", b"/cgi-bin/env.sh")])
    status, _, body, _, _ = c.response(rid)
    assert status == 200
    env = env_of(body)
    assert env["SCRIPT_FILENAME"] == str(cgi_dir / "env.sh") and env["SCRIPT_NAME"] == "/cgi-bin/env.sh"
    assert c.get("", extra=[(b"SCRIPT_NAME", b"/cgi-bin/env.sh")])[0] == 400   # nothing to find it by


def test_path_info_walked_or_as_the_web_server_split_it(scripts, cgi_dir):
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    # nginx's plain `$document_root$fastcgi_script_name`: the path goes on past the script
    root = os.fsencode(cgi_dir)
    status, _, body, _, _ = c.call("env.sh/extra/path", filename=root + b"/env.sh/extra/path")
    env = env_of(body)
    assert status == 200
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/cgi-bin/env.sh", "/extra/path")
    assert env["SCRIPT_FILENAME"] == str(cgi_dir / "env.sh")
    assert env["PATH_TRANSLATED"] == str(cgi_dir.parent) + "/extra/path"
    # a trailing slash is path info, as under Apache, and stays one after a walk
    for asked, path_info in ((b"/env.sh/", "/"), (b"/env.sh/extra/", "/extra/")):
        env = env_of(c.call("x", filename=root + asked)[2])
        assert (env["SCRIPT_FILENAME"], env["PATH_INFO"]) == (str(cgi_dir / "env.sh"), path_info)
    # fastcgi_split_path_info: SCRIPT_FILENAME is the script, PATH_INFO given
    status, _, body, _, _ = c.call("env.sh", path_info=b"/given")
    env = env_of(body)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/cgi-bin/env.sh", "/given")
    # the CVE-2019-11043 request: the split failed on %0a, PATH_INFO is empty
    status, _, _, _, _ = c.call("env.sh/x\nphp", filename=root + b"/env.sh/x\nphp")
    assert status == 400
    assert c.call("env.sh", path_info=b"/a\rb")[0] == 400
    assert c.call("hello.sh")[0] == 200


def test_only_meta_variables_reach_the_script(scripts, cgi_dir):
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    hostile = [(b"LD_PRELOAD", b"/tmp/evil.so"), (b"PATH", b"/tmp/evil"), (b"BASH_ENV", b"/tmp/x"),
               (b"PHP_VALUE", b"auto_prepend_file=/etc/passwd"), (b"HTTP_PROXY", b"http://evil:1"),
               (b"HTTP_AUTHORIZATION", b"Basic c2VjcmV0"), (b"HTTP_X_TRACE", b"abc"),
               (b"HTTPS", b"on"), (b"REMOTE_ADDR", b"192.0.2.7"), (b"HTTP_COOKIE", b"a=b")]
    status, _, body, _, _ = c.call("env.sh", params=hostile, query="q=1")
    env = env_of(body)
    assert status == 200
    for name in ("LD_PRELOAD", "BASH_ENV", "PHP_VALUE", "HTTP_PROXY", "HTTP_AUTHORIZATION"):
        assert name not in env, name
    assert env["PATH"] != "/tmp/evil" and env["PATH"] == os.environ["PATH"]
    assert (env["HTTP_X_TRACE"], env["HTTPS"], env["REMOTE_ADDR"], env["HTTP_COOKIE"]) == \
        ("abc", "on", "192.0.2.7", "a=b")
    assert (env["QUERY_STRING"], env["GATEWAY_INTERFACE"], env["REQUEST_METHOD"]) == ("q=1", "CGI/1.1", "GET")


def test_pass_params_lets_an_operator_add_names(fcgi, cgi_dir, tmp_path):
    conf = tmp_path / "p.toml"
    conf.write_text('[fcgi]\npass_params = ["APP_MODE"]\n')
    d = fcgi("-c", str(conf), "--cgi-dir", str(cgi_dir), "--workers", "1")
    env = env_of(ScriptClient(d, cgi_dir).call("env.sh", params=[(b"APP_MODE", b"demo"),
                                                                 (b"OTHER", b"x")])[2])
    assert env["APP_MODE"] == "demo" and "OTHER" not in env


# --- the response ---

def test_local_redirect_carries_x_accel_redirect(scripts, cgi_dir):
    d = scripts("--workers", "1")
    status, headers, body, _, _ = ScriptClient(d, cgi_dir).call("redirect.sh", query="local")
    assert status == 0 and body == b""          # no Status line: the web server decides
    assert headers == {"Location": "/cgi-bin/hello.sh", "X-Accel-Redirect": "/cgi-bin/hello.sh"}


def test_local_redirect_without_x_accel_redirect(fcgi, cgi_dir, tmp_path):
    conf = tmp_path / "p.toml"
    conf.write_text("[fcgi]\nx_accel_redirect = false\n")
    d = fcgi("-c", str(conf), "--cgi-dir", str(cgi_dir), "--workers", "1")
    _, headers, _, _, _ = ScriptClient(d, cgi_dir).call("redirect.sh", query="local")
    assert headers == {"Location": "/cgi-bin/hello.sh"}


def test_client_redirect_nph_and_broken_scripts(scripts, cgi_dir):
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    status, headers, _, _, _ = c.call("redirect.sh", params=[(b"HTTP_HOST", b"example.org")])
    assert status == 302 and headers["Location"] == "http://example.org/cgi-bin/hello.sh"
    status, headers, body, _, _ = c.call("nph-hello.sh")
    assert status == 200 and headers.get("X-NPH") == "yes" and b"nph" in body
    status, _, _, _, _ = c.call("t/noheaders.sh")
    assert status == 502
    d.wait_for_log(r"-> 502: script=\S+/t/noheaders\.sh")
    assert c.call("t/silent.sh")[0] == 502
    assert c.call("hello.sh")[0] == 200


def test_stderr_goes_to_fcgi_stderr_and_the_log(scripts, cgi_dir):
    d = scripts("--workers", "1")
    status, _, body, stderr, _ = ScriptClient(d, cgi_dir).call("t/stderr.sh")
    assert (status, body) == (200, b"ok\n")
    assert stderr == b"first complaint\nsecond complaint\n"
    d.wait_for_log(r"rid=\S+ script=\S+/t/stderr\.sh stderr: second complaint")


# --- concurrency, streaming, limits ---

def test_multiplexed_requests_run_concurrently(scripts, cgi_dir, tmp_path):
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    markers = [(b"HTTP_X_MARKERS", os.fsencode(tmp_path / "markers"))]
    rids = [c.run("t/barrier.sh", query="4", params=markers) for _ in range(4)]
    assert len(set(rids)) == 4
    for rid in rids:
        status, _, body, _, _ = c.response(rid)
        assert (status, body) == (200, b"seen=4\n")


def test_large_body_streams_through_and_output_waits_for_the_input(scripts, cgi_dir):
    """64 MiB sent without reading anything back, as nginx does: the script gets
    its stdin streamed, its output is held (not in memory) until the input has
    all arrived, and nothing deadlocks."""
    d = scripts("--workers", "1")
    worker = only_worker(d)
    c = ScriptClient(d, cgi_dir)
    assert c.call("hello.sh")[0] == 200
    before = rss_kib(worker)
    size = 64 * 1024 * 1024
    block = os.urandom(1 << 20)
    rid = c.run("echo.py", method="POST", body=b"", send_body=False,
                params=[(b"CONTENT_LENGTH", str(size).encode())])
    sent = hashlib.sha256(b"Status: 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
    for _ in range(size // len(block) - 1):
        c.send(c.conn.send_stdin(rid, block))
        sent.update(block)
    assert not c.events(lambda evs: False, timeout=0.5, must=False)   # nothing before the input ends
    peak = rss_kib(worker)
    c.send(c.conn.send_stdin(rid, block) + c.conn.end_stdin(rid))
    sent.update(block)
    c.events(lambda evs: any(isinstance(e, ev.EndRequest) for e in evs), timeout=60)
    echoed = hashlib.sha256(b"".join(e.data for e in c.pending if isinstance(e, ev.StdoutData)))
    assert echoed.hexdigest() == sent.hexdigest()
    growth = max(peak, rss_kib(worker)) - before
    assert growth < 16 * 1024, f"worker RSS grew by {growth} KiB for a {size >> 20} MiB body"


def test_echoed_body_is_exact(scripts, cgi_dir):
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    body = os.urandom(3 * 1024 * 1024 + 17)
    status, _, echoed, _, _ = c.call("echo.py", method="POST", body=body)
    assert status == 200 and echoed == body


def test_max_children_then_503(fcgi, cgi_dir, tmp_path):
    conf = tmp_path / "q.toml"
    conf.write_text("[cgi]\nmax_children = 1\nqueue_size = 0\n")
    d = fcgi("-c", str(conf), "--cgi-dir", str(cgi_dir), "--workers", "1")
    c = ScriptClient(d, cgi_dir)
    markers = [(b"HTTP_X_MARKERS", os.fsencode(tmp_path / "markers"))]
    first = c.run("t/barrier.sh", query="2", params=markers)
    time.sleep(0.3)
    # on the same connection: past FCGI_MAX_REQS (max_children + queue_size), refused in the protocol
    assert c.call("hello.sh")[4].protocol_status == r.OVERLOADED
    # on another connection (nginx's way): 503 from the script limiter
    status, headers, body, _, _ = ScriptClient(d, cgi_dir).call("hello.sh")
    assert status == 503 and headers["Retry-After"] == "1", (status, headers, body)
    assert c.response(first)[0] == 200
    d.wait_for_log(r"-> 503: 1 scripts running and 0 waiting")


# --- ends: timeout, abort, the web server leaving ---

def test_timeout_kills_the_process_group_and_answers_504(scripts, cgi_dir, tmp_path):
    d = scripts("--workers", "1", "--timeout", "1")
    worker = only_worker(d)
    pidfile = tmp_path / "pids"
    status, _, _, _, _ = ScriptClient(d, cgi_dir).call("t/sleep.py", query=f"pidfile={pidfile}")
    assert status == 504
    wait_no_scripts(worker)
    wait_gone(map(int, pidfile.read_text().split()))          # the script and its grandchild
    d.wait_for_log(r"-> 504: script=\S+sleep\.py ran over its 1s timeout")


def test_abort_request_kills_the_script_and_ends_once(scripts, cgi_dir, tmp_path):
    d = scripts("--workers", "1")
    worker = only_worker(d)
    c = ScriptClient(d, cgi_dir)
    pidfile = tmp_path / "pids"
    rid = c.run("t/sleep.py", query=f"pidfile={pidfile}&headers=1")
    c.events(lambda evs: any(isinstance(e, ev.StdoutData) for e in evs))
    c.send(c.conn.abort_request(rid))
    c.response(rid)                      # exactly one END_REQUEST, asserted inside
    wait_no_scripts(worker)
    assert c.call("hello.sh")[0] == 200  # the connection still serves


def test_web_server_closing_the_connection_kills_the_script(scripts, cgi_dir, tmp_path):
    d = scripts("--workers", "1")
    worker = only_worker(d)
    assert ScriptClient(d, cgi_dir).call("hello.sh")[0] == 200     # lazily opened descriptors: opened
    fds = open_fds(worker)
    pidfile = tmp_path / "pids"
    c = ScriptClient(d, cgi_dir)
    c.run("t/sleep.py", query=f"pidfile={pidfile}&headers=1")
    c.events(lambda evs: any(isinstance(e, ev.StdoutData) for e in evs))
    c.sock.close()                       # nginx's way: no ABORT_REQUEST
    wait_no_scripts(worker)
    d.wait_for_log(r"client went away; process group killed")
    deadline = time.monotonic() + 5
    while open_fds(worker) > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(worker) <= fds


def test_sigterm_lets_a_running_script_finish(scripts, cgi_dir):
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    rid = c.run("t/wait.sh", query="1")
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGTERM)
    status, _, body, _, _ = c.response(rid)
    assert (status, body) == (200, b"waited 1\n")
    assert d.proc.wait(30) == 0


# --- sockets: allow-list, inherited sockets, spawn-fcgi, socket activation ---

def _tcp_client_closed(d: FcgiDaemon) -> bool:
    sock = d.connect()
    sock.sendall(r.encode_begin_request(1) + r.encode_record(r.PARAMS, 1) + r.encode_record(r.STDIN, 1))
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


@pytest.mark.parametrize("mode", ["--cgi-dir", "--app"])
def test_allowed_clients(fcgi, cgi_dir, mode):
    what = ["--cgi-dir", str(cgi_dir)] if mode == "--cgi-dir" else ["--app", "tests.peers.wsgi_apps:router"]
    d = fcgi(*what, "--workers", "1", "--bind", "127.0.0.1:0", "--allowed-clients", "10.0.0.0/8,192.0.2.1")
    assert _tcp_client_closed(d)
    d.wait_for_log(r"fastcgi connection from 127\.0\.0\.1:\d+ refused: not in \[fcgi\] allowed_clients")
    ok = fcgi(*what, "--workers", "1", "--bind", "127.0.0.1:0")      # loopback is allowed by default
    assert not _tcp_client_closed(ok)


def test_bad_allowed_clients_entry_is_a_config_error(cgi_dir):
    result = subprocess.run([sys.executable, "-m", "cgigate", "fcgi", "--cgi-dir", str(cgi_dir),
                             "--allowed-clients", "10.0.0.0/33"], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "--allowed-clients" in result.stderr and "10.0.0.0/33" in result.stderr


def _start_with_socket(cgi_dir, tmp_path, wrapper: list[str], args: list[str]):
    listener = socket.socket(socket.AF_UNIX)
    path = str(tmp_path / "inherited.sock")
    listener.bind(path)
    listener.listen(16)
    log = tmp_path / "error.log"
    proc = subprocess.Popen([*wrapper, sys.executable, "-m", "cgigate", "fcgi", "--cgi-dir", str(cgi_dir),
                             "--workers", "1", "--error-log", str(log), *args],
                            cwd=ROOT, pass_fds=(listener.fileno(),), env=dict(os.environ, FD=str(listener.fileno())))
    listener.close()                     # only the daemon holds it now
    return proc, path, log


def _cgi_fcgi(path: str, cgi_dir, name: str = "hello.sh") -> bytes:
    """What cgi-fcgi gets for a GET of `name`, retried until the daemon listens."""
    tool = require_program("cgi-fcgi")
    env = {"REQUEST_METHOD": "GET", "SCRIPT_FILENAME": str(cgi_dir / name), "QUERY_STRING": ""}
    deadline = time.monotonic() + 15
    while True:
        result = subprocess.run([tool, "-bind", "-connect", path], capture_output=True, env=env, timeout=30)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result.stdout
        time.sleep(0.1)


def _stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_inherited_socket_fd_bind(cgi_dir, tmp_path):
    proc, path, log = _start_with_socket(cgi_dir, tmp_path, ["sh", "-c", 'exec "$@" --bind fd:$FD', "sh"], [])
    try:
        assert _cgi_fcgi(path, cgi_dir).endswith(b"Hello, world!\n"), log.read_text()
    finally:
        assert _stop(proc) == 0
    assert os.path.exists(path)          # an inherited socket is not ours to remove


def test_systemd_socket_activation(cgi_dir, tmp_path):
    # what systemd does: the socket as fd 3, LISTEN_PID naming the daemon itself
    wrapper = [sys.executable, "-c", "import os, sys; os.dup2(int(os.environ['FD']), 3); "
               "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
               "os.execv(sys.argv[1], sys.argv[1:])"]
    proc, path, log = _start_with_socket(cgi_dir, tmp_path, wrapper, ["--bind", f"unix:{tmp_path}/unused.sock"])
    try:
        assert _cgi_fcgi(path, cgi_dir).endswith(b"Hello, world!\n"), log.read_text()
        assert not os.path.exists(tmp_path / "unused.sock")
        env = env_of(_cgi_fcgi(path, cgi_dir, "env.sh"))
        assert "LISTEN_FDS" not in env and "LISTEN_PID" not in env
    finally:
        assert _stop(proc) == 0


def test_fd_0_that_is_not_a_socket_is_refused_with_a_message(cgi_dir):
    result = subprocess.run([sys.executable, "-m", "cgigate", "fcgi", "--cgi-dir", str(cgi_dir), "--bind", "fd:0"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "fd:0 is not a socket" in result.stderr


def test_spawn_fcgi(cgi_dir, tmp_path):
    tool = require_program("spawn-fcgi")
    path = str(tmp_path / "spawned.sock")
    log = tmp_path / "error.log"
    proc = subprocess.Popen([tool, "-n", "-s", path, "--", sys.executable, "-m", "cgigate", "fcgi",
                             "--cgi-dir", str(cgi_dir), "--bind", "fd:0", "--workers", "1",
                             "--error-log", str(log)], cwd=ROOT)
    try:
        assert _cgi_fcgi(path, cgi_dir).endswith(b"Hello, world!\n"), log.exists() and log.read_text()
    finally:
        assert _stop(proc) == 0


def test_libfcgi_cgi_fcgi_post(scripts, cgi_dir):
    tool = require_program("cgi-fcgi")
    d = scripts("--workers", "1")
    env = {"REQUEST_METHOD": "POST", "SCRIPT_FILENAME": str(cgi_dir / "echo.py"), "CONTENT_LENGTH": "11",
           "QUERY_STRING": ""}
    result = subprocess.run([tool, "-bind", "-connect", d.address[5:]], input=b"hello world",
                            capture_output=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Status: 200 OK\r\n") and result.stdout.endswith(b"\r\n\r\nhello world")


def test_no_zombies_or_fd_leaks_after_many_requests(scripts, cgi_dir):
    d = scripts("--workers", "1")
    worker = only_worker(d)
    c = ScriptClient(d, cgi_dir)
    assert c.call("hello.sh")[0] == 200
    fds = open_fds(worker)
    for _ in range(10):
        rids = [c.run(name) for name in ("hello.sh", "t/stderr.sh", "t/noheaders.sh", "nph-hello.sh")]
        for rid in rids:
            c.response(rid)
    wait_no_scripts(worker)
    assert open_fds(worker) <= fds


def test_resource_limits_apply_to_scripts(fcgi, cgi_dir, tmp_path):
    conf = tmp_path / "limits.toml"
    conf.write_text("[cgi]\nlimit_open_files = 37\nlimit_address_space = \"512M\"\nlimit_cpu_seconds = 7\n")
    d = fcgi("-c", str(conf), "--cgi-dir", str(cgi_dir), "--workers", "1")
    status, _, body, _, _ = ScriptClient(d, cgi_dir).call("t/rlimits.sh")
    assert (status, body) == (200, b"nofile=37 as=524288 cpu=7\n")


def test_unix_socket_mode_and_group(fcgi, cgi_dir):
    import grp
    daemon_gid = grp.getgrnam("daemon").gr_gid
    d = fcgi("--cgi-dir", str(cgi_dir), "--workers", "1", "--socket-mode", "0606", "--socket-group", "daemon")
    info = os.stat(d.address[5:])
    assert (info.st_mode & 0o777, info.st_gid) == (0o606, daemon_gid)
    bad = subprocess.run([sys.executable, "-m", "cgigate", "fcgi", "--cgi-dir", str(cgi_dir), "--socket-group",
                          "no-such-group-here", "--bind", f"unix:{cgi_dir}/x.sock"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "no-such-group-here" in bad.stderr


def test_a_refused_request_does_not_keep_the_connection_open(fcgi, cgi_dir, tmp_path):
    conf = tmp_path / "idle.toml"
    conf.write_text("[fcgi]\nidle_timeout = 1\n")
    d = fcgi("-c", str(conf), "--cgi-dir", str(cgi_dir), "--workers", "1")
    c = ScriptClient(d, cgi_dir)
    _, _, _, _, end = c.call("env.sh", params=[(b"HTTP_BIG", b"x" * (1 << 20))])
    assert end.protocol_status == r.OVERLOADED
    c.events(lambda evs: False, timeout=6, must=False)
    assert c.closed                        # idle again, so closed after idle_timeout


def test_hidden_names_and_newlines_in_param_names(scripts, cgi_dir):
    (cgi_dir / ".hidden.sh").symlink_to(cgi_dir / "env.sh")
    d = scripts("--workers", "1")
    c = ScriptClient(d, cgi_dir)
    assert c.call(".hidden.sh")[0] == 404
    status, _, body, _, _ = c.call("env.sh", params=[(b"HTTP_X\n", b"1"), (b"HTTP_OK", b"2")])
    assert status == 200 and b"HTTP_OK=2" in body and b"HTTP_X" not in body


def test_stderr_copy_is_dropped_while_the_web_server_does_not_read(scripts, cgi_dir):
    (cgi_dir / "noisy.sh").write_text("#!/bin/sh\nhead -c 30000000 /dev/zero | tr '\\0' 'e' >&2\n"
                                      "printf 'Content-Type: text/plain\\r\\n\\r\\ndone\\n'\n")
    (cgi_dir / "noisy.sh").chmod(0o755)
    d = scripts("--workers", "1")
    worker = only_worker(d)
    c = ScriptClient(d, cgi_dir)
    before = rss_kib(worker)
    rid = c.run("noisy.sh")
    d.wait_for_log(r"web server not reading: stderr no longer copied", timeout=20)
    growth = rss_kib(worker) - before
    c.events(lambda evs: any(isinstance(e, ev.EndRequest) for e in evs), timeout=60)
    assert b"done\n" in b"".join(e.data for e in c.pending if isinstance(e, ev.StdoutData))
    assert growth < 32 * 1024, f"worker RSS grew by {growth} KiB while 30 MB of stderr went unread"


def test_web_server_leaving_while_the_input_is_paused_kills_the_script(scripts, cgi_dir, tmp_path):
    (cgi_dir / "nap.sh").write_text("#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nnap\\n'\nsleep 30\n")
    (cgi_dir / "nap.sh").chmod(0o755)
    d = scripts("--workers", "1", "--timeout", "60")
    worker = only_worker(d)
    c = ScriptClient(d, cgi_dir)
    rid = c.run("nap.sh", method="POST", send_body=False, params=[(b"CONTENT_LENGTH", b"4000000")])
    c.sock.settimeout(2)
    try:
        for _ in range(8):                  # until the worker stops reading (the script never does)
            c.send(c.conn.send_stdin(rid, b"x" * 65535 * 4))
    except (socket.timeout, TimeoutError):
        pass
    c.sock.close()
    d.wait_for_log(r"closed by the web server while its input was paused", timeout=10)
    wait_no_scripts(worker)
