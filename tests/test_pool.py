"""App pools for real: the front starts `cgigate fcgi` for an app route, and the
tests kill, overload, time out, grow, break and reload its workers while
requests run, then count processes, zombies and descriptors in /proc."""

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import ROOT, children_of, cmdline, open_fds, process_gone, wait_gone

APP = "tests.peers.pool_app:app"


def supervisor_of(d) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [pid for pid, _ in children_of(d.pid) if "supervisor" in cmdline(pid)]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no pool supervisor under the front: {children_of(d.pid)}")


def workers(supervisor: int) -> list[int]:
    """Live workers (zombies not counted)."""
    return [pid for pid, state in children_of(supervisor) if state != "Z"]


def wait_workers(supervisor: int, count, timeout: float = 10.0) -> list[int]:
    """Until the pool has `count` workers (a number, or a predicate on the number)."""
    ok = count if callable(count) else (lambda n: n == count)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = workers(supervisor)
        if ok(len(found)):
            return found
        time.sleep(0.02)
    raise AssertionError(f"pool has {len(workers(supervisor))} workers, not {count}")


@pytest.fixture
def pool(daemon, tmp_path):
    """pool(fcgi_settings, workers=2, ...) starts a front with one app route whose
    pool has those [fcgi] settings; returns the daemon."""

    def start(settings: str = "", workers: int = 2, threads: int = 1, timeout: float = 30):
        config = tmp_path / "cgigate.toml"
        config.write_text(f"""
[server]
graceful_timeout = 5

[fcgi]
graceful_timeout = 5
{settings}

[[route]]
prefix = "/app/"
app = "{APP}"
workers = {workers}
threads = {threads}
timeout = {timeout}
""")
        d = daemon("-c", str(config), env={"POOL_APP_DIR": str(tmp_path)})
        d.appdir = tmp_path
        d.config = config
        return d
    return start


def get(d, path: str, timeout: float = 30) -> requests.Response:
    return requests.get(f"{d.url}/app{path}", timeout=timeout)


class Load:
    """`threads` clients sending GET `path` back to back until stop(); every
    outcome is recorded: a status, or the exception's name."""

    def __init__(self, d, path: str, threads: int = 4):
        self.outcomes: list = []
        self.bodies: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(d, path), daemon=True)
                         for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _client(self, d, path):
        with requests.Session() as s:
            while not self._stop.is_set():
                try:
                    r = s.get(f"{d.url}/app{path}", timeout=30)
                    self.outcomes.append(r.status_code)
                    self.bodies.append(r.text.strip())
                except requests.RequestException as e:
                    self.outcomes.append(type(e).__name__)

    def stop(self) -> collections.Counter:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return collections.Counter(self.outcomes)


# --- workers die, and are replaced ---

