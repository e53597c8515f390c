"""The demo's cost model and its /proc counters, on known inputs."""

import os
import subprocess
import sys
import time

import pytest

from cgigate.demo import model
from cgigate.demo.measure import TreeWatch, last_pid


def test_fit_line_recovers_a_line():
    a, b = model.fit_line([(0, 3.0), (10, 8.0), (50, 28.0)])
    assert a == pytest.approx(3.0) and b == pytest.approx(0.5)
    assert model.fit_line([(10, 1.0), (10, 2.0)]) is None


def test_fit_recovers_the_terms_it_was_built_from():
    http, spawn, sh, python, ipc = 0.07, 0.8, 0.1, 18.0, 0.2
    latency = {"floor": http, "c": http + spawn, "sh": http + spawn + sh,
               "py": http + spawn + python, "wsgi": http + ipc}
    startup = {"py": [(10.0, http + spawn + python + 10), (50.0, http + spawn + python + 50)],
               "wsgi": [(10.0, http + ipc), (50.0, http + ipc)]}
    fitted = model.fit(latency, startup)
    t = fitted["terms_ms"]
    assert t["http"] == pytest.approx(http)
    assert t["spawn"] == pytest.approx(spawn)
    assert t["sh_start"] == pytest.approx(sh)
    assert t["python_start"] == pytest.approx(python)
    assert t["k_cgi"] == pytest.approx(1.0)
    assert t["ipc"] == pytest.approx(ipc)
    assert t["k_fcgi"] == pytest.approx(0.0, abs=1e-9)
    for form, ms, expected in [("py", 50, http + spawn + python + 50), ("wsgi", 50, http + ipc),
                               ("sh", 0, latency["sh"]), ("c", 0, latency["c"])]:
        assert model.predict(t, form, ms) == pytest.approx(expected)
    text = "\n".join(model.describe(fitted))
    assert "18.00 ms to start Python" in text and "1.00 x app start-up" in text
    assert "0.20 ms to pass the request to a worker" in text


def test_fit_without_a_c_compiler_keeps_spawn_and_python_together():
    fitted = model.fit({"floor": 0.1, "py": 20.1}, {"py": [(50.0, 70.1)]})
    t = fitted["terms_ms"]
    assert t["spawn"] is None and t["python_start"] is None
    assert t["spawn_and_python_start"] == pytest.approx(20.0)
    assert "20.00 ms to spawn and start Python" in "\n".join(model.describe(fitted))


def test_cpu_bound():
    assert model.cpu_bound(2, 0.5) == pytest.approx(4000.0)
    assert model.cpu_bound(2, 0) is None


BUSY = ("import time\nt = time.process_time() + 0.05\nwhile time.process_time() < t: pass\n")


def _parent(script: str):
    """A process that waits for a line on stdin, runs `script`, prints 'done' and waits again."""
    code = ("import subprocess, sys\nsys.stdin.readline()\n" + script +
            "\nprint('done', flush=True)\nsys.stdin.readline()\n")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("front_tree", [False, True])
def test_tree_watch_counts_children_processes_and_cpu(front_tree):
    children = 3
    parent = _parent(f"for _ in range({children}): subprocess.run([sys.executable, '-c', {BUSY!r}])")
    try:
        time.sleep(0.3)  # let the parent's own start-up pass before the window
        watch = TreeWatch(parent.pid, front_tree=front_tree, interval=0.02)
        watch.start_sampling()
        before = watch.snapshot()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline() == "done\n"
        after = watch.snapshot()
        watch.stop_sampling()
        usage = watch.usage(before, after)
    finally:
        parent.stdin.close()
        parent.wait(10)
    assert usage.tasks_created >= children
    burnt = children * 0.05   # each child burns 50 ms of CPU, plus Python's start
    child_cpu, parent_cpu = ((usage.front_cpu_s, usage.backend_cpu_s) if front_tree
                             else (usage.backend_cpu_s, usage.front_cpu_s))
    assert burnt * 0.8 <= child_cpu <= burnt + children * 0.2
    assert parent_cpu < burnt
    assert usage.peak_memory_kib > 1000 and usage.samples >= 2


def test_backend_roots_are_watched_as_backend():
    outside = _parent(f"subprocess.run([sys.executable, '-c', {BUSY!r}])")
    try:
        time.sleep(0.3)
        watch = TreeWatch(os.getpid(), backend_roots=(outside.pid,))
        before = watch.snapshot()
        outside.stdin.write("go\n")
        outside.stdin.flush()
        assert outside.stdout.readline() == "done\n"
        after = watch.snapshot()
    finally:
        outside.stdin.close()
        outside.wait(10)
    usage = watch.usage(before, after)
    assert usage.backend_cpu_s >= 0.04


def test_last_pid_moves_with_each_new_process():
    first = last_pid()
    for _ in range(5):
        subprocess.run(["true"])
    assert last_pid() - first >= 5 or last_pid() < first   # (or the counter wrapped)
