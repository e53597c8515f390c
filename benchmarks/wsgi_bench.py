#!/usr/bin/env python3
"""WSGI benchmark: cgigate --app vs flup behind cgigate vs gunicorn sync.

The same hello-world WSGI app (examples/hello.py, callable `app`) served
three ways, measured in one run with the same load generator
(cgigate/demo/loadgen.py) at concurrency 1, 16 and 64:

  cgigate --app     cgigate serve --app examples.hello:app --workers 2: the
                    asyncio front forwards over FastCGI to 2 pre-forked
                    `cgigate fcgi` workers on private unix sockets
  flup+cgigate      flup's threaded fcgi WSGIServer on a unix socket, behind
                    cgigate serve --fastcgi unix:PATH (the same front)
  gunicorn sync     gunicorn -w 2 -k sync (closes the connection after each
                    response)

Runs are interleaved round-robin (A B C A B C ...) and the median of the
runs is reported, with the ratios cgigate ÷ gunicorn and cgigate ÷ flup.
Then, optionally, cgigate is profiled once at c=16 with py-spy (front
process and one worker).

    .venv/bin/python benchmarks/wsgi_bench.py [--quick] [--duration S] [--runs N]
        [--concurrency 1,16,64] [--out benchmarks/results/wsgi.json] [--no-profile]

See benchmarks/README.md ("WSGI benchmark") for how to read the numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import linecache
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import cgi_bench as cb  # noqa: E402  (process handling, loadgen cells, aggregation)
from cgigate.demo import loadgen  # noqa: E402

HOST = cb.HOST
EXPECT = b"Hello, world!"
APP = "examples.hello:app"
BIN = Path(sys.executable).parent          # the venv's bin/ (not resolved: keep the venv)

CGIGATE, FLUP, GUNICORN = "cgigate --app", "flup+cgigate", "gunicorn sync"
ALL_SYSTEMS = [CGIGATE, FLUP, GUNICORN]

FLUP_SCRIPT = (
    "import sys\n"
    "from flup.server.fcgi import WSGIServer\n"
    "from examples.hello import app\n"
    "WSGIServer(app, bindAddress=sys.argv[1], debug=False).run()\n"
)

log = cb.log

TARGETS = {
    "cgigate/gunicorn rps at c=16": 1.0,
    "cgigate/flup+cgigate rps at c=16": 2.0,
    "cgigate p99 ms at c=16": 5.0,
}


# --------------------------------------------------------------------------
# systems
# --------------------------------------------------------------------------

class System(cb.System):
    def url(self, script: str = "") -> str:
        return f"http://{HOST}:{self.port}/"


class KillProc(cb.Proc):
    """flup: its SIGTERM handling waits for threads, so SIGKILL straight away."""

    def stop(self) -> None:
        if self.alive():
            cb._signal(self.pid, signal.SIGKILL)
            try:
                self.p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        super().stop()


def wait_hello(procs, port: int, timeout: float) -> tuple[bool, str]:
    """Poll GET / until a 200 with the Hello body."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                return False, f"{p.name} exited with code {p.p.returncode}"
        try:
            r = loadgen.http_get(HOST, port, "/", timeout=2)
            if r.status == 200 and EXPECT in r.body:
                return True, "ready"
            last = f"GET / -> {r.status} {bytes(r.body[:60])!r}"
        except Exception as e:  # noqa: BLE001
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    return False, f"not ready after {timeout:.0f}s (last: {last})"


def _cgigate_version() -> str:
    try:
        import cgigate  # type: ignore

        return getattr(cgigate, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        return f"import failed: {e}"


def _dist_version(name: str) -> str | None:
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:  # noqa: BLE001
        return None


def _front_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cgigate", "serve", "--bind", f"{HOST}:{port}", *extra,
            "--access-log", "off"]


