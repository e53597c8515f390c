"""End to end: a real nginx, running the shipped conf/nginx/ files, in front of
real `cgigate fcgi` processes (a WSGI app, CGI scripts, two instances behind a
load balancer).  The files are rendered by tests/nginx.py with a free port,
temp socket paths and a temp document root, nothing else changed, so these
tests are what proves the files a user copies work.

nginx's and cgigate's logs are printed at teardown: pytest shows them for a
failed test.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, SAMPLE_CGI_BIN, TEST_CGI_BIN, children_of
from nginx import CONF_DIR, Nginx, require_nginx

APP = "tests.peers.nginx_apps:app"
MiB = 1024 * 1024


# --- helpers ---

def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat and stat[2] == pgid and stat[0] != "Z":
                found.append(int(entry))
    return found


def wait_for(predicate, timeout: float, message) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(0.05)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def big_body(size: int) -> bytes:
    """What tests/peers/nginx_apps.py's /big?SIZE and the big.py CGI fixture send."""
    return random.Random(size).randbytes(size)


class Cgigate:
    """`python -m cgigate fcgi ARGS --bind unix:SOCKET` in a session of its own
    (so the whole instance, supervisor and workers, can be SIGKILLed with killpg)."""

    def __init__(self, args: list[str], sock: str, log: Path, workers: int = 2):
        self.socket = sock
        self.log_path = log
        self.stderr_path = log.with_suffix(".stderr")
        command = [sys.executable, "-m", "cgigate", "fcgi", *args, "--workers", str(workers),
                   "--bind", f"unix:{sock}", "--error-log", str(log), "--graceful-timeout", "5"]
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr, start_new_session=True,
                                         env=dict(os.environ, CGIGATE_TEST_MARKERS=str(log.parent)))
        try:
            self._wait_ready(workers)
        except BaseException:
            self.cleanup()
            raise

    def _wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cgigate fcgi exited with {self.proc.returncode}:\n{self.report()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cgigate fcgi did not listen on {self.socket} within 15s:\n{self.report()}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.socket)
                break
            except OSError:
                time.sleep(0.02)
        wait_for(lambda: len(self.workers()) >= workers, 15,
                 lambda: f"cgigate started {self.workers()} of {workers} workers:\n{self.report()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[int]:
        return [pid for pid, state in children_of(self.pid) if state != "Z"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def report(self, tail: int = 60) -> str:
        parts = []
        for path in (self.log_path, self.stderr_path):
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail:]
            except FileNotFoundError:
                continue
            if lines:
                parts.append(f"--- cgigate {path.name}:\n" + "\n".join(lines))
        return "\n".join(parts)

    def kill_group(self) -> None:
        """SIGKILL the supervisor and its workers at once; returns when all are gone."""
        workers = self.workers()
        os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        wait_for(lambda: not any(proc_stat(w) and proc_stat(w)[0] != "Z" for w in workers), 10,
                 f"workers {workers} survived SIGKILL")

    def stop(self) -> None:
        """SIGTERM: expects exit status 0 and no worker left behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"cgigate did not stop within 20s of SIGTERM:\n{self.report()}")
            assert self.proc.returncode == 0, f"cgigate exited {self.proc.returncode}:\n{self.report()}"
            wait_for(lambda: not group_members(self.pid), 5,
                     lambda: f"cgigate exited, its processes {group_members(self.pid)} did not")

    def cleanup(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Stack:
    """nginx plus the cgigate instances behind it; `close()` stops all of them."""

    def __init__(self, ng: Nginx):
        self.ng = ng
        self.instances: list[Cgigate] = []

    def cgigate(self, args: list[str], sock_as_in_conf: str, name: str, **kw) -> Cgigate:
        c = Cgigate(args, self.ng.local(sock_as_in_conf), self.ng.dir.parent / f"{name}.log", **kw)
        self.instances.append(c)
        return c

    def url(self, path: str) -> str:
        return self.ng.url(path)

    def close(self) -> None:
        """nginx first (it holds keep-alive connections to cgigate), then each cgigate."""
        errors = []
        try:
            self.ng.stop(timeout=5)
        except Exception as e:          # pragma: no cover - reported below
            errors.append(f"stopping nginx: {e}")
        for c in self.instances:
            try:
                c.stop()
            except AssertionError as e:
                errors.append(str(e))
            finally:
                c.cleanup()
        print(self.ng.report())
        for c in self.instances:
            print(c.report())
        assert not errors, "\n".join(errors)


@pytest.fixture
def stack(tmp_path):
    """Factory: stack(conf_name) renders conf/nginx/CONF_NAME (not started yet)."""
    require_nginx()
    made: list[Stack] = []

    def make(conf: str) -> Stack:
        s = Stack(Nginx(conf, tmp_path / ("nginx" + (str(len(made)) if made else ""))))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# --- the shipped files are valid nginx configuration ---

@pytest.mark.parametrize("conf", sorted(p.name for p in CONF_DIR.glob("*.conf")))
def test_conf_file_passes_nginx_t(tmp_path, conf):
    """`nginx -t` on each shipped file as a test renders it."""
    binary = require_nginx()
    ng = Nginx(conf, tmp_path)
    try:
        ng.port = 8080
        ng.write()
        result = subprocess.run([binary, "-t", "-c", str(ng.conf_path), "-e", str(ng.early_log_path),
                                 "-p", f"{ng.dir}/"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "test is successful" in result.stderr
        assert ng.unix_sockets(), "every shipped file passes requests to a cgigate unix socket"
    finally:
        ng.stop()


# --- a WSGI application: wsgi-app.conf ---

STATIC_CSS = b"body { color: #123456 }\n" * 100


@pytest.fixture
def wsgi(stack):
    s = stack("wsgi-app.conf")
    static = s.ng.docroot / "app" / "static"
    static.mkdir(parents=True)
    (static / "site.css").write_bytes(STATIC_CSS)
    s.app = s.cgigate(["--app", APP, "--log-level", "debug"], "/run/cgigate/app.sock", "app")
    s.ng.start()
    return s


def test_wsgi_get(wsgi):
    r = requests.get(wsgi.url("/environ?a=1&b=%20"), headers={"X-Test": "yes"}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    environ = r.json()
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["PATH_INFO"] == "/environ" and environ["SCRIPT_NAME"] == ""
    assert environ["QUERY_STRING"] == "a=1&b=%20"
    assert environ["REQUEST_URI"] == "/environ?a=1&b=%20"
    assert environ["HTTP_X_TEST"] == "yes"
    assert environ["SERVER_SOFTWARE"].startswith("nginx/")
    assert environ["SERVER_PORT"] == str(wsgi.ng.port)
    # and a path the app does not know: its own 404, through nginx
    r = requests.get(wsgi.url("/nowhere"), timeout=10)
    assert r.status_code == 404 and r.text == "no such path\n"


def test_wsgi_post_large_body(wsgi):
    """20 MB up and back.  /slurp reads the whole body before answering: nginx
    stops sending a request body as soon as the response header has come
    (ngx_http_upstream_send_request_handler: `u->header_sent &&
    !u->conf->preserve_output`), so an app echoing while it reads stalls."""
    body = os.urandom(20 * MiB)
    try:
        r = requests.post(wsgi.url("/slurp"), data=body, timeout=10,
                          headers={"Content-Type": "application/octet-stream"})
    except requests.RequestException as e:
        pytest.fail(f"no complete answer to a 20 MB POST: {e!r}")
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(body)
    assert len(r.content) == len(body) and sha256(r.content) == sha256(body)


def test_wsgi_large_response(wsgi):
    size = 10 * MiB + 7
    r = requests.get(wsgi.url(f"/big?{size}"), timeout=60)
    assert r.status_code == 200
    assert len(r.content) == size and sha256(r.content) == sha256(big_body(size))


def test_wsgi_keepalive_between_nginx_and_cgigate(wsgi):
    """fastcgi_keep_conn on + upstream keepalive: nginx reuses its connection to cgigate."""
    opened = "fastcgi connection opened"
    before = wsgi.app.log().count(opened)
    seen: set[int] = set()
    with requests.Session() as client:
        for _ in range(50):
            r = client.get(wsgi.url("/sockets"), timeout=10)
            assert r.status_code == 200
            seen.update(r.json()["sockets"])
    # Seen from inside the workers: the sockets they hold open while answering
    # (the shared listening socket plus the connection the request came on).
    # Without keep-alive every request shows a new connection: 50 of them.
    assert len(seen) <= 3, f"{len(seen)} different sockets over 50 requests: {sorted(seen)}"
    # Seen by cgigate: one debug line per accepted connection.  The readiness
    # probe of the fixture may be counted here too.
    log = wsgi.app.log()
    new = log.count(opened) - before
    assert 1 <= new <= 2, f"{new} FastCGI connections opened for 50 requests:\n{log[-3000:]}"


def test_static_files_served_by_nginx(wsgi):
    r = requests.get(wsgi.url("/static/site.css"), timeout=10)
    assert r.status_code == 200 and r.content == STATIC_CSS
    assert r.headers["Content-Type"] == "text/css"          # nginx's mime.types
    assert "Expires" in r.headers
    # a missing static file: nginx's own 404, the app (whose 404 says "no such path") never asked
    r = requests.get(wsgi.url("/static/missing.css"), timeout=10)
    assert r.status_code == 404
    assert "no such path" not in r.text and "nginx" in r.text


# --- CGI scripts: cgi-scripts.conf ---

BIG_CGI = """#!{python}
import random, sys
size = {size}
body = random.Random(size).randbytes(size)
sys.stdout.buffer.write(b"Content-Type: application/octet-stream\\r\\nContent-Length: %d\\r\\n\\r\\n" % size)
sys.stdout.buffer.write(body)
"""

PARTIAL_CGI = """#!/bin/sh
# begins its answer, then hangs
printf 'Content-Type: text/plain\\r\\n\\r\\npartial answer\\n'
sleep 30
printf 'the rest\\n'
"""

SLEEPER_CGI = """#!/bin/sh
# starts a child, records both pids, then waits far past any timeout
sleep 30 &
echo "$$ $!" > {pidfile}
wait
printf 'Content-Type: text/plain\\r\\n\\r\\nwoke up\\n'
"""

BIG_CGI_SIZE = 10 * MiB + 3
PLAIN = "cgi.example.org"           # the two server blocks of cgi-scripts.conf
SPLIT = "pathinfo.example.org"


def cgi_stack(stack, tmp_path, timeout: int = 5) -> Stack:
    s = stack("cgi-scripts.conf")
    cgi_dir = Path(s.ng.local("/srv/www/cgi-bin"))
    shutil.copytree(SAMPLE_CGI_BIN, cgi_dir)
    shutil.copytree(TEST_CGI_BIN, cgi_dir, dirs_exist_ok=True)
    big = cgi_dir / "big.py"
    big.write_text(BIG_CGI.format(python=sys.executable, size=BIG_CGI_SIZE))
    s.pidfile = tmp_path / "sleeper.pids"
    sleeper = cgi_dir / "sleeper.sh"
    sleeper.write_text(SLEEPER_CGI.format(pidfile=s.pidfile))
    partial = cgi_dir / "partial.sh"
    partial.write_text(PARTIAL_CGI)
    for script in (big, sleeper, partial):
        script.chmod(0o755)
    s.cgi_dir = cgi_dir
    s.cgi = s.cgigate(["--cgi-dir", str(cgi_dir), "--timeout", str(timeout), "--log-level", "debug"],
                      "/run/cgigate/cgi.sock", "cgi")
    s.ng.start()
    return s


@pytest.fixture
def cgi(stack, tmp_path):
    return cgi_stack(stack, tmp_path)


def get(s: Stack, path: str, host: str = PLAIN, **kw) -> requests.Response:
    return requests.get(s.url(path), headers={"Host": host}, timeout=kw.pop("timeout", 20), **kw)


def env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_cgi_get(cgi):
    r = get(cgi, "/cgi-bin/hello.sh")
    assert r.status_code == 200, r.text
    assert r.text == "Hello, world!\n" and r.headers["Content-Type"] == "text/plain"


def test_cgi_post_large_body(cgi):
    """20 MB through echo.py, which sends its header first, then copies stdin to
    stdout as it reads.  nginx stops sending the request body once the response
    header has arrived (see test_wsgi_post_large_body), so this passes only if
    cgigate takes in the whole body before the script's output goes out."""
    body = os.urandom(20 * MiB)
    try:
        r = requests.post(cgi.url("/cgi-bin/echo.py"), data=body, timeout=10,
                          headers={"Host": PLAIN, "Content-Type": "application/octet-stream"})
    except requests.RequestException as e:
        pytest.fail(f"the echoed body did not come back complete: {e!r}")
    assert r.status_code == 200, r.text[:500]
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert len(r.content) == len(body) and sha256(r.content) == sha256(body)


def test_cgi_large_response(cgi):
    r = get(cgi, "/cgi-bin/big.py", timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert len(r.content) == BIG_CGI_SIZE and sha256(r.content) == sha256(big_body(BIG_CGI_SIZE))


@pytest.mark.parametrize("host", [PLAIN, SPLIT])
def test_cgi_path_info(cgi, host):
    """Plain: nginx sends SCRIPT_FILENAME .../cgi-bin/env.sh/extra/path and no
    PATH_INFO, cgigate walks up to env.sh.  Split: nginx sends both parts."""
    r = get(cgi, "/cgi-bin/env.sh/extra/path?q=1", host=host)
    assert r.status_code == 200, r.text
    env = env_lines(r.text)
    assert env["SCRIPT_NAME"] == "/cgi-bin/env.sh"
    assert env["PATH_INFO"] == "/extra/path"
    assert env["QUERY_STRING"] == "q=1"
    assert env["REQUEST_URI"] == "/cgi-bin/env.sh/extra/path?q=1"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"
    if host == SPLIT:
        assert env["SCRIPT_FILENAME"] == str(cgi.cgi_dir / "env.sh")
    # and without a path after the script
    env = env_lines(get(cgi, "/cgi-bin/env.sh", host=host).text)
    assert env["SCRIPT_NAME"] == "/cgi-bin/env.sh" and env.get("PATH_INFO", "") == ""


@pytest.mark.parametrize("host", [PLAIN, SPLIT])
@pytest.mark.parametrize("path", ["/cgi-bin/env.sh/foo%0abar", "/cgi-bin/env.sh%0a/foo",
                                  "/cgi-bin/env.sh/foo%0d%0aX-Injected:%20yes"])
def test_cgi_newline_in_path(cgi, host, path):
    """CVE-2019-11043's request: the split regex fails on %0a, PATH_INFO is empty,
    SCRIPT_FILENAME holds the newline.  cgigate answers 400 and runs nothing; the
    client's connection to nginx goes on working."""
    conn = http.client.HTTPConnection("127.0.0.1", cgi.ng.port, timeout=20)
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 400, (r.status, body[:500])
        assert b"GATEWAY_INTERFACE" not in body and r.getheader("X-Injected") is None
        conn.request("GET", "/cgi-bin/env.sh/after", headers={"Host": host})
        r = conn.getresponse()
        body = r.read().decode()
        assert r.status == 200, body
        assert env_lines(body)["PATH_INFO"] == "/after"
    finally:
        conn.close()


def test_cgi_timeout_kills_the_process_group(stack, tmp_path):
    s = cgi_stack(stack, tmp_path, timeout=1)
    # The client's timeout is the bound: nginx's own fastcgi_read_timeout (60s)
    # must not be what ends the request; cgigate's 1s timeout must.
    r = get(s, "/cgi-bin/sleeper.sh", timeout=10)
    assert r.status_code == 504, r.text
    assert "woke up" not in r.text
    shell, child = map(int, s.pidfile.read_text().split())
    wait_for(lambda: not group_members(shell), 10,
             lambda: f"the script's process group {shell} is still there: {group_members(shell)}")
    # reaped, too: no child (not even a zombie) left under any worker
    wait_for(lambda: not any(children_of(w) for w in s.cgi.workers()), 10,
             lambda: f"cgigate workers still have children: {[children_of(w) for w in s.cgi.workers()]}")
    for pid in (shell, child):
        stat = proc_stat(pid)
        assert stat is None or stat[0] == "Z", (pid, stat)     # a zombie of init's, if any
    # the next request is served normally
    r = get(s, "/cgi-bin/hello.sh")
    assert r.status_code == 200 and r.text == "Hello, world!\n"


def test_cgi_response_cut_at_timeout_is_not_complete(stack, tmp_path):
    """A script killed after it began answering: cgigate closes the FastCGI
    connection without END_REQUEST; with fastcgi_keep_conn on, nginx cuts the
    client's chunked response too (no last chunk) instead of completing it."""
    s = cgi_stack(stack, tmp_path, timeout=1)
    with socket.create_connection(("127.0.0.1", s.ng.port), timeout=10) as client:
        client.sendall(f"GET /cgi-bin/partial.sh HTTP/1.1\r\nHost: {PLAIN}\r\n\r\n".encode())
        data = b""
        # until nginx closes the connection (or, wrongly, ends the response)
        while not data.endswith(b"\r\n0\r\n\r\n") and (chunk := client.recv(65536)):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data
    assert b"Transfer-Encoding: chunked" in head, head
    assert b"partial answer" in body and b"the rest" not in body
    assert not body.endswith(b"0\r\n\r\n"), f"nginx finished a response cgigate cut: {body!r}"
    wait_for(lambda: "prematurely closed" in s.ng.error_log(), 5, s.ng.report)


def test_cgi_keepalive_between_nginx_and_cgigate(cgi):
    opened = "fastcgi connection opened"
    before = cgi.cgi.log().count(opened)
    with requests.Session() as client:
        for _ in range(20):
            r = client.get(cgi.url("/cgi-bin/hello.sh"), headers={"Host": PLAIN}, timeout=10)
            assert r.status_code == 200 and r.text == "Hello, world!\n"
    new = cgi.cgi.log().count(opened) - before
    assert 1 <= new <= 2, f"{new} FastCGI connections opened for 20 requests:\n{cgi.cgi.log()[-3000:]}"


@pytest.mark.parametrize("host", [PLAIN, SPLIT])
def test_cgi_local_redirect_served_by_nginx(cgi, host):
    """redirect.sh?local prints only `Location: /cgi-bin/hello.sh`; cgigate adds
    X-Accel-Redirect, nginx serves /cgi-bin/hello.sh in its place."""
    r = get(cgi, "/cgi-bin/redirect.sh?local", host=host, allow_redirects=False)
    assert r.status_code == 200, (r.status_code, r.headers, r.text)
    assert r.text == "Hello, world!\n"
    assert "Location" not in r.headers and "X-Accel-Redirect" not in r.headers
    # one request as far as the client is concerned, logged as the original URI
    wait_for(lambda: "redirect.sh?local" in cgi.ng.access_log(), 5, cgi.ng.access_log)
    line = next(l for l in cgi.ng.access_log().splitlines() if "redirect.sh?local" in l)
    assert '" 200 ' in line


def test_cgi_client_redirect_passed_through(cgi):
    """An absolute Location is the client's business: a 302, not an internal redirect."""
    r = get(cgi, "/cgi-bin/redirect.sh", allow_redirects=False)
    assert r.status_code == 302, (r.status_code, r.headers, r.text)
    assert r.headers["Location"].startswith("http://")
    assert r.headers["Location"].endswith("/cgi-bin/hello.sh")
    assert "X-Accel-Redirect" not in r.headers


# --- two instances behind load-balanced.conf ---

def test_failover_when_an_instance_is_killed(stack):
    s = stack("load-balanced.conf")
    first = s.cgigate(["--app", APP], "/run/cgigate/app1.sock", "app1")
    second = s.cgigate(["--app", APP], "/run/cgigate/app2.sock", "app2")
    s.ng.start()
    first_workers, second_workers = set(first.workers()), set(second.workers())

    threads, per_thread, kill_after = 4, 100, 120
    results: list[tuple[float, int | str, int | None]] = []     # (start time, status or error, pid)
    lock = threading.Lock()
    halfway = threading.Event()

    def client():
        with requests.Session() as session:
            for _ in range(per_thread):
                started = time.monotonic()
                try:
                    r = session.get(s.url("/pid"), timeout=20)
                    outcome, pid = r.status_code, (r.json()["pid"] if r.status_code == 200 else None)
                except Exception as e:
                    outcome, pid = f"{type(e).__name__}: {e}", None
                with lock:
                    results.append((started, outcome, pid))
                    if len(results) >= kill_after:
                        halfway.set()

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    try:
        assert halfway.wait(30), "the clients did not get going"
        first.kill_group()
        killed_at = time.monotonic()
    finally:
        for t in pool:
            t.join(60)

    failed = [r for r in results if r[1] != 200]
    assert len(results) == threads * per_thread
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:5]}\n{s.ng.report()}"
    before = [pid for started, _, pid in results if started < killed_at]
    after = [pid for started, _, pid in results if started > killed_at]
    assert set(before) & first_workers, "the killed instance served nothing before: nothing was tested"
    assert after, "no request after the kill: nothing was tested"
    assert set(after) <= second_workers, set(after) - second_workers

    # nginx saw the failures and went to the other instance
    assert re.search(r"\[(error|crit)\].*app1\.sock", s.ng.error_log()), s.ng.report()
    # afterwards: everything answers, from the survivor
    with requests.Session() as session:
        for _ in range(20):
            r = session.get(s.url("/pid"), timeout=10)
            assert r.status_code == 200 and r.json()["pid"] in second_workers