def test_killed_workers_are_replaced_under_load(pool):
    d = pool(workers=3)
    sup = supervisor_of(d)
    wait_workers(sup, 3)
    assert get(d, "/pid").status_code == 200
    fds_before = open_fds(sup)
    load = Load(d, "/sleep?0.02", threads=4)
    killed = []
    for _ in range(3):
        time.sleep(0.5)
        victim = workers(sup)[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        wait_gone([victim], timeout=2)
        # back to full size within a second
        wait_workers(sup, 3, timeout=1.0)
    time.sleep(0.5)
    outcomes = load.stop()
    # every request got an answer; only those running on a killed worker may fail
    assert set(outcomes) <= {200, 502}, outcomes
    assert outcomes[502] <= len(killed), outcomes
    assert outcomes[200] > 50
    assert not [c for c in children_of(sup) if c[1] == "Z"], "zombie workers"
    assert open_fds(sup) == fds_before, "the supervisor leaked descriptors"
    for victim in killed:
        d.wait_for_log(rf"worker \d+ \(pid {victim}\) died: killed by SIGKILL; starting another")


def test_process_titles_show_pool_and_state(pool):
    d = pool(workers=2)
    sup = supervisor_of(d)
    assert re.fullmatch(r"cgigate fcgi: supervisor pool=tests\.peers\.pool_app pm=static workers=2/2",
                        cmdline(sup)), cmdline(sup)
    deadline = time.monotonic() + 10
    while True:
        titles = sorted(cmdline(pid) for pid in wait_workers(sup, 2))
        if all(t.endswith(" idle") for t in titles) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert titles == ["cgigate fcgi: worker 0 pool=tests.peers.pool_app idle",
                      "cgigate fcgi: worker 1 pool=tests.peers.pool_app idle"], titles


# --- recycling ---

def test_max_requests_recycles_workers_with_jitter(pool):
    d = pool("max_requests = 4\nmax_requests_jitter = 3", workers=2)
    with requests.Session() as s:
        pids = [s.get(f"{d.url}/app/pid", timeout=10).text.strip() for _ in range(40)]
    served = collections.Counter(pids)
    assert len(served) >= 6, served            # 40 requests at 4 to 7 each
    # none past max_requests + jitter, but for a request already on its way to a
    # worker (on a connection it had just accepted) when it began its last one
    assert max(served.values()) <= 7 + 1, served
    d.wait_for_log(r"served \d+ requests \(max_requests\): finishing its requests and exiting")


def test_memory_ceiling_replaces_the_worker_after_its_request(pool):
    d = pool('max_rss = "100M"', workers=1)
    sup = supervisor_of(d)
    [first] = wait_workers(sup, 1)
    assert get(d, "/grow?150").status_code == 200       # finished, then retired
    d.wait_for_log(r"uses \d+ MiB, over max_rss \(100 MiB\): finishing its requests and exiting")
    wait_gone([first], timeout=5)
    [second] = wait_workers(sup, 1)
    assert second != first
    assert get(d, "/pid").text.strip() == str(second)


# --- timeouts ---

def test_request_timeout_answers_504_logs_the_stack_and_replaces_the_worker(pool):
    d = pool("request_timeout = 1\nslow_request_timeout = 0.4", workers=2)
    sup = supervisor_of(d)
    before = set(wait_workers(sup, 2))
    started = time.monotonic()
    r = get(d, "/sleep?30")
    assert r.status_code == 504
    assert time.monotonic() - started < 10
    log = d.wait_for_log(r"request GET /app/sleep\?30 timed out after [\d.]+s \(request_timeout 1s\); "
                         r"its Python stack:\n(?:.*\n)*?.*pool_app\.py.*\n\s+time\.sleep").group(0)
    assert "timed out" in log
    d.wait_for_log(r"slow request: GET /app/sleep\?30 running for [\d.]+s \(slow_request_timeout 0.4s\); "
                   r"its Python stack:\n(?:.*\n)*?.*pool_app\.py")
    # its worker is replaced; the other goes on
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(workers(sup)) & before == before:
        time.sleep(0.05)
    now = wait_workers(sup, 2)
    assert len(set(now) & before) == 1
    assert get(d, "/pid").status_code == 200


# --- pool modes ---

def test_ondemand_starts_on_the_first_request_and_scales_to_zero(pool):
    d = pool('pm = "ondemand"\nidle_worker_timeout = 1', workers=3)
    sup = supervisor_of(d)
    time.sleep(0.5)
    assert workers(sup) == []
    first = get(d, "/pid")
    assert first.status_code == 200
    assert wait_workers(sup, 1) == [int(first.text)]
    wait_workers(sup, 0, timeout=5)                     # idle for a second: gone
    d.wait_for_log(r"stopped \(idle for 1s\)")
    again = get(d, "/pid")                              # and back on the next request
    assert again.status_code == 200 and again.text != first.text


def test_dynamic_grows_under_load_counts_the_maximum_and_shrinks(pool):
    d = pool('pm = "dynamic"\nmin_spare = 1\nmax_spare = 2', workers=4)
    sup = supervisor_of(d)
    wait_workers(sup, 1)
    load = Load(d, "/sleep?0.3", threads=10)
    wait_workers(sup, 4, timeout=10)
    time.sleep(1.0)
    assert len(workers(sup)) <= 4
    outcomes = load.stop()
    assert set(outcomes) == {200}, outcomes
    d.wait_for_log(r"every worker is busy and 4 is the most \(workers\); requests wait")
    # idle again: one spare worker stopped a second, down to max_spare
    wait_workers(sup, lambda n: n <= 2, timeout=10)


# --- crash loops and broken apps ---

def test_crash_loop_backs_off_and_reports_unhealthy(pool):
    d = pool(workers=2)
    sup = supervisor_of(d)
    (d.appdir / "broken").write_text("")
    for pid in wait_workers(sup, 2):
        os.kill(pid, signal.SIGKILL)
    d.wait_for_log(r"pool tests\.peers\.pool_app is unhealthy: 3 workers in a row died before they were "
                   r"ready", timeout=15)
    mark = len(d.error_text())
    time.sleep(2.0)
    starts = len(re.findall(r"worker \d+ started", d.error_text()[mark:]))
    assert starts <= 2, "no back-off: workers restarted at full speed"
    assert "broken on purpose" in d.error_text()
    (d.appdir / "broken").unlink()
    d.wait_for_log(r"pool tests\.peers\.pool_app is healthy again", timeout=40)
    wait_workers(sup, 2, timeout=10)
    assert get(d, "/pid").status_code == 200


def test_broken_app_stops_serve_at_start(tmp_path):
    (tmp_path / "broken").write_text("")
    done = subprocess.run([sys.executable, "-m", "cgigate", "serve", "--bind", "127.0.0.1:0",
                           "--app", APP], cwd=ROOT, env={**os.environ, "POOL_APP_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("broken on purpose") == 1, done.stderr
    assert "the workers for app tests.peers.pool_app:app exited with status 2" in done.stderr


# --- reload ---

def test_reload_under_load_drops_nothing_and_serves_the_new_code(pool):
    version = None
    d = pool(workers=2)
    (d.appdir / "version").write_text("v1")
    d.proc.send_signal(signal.SIGHUP)       # the first workers started before the file existed
    d.wait_for_log(r"reload: generation 2 serving")
    sup = supervisor_of(d)
    load = Load(d, "/version", threads=3)
    for version in ("v2", "v3", "v4"):
        time.sleep(0.7)
        (d.appdir / "version").write_text(version)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log(rf"reload: generation {int(version[1]) + 1} serving")
    time.sleep(1.0)
    outcomes = load.stop()
    problems = [line for line in d.error_text().splitlines() if "[ERROR]" in line or "[WARNING]" in line]
    assert set(outcomes) == {200}, (outcomes, problems)
    seen = [b for b in load.bodies]
    assert seen[-1] == "v4" and {"v1", "v2", "v3", "v4"} <= set(seen)
    wait_workers(sup, 2)
    assert {get(d, "/version").text.strip() for _ in range(10)} == {"v4"}


def test_a_hung_worker_is_killed_by_the_supervisor(pool):
    # a regular expression holding the GIL: the worker's own watchdog cannot act,
    # so the supervisor must, with the stacks from faulthandler first
    d = pool("request_timeout = 1", workers=1)
    sup = supervisor_of(d)
    [hung] = wait_workers(sup, 1)
    # a POST, which the front does not send again on another connection
    r = requests.post(f"{d.url}/app/hang", data=b"x", timeout=30)
    assert r.status_code == 502                       # its connection died with it
    d.wait_for_log(rf"worker 0 \(pid {hung}\) is not answering: request POST /app/hang running for \d+s; "
                   r"its Python stacks follow, then SIGTERM and SIGKILL after 2s")
    d.wait_for_log(r'File ".*pool_app\.py", line \d+ in app')     # faulthandler's dump
    d.wait_for_log(rf"worker 0 \(pid {hung}\) still running 2s after SIGTERM; SIGKILL")
    wait_gone([hung], timeout=5)
    [fresh] = wait_workers(sup, 1)
    assert get(d, "/pid").text.strip() == str(fresh)


def test_front_reload_applies_new_routes(pool):
    d = pool(workers=1)
    assert requests.get(d.url + "/health/", timeout=10).status_code == 404
    d.config.write_text(d.config.read_text() + '\n[[route]]\nprefix = "/health/"\nreturn = "ok"\n')
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log(r"SIGHUP: config .* reloaded: 2 route\(s\)")
    r = requests.get(d.url + "/health/", timeout=10)
    assert (r.status_code, r.text) == (200, "ok")
    d.wait_for_log(r"reload: generation 2 serving")     # and the pool reloaded its app
    assert get(d, "/pid").status_code == 200


# --- signals to a standalone pool ---

def test_standalone_reload_reads_the_config_again(tmp_path):
    sock = tmp_path / "pool.sock"
    config = tmp_path / "pool.toml"
    config.write_text(f'[fcgi]\napp = "{APP}"\nbind = ["unix:{sock}"]\nworkers = 2\n')
    proc = subprocess.Popen([sys.executable, "-m", "cgigate", "fcgi", "-c", str(config),
                             "--error-log", str(tmp_path / "error.log")], cwd=ROOT,
                            env={**os.environ, "POOL_APP_DIR": str(tmp_path)})
    try:
        old = set(wait_workers(proc.pid, 2))
        config.write_text(config.read_text().replace("workers = 2", "workers = 3"))
        proc.send_signal(signal.SIGHUP)
        wait_gone(old, timeout=15)                        # the old generation goes
        new = set(wait_workers(proc.pid, 3))              # and the new one has 3
        assert not new & old
        config.write_text("[fcgi]\nworkers = 0\n")         # a broken file: keep serving
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in (tmp_path / "error.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert re.search(r"reload failed: .*pool\.toml: \[fcgi\] workers: expected a whole number >= 1, "
                         r"got 0; the running workers go on", (tmp_path / "error.log").read_text())
        assert set(workers(proc.pid)) == new
    finally:
        proc.terminate()
        proc.wait(30)


def test_ttin_ttou_usr1_and_quit(tmp_path):
    sock = tmp_path / "pool.sock"
    log = tmp_path / "error.log"
    proc = subprocess.Popen([sys.executable, "-m", "cgigate", "fcgi", "--app", APP, "--bind", f"unix:{sock}",
                             "--workers", "2", "--error-log", str(log)], cwd=ROOT,
                            env={**os.environ, "POOL_APP_DIR": str(tmp_path)})
    try:
        wait_workers(proc.pid, 2)
        proc.send_signal(signal.SIGTTIN)
        wait_workers(proc.pid, 3)
        proc.send_signal(signal.SIGTTOU)
        wait_workers(proc.pid, 2)
        # logrotate: the file moves, SIGUSR1, and the pool writes to a new one
        os.rename(log, tmp_path / "error.log.1")
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (log.exists() and "log files reopened" in log.read_text()):
            time.sleep(0.05)
        assert "log files reopened" in log.read_text()
        pids = workers(proc.pid)
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(5) == 0
        assert all(process_gone(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
