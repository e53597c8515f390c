"""`cgigate demo` end to end, in a short mode: real daemons, real scripts, real
workers, the real load generator; then the report is checked for sense."""

import html
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import requests

from cgigate.demo.measure import descendants
from cgigate.demo.run import WORKDIR_PREFIX
from conftest import ROOT, cmdline, require_program, wait_gone

FORMS = ("floor", "c", "sh", "py", "wsgi")


def demo(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "cgigate", "demo", "--quiet", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def leftovers(workdir: str) -> list[str]:
    """Live processes started with a path inside the demo's work directory `workdir`
    in their command line or their environment, or titled as workers of the demo's
    app pools (setproctitle rewrites a worker's command line and environment)."""
    return [f"{pid}: {cmdline(pid)}" for pid in filter(str.isdigit, os.listdir("/proc"))
            if int(pid) != os.getpid() and (any(workdir + "/" in cmdline(pid, what)
                                                for what in ("cmdline", "environ"))
                                            or "pool=demo_hello_" in cmdline(pid))]


def workdirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith(WORKDIR_PREFIX)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    before = workdirs()
    done = demo("--duration", "0.6", "--warmup", "0.2", "--concurrency", "1,4", "--startup", "0,50",
                "-o", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out / "report.json") as f:
        result = json.load(f)
    assert workdirs() <= before, "the demo left its work directory behind"
    return out, result, done.stdout


def cells(result, form, startup_ms=0):
    row = next(r for r in result["rows"] if r["system"] == "cgigate" and r["form"] == form
               and r["startup_ms"] == startup_ms)
    return {c["concurrency"]: c for c in row["cells"]}


def test_every_form_ran_and_answered(report):
    _, result, _ = report
    assert result["skipped"] == []
    for form in FORMS:
        for c, cell in cells(result, form).items():
            assert cell["requests"] > 0 and cell["failed"] == 0, (form, c, cell)
            assert cell["latency_ms"]["p50"] <= cell["latency_ms"]["p90"] <= cell["latency_ms"]["p99"]
            # the machine's busy CPU (less the load generator's) covers what the tree used
            assert cell["machine_cpu_ms_per_request"] >= 0.5 * cell["cpu_ms_per_request"]["total"]


def test_cgi_forms_spawn_a_process_per_request(report):
    _, result, _ = report
    for form in ("c", "sh", "py"):
        for c, cell in cells(result, form).items():
            # one each, for every request the load generator sent (warm-up included),
            # all of which were answered before it exited
            assert cell["requests_sent"] >= cell["requests"]
            assert cell["processes_created"] >= cell["requests_sent"], (form, c, cell)
            assert cell["processes_per_request"] >= 1
            assert cell["cpu_ms_per_request"]["backend"] > 0


def test_fastcgi_and_floor_spawn_nothing_after_warm_up(report):
    _, result, _ = report
    for form in ("floor", "wsgi"):
        for c, cell in cells(result, form).items():
            assert cell["processes_per_request"] < 0.05, (form, c, cell)
    assert all(cell["cpu_ms_per_request"]["backend"] == 0 for cell in cells(result, "floor").values())
    # the workers are the backend, and they did the app's work
    assert cells(result, "wsgi")[4]["cpu_ms_per_request"]["backend"] > 0
    assert cells(result, "wsgi")[4]["peak_processes"] >= 3   # front, supervisor, workers


def test_throughput_ordering_floor_fastcgi_python_cgi(report):
    _, result, _ = report
    for c in (1, 4):
        floor, wsgi, py = (cells(result, f)[c]["rps"] for f in ("floor", "wsgi", "py"))
        assert floor > wsgi > py, (c, floor, wsgi, py)


def test_start_up_cost_is_paid_per_request_by_cgi_only(report):
    _, result, _ = report
    terms = result["model"]["terms_ms"]
    # 50 ms of start-up CPU: a CGI script pays it on every request, a worker once
    assert cells(result, "py", 50)[1]["latency_ms"]["p50"] > cells(result, "py", 0)[1]["latency_ms"]["p50"] + 25
    assert 0.5 < terms["k_cgi"] < 2.0
    assert abs(terms["k_fcgi"]) < 0.1
    assert terms["spawn"] > 0 and terms["python_start"] > 0


def test_chart_html_and_terminal_summary(report):
    out, result, stdout = report
    png = (out / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20000
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    for row in result["rows"]:
        assert html.escape(row["explanation"]) in page
    assert "Cost model per request" in stdout and "CGI Python" in stdout
    assert re.search(r"to start Python \+ [0-9.]+ x app start-up", stdout)
    assert f"json: {out / 'report.json'}" in stdout


def test_nothing_is_left_behind(report):
    workdir = report[1]["workdir_removed"]
    assert workdir.startswith(os.path.join(tempfile.gettempdir(), WORKDIR_PREFIX))
    assert not os.path.exists(workdir)
    assert leftovers(workdir) == []


def test_against_adds_the_peers_as_rows(tmp_path):
    done = demo("--forms", "sh", "--against", "nginx-fcgiwrap,flup,gunicorn", "--concurrency", "2",
                "--startup", "0", "--duration", "0.5", "--warmup", "0.2", "-o", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "report.json").read_text())
    missing = {s["what"]: s["reason"] for s in result["skipped"]}
    if missing:
        from conftest import IN_CI
        if IN_CI:
            pytest.fail(f"CGIGATE_REQUIRE_PEERS is set but peers were skipped: {missing}")
        pytest.skip(f"peers not installed: {missing}")
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"cgigate", "nginx-fcgiwrap", "flup", "gunicorn"}
    for name, row in rows.items():
        [cell] = row["cells"]
        assert cell["requests"] > 0 and cell["failed"] == 0, (name, cell)
    # fcgiwrap forks a script per request, like cgigate's sh form
    fcgiwrap = rows["nginx-fcgiwrap"]["cells"][0]
    assert fcgiwrap["processes_created"] >= fcgiwrap["requests_sent"]
    assert any("SIGCHLD" in n for n in rows["nginx-fcgiwrap"]["notes"])
    assert "nginx-fcgiwrap: " in done.stdout   # its notes are shown in the terminal too
    assert leftovers(result["workdir_removed"]) == []