def launch(s: System, name: str, argv: list[str], log: Path, args) -> System:
    """Start `argv` as part of `s` and wait until it answers GET / with the Hello body."""
    try:
        s.procs.append(cb.Proc(name, argv, REPO, cb.server_env(), log))
    except OSError as e:
        return s.fail(f"could not start {name}: {e}")
    ok, why = wait_hello(s.procs, s.port, args.start_timeout)
    if not ok:
        return s.fail(why)
    s.ok = True
    return s


def start_cgigate(tmp: Path, args) -> System:
    s = System(CGIGATE, "http")
    s.port = cb.free_port()
    argv = _front_argv(s.port, "--app", APP, "--workers", str(args.workers))
    s.details.update(argv=argv, cwd=str(REPO), version=_cgigate_version())
    return launch(s, "cgigate", argv, tmp / "cgigate-app.log", args)


def start_flup(tmp: Path, args) -> System:
    s = System(FLUP, "http")
    if _dist_version("flup") is None:
        return s.fail("skipped: flup is not installed in this interpreter")
    sock = tmp / "flup.sock"
    fl_argv = [sys.executable, "-c", FLUP_SCRIPT, str(sock)]
    try:
        s.procs.append(KillProc("flup", fl_argv, REPO, cb.server_env(), tmp / "flup.log"))
    except OSError as e:
        return s.fail(f"could not start flup: {e}")
    why = cb.wait_unix_socket(s.procs[0], sock, args.start_timeout)
    if why:
        return s.fail(why)
    s.port = cb.free_port()
    argv = _front_argv(s.port, "--fastcgi", f"unix:{sock}")
    s.details.update(flup_argv=fl_argv[:2] + ["<inline script>", str(sock)], flup_script=FLUP_SCRIPT,
                     flup_version=_dist_version("flup"), front_argv=argv, cwd=str(REPO),
                     version=_cgigate_version())
    return launch(s, "cgigate", argv, tmp / "cgigate-flup.log", args)


