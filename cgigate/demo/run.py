"""`cgigate demo`: run every form under the same load and count what it costs.

For each form (and each peer asked for with --against) the demo starts the
real server, checks that it answers `Hello, world!`, and then runs one
*cell* per concurrency level: the load generator (a subprocess) opens its
counted window, the demo reads the servers' CPU and PID counters at that
moment and at the window's end (measure.py), and samples their memory in
between.  The start-up sweep runs the Python forms again with app start-up
costs, at one concurrency.  Nothing is simulated: every figure comes from
the load generator's per-request timings or from /proc.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import cgigate
from cgigate.demo import forms as F
from cgigate.demo import model
from cgigate.demo.measure import CLK_TCK, TreeWatch, cpu_ticks, last_pid, machine_busy_ticks, pid_max


WORKDIR_PREFIX = "cgigate-demo-work-"


@dataclass
class Settings:
    duration: float = 1.5
    warmup: float = 0.3
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    forms: tuple[str, ...] = F.DEFAULT_FORMS
    startup_ms: tuple[int, ...] = (0, 10, 50)
    startup_concurrency: int = 1
    against: tuple[str, ...] = ()
    url: str | None = None
    loadgen: str = "builtin"       # or "wrk"
    workers: int = field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 4)))
    keep_workdir: bool = False


class CellError(RuntimeError):
    pass


def _check_answers(url: str, expect: str | None, timeout: float = 20.0) -> None:
    """GET `url` until it answers 200 (with `expect` in the body)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read().decode("utf-8", "replace")
                if expect is None or expect in body:
                    return
                last = f"{r.status} with body {body[:200]!r}"
        except Exception as e:  # connection refused while starting, HTTP errors
            last = str(e)
        time.sleep(0.1)
    raise CellError(f"{url} did not answer {expect or 'anything'!r} within {timeout:g}s: {last}")


def run_cell(url: str, concurrency: int, settings: Settings, watch: TreeWatch | None,
             expect: str | None = F.HELLO) -> dict:
    """One load generator run at `concurrency`, with the servers' counters around its window."""
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "cgigate.demo.loadgen", url, "-c", str(concurrency),
            "-d", f"{settings.duration:g}", "--warmup", f"{settings.warmup:g}", "--timeout", "30",
            "--json", "--window-fd", str(write_end), "--expect", expect or ""]
    if settings.loadgen == "wrk":
        argv.append("--wrk")
    if watch is not None:
        watch.start_sampling()   # its thread exists before any count starts
    first_pid = last_pid()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            pass_fds=(write_end,))
    os.close(write_end)
    before = after = None
    machine: list[int] = []   # busy ticks less the load generator's and ours, at 's' and 'e'

    def others() -> int:
        loadgen = sum(cpu_ticks(proc.pid) or (0, 0))   # its own, and wrk's once reaped
        me = os.times()
        return machine_busy_ticks() - loadgen - round((me.user + me.system) * CLK_TCK)

    try:
        with os.fdopen(read_end, "rb", buffering=0) as window:
            if window.read(1) == b"s":
                machine.append(others())
                if watch is not None:
                    before = watch.snapshot()
            if window.read(1) == b"e":
                machine.append(others())
                if watch is not None:
                    after = watch.snapshot()
    except BaseException:   # interrupted: the load generator goes too
        proc.kill()
        proc.communicate()
        raise
    finally:
        if watch is not None:
            watch.stop_sampling()
    out, err = proc.communicate(timeout=settings.warmup + settings.duration + 120)
    created = last_pid() - first_pid
    if proc.returncode != 0 or not out.strip():
        raise CellError(f"the load generator failed (exit {proc.returncode}): {err.strip()[-1000:]}")
    res = json.loads(out)
    cell = {
        "concurrency": concurrency, "loadgen": res["mode"], "requests": res["requests"],
        "failed": res["failed"], "failures": {**res.get("non200", {}), **res.get("errors", {}),
                                              **({"bad body": res["bad_body"]} if res.get("bad_body") else {})},
        "rps": res["rps"], "latency_ms": res["latency_ms"],
        "processes_per_request": None, "cpu_ms_per_request": None,
        "peak_memory_mib": None, "peak_processes": None, "machine_cpu_ms_per_request": None,
    }
    n = res["requests"] + res["failed"]
    if len(machine) == 2 and n and watch is not None:
        cell["machine_cpu_ms_per_request"] = round(max(0, machine[1] - machine[0]) / CLK_TCK * 1000 / n, 4)
    if watch is not None and before is not None and after is not None:
        usage = watch.usage(before, after, res.get("tasks_created_in_window", 0))
        # Processes are counted over the load generator's whole life, warm-up included,
        # against every request it sent: each of those was answered before it exited,
        # so no request is cut in two by the edges of a window.  It and wrk are not counted.
        if created < 0:
            created += pid_max() - 300
        created -= 1 + res.get("tasks_created", 0)
        sent = res.get("sent_total")
        if sent:
            cell["processes_per_request"] = round(max(0, created) / sent, 4)
            cell["processes_created"] = max(0, created)
            cell["requests_sent"] = sent
        if n:
            front = usage.front_cpu_s * 1000 / n
            backend = usage.backend_cpu_s * 1000 / n
            cell["cpu_ms_per_request"] = {"front": round(front, 4), "backend": round(backend, 4),
                                          "total": round(front + backend, 4)}
        cell["peak_memory_mib"] = round(usage.peak_memory_kib / 1024, 2)
        cell["peak_processes"] = usage.peak_processes
        cell["processes_created_in_window"] = usage.tasks_created
        cell["window_s"] = round(usage.seconds, 4)
    return cell