def test_wrk_drives_the_demo_too(tmp_path):
    require_program("wrk")
    done = demo("--forms", "sh,wsgi", "--loadgen", "wrk", "--concurrency", "2", "--startup", "0",
                "--duration", "1", "--warmup", "0", "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["settings"]["loadgen"] == "wrk"
    sh, wsgi = (cells(result, form)[2] for form in ("sh", "wsgi"))
    for cell in (sh, wsgi):
        assert cell["loadgen"] == "wrk" and cell["requests"] > 0 and cell["failed"] == 0
    # wrk's own process and threads are not counted; each script is
    assert sh["processes_created"] >= sh["requests_sent"]
    assert wsgi["processes_per_request"] < 0.05


def test_url_mode_measures_a_running_server(cgi, tmp_path):
    done = demo("--url", cgi.url + "/cgi-bin/hello.sh", "--concurrency", "2", "--duration", "0.4",
                "--warmup", "0.1", "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "report.json").read_text())
    [row] = result["rows"]
    [cell] = row["cells"]
    assert row["system"] == "url" and cell["requests"] > 0 and cell["failed"] == 0
    assert cell["cpu_ms_per_request"] is None   # not the demo's processes: not counted
    assert requests.get(cgi.url + "/cgi-bin/hello.sh").status_code == 200


@pytest.mark.parametrize("args,message", [
    (["--forms", "c,perl"], "unknown form perl; choose from floor, c, sh, py, wsgi"),
    (["--against", "apache"], "unknown peer apache; choose from"),
    (["--url", "ftp://example.org/"], "--url wants an http:// URL"),
    (["--concurrency", "0"], "concurrency must be at least 1"),
    (["--duration", "0"], "want more than 0 seconds"),
    (["--warmup", "-1"], "want at least 0 seconds"),
    (["--workers", "0"], "want a whole number of at least 1"),
    (["--forms", "none"], "nothing to measure"),
])
def test_bad_options_are_explained(args, message):
    done = demo(*args, timeout=30)
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.parametrize("sig,form", [(signal.SIGINT, "wsgi"), (signal.SIGTERM, "py")])
def test_interrupted_demo_stops_its_servers(tmp_path, sig, form):
    before = workdirs()
    proc = subprocess.Popen([sys.executable, "-m", "cgigate", "demo", "--quiet", "--forms", form,
                             "--duration", "30", "-o", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                "cgigate.demo.loadgen" in cmdline(pid) for pid in descendants(proc.pid)):
            time.sleep(0.1)   # until the first point is being measured
        [workdir] = [os.path.join(tempfile.gettempdir(), d) for d in workdirs() - before]
        running = descendants(proc.pid)   # the daemon and what it started, the load generator
        assert leftovers(workdir), "the demo never started a server"
        if form == "wsgi":   # the front, the workers' supervisor and its workers, the load generator
            assert len(running) >= 5, [cmdline(pid) for pid in running]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:   # the test failed before: still let the demo clean up
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; the servers it started are stopped" in err
    wait_gone(running)
    assert leftovers(workdir) == []
    assert workdirs() <= before


def test_plan_starts_each_server_once():
    # The start-up sweep's 0 ms point joins the concurrency sweep's server, even when
    # its concurrency is not among the sweep's (two daemons of one name once shared a
    # log, and the second was asked for the first one's port).
    from cgigate.demo.run import Settings, plan
    runs = plan(Settings(concurrency=(2, 8), forms=("floor", "py", "wsgi"), startup_ms=(0, 10),
                         startup_concurrency=1))
    assert runs == [("floor", 0, (2, 8)), ("py", 0, (1, 2, 8)), ("wsgi", 0, (1, 2, 8)),
                    ("py", 10, (1,)), ("wsgi", 10, (1,))]
    assert len({(what, ms) for what, ms, _ in runs}) == len(runs)