def _gunicorn_has(flag: str) -> bool:
    try:
        out = subprocess.run([str(BIN / "gunicorn"), "--help"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in out


def start_gunicorn(tmp: Path, args) -> System:
    s = System(GUNICORN, "http")
    exe = BIN / "gunicorn"
    if not exe.exists():
        return s.fail(f"skipped: {exe} not found (.venv/bin/pip install gunicorn, "
                      "or pip install -e '.[bench]')")
    s.port = cb.free_port()
    argv = [str(exe), "-w", str(args.workers), "-k", "sync", "-b", f"{HOST}:{s.port}"]
    if _gunicorn_has("--no-control-socket"):
        argv.append("--no-control-socket")
    else:
        s.details["note_control_socket"] = "--no-control-socket is not a flag of this gunicorn; dropped"
    argv.append(APP)
    s.details.update(argv=argv, cwd=str(REPO), version=_dist_version("gunicorn"),
                     note="sync worker: Connection: close after every response")
    return launch(s, "gunicorn", argv, tmp / "gunicorn.log", args)


def verify(s: System) -> dict:
    return cb.check_body(s.port, "/", "server")


# --------------------------------------------------------------------------
# profiling (py-spy)
# --------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = cb._stat(int(d))
            if st is not None and st[0] == pid:
                kids.append(int(d))
    return sorted(kids)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cpu_ticks(pids) -> int:
    total = 0
    for pid in pids:
        try:
            data = Path(f"/proc/{pid}/stat").read_bytes()
        except (OSError, TypeError):
            continue
        rest = data[data.rfind(b")") + 2:].split()
        total += int(rest[11]) + int(rest[12])     # utime, stime
    return total


def find_worker(front_pid: int) -> tuple[int | None, int | None]:
    """(the `cgigate fcgi` supervisor started by the front, its first worker)."""
    for kid in _children(front_pid):
        if "cgigate fcgi" in _cmdline(kid):
            workers = _children(kid)
            return kid, (workers[0] if workers else None)
    return None, None


_SYSCALL_RE = re.compile(r"\.(recv|recv_into|send|sendall|accept|write|writelines|connect|"
                         r"close|shutdown|settimeout|setsockopt)\(|transport\.(write|writelines)|"
                         r"sock_(recv|send)")
_THREAD_FILES = ("threading.py", "concurrent/futures/thread.py", "concurrent/futures/_base.py",
                 "queue.py")


def _frame_parts(frame: str) -> tuple[str, str, int]:
    """'func (path:line)' -> (func, path, line)."""
    m = re.match(r"^(.*) \((.*?):(\d+)\)$", frame.strip())
    if not m:
        return frame.strip(), "", 0
    return m.group(1), m.group(2), int(m.group(3))


def _short(path: str) -> str:
    p = path.replace(str(REPO) + "/", "")
    for marker in ("site-packages/", "lib/python3"):
        i = p.find(marker)
        if i >= 0:
            p = p[i + len(marker):]
            if marker == "lib/python3":
                p = "stdlib" + p[p.find("/"):]
            break
    return p


_SEARCH = [str(REPO)] + [p for p in sys.path if p and Path(p).is_dir()]


def _source_line(path: str, line: int) -> str:
    """The source text of path:line; py-spy gives paths relative to sys.path."""
    if not path or not line:
        return ""
    cands = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in _SEARCH]
    for c in cands:
        if os.path.exists(c):
            return linecache.getline(c, line).strip()
    return ""


def classify(func: str, path: str, line: int, role: str) -> str:
    src = _source_line(path, line)
    if src and _SYSCALL_RE.search(src):
        return "syscalls (socket I/O)"
    p = path.replace("\\", "/")
    if not p.startswith("/"):
        p = "/" + p
    if p.endswith("/asyncio/runners.py") and func == "Runner.run":
        return "event loop: uvloop C code (epoll, socket reads/writes, callbacks)"
    if "/cgigate/fastcgi/" in p or "/cgigate/upstream/pool.py" in p:
        return "FastCGI encode/decode + pool"
    if "/cgigate/worker/wsgi.py" in p or "/examples/hello.py" in p:
        return "WSGI (environ, run_app, app)"
    if "/cgigate/worker/server.py" in p:
        return "worker glue (connection/dispatch)"
    if "/cgigate/front/" in p or "/cgigate/upstream/handler.py" in p or "/cgigate/cgi/" in p:
        return "HTTP parsing / front glue"
    if any(p.endswith("/" + f) for f in _THREAD_FILES):
        return "threads / locks / executor"
    if "/asyncio/" in p or "/uvloop/" in p:
        return "event loop (asyncio/uvloop Python)"
    if p.endswith("/socket.py"):
        return "syscalls (socket I/O)"
    if "/cgigate/" in p:
        return "other cgigate"
    return "other"


def summarise_raw(path: Path, role: str, top: int = 15) -> dict:
    """Self-time (leaf frame) totals from a py-spy raw (collapsed) file."""
    by_leaf: Counter = Counter()
    by_func: Counter = Counter()
    by_group: Counter = Counter()
    total = 0
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return {"error": str(e)}
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        # py-spy puts "process ..." / "thread ..." pseudo-frames first with some options
        leaf = frames[-1]
        func, fpath, fline = _frame_parts(leaf)
        total += n
        by_leaf[f"{func} ({_short(fpath)}:{fline})"] += n
        by_func[f"{func} ({_short(fpath)})"] += n
        by_group[classify(func, fpath, fline, role)] += n

    def pct(c: Counter, k: int | None = None):
        return [{"frame": f, "samples": v, "pct": round(100.0 * v / total, 1)}
                for f, v in c.most_common(k)]

    return {"samples": total, "groups": pct(by_group), "top_lines": pct(by_leaf, top),
            "top_functions": pct(by_func, top)}


def profile_cgigate(s: System, args, pin: bool, tmp: Path) -> dict:
    """One c=16 load on cgigate --app while py-spy samples the front and a worker:
    first with --gil (CPU-only Python samples), then without (all non-idle threads)."""
    out: dict = {"concurrency": 16, "rate_hz": 500, "seconds": args.profile_seconds}
    pyspy = BIN / "py-spy"
    if not pyspy.exists():
        out["skipped"] = f"{pyspy} not found"
        return out
    front = s.procs[0].pid
    sup, worker = find_worker(front)
    out.update(front_pid=front, fcgi_supervisor_pid=sup, worker_pid=worker)
    if worker is None:
        out["skipped"] = "no `cgigate fcgi` worker found under the front"
        return out
    modes = [("gil", ["--gil"]), ("nogil", [])]
    secs = args.profile_seconds
    load_secs = 1.0 + len(modes) * (secs + 1.5) + 1.0
    lg = [*cb.LOADGEN, s.url(), "-c", "16", "-d", f"{load_secs:g}",
          "--warmup", "0.5", "--json"] + (["--pin", "1"] if pin else [])
    log(f"profiling cgigate at c=16: front pid {front}, worker pid {worker} "
        f"(fcgi supervisor {sup}); py-spy {secs:g}s at 500 Hz, --gil then without")
    load = subprocess.Popen(lg, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = {"front": [front], "fcgi supervisor": [sup], "workers": _children(sup),
               "load generator": [load.pid]}
    try:
        time.sleep(1.5)
        cpu0, t0 = {k: _cpu_ticks(v) for k, v in watched.items()}, time.monotonic()
        for mode, extra in modes:
            spies = {}
            for role, pid in (("front", front), ("worker", worker)):
                f = tmp / f"pyspy-{role}-{mode}.txt"
                argv = [str(pyspy), "record", "-p", str(pid), "-d", f"{secs:g}", "-r", "500",
                        "-f", "raw", "-o", str(f), "--nonblocking", *extra]
                spies[role] = (argv, f, subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                         stderr=subprocess.STDOUT, text=True))
            for role, (argv, f, p) in spies.items():
                try:
                    msg, _ = p.communicate(timeout=secs + 30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    msg, _ = p.communicate()
                key = f"{role}_{mode}"
                res = summarise_raw(f, role) if f.exists() else {"error": (msg or "")[-500:]}
                res["argv"] = argv
                res["rc"] = p.returncode
                if f.exists() and args.profile_dir:
                    dest = Path(args.profile_dir)
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, dest / f.name)
                    res["raw_file"] = str(dest / f.name)
                out[key] = res
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        out["cpu_pct_during_profile"] = {
            k: round(100.0 * (_cpu_ticks(v) - cpu0[k]) / hz / elapsed, 1) for k, v in watched.items()}
        out["cpu_note"] = ("utime+stime from /proc over the profiling window (py-spy attached), "
                           "100% = one core; 'workers' is the sum of all workers")
        lo, le = load.communicate(timeout=load_secs + 60)
        if lo.strip():
            r = json.loads(lo.strip().splitlines()[-1])
            out["load_during_profile"] = {"rps": r["rps"], "p50_ms": r["latency_ms"]["p50"],
                                          "p99_ms": r["latency_ms"]["p99"], "failed": r["failed"]}
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    return out


def print_profile(prof: dict) -> None:
    if prof.get("skipped"):
        log(f"profile: skipped ({prof['skipped']})")
        return
    ld = prof.get("load_during_profile")
    if ld:
        log(f"profile load (c=16, py-spy attached): {ld['rps']:,.0f} req/s, p50 {ld['p50_ms']:.2f} ms, "
            f"p99 {ld['p99_ms']:.2f} ms, failed {ld['failed']}")
    cpu = prof.get("cpu_pct_during_profile")
    if cpu:
        log("CPU during the profile window (100% = one core): "
            + ", ".join(f"{k} {v:.0f}%" for k, v in cpu.items()))
    for key in ("front_gil", "worker_gil", "front_nogil", "worker_nogil"):
        res = prof.get(key)
        if not res:
            continue
        role, mode = key.split("_")
        title = f"{role} (pid {prof[role + '_pid']}), " + (
            "--gil: samples of the GIL holder" if mode == "gil" else
            "no --gil: py-spy's non-idle threads (may include threads blocked in recv/accept/wait)")
        if "error" in res:
            log(f"== profile {title}: FAILED: {res['error']}")
            continue
        log(f"== profile {title}: {res['samples']} samples ==")
        log("  self time by group:")
        for g in res["groups"]:
            log(f"    {g['pct']:5.1f}%  {g['frame']}")
        log("  top self-time lines:")
        for g in res["top_lines"][:12]:
            log(f"    {g['pct']:5.1f}%  {g['frame']}")
        log()


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="WSGI benchmark: cgigate --app vs flup behind cgigate "
                                             "vs gunicorn sync.")
    cb.add_timing_args(ap)
    ap.add_argument("--concurrency", default="1,16,64", help="comma list of concurrencies")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for cgigate and gunicorn")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                    help=f"comma list, subset of {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--out", default=str(HERE / "results" / "wsgi.json"), help="JSON output path")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the py-spy profile of cgigate at c=16")
    ap.add_argument("--profile-seconds", type=float, default=5.0)
    ap.add_argument("--profile-dir", default=str(HERE / "results" / "wsgi-profile"),
                    help="where the raw py-spy files are kept ('' to discard)")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--plain", action="store_true", help="plain-text tables even if rich is importable")
    args = ap.parse_args(argv)
    cb.settle_common_args(ap, args, ALL_SYSTEMS)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    return args


