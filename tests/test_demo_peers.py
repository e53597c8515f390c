"""`cgigate demo --against`: the peers (cgigate/demo/peers.py), run for real.

Each peer is started in a temp Workdir, answers Hello, world!, is watched
with the demo's TreeWatch over a window of requests, and leaves no process
or socket behind once stopped.  A peer that is not installed is skipped
locally and fails under CGIGATE_REQUIRE_PEERS (CI), as in conftest's
require_program.
"""

from __future__ import annotations

import glob
import os
import time

import pytest
import requests

from conftest import require_module, require_program, wait_gone
from nginx import require_nginx

from cgigate.demo import peers
from cgigate.demo.forms import HELLO, Workdir
from cgigate.demo.measure import TreeWatch, children
from cgigate.demo.peers import PEERS

BATCH = 50          # requests per batch
MAX_REQUESTS = 1000  # CPU counters tick every 10 ms: more batches until they move
QUIET_WAIT = 15.0    # seconds to wait for a window with no outside process creation


def require_peer(name: str) -> None:
    if name == "nginx-fcgiwrap":
        require_nginx()
        require_program("fcgiwrap")
    elif name == "flup":
        require_module("flup", "flup==1.0.3")
    elif name == "gunicorn":
        require_module("gunicorn", "gunicorn")
    assert PEERS[name].missing() is None


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False          # no proxy from the environment for 127.0.0.1
    return s


def get_hellos(s: requests.Session, url: str, n: int) -> None:
    for _ in range(n):
        r = s.get(url, timeout=10)
        assert r.status_code == 200 and r.text.strip() == HELLO, (r.status_code, r.text[:200])


def window(s: requests.Session, url: str, watch: TreeWatch, seen: set[int]):
    """(requests, Usage) of a window of BATCH requests, extended by BATCH at a time until
    some CPU shows (the counters are in 10 ms ticks, per process)."""
    before = watch.snapshot()
    n = 0
    while True:
        get_hellos(s, url, BATCH)
        n += BATCH
        seen.update(watch.processes())
        usage = watch.usage(before, watch.snapshot())
        if usage.front_cpu_s + usage.backend_cpu_s > 0 or n >= MAX_REQUESTS:
            return n, usage


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_serves_hello_and_is_measurable(name, tmp_path):
    require_peer(name)
    peer = PEERS[name]
    work = Workdir(str(tmp_path))
    run = peer.start(work, 2)
    seen: set[int] = set()
    try:
        assert run.url.startswith("http://127.0.0.1:")
        assert run.front > 0 and all(p > 0 for p in run.backend_roots)
        assert run.front_tree == (name == "nginx-fcgiwrap")
        for path in run.sockets:
            assert os.path.exists(path)
        with session() as s:
            r = s.get(run.url, timeout=5)
            assert r.status_code == 200
            assert r.text == HELLO + "\n"

            watch = TreeWatch(run.front, run.backend_roots, run.front_tree)
            seen.update(watch.processes())
            get_hellos(s, run.url, 10)       # warm-up: pools, threads, connections
            n, usage = window(s, run.url, watch, seen)
            assert usage.front_cpu_s + usage.backend_cpu_s > 0, usage
            if peer.spawns:
                # fcgiwrap forks one process per request
                assert usage.tasks_created >= n, (n, usage)
            else:
                # persistent processes: next to nothing is created.  The counter is the
                # machine's (other tests may be spawning processes meanwhile), so windows are
                # taken until a quiet one: a peer that did create a task per request never
                # shows one.
                tries = [(n, usage)]
                deadline = time.monotonic() + QUIET_WAIT
                while usage.tasks_created >= 0.05 * n and time.monotonic() < deadline:
                    time.sleep(0.1)
                    n, usage = window(s, run.url, watch, seen)
                    tries.append((n, usage))
                assert usage.tasks_created < 0.05 * n, (
                    f"{len(tries)} windows, tasks created per request: "
                    f"{[round(u.tasks_created / k, 2) for k, u in tries]}; last: {usage}")
        assert run.notes and all(isinstance(note, str) and note for note in run.notes)
    finally:
        run.stop()
    assert {run.front, *run.backend_roots} <= seen
    wait_gone(sorted(seen))
    for path in run.sockets:
        assert not os.path.exists(path)
    run.stop()       # twice is harmless


def test_nginx_fcgiwrap_notes_say_why_backend_cpu_is_low(tmp_path):
    """fcgiwrap's workers ignore SIGCHLD: the scripts' CPU reaches no cutime."""
    require_peer("nginx-fcgiwrap")
    run = PEERS["nginx-fcgiwrap"].start(Workdir(str(tmp_path)), 1)
    try:
        workers = children(run.backend_roots[0])
        assert len(workers) == peers.FCGIWRAP_CHILDREN
        assert all(peers._ignores_sigchld(w) for w in workers)
        assert any("SIGCHLD" in note for note in run.notes)
    finally:
        run.stop()
    wait_gone([run.front, *run.backend_roots, *workers])


def test_start_failure_names_the_peer_and_its_log(tmp_path, monkeypatch):
    require_peer("nginx-fcgiwrap")
    monkeypatch.setattr(peers, "NGINX_CONF", peers.NGINX_CONF.replace("worker_processes 1;",
                                                                      "no_such_directive 1;"))
    started: list[peers._Proc] = []
    real_init = peers._Proc.__init__

    def record(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(peers._Proc, "__init__", record)
    with pytest.raises(RuntimeError) as e:
        PEERS["nginx-fcgiwrap"].start(Workdir(str(tmp_path)), 1)
    message = str(e.value)
    assert message.startswith("nginx-fcgiwrap: ")
    assert "no_such_directive" in message         # the tail of nginx's error log
    assert [p.name for p in started] == ["fcgiwrap", "nginx"]
    wait_gone([p.pid for p in started])
    assert not glob.glob(os.path.join(str(tmp_path), "**", "*.sock"), recursive=True)


def test_missing_names_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(peers, "SBIN_DIRS", ())
    assert PEERS["nginx-fcgiwrap"].missing() == "nginx not installed (apt-get install nginx)"
    with pytest.raises(RuntimeError, match=r"nginx-fcgiwrap: nginx not installed \(apt-get install nginx\)"):
        PEERS["nginx-fcgiwrap"].start(Workdir.__new__(Workdir), 1)

    monkeypatch.setattr(peers, "module_available", lambda name: False)
    assert PEERS["gunicorn"].missing() == "gunicorn not installed (pip install gunicorn)"
    assert PEERS["flup"].missing() == "flup not installed (pip install flup==1.0.3)"


def test_missing_fcgiwrap_alone(monkeypatch, tmp_path):
    nginx = require_program("nginx")
    os.symlink(nginx, tmp_path / "nginx")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(peers, "SBIN_DIRS", ())
    assert PEERS["nginx-fcgiwrap"].missing() == "fcgiwrap not installed (apt-get install fcgiwrap)"


def test_peer_table():
    assert list(PEERS) == ["nginx-fcgiwrap", "flup", "gunicorn"]
    assert [p.spawns for p in PEERS.values()] == [True, False, False]
    for name, peer in PEERS.items():
        assert peer.name == name and peer.label and peer.explanation