class Progress:
    """A progress bar (rich) over the cells, or plain lines without rich."""

    def __init__(self, total: int, quiet: bool = False):
        self.total = total
        self.done = 0
        self.quiet = quiet
        self._rich = None
        if quiet:
            return
        try:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._rich = RichProgress(TextColumn("{task.description:<44}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                  transient=False)
        self._rich.start()
        self._task = self._rich.add_task("starting", total=total)

    def step(self, text: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=text)
        elif not self.quiet:
            print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def skip(self, cells: int) -> None:
        self.done += cells
        if self._rich is not None:
            self._rich.advance(self._task, cells)

    def advance(self) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)

    def note(self, text: str) -> None:
        if self._rich is not None:
            self._rich.console.print(text)
        elif not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description="done")
            self._rich.stop()


def _row(system: str, name: str, label: str, short: str, explanation: str, startup_ms: int,
         spawns: bool | None, kind: str) -> dict:
    return {"system": system, "form": name, "label": label, "short": short, "explanation": explanation,
            "kind": kind, "startup_ms": startup_ms, "spawns": spawns, "cells": [], "notes": []}


def plan(settings: Settings) -> list[tuple[str, int, tuple[int, ...]]]:
    """(what, app start-up ms, concurrency levels) for every server the demo starts."""
    runs = []
    c1 = settings.startup_concurrency
    for name in settings.forms:
        levels = settings.concurrency
        if name in ("py", "wsgi") and 0 in settings.startup_ms and c1 not in levels:
            levels = tuple(sorted({*levels, c1}))   # the start-up sweep's point at 0 ms
        runs.append((name, 0, levels))
    for name in settings.against:
        runs.append(("peer:" + name, 0, settings.concurrency))
    if settings.url:
        runs.append(("url", 0, settings.concurrency))
    for name in ("py", "wsgi"):
        if name not in settings.forms:
            continue
        for ms in settings.startup_ms:
            if ms:   # 0 ms is measured with the concurrency sweep
                runs.append((name, ms, (c1,)))
    return runs


def idle_probe(seconds: float = 0.5) -> dict:
    """What the rest of the machine does while the demo does nothing: the busy CPU
    (in cores) and the processes it creates a second.  Both count in every figure."""
    ticks, pids, t0 = machine_busy_ticks(), last_pid(), time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - t0
    return {"busy_cores": round((machine_busy_ticks() - ticks) / CLK_TCK / elapsed, 3),
            "processes_per_s": round(max(0, last_pid() - pids) / elapsed, 1)}