def _ratio(a, b):
    return a / b if a is not None and b else None


def build_tables(results: dict, systems: dict, order: list[str]):
    tables = []
    for key, cell in results.items():
        cg = cell.get(CGIGATE, {}).get("summary", {})
        rows, notes = [], []
        for name in order:
            entry = cell.get(name, {})
            a = entry.get("summary", {})
            if not a.get("runs_ok"):
                why = entry.get("skipped") or (systems[name].reason if name in systems else "") or "no data"
                rows.append([name, "—", "", "—", "—", "—", "—"])
                notes.append(f"{name}: {why}")
                continue
            spread, err = cb.spread_and_errors(a)
            r = _ratio(cg.get("rps_median"), a["rps_median"])
            ratio = "—" if name == CGIGATE else ("n/a" if r is None else f"{r:.2f}×")
            conns = statistics.median([x.get("mean_requests_per_connection") or 0
                                       for x in entry["runs"] if x.get("ok")])
            rows.append([name, cb._fmt(a["rps_median"]), spread, cb._fmt(a["p50_ms_median"], 2),
                         cb._fmt(a["p99_ms_median"], 2), err, ratio, cb._fmt(conns, 1)])
            if a.get("listen_overflows_total"):
                notes.append(f"{name}: {a['listen_overflows_total']} TCP listen-queue overflows")
        rows = [r + [""] * (8 - len(r)) for r in rows]
        header = ["system", "req/s (median)", "min–max", "p50 ms", "p99 ms", "errors",
                  "cgigate ÷ this (req/s)", "req/conn"]
        tables.append((f"hello WSGI app, concurrency {cell['concurrency']}", header, rows, notes))
    return tables


