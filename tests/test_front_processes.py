"""`[server] processes` > 1: pre-forked front processes sharing the listening sockets."""

import os
import signal
import threading
import time

import requests

from conftest import SAMPLE_CGI_BIN, TEST_CGI_BIN, children_of, wait_gone


def live_workers(d) -> list[int]:
    return [pid for pid, state in children_of(d.pid) if state != "Z"]


def wait_workers(d, count: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = live_workers(d)
        if len(pids) == count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"expected {count} workers, have {live_workers(d)}")


def test_two_workers_serve(daemon):
    d = daemon("--cgi-dir", TEST_CGI_BIN, "--processes", "2")
    workers = wait_workers(d, 2)
    parents = set()
    for _ in range(40):
        r = requests.get(f"{d.url}/cgi-bin/ppid.sh")   # a new connection each time
        assert r.status_code == 200
        parents.add(int(r.text))
    # Every script was started by one of the two workers, never by the arbiter.
    # (Which worker accepts a connection is the kernel's choice.)
    assert parents <= set(workers), (parents, workers)
    d.wait_for_log(r"worker 0 started \(pid \d+\)")
    d.wait_for_log(r"worker 1 started \(pid \d+\)")
    assert sorted(workers) == sorted(live_workers(d))


def test_a_dead_worker_is_replaced(daemon):
    d = daemon("--cgi-dir", SAMPLE_CGI_BIN, "--processes", "2")
    victim, survivor = wait_workers(d, 2)
    os.kill(victim, signal.SIGKILL)
    d.wait_for_log(rf"worker \d \(pid {victim}\) died: killed by SIGKILL; starting another")
    replaced = wait_workers(d, 2)
    assert victim not in replaced and survivor in replaced
    for _ in range(10):
        assert requests.get(f"{d.url}/cgi-bin/hello.sh").text == "Hello, world!\n"


def test_sigterm_lets_in_flight_requests_finish(daemon, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f"[server]\nprocesses = 2\n[[route]]\nprefix = \"/t/\"\ncgi_dir = \"{TEST_CGI_BIN}\"\n")
    d = daemon("-c", str(conf))
    wait_workers(d, 2)
    results = []
    t = threading.Thread(target=lambda: results.append(requests.get(f"{d.url}/t/wait.sh?1", timeout=30)))
    t.start()
    time.sleep(0.4)
    os.kill(d.pid, signal.SIGTERM)
    t.join()
    assert results[0].status_code == 200 and results[0].text == "waited 1\n"
    assert d.proc.wait(20) == 0
    assert "SIGTERM: stopping 2 worker(s) gracefully" in d.error_text()
    assert not children_of(d.pid)


def test_limits_are_divided_among_workers():
    from cgigate.config import load
    from cgigate.front.server import worker_config
    config = load(None, {"server.processes": "3", "cgi.max_children": "10", "server.max_connections": "100"})
    share = worker_config(config)
    assert share.cgi.max_children == 4 and share.server.max_connections == 34
    assert config.cgi.max_children == 10   # the original is untouched


def test_sighup_and_sigusr1_reach_every_front_process(daemon, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f"[server]\nprocesses = 2\n[[route]]\nprefix = \"/t/\"\ncgi_dir = \"{TEST_CGI_BIN}\"\n")
    d = daemon("-c", str(conf))
    before = sorted(pid for pid, _ in children_of(d.pid))
    assert len(before) == 2
    time.sleep(1.0)   # (both have their event loops and handlers up)
    conf.write_text(conf.read_text() + '[[route]]\nprefix = "/ok/"\nreturn = "reloaded"\n')
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.error_text().count("reloaded: 2 route(s)") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.error_text().count("reloaded: 2 route(s)") == 2     # each front process
    with requests.Session() as s:
        assert {s.get(d.url + "/ok/", timeout=10).text for _ in range(20)} == {"reloaded"}
    assert sorted(pid for pid, _ in children_of(d.pid)) == before   # nobody died of it
    os.rename(d.error_log, d.error_log + ".1")
    d.proc.send_signal(signal.SIGUSR1)
    d.wait_for_log(r"SIGUSR1: log files reopened")


def test_sigquit_stops_at_once(daemon, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f"[server]\nprocesses = 2\ngraceful_timeout = 30\n"
                    f"[[route]]\nprefix = \"/t/\"\ncgi_dir = \"{TEST_CGI_BIN}\"\n")
    d = daemon("-c", str(conf))
    workers = [pid for pid, _ in children_of(d.pid)]
    outcome = []

    def slow_request():
        try:
            outcome.append(requests.get(d.url + "/t/front_sleep_then_answer.sh?20", timeout=30).status_code)
        except requests.RequestException as e:
            outcome.append(type(e).__name__)

    slow = threading.Thread(target=slow_request)
    slow.start()
    time.sleep(0.5)
    d.proc.send_signal(signal.SIGQUIT)
    assert d.proc.wait(15) == 0      # SIGTERM would wait for the 20 s script (grace 30 s)
    slow.join()
    assert outcome != [200], "the running request was let finish"
    wait_gone(workers)