def run(settings: Settings, quiet: bool = False) -> dict:
    """Run the demo; returns the whole result (what report.py writes)."""
    from cgigate.demo import peers as P

    idle = idle_probe()
    workroot = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    work = F.Workdir(workroot)
    runs = plan(settings)
    progress = Progress(sum(len(levels) for _, _, levels in runs), quiet)
    rows: list[dict] = []
    skipped: list[dict] = []
    started = time.time()
    try:
        for what, startup_ms, levels in runs:
            if what == "url":
                row = _row("url", "url", f"your server: {settings.url}", "your URL",
                           "The server at the URL you gave. Its processes are not the demo's, so only "
                           "throughput and latency are measured.", 0, None, "url")
                _run_levels(row, settings.url, levels, settings, None, None, progress)
                rows.append(row)
                continue
            if what.startswith("peer:"):
                peer = P.PEERS[what[5:]]
                reason = peer.missing()
                if reason:
                    skipped.append({"what": peer.name, "reason": reason})
                    progress.note(f"skipped {peer.name}: {reason}")
                    progress.skip(len(levels))
                    continue
                row = _row(peer.name, peer.name, peer.label, peer.name, peer.explanation, 0, peer.spawns, "peer")
                try:
                    server = peer.start(work, settings.workers)
                except Exception as e:
                    skipped.append({"what": peer.name, "reason": str(e)})
                    progress.note(f"skipped {peer.name}: {e}")
                    continue
                try:
                    row["notes"] += list(server.notes)
                    watch = TreeWatch(server.front, server.backend_roots, server.front_tree)
                    _run_levels(row, server.url, levels, settings, watch, F.HELLO, progress)
                except CellError as e:
                    skipped.append({"what": peer.name, "reason": str(e)})
                    progress.note(f"gave up on {peer.name}: {e}")
                    continue
                finally:
                    server.stop()
                rows.append(row)
                continue
            form = F.FORMS[what]
            label = form.label + (f", app start-up {startup_ms} ms" if startup_ms else "")
            short = form.short + (f" +{startup_ms}ms" if startup_ms else "")
            row = _row("cgigate", form.name, label, short, form.explanation, startup_ms, form.spawns, form.kind)
            try:
                route, script = F.route_for(form, work, startup_ms, settings.workers)
            except RuntimeError as e:
                skipped.append({"what": form.name, "reason": str(e)})
                progress.note(f"skipped {form.label}: {e}")
                progress.skip(len(levels))
                continue
            name = f"{form.name}-{startup_ms}ms"
            try:
                daemon = F.DemoDaemon(work.config(name, route), work.error_log(name),
                                      work.apps)
            except RuntimeError as e:
                skipped.append({"what": label, "reason": str(e)})
                progress.note(f"skipped {label}: {e}")
                progress.skip(len(levels))
                continue
            try:
                url = f"http://127.0.0.1:{daemon.port}/demo/{script}"
                row["url"] = url
                _run_levels(row, url, levels, settings, TreeWatch(daemon.pid), F.HELLO, progress)
            except CellError as e:
                skipped.append({"what": label, "reason": f"{e}\n{daemon.log_text()[-1500:]}"})
                progress.note(f"gave up on {label}: {e}")
                continue
            finally:
                daemon.stop()
            rows.append(row)
    finally:
        progress.close()
        if settings.keep_workdir:
            print(f"work directory kept: {workroot}", file=sys.stderr)
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    result = {
        "cgigate_version": cgigate.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "workdir": workroot if settings.keep_workdir else None,
        "workdir_removed": None if settings.keep_workdir else workroot,
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "kernel": platform.release(), "python": platform.python_version(),
                    "idle_before_start": idle},
        "settings": {"duration_s": settings.duration, "warmup_s": settings.warmup,
                     "concurrency": list(settings.concurrency), "forms": list(settings.forms),
                     "startup_ms": list(settings.startup_ms),
                     "startup_concurrency": settings.startup_concurrency,
                     "against": list(settings.against), "url": settings.url, "loadgen": settings.loadgen,
                     "workers": settings.workers},
        "rows": rows,
        "skipped": skipped,
    }
    result["model"] = fit_model(result)
    result["checks"] = checks(result)
    return result


