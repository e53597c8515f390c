"""The status page, ping and Prometheus text, against a real front and pool."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import ROOT, TEST_CGI_BIN, require_program
from test_pool import Load, supervisor_of, wait_workers

APP = "tests.peers.pool_app:app"
METRIC_LINE = re.compile(r'cgigate_[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? -?[0-9.e+]+')


@pytest.fixture
def front(daemon, tmp_path):
    def start(status_allow='["127.0.0.1", "::1"]', fcgi="", queue_size=256, workers=2):
        config = tmp_path / "cgigate.toml"
        config.write_text(f"""
[status]
path = "/status"
ping_path = "/ping"
allow = {status_allow}

[fcgi]
slow_request_timeout = 0.3
{fcgi}

[[route]]
prefix = "/app/"
app = "{APP}"
workers = {workers}
queue_size = {queue_size}

[[route]]
prefix = "/t/"
cgi_dir = "{TEST_CGI_BIN}"
timeout = 1
""")
        d = daemon("-c", str(config), env={"POOL_APP_DIR": str(tmp_path)})
        d.appdir = tmp_path
        return d
    return start


def status(d, form=""):
    r = requests.get(f"{d.url}/status{form}", timeout=10)
    assert r.status_code == 200, r.text
    return r


def test_status_json_counts_routes_cgi_and_workers(front):
    d = front()
    sup = supervisor_of(d)
    pids = set(wait_workers(sup, 2))
    for _ in range(5):
        assert requests.get(f"{d.url}/app/pid", timeout=10).status_code == 200
    assert requests.get(f"{d.url}/t/front_sleep_then_answer.sh?0", timeout=10).status_code == 200
    assert requests.get(f"{d.url}/t/front_sleep_then_answer.sh?5", timeout=10).status_code == 504
    # a request running while the page is asked for
    slow = threading.Thread(target=requests.get, args=(f"{d.url}/app/sleep?1.5",), kwargs={"timeout": 10})
    slow.start()
    time.sleep(0.6)
    snap = status(d).json()
    slow.join()

    routes = snap["front"]["routes"]
    assert routes[f"app:{APP}"]["requests"] == 5 and routes[f"app:{APP}"]["responses"] == {"2xx": 5}
    assert routes["cgi:/t/"]["responses"] == {"2xx": 1, "5xx": 1}
    p50, p99 = routes["cgi:/t/"]["latency_ms"]["p50"], routes["cgi:/t/"]["latency_ms"]["p99"]
    assert 0 < p50 <= p99 and p99 > 900            # the timed-out one took the route's 1 s
    cgi = snap["cgi"]
    assert cgi["spawned"] == 2 and cgi["killed_on_timeout"] == 1 and cgi["children_running"] == 0

    [pool] = snap["pools"]
    assert pool["pool"] == "tests.peers.pool_app" and pool["mode"] == "static" and pool["healthy"]
    assert pool["route"] == "/app/" and pool["total_workers"] == 2
    assert {w["pid"] for w in pool["workers"]} == pids
    assert pool["accepted_requests"] == 5
    assert pool["idle_workers"] + pool["active_workers"] == 2 and pool["active_workers"] == 1
    [busy] = [w for w in pool["workers"] if w["state"] == "busy"]
    assert busy["current_request"]["uri"] == "/app/sleep?1.5"
    assert 0.3 < busy["current_request"]["duration_s"] < 1.5
    assert all(w["rss_kib"] > 1000 for w in pool["workers"])
    assert pool["queue"]["waiting"] == 0 and pool["queue"]["queue_size"] == 256
    d.wait_for_log(r"slow request: GET /app/sleep\?1\.5")
    assert status(d).json()["pools"][0]["slow_requests"] == 1


def test_status_html_and_prometheus(front):
    d = front()
    requests.get(f"{d.url}/app/pid", timeout=10)
    page = status(d, "?html")
    assert page.headers["Content-Type"].startswith("text/html")
    assert "<h2>pool tests.peers.pool_app (static)</h2>" in page.text
    text = status(d, "?prometheus")
    assert text.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = [line for line in text.text.splitlines() if line and not line.startswith("#")]
    bad = [line for line in lines if not METRIC_LINE.fullmatch(line)]
    assert not bad, bad
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert values['cgigate_pool_healthy{pool="tests.peers.pool_app"}'] == 1
    assert values['cgigate_pool_accepted_requests_total{pool="tests.peers.pool_app"}'] == 1
    assert values['cgigate_pool_workers{pool="tests.peers.pool_app",state="idle"}'] == 2
    assert values["cgigate_cgi_children_spawned_total"] == 0
    assert values[f'cgigate_route_requests_total{{route="app:{APP}"}}'] == 1


def test_status_is_refused_to_other_addresses(front):
    d = front(status_allow='["10.0.0.0/8"]')
    for path in ("/status", "/ping"):
        assert requests.get(d.url + path, timeout=10).status_code == 403
    d.wait_for_log(r"status page asked by 127\.0\.0\.1, not in \[status\] allow")


def test_ping_says_pong_then_unhealthy(front):
    d = front()
    r = requests.get(f"{d.url}/ping", timeout=10)
    assert (r.status_code, r.text) == (200, "pong\n")
    sup = supervisor_of(d)
    (d.appdir / "broken").write_text("")
    for pid in wait_workers(sup, 2):
        os.kill(pid, signal.SIGKILL)
    d.wait_for_log(r"is unhealthy", timeout=15)
    r = requests.get(f"{d.url}/ping", timeout=10)
    assert (r.status_code, r.text) == (503, "unhealthy: tests.peers.pool_app\n")
    assert status(d).json()["pools"][0]["healthy"] is False
    assert status(d).json()["pools"][0]["crashed_workers"] >= 3


def test_full_queue_gets_503_and_is_counted(front):
    d = front(workers=1, queue_size=1)
    results = []

    def client():
        r = requests.get(f"{d.url}/app/sleep?0.2", timeout=30)
        results.append((r.status_code, r.headers.get("Retry-After")))

    # the worker takes 8 connections (FCGI_MAX_CONNS), the front queues 1 more:
    # of 12 at once, the rest get 503
    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(code for code, _ in results)
    assert codes.count(503) >= 1 and codes.count(200) >= 9, results
    assert all(after == "1" for code, after in results if code == 503)
    queue = status(d).json()["pools"][0]["queue"]
    assert queue["queue_full"] == codes.count(503) and queue["peak_waiting"] == 1


def test_max_children_reached_is_counted(front):
    d = front(fcgi='pm = "dynamic"\nmin_spare = 1\nmax_spare = 1', workers=2)
    load = Load(d, "/sleep?0.2", threads=6)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not status(d).json()["pools"][0]["max_children_reached"]:
        time.sleep(0.2)
    assert set(load.stop()) == {200}
    assert status(d).json()["pools"][0]["max_children_reached"] >= 1


def test_standalone_pool_answers_status_path_and_ping(tmp_path):
    cgi_fcgi = require_program("cgi-fcgi")
    sock = tmp_path / "pool.sock"
    proc = subprocess.Popen([sys.executable, "-m", "cgigate", "fcgi", "--app", APP, "--bind", f"unix:{sock}",
                             "--workers", "2", "--status-path", "/fpm-status", "--ping-path", "/fpm-ping",
                             "--error-log", str(tmp_path / "error.log")], cwd=ROOT,
                            env={**os.environ, "POOL_APP_DIR": str(tmp_path)})
    try:
        wait_workers(proc.pid, 2)
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        def ask(path, query=""):
            env = {"SCRIPT_NAME": path, "REQUEST_METHOD": "GET", "QUERY_STRING": query, "PATH": os.environ["PATH"]}
            out = subprocess.run([cgi_fcgi, "-bind", "-connect", str(sock)], env=env, capture_output=True,
                                 timeout=10).stdout.decode()
            head, _, body = out.partition("\r\n\r\n")
            return head, body

        head, body = ask("/fpm-ping")
        assert head.startswith("Status: 200") and body == "pong\n"
        head, body = ask("/fpm-status")
        snap = json.loads(body)
        [pool] = snap["pools"]
        assert pool["total_workers"] == 2 and pool["mode"] == "static"
        # the status request itself is running on one of the workers
        assert pool["active_workers"] == 1
        head, body = ask("/fpm-status", "prometheus")
        assert 'cgigate_pool_workers{pool="tests.peers.pool_app",state="idle"} 1' in body
        head, body = ask("/other")
        assert body.strip().isdigit()                # the app, not the status page
    finally:
        proc.terminate()
        proc.wait(30)