def target_report(results: dict) -> list[dict]:
    c16 = results.get("c=16", {})
    cg = c16.get(CGIGATE, {}).get("summary", {})
    gu = c16.get(GUNICORN, {}).get("summary", {})
    fl = c16.get(FLUP, {}).get("summary", {})
    out = []
    r = _ratio(cg.get("rps_median"), gu.get("rps_median"))
    out.append({"target": "cgigate --app req/s ÷ gunicorn sync req/s at c=16 ≥ 1.0×", "value": r,
                "want": 1.0, "met": None if r is None else r >= 1.0,
                "shortfall_pct": None if r is None or r >= 1.0 else round(100 * (1 - r / 1.0), 1)})
    r = _ratio(cg.get("rps_median"), fl.get("rps_median"))
    out.append({"target": "cgigate --app req/s ÷ flup+cgigate req/s at c=16 ≥ 2.0×", "value": r,
                "want": 2.0, "met": None if r is None else r >= 2.0,
                "shortfall_pct": None if r is None or r >= 2.0 else round(100 * (1 - r / 2.0), 1)})
    p = cg.get("p99_ms_median")
    out.append({"target": "cgigate --app p99 at c=16 < 5 ms", "value": p, "want": 5.0,
                "met": None if p is None else p < 5.0,
                "excess_pct": None if p is None or p < 5.0 else round(100 * (p / 5.0 - 1), 1)})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, cb._raise_interrupt)
    signal.signal(signal.SIGHUP, cb._raise_interrupt)

    cmdline = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    minfo = cb.machine_info()
    ncpu = len(minfo["affinity"] or []) or (os.cpu_count() or 1)
    pin = ncpu > 1

    log(f"command: {cmdline}")
    log(f"machine: nproc={minfo['nproc']} affinity={minfo['affinity']} cpu={minfo.get('cpu', '?')}")
    log(f"         python {minfo['python']} ({sys.executable}), kernel {minfo['kernel']}, "
        f"{minfo.get('os', '?')}, loadavg {minfo['loadavg']}")
    log(f"settings: {len(args.concurrency)} concurrencies {args.concurrency} x {len(args.systems)} systems "
        f"x {args.runs} run(s), {args.duration:g} s measured + {args.warmup:g} s warm-up each, "
        f"round-robin order {' → '.join(args.systems)}; app {APP}; {args.workers} workers")
    log("load generator: cgigate/demo/loadgen.py (closed loop, keep-alive reuse, reconnect on "
        "Connection: close with the connect time counted; p50/p99 from its own perf_counter timings)"
        + (", pinned to CPU 1 (servers unpinned)" if pin else ", not pinned (1 CPU)"))
    log()

    out = {
        "command": cmdline,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": minfo,
        "settings": {
            "duration_s": args.duration, "warmup_s": args.warmup, "runs": args.runs,
            "concurrency": args.concurrency, "systems": args.systems, "app": APP,
            "workers": args.workers,
            "order": "round-robin: for run: for concurrency: for system",
            "loadgen_pinned_cpu": 1 if pin else None,
            "aggregate": "median over runs of req/s, of p50 and of p99; errors summed",
            "latency_source": "harness's own per-request time.perf_counter timings",
        },
        "systems": {},
        "results": {},
        "targets": [],
        "profile": None,
        "interrupted": False,
    }
    results: dict = out["results"]
    systems: dict[str, System] = {}
    tmp = Path(tempfile.mkdtemp(prefix="wsgibench-"))
    rc = 0
    try:
        starters = {CGIGATE: start_cgigate, FLUP: start_flup, GUNICORN: start_gunicorn}
        for name in args.systems:
            log(f"starting {name} ...")
            try:
                s = starters[name](tmp, args)
            except Exception as e:  # noqa: BLE001
                s = System(name, "?").fail(f"harness error while starting: {type(e).__name__}: {e}")
            systems[name] = s
            if s.ok:
                v = s.verified["/"] = verify(s)
                if not v["ok"]:
                    s.ok, s.reason = False, f"body check failed: {v['why']}"
                log(f"  {name}: up on {HOST}:{s.port}; body check "
                    + (f"OK ({v['status']}, {v['version']}, {v['framing']}"
                       f"{', keep-alive' if v['keep_alive'] else ', no keep-alive'})"
                       if v["ok"] else f"FAILED ({v['why']})"))
                if s.details.get("note_control_socket"):
                    log(f"  note: {s.details['note_control_socket']}")
            else:
                cb.report_unavailable(name, s)
        log()

        for run in range(1, args.runs + 1):
            for conc in args.concurrency:
                key = f"c={conc}"
                cell = results.setdefault(key, {"concurrency": conc})
                for name in args.systems:
                    s = systems[name]
                    entry = cell.setdefault(name, {"runs": []})
                    if not s.ok:
                        entry["skipped"] = s.reason
                        continue
                    if not s.alive():
                        dead = [p.name for p in s.procs if not p.alive()]
                        s.ok = False
                        s.reason = f"{'/'.join(dead)} died during the benchmark"
                        s.details["log_tail"] = {p.name: p.log_tail() for p in s.procs}
                        entry["skipped"] = s.reason
                        log(f"  {name}: {s.reason}")
                        continue
                    r = cb.run_cell(s, "", conc, args, pin)
                    r["run"] = run
                    entry["runs"].append(r)
                    if r.get("ok"):
                        lat = r["latency_ms"]
                        log(f"[run {run}/{args.runs}] {key:<5} {name:<14} {r['rps']:>9,.1f} req/s"
                            f"  p50 {cb._fmt(lat['p50'], 2):>7} ms  p99 {cb._fmt(lat['p99'], 2):>7} ms"
                            f"  failed {r['failed']}  conns {r.get('connects')}"
                            + (f"  listen-overflows {r['listen_overflows']}" if r.get("listen_overflows")
                               else ""))
                    else:
                        log(f"[run {run}/{args.runs}] {key:<5} {name:<14} FAILED: {r['why']}")

        if args.profile and CGIGATE in systems and systems[CGIGATE].ok and systems[CGIGATE].alive():
            log()
            try:
                out["profile"] = profile_cgigate(systems[CGIGATE], args, pin, tmp)
            except Exception as e:  # noqa: BLE001
                out["profile"] = {"skipped": f"harness error: {type(e).__name__}: {e}"}
    except KeyboardInterrupt:
        out["interrupted"] = True
        rc = 130
        log("\ninterrupted: cleaning up and writing partial results")
    finally:
        cb.stop_all(systems.values(), tmp)

    for key, cell in results.items():
        for name in args.systems:
            entry = cell.get(name)
            if isinstance(entry, dict) and "runs" in entry:
                entry["summary"] = cb.aggregate(entry["runs"])
        cg = cell.get(CGIGATE, {}).get("summary", {})
        cell["ratios"] = {
            f"cgigate/{name}": {
                "rps": _ratio(cg.get("rps_median"), cell.get(name, {}).get("summary", {}).get("rps_median")),
                "p99": _ratio(cg.get("p99_ms_median"),
                              cell.get(name, {}).get("summary", {}).get("p99_ms_median")),
            }
            for name in args.systems if name != CGIGATE
        }
    out["systems"] = {n: s.to_json() for n, s in systems.items()}
    out["targets"] = target_report(results)
    out["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    caption = (f"median of {args.runs} run(s) x {args.duration:g} s; p50/p99 from the harness's own "
               "per-request timings; req/conn = mean requests per client connection (1 = a new "
               "TCP connection per request, its connect time counted)")
    log()
    cb.print_tables(build_tables(results, systems, args.systems), args.plain, caption)

    log("ratios (cgigate --app ÷ other, req/s):")
    for key, cell in results.items():
        parts = []
        for name in (GUNICORN, FLUP):
            r = cell.get("ratios", {}).get(f"cgigate/{name}", {}).get("rps")
            if name in args.systems:
                parts.append(f"÷ {name} {'n/a' if r is None else f'{r:.2f}×'}")
        log(f"  {key:<5} " + "   ".join(parts))
    c16 = results.get("c=16")
    if c16:
        log("p99 at c=16: " + ", ".join(
            f"{n} {cb._fmt(c16.get(n, {}).get('summary', {}).get('p99_ms_median'), 2)} ms"
            for n in args.systems))
    log()
    log("targets:")
    for t in out["targets"]:
        v = t["value"]
        shown = "n/a" if v is None else (f"{v:.2f} ms" if "p99" in t["target"] else f"{v:.2f}×")
        verdict = ("not measured" if t["met"] is None else "MET" if t["met"] else
                   f"MISSED by {t.get('shortfall_pct', t.get('excess_pct'))}%")
        log(f"  {t['target']}: {shown} -> {verdict}")
    log()
    if out["profile"]:
        out["profile"]["note"] = ("self time = leaf frame of each sample; C calls (socket I/O) are "
                                  "charged to the Python line that makes them and grouped as syscalls "
                                  "by that line's source text")
        print_profile(out["profile"])

    cb.write_results(out, Path(args.out))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