def _run_levels(row: dict, url: str, levels, settings: Settings, watch: TreeWatch | None,
                expect: str | None, progress: Progress) -> None:
    try:
        _check_answers(url, expect)
    except CellError as e:
        raise CellError(f"{row['label']}: {e}") from None
    for c in levels:
        progress.step(f"{row['label'][:36]}  c={c}")
        cell = run_cell(url, c, settings, watch, expect)
        row["cells"].append(cell)
        progress.advance()


def _mean_latency(row: dict, concurrency: int) -> float | None:
    for cell in row["cells"]:
        if cell["concurrency"] == concurrency and cell["requests"]:
            return cell["latency_ms"]["mean"]
    return None


def fit_model(result: dict) -> dict:
    c1 = result["settings"]["startup_concurrency"]
    own = [r for r in result["rows"] if r["system"] == "cgigate"]
    latency = {r["form"]: v for r in own if r["startup_ms"] == 0
               and (v := _mean_latency(r, c1)) is not None}
    startup: dict[str, list[tuple[float, float]]] = {}
    for r in own:
        if r["form"] in ("py", "wsgi"):
            v = _mean_latency(r, c1)
            if v is not None:
                startup.setdefault(r["form"], []).append((float(r["startup_ms"]), v))
    fitted = model.fit(latency, startup)
    fitted["concurrency"] = c1
    checks = []
    for r in own:
        measured = _mean_latency(r, c1)
        predicted = model.predict(fitted["terms_ms"], r["form"], r["startup_ms"])
        if measured is not None and predicted is not None:
            checks.append({"label": r["label"], "measured_ms": measured, "model_ms": round(predicted, 4)})
    fitted["latency_check"] = checks
    cores = result["machine"]["usable_cpus"]
    bounds = []
    top = max(result["settings"]["concurrency"])
    for r in result["rows"]:
        cell = next((c for c in r["cells"] if c["concurrency"] == top), None)
        cpu = cell and (cell.get("machine_cpu_ms_per_request") or (cell["cpu_ms_per_request"] or {}).get("total"))
        if not cpu:
            continue
        bound = model.cpu_bound(cores, cpu)
        bounds.append({"label": r["label"], "concurrency": top, "cpu_ms_per_request": cpu,
                       "cpu_bound_rps": round(bound, 1) if bound else None, "measured_rps": cell["rps"]})
    fitted["cpu_bound"] = bounds
    fitted["lines_text"] = model.describe(fitted)
    return fitted


def checks(result: dict) -> list[str]:
    """What an attentive reader should know about this run's figures."""
    out = []
    for r in result["rows"]:
        for cell in r["cells"]:
            if cell["failed"]:
                out.append(f"{r['label']} at c={cell['concurrency']}: {cell['failed']} failed requests "
                           f"{cell['failures']}")
            c, n = cell["concurrency"], cell["requests"] + cell["failed"]
            if n < 20:
                out.append(f"{r['label']} at c={c}: only {n} requests were counted; "
                           "use a longer --duration for steadier figures")
            elif r["spawns"] and cell["loadgen"] == "wrk" and c > 0.1 * n:
                # wrk counts only the requests it completed
                out.append(f"{r['label']} at c={c}: wrk counted {n} requests and drops up to {c} in "
                           f"flight at its end, so procs/req may be off by up to {c / n:.2f}")
    idle = result["machine"]["idle_before_start"]
    if idle["busy_cores"] > 0.2:
        out.append(f"before the demo started, other programs kept {idle['busy_cores']:.2f} cores busy; "
                   "they share the cores with every form and lower its figures")
    if idle["processes_per_s"] > 5:
        out.append(f"before the demo started, other programs created {idle['processes_per_s']:.0f} processes "
                   "a second; those count in procs/req too")
    return out
