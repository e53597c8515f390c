#!/usr/bin/env python3
"""CGI benchmark: cgigate vs nginx+fcgiwrap vs http.server --cgi vs a bare spawn loop.

Measures requests/s and p50/p99 latency for cgi-bin/hello.sh and
cgi-bin/hello.py at concurrency 1 and 16, all systems side by side in one
run, with runs interleaved round-robin (A B C D A B C D ...) and the median
of the runs reported.  Latencies come from the harness's own per-request
timings (cgigate/demo/loadgen.py), not from wrk.

    .venv/bin/python benchmarks/cgi_bench.py [--quick] [--duration S] [--runs N]
                                             [--out benchmarks/results/cgi.json]

See benchmarks/README.md for how to read the numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import signal
import socket
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

from cgigate.demo import loadgen  # noqa: E402  (the load generator `cgigate demo` uses too)

LOADGEN = [sys.executable, "-m", "cgigate.demo.loadgen"]
HOST = "127.0.0.1"
# The PATH every system hands its CGI scripts (so `#!/usr/bin/env python3`
# resolves to the same interpreter everywhere, and not to a pyenv shim).
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
EXPECT = b"Hello, world!"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"

CGIGATE, NGINX, HTTPSERVER, SPAWN = "cgigate", "nginx+fcgiwrap", "http.server", "spawn-loop"
ALL_SYSTEMS = [CGIGATE, NGINX, HTTPSERVER, SPAWN]


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------
# process handling
# --------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, pgid, state, starttime) from /proc/PID/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[1]), int(rest[2]), rest[0].decode(), int(rest[19])
    except (IndexError, ValueError):
        return None


def _tree(root: int) -> dict[int, int]:
    """root, its descendants and every member of its process group: pid -> starttime."""
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                table[int(d)] = st
    found = {pid: st[3] for pid, st in table.items() if pid == root or st[1] == root}
    changed = True
    while changed:
        changed = False
        for pid, st in table.items():
            if st[0] in found and pid not in found:
                found[pid] = st[3]
                changed = True
    return found


class Proc:
    """A server process started in its own session; stop() kills its whole tree."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict, logfile: Path):
        self.name = name
        self.argv = argv
        self.logfile = logfile
        self._log = open(logfile, "wb")
        self.p = subprocess.Popen(
            argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """Stop the process, then everything left of its tree and process group.

        The root goes first so that a pre-forking parent (fcgiwrap, the nginx
        master) stops respawning workers; fcgiwrap does not take its workers
        down with it, so the rest are signalled afterwards.  Orphans lose their
        parent link but keep the process group id, and a snapshot taken before
        the root dies covers children that moved to groups of their own.
        """
        root = self.p.pid
        snapshot = _tree(root)
        if self.alive():
            _signal(root, signal.SIGTERM)
            try:
                self.p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                snapshot.update(_tree(root))
                _signal(root, signal.SIGKILL)
                try:
                    self.p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
            snapshot.update(_tree(root))
            left = {pid: t for pid, t in snapshot.items() if pid != root and _running(pid, t)}
            if not left:
                break
            for pid in left:
                _signal(pid, sig)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and any(_running(p, t) for p, t in left.items()):
                time.sleep(0.05)
        self._log.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _running(pid: int, starttime: int) -> bool:
    """Still the same process (same start time), and not a zombie."""
    st = _stat(pid)
    return st is not None and st[3] == starttime and st[2] != "Z"


def become_subreaper() -> bool:
    """Adopt orphaned descendants (prctl PR_SET_CHILD_SUBREAPER), so that workers
    outliving their parent (fcgiwrap's do) are reaped by us, not left to init."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except Exception:  # noqa: BLE001
        return False


def reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def server_env() -> dict:
    return {"PATH": CLEAN_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def wait_ready(proc_list: list[Proc], port: int, path: str, timeout: float) -> tuple[bool, str]:
    """Poll TCP connect + GET path until 200. Returns (ok, reason)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for p in proc_list:
            if not p.alive():
                return False, f"{p.name} exited with code {p.p.returncode}"
        try:
            with socket.create_connection((HOST, port), timeout=1):
                pass
            r = loadgen.http_get(HOST, port, path, timeout=5)
            if r.status == 200:
                return True, "ready"
            last = f"GET {path} -> {r.status}"
        except Exception as e:  # noqa: BLE001
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    return False, f"not ready after {timeout:.0f}s (last: {last})"


# --------------------------------------------------------------------------
# systems
# --------------------------------------------------------------------------

class System:
    def __init__(self, name: str, kind: str):
        self.name = name
        self.kind = kind  # "http" or "spawn"
        self.port: int | None = None
        self.procs: list[Proc] = []
        self.ok = False
        self.reason = ""
        self.details: dict = {}
        self.verified: dict[str, dict] = {}

    def url(self, script: str) -> str:
        return f"http://{HOST}:{self.port}/cgi-bin/{script}"

    def fail(self, reason: str) -> "System":
        self.ok = False
        self.reason = reason
        tails = {p.name: p.log_tail() for p in self.procs if p.log_tail()}
        if tails:
            self.details["log_tail"] = tails
        return self

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as e:  # noqa: BLE001
                log(f"  warning: stopping {p.name}: {e}")

    def to_json(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "kind": self.kind, "port": self.port,
                "details": self.details, "verified": self.verified}


def start_cgigate(tmp: Path, args) -> System:
    s = System(CGIGATE, "http")
    s.port = free_port()
    if args.cgigate_cmd:
        argv = shlex.split(args.cgigate_cmd.format(port=s.port, host=HOST, python=sys.executable))
    else:
        argv = [sys.executable, "-m", "cgigate", "serve", "--bind", f"{HOST}:{s.port}",
                "--cgi-dir", "cgi-bin", "--cgi-prefix", "/cgi-bin/", "--access-log", "off",
                "--max-children", "64"]
    s.details["argv"] = argv
    s.details["cwd"] = str(REPO)
    try:
        import cgigate  # type: ignore

        s.details["version"] = getattr(cgigate, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        s.details["version"] = f"import failed: {e}"
    try:
        s.procs.append(Proc("cgigate", argv, REPO, server_env(), tmp / "cgigate.log"))
    except OSError as e:
        return s.fail(f"could not start: {e}")
    ok, why = wait_ready(s.procs, s.port, "/cgi-bin/hello.sh", args.start_timeout)
    if not ok:
        return s.fail(why)
    s.ok = True
    return s


NGINX_CONF = """\
# generated by benchmarks/cgi_bench.py
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    fastcgi_temp_path {tmp}/fastcgi;
    proxy_temp_path {tmp}/proxy;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    server {{
        listen {host}:{port};
        root {repo};
        location /cgi-bin/ {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_param PATH {path};
            fastcgi_pass unix:{sock};
        }}
    }}
}}
"""


def wait_unix_socket(proc, sock: Path, timeout: float) -> str | None:
    """Wait until `proc` accepts connections on the unix socket `sock`;
    None when it does, else why not."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            return f"{proc.name} exited with code {proc.p.returncode}"
        if sock.exists():
            try:
                with socket.socket(socket.AF_UNIX) as u:
                    u.connect(str(sock))
                return None
            except OSError:
                pass
        if time.monotonic() > deadline:
            return f"{proc.name}'s socket did not appear within {timeout:g}s"
        time.sleep(0.05)


def start_nginx(tmp: Path, args) -> System:
    s = System(NGINX, "http")
    nginx, fcgiwrap = which("nginx"), which("fcgiwrap")
    missing = [n for n, p in (("nginx", nginx), ("fcgiwrap", fcgiwrap)) if not p]
    if missing:
        return s.fail(f"skipped: {' and '.join(missing)} not installed")
    if not Path("/etc/nginx/fastcgi_params").exists():
        return s.fail("skipped: /etc/nginx/fastcgi_params not found")
    d = tmp / "nginx"
    d.mkdir()
    sock = d / "fcgiwrap.sock"
    s.port = free_port()
    fw_argv = [fcgiwrap, "-c", str(args.fcgiwrap_children), "-s", f"unix:{sock}"]
    try:
        s.procs.append(Proc("fcgiwrap", fw_argv, d, server_env(), tmp / "fcgiwrap.log"))
    except OSError as e:
        return s.fail(f"could not start fcgiwrap: {e}")
    why = wait_unix_socket(s.procs[0], sock, 10)
    if why:
        return s.fail(why)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=args.nginx_workers, tmp=d, host=HOST, port=s.port,
                                      repo=REPO, path=CLEAN_PATH, sock=sock))
    ng_argv = [nginx, "-c", str(conf), "-e", str(d / "early-error.log"), "-p", f"{d}/"]
    s.details.update(
        fcgiwrap_argv=fw_argv, nginx_argv=ng_argv, nginx_conf=conf.read_text(),
        nginx_worker_processes=args.nginx_workers, fcgiwrap_children=args.fcgiwrap_children,
        nginx_version=_cmd_out([nginx, "-v"]), fcgiwrap_version=_dpkg_version("fcgiwrap"),
    )
    try:
        s.procs.append(Proc("nginx", ng_argv, d, server_env(), tmp / "nginx-stdout.log"))
    except OSError as e:
        return s.fail(f"could not start nginx: {e}")
    ok, why = wait_ready(s.procs, s.port, "/cgi-bin/hello.sh", args.start_timeout)
    if not ok:
        for name in ("early-error.log", "error.log"):
            f = d / name
            if f.exists() and f.stat().st_size:
                s.details[f"nginx_{name}"] = f.read_text(errors="replace")[-2000:]
        return s.fail(why)
    s.ok = True
    return s


def _httpserver_python() -> tuple[str | None, str]:
    """The system python3 (resolved through pyenv shims) if it still has CGIHTTPRequestHandler."""
    probe = "import sys, http.server; http.server.CGIHTTPRequestHandler; print(sys.executable)"
    tried = []
    for cand in (shutil.which("python3"), "/usr/bin/python3", sys.executable):
        if not cand or cand in tried:
            continue
        tried.append(cand)
        try:
            out = subprocess.run([cand, "-W", "ignore", "-c", probe], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[-1], ""
    return None, f"no python3 with http.server.CGIHTTPRequestHandler (tried {', '.join(tried)})"


def start_httpserver(tmp: Path, args) -> System:
    s = System(HTTPSERVER, "http")
    py, why = _httpserver_python()
    if not py:
        return s.fail(f"skipped: {why}")
    # When run as root, CGIHTTPRequestHandler setuid()s the CGI child to `nobody`,
    # so the scripts must live somewhere `nobody` can reach: a 0755 copy in tmp.
    root = tmp / "httpserver"
    root.mkdir()
    root.chmod(0o755)
    shutil.copytree(REPO / "cgi-bin", root / "cgi-bin", symlinks=False)
    (root / "cgi-bin").chmod(0o755)
    s.port = free_port()
    argv = [py, "-m", "http.server", "--cgi", "--bind", HOST, str(s.port)]
    s.details.update(argv=argv, cwd=str(root), python=py,
                     python_version=_cmd_out([py, "-c", "import sys; print(sys.version.split()[0])"]),
                     note="scripts are a copy of cgi-bin/ (CGI children run as nobody when the "
                          "server runs as root); HTTP/1.0, one connection per request")
    try:
        s.procs.append(Proc("http.server", argv, root, server_env(), tmp / "httpserver.log"))
    except OSError as e:
        return s.fail(f"could not start: {e}")
    ok, why = wait_ready(s.procs, s.port, "/cgi-bin/hello.sh", args.start_timeout)
    if not ok:
        return s.fail(why)
    s.ok = True
    return s


def start_spawn(tmp: Path, args) -> System:
    s = System(SPAWN, "spawn")
    s.details.update(
        how="N threads (N = concurrency) each doing subprocess.run([script], stdout=PIPE, "
            "env=<small CGI env>) back to back; the script runs via its shebang",
        env_path=CLEAN_PATH, pinned=False,
        note="not pinned: the spawning process is the system under test here",
    )
    s.ok = True
    return s


def verify(s: System, script: str) -> dict:
    """One request (or one spawn), checking for a 200 with the Hello body."""
    if s.kind == "spawn":
        path = REPO / "cgi-bin" / script
        try:
            cp = subprocess.run([str(path)], stdin=subprocess.DEVNULL, capture_output=True,
                                env=loadgen.spawn_env(str(path), CLEAN_PATH), cwd=str(path.parent),
                                timeout=30)
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "why": f"{type(e).__name__}: {e}"}
        ok = cp.returncode == 0 and EXPECT in cp.stdout
        return {"ok": ok, "exit": cp.returncode, "stdout": cp.stdout[:200].decode("latin-1"),
                "why": "" if ok else f"exit {cp.returncode}, stdout {cp.stdout[:80]!r}"}
    return check_body(s.port, f"/cgi-bin/{script}", "content-type")


def check_body(port: int, path: str, header: str) -> dict:
    """GET `path`: did it answer 200 with the hello text, how was it framed; plus
    the value of one `header` worth recording."""
    try:
        r = loadgen.http_get(HOST, port, path, timeout=10, close=False)
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "why": f"{type(e).__name__}: {e}"}
    ok = r.status == 200 and EXPECT in r.body
    framing = ("chunked" if "chunked" in r.headers.get("transfer-encoding", "")
               else "content-length" if "content-length" in r.headers else "close-delimited")
    return {"ok": ok, "status": r.status, "version": r.version, "framing": framing,
            "keep_alive": r.keep_alive, "body": bytes(r.body[:200]).decode("latin-1"),
            header.replace("-", "_"): r.headers.get(header),
            "why": "" if ok else f"status {r.status}, body {bytes(r.body[:80])!r}"}


def probe_cgi_path(s: System) -> None:
    """Best effort: which PATH (hence which python3) do this system's CGI children see?"""
    if s.kind == "spawn":
        path = CLEAN_PATH
    else:
        try:
            r = loadgen.http_get(HOST, s.port, "/cgi-bin/env.sh", timeout=10)
        except Exception:  # noqa: BLE001
            return
        if r.status != 200:
            return
        path = None
        for line in bytes(r.body).decode("latin-1").splitlines():
            if line.startswith("PATH="):
                path = line[5:]
        if path is None:
            # no PATH: `env` in the shebang falls back to the libc default
            s.details["cgi_path"] = None
            s.details["cgi_python3"] = _realpath(shutil.which("python3", path="/bin:/usr/bin"))
            return
    s.details["cgi_path"] = path
    s.details["cgi_python3"] = _realpath(shutil.which("python3", path=path))


def _realpath(p: str | None) -> str | None:
    return os.path.realpath(p) if p else None


def _cmd_out(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (cp.stdout + cp.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"


def _dpkg_version(pkg: str) -> str | None:
    out = _cmd_out(["dpkg-query", "-W", "-f=${Version}", pkg])
    return out if out and not out.startswith("?") and "no packages" not in out else None


# --------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------

def _netstat_listen() -> dict[str, int]:
    """TcpExt ListenOverflows/ListenDrops (a full accept queue shows up here)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for i in range(0, len(lines) - 1, 2):
        if lines[i].startswith("TcpExt:"):
            names, vals = lines[i].split()[1:], lines[i + 1].split()[1:]
            d = dict(zip(names, map(int, vals)))
            return {k: d.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}
    return {}


def run_cell(s: System, script: str, conc: int, args, pin: bool) -> dict:
    if s.kind == "spawn":
        argv = [*LOADGEN, "--spawn", str(REPO / "cgi-bin" / script),
                "--path-env", CLEAN_PATH]
    else:
        argv = [*LOADGEN, s.url(script)]
        if pin:
            argv += ["--pin", "1"]
    argv += ["-c", str(conc), "-d", str(args.duration), "--warmup", str(args.warmup), "--json"]
    before = _netstat_listen()
    load = os.getloadavg()[0]
    t = time.time()
    try:
        cp = subprocess.run(argv, capture_output=True, text=True,
                            timeout=args.warmup + args.duration + 60)
    except subprocess.TimeoutExpired:
        return {"ok": False, "why": "load generator timed out", "argv": argv}
    after = _netstat_listen()
    if cp.returncode != 0 or not cp.stdout.strip():
        return {"ok": False, "why": f"load generator exit {cp.returncode}: {cp.stderr.strip()[-500:]}",
                "argv": argv}
    res = json.loads(cp.stdout.strip().splitlines()[-1])
    res.update(ok=True, started_unix=round(t, 3), loadavg_1m_before=round(load, 2),
               listen_overflows=after.get("ListenOverflows", 0) - before.get("ListenOverflows", 0),
               listen_drops=after.get("ListenDrops", 0) - before.get("ListenDrops", 0))
    if cp.stderr.strip():
        res["stderr"] = cp.stderr.strip()[-500:]
    return res


def aggregate(runs: list[dict]) -> dict:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return {"runs_ok": 0, "runs": len(runs)}

    def med(key):
        vals = [r["latency_ms"][key] for r in good if r["latency_ms"][key] is not None]
        return statistics.median(vals) if vals else None

    rps = [r["rps"] for r in good]
    fails: Counter = Counter()
    for r in good:
        for k, v in r["non200"].items():
            fails[f"HTTP {k}"] += v
        for k, v in r["errors"].items():
            fails[k] += v
        if r["bad_body"]:
            fails["bad body"] += r["bad_body"]
    return {
        "runs_ok": len(good), "runs": len(runs),
        "rps_median": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
        "p50_ms_median": med("p50"), "p99_ms_median": med("p99"),
        "requests_total": sum(r["requests"] for r in good),
        "failed_total": sum(r["failed"] for r in good),
        "failed_breakdown": dict(fails),
        "listen_overflows_total": sum(r.get("listen_overflows", 0) for r in good),
    }


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

def _fmt(v, nd=1) -> str:
    return "—" if v is None else f"{v:,.{nd}f}"


def _ratio(a, b) -> str:
    if a is None or not b:
        return "n/a"
    return f"{a / b:.2f}×"


def build_tables(results: dict, systems: dict[str, System], cells: list[tuple[str, int]],
                 order: list[str]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    tables = []
    for script, conc in cells:
        key = f"{script} c={conc}"
        cell = results.get(key, {})
        cg = cell.get(CGIGATE, {}).get("summary", {}) if CGIGATE in order else {}
        cg_rps = cg.get("rps_median")
        rows, notes = [], []
        for name in order:
            s = systems.get(name)
            entry = cell.get(name)
            if entry is not None and entry.get("skipped"):
                notes.append(f"{name}: {entry['skipped']}")
            if entry is None or not entry.get("runs"):
                why = ((entry or {}).get("skipped") or (s.reason if s is not None and not s.ok else "")
                       or "not measured (run interrupted)")
                rows.append([name, "—", "", "—", "—", "—", "—"])
                if not (entry or {}).get("skipped"):
                    notes.append(f"{name}: {why}")
                continue
            a = entry["summary"]
            if not a.get("runs_ok"):
                rows.append([name, "—", "", "—", "—", "—", "—"])
                notes.append(f"{name}: every run failed ({entry['runs'][0].get('why', '?')})")
                continue
            spread, err = spread_and_errors(a)
            ratio = "—" if name == CGIGATE else _ratio(cg_rps, a["rps_median"])
            rows.append([name, _fmt(a["rps_median"]), spread, _fmt(a["p50_ms_median"], 2),
                         _fmt(a["p99_ms_median"], 2), err, ratio])
            if a["runs_ok"] < a["runs"]:
                notes.append(f"{name}: only {a['runs_ok']}/{a['runs']} runs completed")
            if a.get("listen_overflows_total"):
                notes.append(f"{name}: {a['listen_overflows_total']} TCP listen-queue overflows "
                             "(SYN retried after ~1 s: shows in p99)")
        title = f"{script}, concurrency {conc}"
        header = ["system", "req/s (median)", "min–max", "p50 ms", "p99 ms", "errors",
                  "cgigate ÷ this (req/s)"]
        tables.append((title, header, rows, notes))
    return tables


def print_tables(tables, plain: bool, caption: str) -> None:
    console = None
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table

            # rich assumes 80 columns when stdout is not a terminal: too narrow here
            console = Console(width=None if sys.stdout.isatty() else 150)
        except ImportError:
            console = None
    for title, header, rows, notes in tables:
        if all(not r[2] for r in rows):  # one run per cell: no min–max spread to show
            header = header[:2] + header[3:]
            rows = [r[:2] + r[3:] for r in rows]
        left = {0, header.index("errors")}
        if console is not None:
            t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
            for i, h in enumerate(header):
                t.add_column(h, justify="left" if i in left else "right", no_wrap=i == 0)
            for r in rows:
                t.add_row(*r)
            console.print(t)
            for n in notes:
                console.print(f"  note: {n}", highlight=False, markup=False)
            console.print()
            continue
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

        def line(cells):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        log(f"== {title} ==")
        log(line(header))
        log("  ".join("-" * w for w in widths))
        for r in rows:
            log(line(r))
        for n in notes:
            log(f"  note: {n}")
        log(f"  ({caption})")
        log()


def machine_info() -> dict:
    info = {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def spread_and_errors(a: dict) -> tuple[str, str]:
    """Two table cells of an aggregated cell: the req/s range over the runs, and
    the failed requests with their kinds."""
    spread = f"{a['rps_min']:,.0f}–{a['rps_max']:,.0f}" if a["runs_ok"] > 1 else ""
    err = str(a["failed_total"])
    if a["failed_breakdown"]:
        err += " (" + ", ".join(f"{k}×{v}" for k, v in sorted(a["failed_breakdown"].items())) + ")"
    return spread, err


def add_timing_args(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark here shares: how long and how often."""
    ap.add_argument("--quick", action="store_true", help="2 s per cell, 1 run (unless given)")
    ap.add_argument("--duration", type=float, help="measured seconds per cell (default 5, quick 2)")
    ap.add_argument("--runs", type=int, help="runs per cell, median reported (default 3, quick 1)")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds per cell not counted (0.5)")


def settle_common_args(ap: argparse.ArgumentParser, args, all_systems) -> None:
    """Defaults that depend on --quick, and --systems checked against `all_systems`."""
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    args.systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    bad = [x for x in args.systems if x not in all_systems]
    if bad:
        ap.error(f"unknown system(s) {bad}; choose from {all_systems}")


def report_unavailable(name: str, s) -> None:
    """A system that could not start: why, the tail of its output, and stop it."""
    log(f"  {name}: NOT AVAILABLE: {s.reason}")
    for pname, tail in s.details.get("log_tail", {}).items():
        log(f"  --- last lines of {pname} output ---")
        for line in tail.splitlines():
            log(f"  | {line}")
    s.stop()


def write_results(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    log(f"raw results: {path}")


def stop_all(systems, tmp, remove: bool = True) -> None:
    """At the end, even after Ctrl-C: stop every system, reap, remove the temp dir
    (unless the caller still reads logs from it)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not abort the cleanup
    # only now, not while measuring: orphans of the systems become our children
    become_subreaper()
    for s in systems:
        s.stop()
    reap_children()
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="CGI benchmark: cgigate vs nginx+fcgiwrap vs "
                                             "http.server --cgi vs a bare spawn loop.")
    add_timing_args(ap)
    ap.add_argument("--out", default=str(HERE / "results" / "cgi.json"), help="JSON output path")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                    help=f"comma list, subset of {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--scripts", default="hello.sh,hello.py", help="scripts in cgi-bin/")
    ap.add_argument("--concurrency", default="1,16", help="comma list of concurrencies")
    ap.add_argument("--fcgiwrap-children", type=int, default=4)
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--start-timeout", type=float, default=20.0,
                    help="seconds to wait for a server to answer 200")
    ap.add_argument("--cgigate-cmd", default=None,
                    help="override the cgigate command; {port}, {host}, {python} are substituted")
    ap.add_argument("--plain", action="store_true", help="plain-text tables even if rich is importable")
    args = ap.parse_args(argv)
    settle_common_args(ap, args, ALL_SYSTEMS)
    args.scripts = [x.strip() for x in args.scripts.split(",") if x.strip()]
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    cmdline = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    minfo = machine_info()
    ncpu = len(minfo["affinity"] or []) or (os.cpu_count() or 1)
    pin = ncpu > 1
    cells = [(sc, c) for sc in args.scripts for c in args.concurrency]
    for sc in args.scripts:
        if not (REPO / "cgi-bin" / sc).exists():
            log(f"error: cgi-bin/{sc} not found")
            return 2

    log(f"command: {cmdline}")
    log(f"machine: nproc={minfo['nproc']} affinity={minfo['affinity']} cpu={minfo.get('cpu', '?')}")
    log(f"         python {minfo['python']} ({sys.executable}), kernel {minfo['kernel']}, "
        f"{minfo.get('os', '?')}, loadavg {minfo['loadavg']}")
    log(f"settings: {len(cells)} cells x {len(args.systems)} systems x {args.runs} run(s), "
        f"{args.duration:g} s measured + {args.warmup:g} s warm-up each, round-robin order "
        f"{' → '.join(args.systems)}")
    log("load generator: cgigate/demo/loadgen.py (own closed-loop client, raw sockets, "
        "asyncio/uvloop; p50/p99 from its own per-request perf_counter timings)"
        + (", pinned to CPU 1 (servers unpinned)" if pin else ", not pinned (1 CPU)")
        + "; spawn loop is not pinned")
    log(f"CGI PATH given by the harness: {CLEAN_PATH} "
        f"(python3 -> {_realpath(shutil.which('python3', path=CLEAN_PATH))})")
    log()

    out = {
        "command": cmdline,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": minfo,
        "settings": {
            "duration_s": args.duration, "warmup_s": args.warmup, "runs": args.runs,
            "scripts": args.scripts, "concurrency": args.concurrency, "systems": args.systems,
            "order": "round-robin: for run: for (script, concurrency): for system",
            "loadgen_pinned_cpu": 1 if pin else None, "cgi_path": CLEAN_PATH,
            "aggregate": "median over runs of req/s, of p50 and of p99; errors summed",
            "latency_source": "harness's own per-request time.perf_counter timings",
        },
        "systems": {},
        "results": {},
        "interrupted": False,
    }
    results: dict = out["results"]
    systems: dict[str, System] = {}
    tmp = Path(tempfile.mkdtemp(prefix="cgibench-"))
    tmp.chmod(0o755)  # http.server's CGI children run as nobody and must traverse it
    rc = 0
    try:
        starters = {CGIGATE: start_cgigate, NGINX: start_nginx, HTTPSERVER: start_httpserver,
                    SPAWN: start_spawn}
        for name in args.systems:
            log(f"starting {name} ...")
            try:
                s = starters[name](tmp, args)
            except Exception as e:  # noqa: BLE001
                s = System(name, "?").fail(f"harness error while starting: {type(e).__name__}: {e}")
            systems[name] = s
            if s.ok:
                for sc in args.scripts:
                    s.verified[sc] = verify(s, sc)
                probe_cgi_path(s)
                checks = ", ".join(
                    f"{sc}: " + (f"OK ({v.get('status', 'exit 0')}, {v.get('framing', 'stdout')}"
                                 f"{', keep-alive' if v.get('keep_alive') else ''})"
                                 if v["ok"] else f"FAILED ({v['why']})")
                    for sc, v in s.verified.items())
                where = f" on {HOST}:{s.port}" if s.port else ""
                log(f"  {name}: up{where}; body check {checks}")
                if s.details.get("cgi_path") is not None or "cgi_python3" in s.details:
                    log(f"  {name}: CGI sees PATH={s.details.get('cgi_path')} "
                        f"-> python3 = {s.details.get('cgi_python3')}")
            else:
                report_unavailable(name, s)
        ref_py = systems[SPAWN].details.get("cgi_python3") if SPAWN in systems else \
            _realpath(shutil.which("python3", path=CLEAN_PATH))
        for name, s in systems.items():
            cp = s.details.get("cgi_python3")
            if s.ok and cp and ref_py and cp != ref_py:
                log(f"  WARNING: {name}'s CGI children resolve python3 to {cp}, not {ref_py}: "
                    "hello.py numbers are not like for like")
        log()

        for run in range(1, args.runs + 1):
            for sc, conc in cells:
                key = f"{sc} c={conc}"
                cell = results.setdefault(key, {"script": sc, "concurrency": conc})
                for name in args.systems:
                    s = systems[name]
                    entry = cell.setdefault(name, {"runs": []})
                    if not s.ok:
                        entry["skipped"] = s.reason
                        continue
                    if not s.verified.get(sc, {}).get("ok"):
                        entry["skipped"] = f"{sc} body check failed: {s.verified[sc]['why']}"
                        continue
                    if s.kind == "http" and not s.alive():
                        dead = [p.name for p in s.procs if not p.alive()]
                        s.ok = False
                        s.reason = f"{'/'.join(dead)} died during the benchmark"
                        s.details["log_tail"] = {p.name: p.log_tail() for p in s.procs}
                        entry["skipped"] = s.reason
                        log(f"  {name}: {s.reason}")
                        continue
                    r = run_cell(s, sc, conc, args, pin)
                    r["run"] = run
                    entry["runs"].append(r)
                    if r.get("ok"):
                        lat = r["latency_ms"]
                        log(f"[run {run}/{args.runs}] {key:<14} {name:<15} {r['rps']:>9,.1f} req/s"
                            f"  p50 {_fmt(lat['p50'], 2):>8} ms  p99 {_fmt(lat['p99'], 2):>8} ms"
                            f"  failed {r['failed']}"
                            + (f"  conns {r['connects']}" if r.get("connects") is not None else "")
                            + (f"  listen-overflows {r['listen_overflows']}"
                               if r.get("listen_overflows") else "")
                            + (f"  stale-conn-retries {r['stale_connection_retries']}"
                               if r.get("stale_connection_retries") else ""))
                    else:
                        log(f"[run {run}/{args.runs}] {key:<14} {name:<15} FAILED: {r['why']}")
    except KeyboardInterrupt:
        out["interrupted"] = True
        rc = 130
        log("\ninterrupted: cleaning up and writing partial results")
    finally:
        stop_all(systems.values(), tmp)

    # summaries and ratios
    for key, cell in results.items():
        for name in args.systems:
            entry = cell.get(name)
            if isinstance(entry, dict) and "runs" in entry:
                entry["summary"] = aggregate(entry["runs"])
        cg = cell.get(CGIGATE, {}).get("summary", {})
        ratios = {}
        for name in args.systems:
            if name == CGIGATE:
                continue
            o = cell.get(name, {}).get("summary", {})
            ratios[f"cgigate/{name}"] = {
                "rps": (cg["rps_median"] / o["rps_median"]
                        if cg.get("rps_median") and o.get("rps_median") else None),
                "p99": (cg["p99_ms_median"] / o["p99_ms_median"]
                        if cg.get("p99_ms_median") and o.get("p99_ms_median") else None),
            }
        cell["ratios"] = ratios
    out["systems"] = {n: s.to_json() for n, s in systems.items()}
    out["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    caption = (f"median of {args.runs} run(s) x {args.duration:g} s; p50/p99 from the harness's "
               "own per-request timings; errors = non-200 + transport errors + wrong body, "
               "summed over runs; spawn-loop = process cost only, no HTTP")
    log()
    print_tables(build_tables(results, systems, cells, args.systems), args.plain, caption)
    if CGIGATE in systems and not systems[CGIGATE].ok:
        measured = any(c.get(CGIGATE, {}).get("runs") for c in results.values())
        log(f"cgigate: {'NOT FULLY MEASURED' if measured else 'NOT MEASURED'} — "
            f"{systems[CGIGATE].reason}")

    write_results(out, Path(args.out))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
