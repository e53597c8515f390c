"""The front multiplexing HTTP onto FastCGI: `serve --app` (its own worker pool)
and `serve --fastcgi` (flup, an external responder), over real sockets."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import requests

from conftest import ROOT, SAMPLE_CGI_BIN, children_of, rss_kib

FLUP_APP = os.path.join(ROOT, "tests", "peers", "flup_app.py")


def descendants(pid: int) -> list[int]:
    found = []
    for child, _ in children_of(pid):
        found += [child, *descendants(child)]
    return found


def test_app_route_cgi_side_by_side(daemon):
    d = daemon("--cgi-dir", SAMPLE_CGI_BIN, "--app", "tests.peers.wsgi_apps:router", "--app-prefix", "/app/",
               "--workers", "2")
    r = requests.get(f"{d.url}/app/environ?x=1", headers={"X-Test": "v"})
    environ = r.json()
    assert r.status_code == 200
    assert environ["SCRIPT_NAME"] == "/app" and environ["PATH_INFO"] == "/environ"
    assert environ["QUERY_STRING"] == "x=1" and environ["HTTP_X_TEST"] == "v"
    assert environ["SERVER_PORT"] == str(d.port) and environ["REMOTE_ADDR"] == "127.0.0.1"
    assert requests.get(f"{d.url}/cgi-bin/hello.sh").text == "Hello, world!\n"
    d.wait_for_log(r'"GET /app/environ\?x=1 HTTP/1.1" 200 \d+ .* app:tests.peers.wsgi_apps:router rid=',
                   access=True)


def test_app_errors_and_stderr_reach_the_log(daemon):
    d = daemon("--app", "tests.peers.wsgi_apps:router", "--workers", "1")
    assert requests.get(f"{d.url}/fail").status_code == 500
    assert requests.get(f"{d.url}/stderr").text == "ok"
    d.wait_for_log(r"rid=\S+ fastcgi=unix:\S+ stderr: a line for the log")
    assert requests.get(f"{d.url}/pid").status_code == 200


def test_app_100_mb_each_way_with_bounded_memory(daemon):
    d = daemon("--app", "tests.peers.wsgi_apps:router", "--workers", "1")
    size = 100 * 1024 * 1024
    block = os.urandom(1 << 20)
    expected = hashlib.sha256()
    for _ in range(100):
        expected.update(block)
    requests.post(f"{d.url}/echo", data=block)      # warm up
    before = rss_kib(d.pid)
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(d.pid))
            time.sleep(0.01)
    sampler = threading.Thread(target=sample)
    sampler.start()
    sock = d.connect()
    sock.settimeout(60)

    def send():   # the body goes out while the echo comes back: neither side may wait for the other
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        for _ in range(100):
            sock.sendall(block)
    sender = threading.Thread(target=send)
    sender.start()
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    head, _, rest = head.partition(b"\r\n\r\n")
    got = hashlib.sha256(rest)
    total = len(rest)
    while chunk := sock.recv(1 << 20):
        got.update(chunk)
        total += len(chunk)
    sender.join()
    sock.close()
    done.set()
    sampler.join()
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % size in head
    assert total == size and got.hexdigest() == expected.hexdigest()
    assert (peak[0] - before) < 16 * 1024, f"front RSS grew by {(peak[0] - before) / 1024:.1f} MB"


def test_client_going_away_aborts_the_app_request(daemon):
    d = daemon("--app", "tests.peers.wsgi_apps:router", "--workers", "1", "--threads", "2")
    sock = d.connect()
    sock.sendall(b"GET /slow?2 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    sock.close()
    # the pool stays usable, on a multiplexed connection that was sent ABORT_REQUEST
    for _ in range(5):
        assert requests.get(f"{d.url}/pid", timeout=10).status_code == 200


def test_dead_app_worker_means_502_then_recovery(daemon):
    d = daemon("--app", "tests.peers.wsgi_apps:router", "--workers", "1")
    worker_pid = requests.get(f"{d.url}/pid").json()["pid"]
    sock = d.connect()
    # a POST: an idempotent GET would be retried once on a fresh connection, as nginx does
    sock.sendall(b"POST /slow?5 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    time.sleep(0.5)
    os.kill(worker_pid, signal.SIGKILL)
    sock.settimeout(10)
    reply = sock.recv(65536)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 502")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:      # the app's supervisor replaces the worker
        r = requests.get(f"{d.url}/pid", timeout=10)
        if r.status_code == 200:
            assert r.json()["pid"] != worker_pid
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the app never came back")


def test_stopping_the_front_stops_its_app_workers(daemon):
    d = daemon("--app", "tests.peers.wsgi_apps:router", "--workers", "2")
    assert requests.get(f"{d.url}/pid").status_code == 200
    everyone = descendants(d.pid)
    assert len(everyone) >= 3     # the app supervisor and its two workers
    assert d.stop() == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in everyone):
        time.sleep(0.05)
    assert not [p for p in everyone if os.path.exists(f"/proc/{p}")]


def test_external_flup_behind_the_front(daemon, tmp_path):
    sock_path = str(tmp_path / "flup.sock")
    flup = subprocess.Popen([sys.executable, FLUP_APP, sock_path])
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        d = daemon("--fastcgi", f"unix:{sock_path}", "--fastcgi-prefix", "/flup/", "--cgi-dir", SAMPLE_CGI_BIN)
        r = requests.get(f"{d.url}/flup/environ?q=1")
        assert r.status_code == 200 and r.json()["QUERY_STRING"] == "q=1"
        assert r.json()["SCRIPT_NAME"] == "/flup"
        body = os.urandom(2 * 1024 * 1024)
        assert requests.post(f"{d.url}/flup/echo", data=body).content == body
        for _ in range(20):
            assert requests.get(f"{d.url}/flup/environ").status_code == 200
        d.wait_for_log(r"fastcgi=unix:\S+flup.sock does not multiplex")
        assert requests.get(f"{d.url}/cgi-bin/hello.sh").text == "Hello, world!\n"
    finally:
        flup.kill()      # flup's threaded server waits for its threads on SIGTERM
        flup.wait(10)


def test_external_responder_down_is_502(daemon, tmp_path):
    d = daemon("--fastcgi", f"unix:{tmp_path}/nobody-here.sock")
    assert requests.get(f"{d.url}/x").status_code == 502
    d.wait_for_log(r"-> 502: .*nobody-here.sock")
