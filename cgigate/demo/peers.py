"""Peers for `cgigate demo --against`: the same "hello" served by other programs.

Each peer is an extra row of the demo's table, run only when it is present
on the machine (`Peer.missing()` says what to install otherwise):

    nginx-fcgiwrap  nginx (one worker) passing /cgi-bin/ over FastCGI to
                    fcgiwrap, which forks work.cgi_bin/hello.sh per request;
                    comparable to cgigate's "sh" form
    flup            cgigate's own front passing /demo/ over FastCGI to flup's
                    threaded WSGIServer running the demo's WSGI app;
                    comparable to cgigate's "wsgi" form (same front, another
                    FastCGI server)
    gunicorn        gunicorn's sync workers serving the same WSGI app over
                    HTTP themselves, with no separate front

`Peer.start(work, workers)` starts one and returns a `PeerRun` once its URL
answers `Hello, world!`: the URL, and the pids the demo's `TreeWatch` needs
(`front`, `backend_roots`, `front_tree`).  Every process is started in a
session of its own, so `PeerRun.stop()` can signal whole process groups
and leave nothing behind; it also removes the unix sockets.

Standard library only: this runs inside `cgigate demo`.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from cgigate.demo.forms import HELLO, DemoDaemon, Workdir
from cgigate.demo.measure import children

HOST = "127.0.0.1"
START_TIMEOUT = 20.0          # seconds for a peer to answer Hello, world!
FCGIWRAP_CHILDREN = 64        # fcgiwrap -c: CGI children are not the limit at concurrency 64
# nginx and fcgiwrap live in sbin, which is not on every user's PATH
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
FASTCGI_PARAMS = "/etc/nginx/fastcgi_params"
SIGCHLD_BIT = 1 << (signal.SIGCHLD - 1)     # in /proc/PID/status SigIgn
MAX_UNIX_PATH = 100           # sun_path holds 108 bytes; keep some margin


def which(program: str) -> str | None:
    """`program` on PATH, or in the sbin directories."""
    return shutil.which(program) or (shutil.which(program, path=os.pathsep.join(SBIN_DIRS))
                                     if SBIN_DIRS else None)


def module_available(name: str) -> bool:
    """Whether this interpreter (the one the peers' Python processes run) can import `name`."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal process group `pgid`; False when it has no member left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _tail(path: str, lines: int = 60) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])
    except OSError:
        return ""


def _ignores_sigchld(pid: int) -> bool | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & SIGCHLD_BIT)
    except OSError:
        pass
    return None


def _live_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not (yet) zombies."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


class _Proc:
    """One program in a session (and process group) of its own, its output in `log`."""

    def __init__(self, name: str, argv: list[str], log: str, cwd: str | None = None,
                 env: dict | None = None):
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0, group: bool = False) -> None:
        """`sig` to the process (or its whole group), then SIGKILL to whatever is left of
        the group once the process has exited or `timeout` has passed."""
        if self.alive():
            if group:
                _signal_group(self.pid, sig)
            else:
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # members that outlived the leader (fcgiwrap's workers do) keep its group id
        _signal_group(self.pid, signal.SIGKILL)
        self.popen.wait()
        deadline = time.monotonic() + 5
        while _live_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)      # (orphans that are zombies are init's to reap)


class PeerRun:
    """A running peer: where to send requests and which processes to watch."""

    def __init__(self, peer: "Peer"):
        self.peer = peer
        self.url = ""
        self.front = 0
        self.backend_roots: tuple[int, ...] = ()
        self.front_tree = False
        self.notes: list[str] = []
        self.logs: list[str] = []            # shown when it fails to start
        self.sockets: list[str] = []         # unix sockets it listens on, removed by stop()
        self._stops: list[Callable[[], None]] = []
        self._remove: list[str] = []         # sockets and directories
        self._stopped = False

    def stop(self) -> None:
        """Stop everything that was started, in order (the front first), and remove
        the sockets.  Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[BaseException] = []
        for stop in self._stops:
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - stop the rest all the same
                errors.append(e)
        for path in self._remove:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if errors:
            raise errors[0]

    def __enter__(self) -> "PeerRun":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail(self, why: str) -> RuntimeError:
        """Stop what was started; the error to raise, with the tails of the logs."""
        try:
            self.stop()
        except Exception as e:  # noqa: BLE001
            why += f" (and stopping it failed: {e})"
        parts = [f"{self.peer.name}: {why}"]
        for log in self.logs:
            text = _tail(log)
            parts.append(f"--- {log}:\n{text}" if text else f"--- {log}: (empty)")
        return RuntimeError("\n".join(parts))

    def socket_path(self, work: Workdir, name: str) -> str:
        """A unix socket path inside work.root, or in a short directory of its own in /tmp
        when work.root is too long for one; removed by stop()."""
        path = os.path.join(work.root, name)
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            short = tempfile.mkdtemp(prefix="cgigate-peer-", dir="/tmp" if os.path.isdir("/tmp") else None)
            self._remove.append(short)
            path = os.path.join(short, name)
        self._remove.append(path)
        self.sockets.append(path)
        if os.path.exists(path):
            os.unlink(path)
        return path

    def wait_hello(self, procs: list[_Proc], timeout: float = START_TIMEOUT) -> str | None:
        """Wait until GET url answers Hello, world!; None when it does, else why not."""
        parts = urlsplit(self.url)
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for p in procs:
                if not p.alive():
                    return f"{p.name} exited with status {p.popen.returncode}"
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            try:
                conn.request("GET", parts.path or "/")
                r = conn.getresponse()
                body = r.read()
                if r.status == 200 and HELLO.encode() in body:
                    return None
                last = f"GET {parts.path} answered {r.status} {body[:100]!r}"
            except (OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            finally:
                conn.close()
            time.sleep(0.1)
        return f"{self.url} did not answer {HELLO!r} within {timeout:g}s (last: {last})"


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    explanation: str
    spawns: bool
    programs: tuple[tuple[str, str], ...] = ()   # (program, how to install it)
    modules: tuple[tuple[str, str], ...] = ()    # (Python module, how to install it)
    files: tuple[tuple[str, str], ...] = ()      # (file, how to install it)

    def missing(self) -> str | None:
        """None when this peer can run here, else what is missing and how to install it."""
        for program, install in self.programs:
            if which(program) is None:
                return f"{program} not installed ({install})"
        for path, install in self.files:
            if not os.path.exists(path):
                return f"{path} not found ({install})"
        for module, install in self.modules:
            if not module_available(module):
                return f"{module} not installed ({install})"
        return None

    def start(self, work: Workdir, workers: int) -> PeerRun:
        """Start the peer on a free loopback port; returns once its URL answers
        Hello, world!, raises RuntimeError (with the tails of its logs) if it does not.
        `workers` is the number of processes for a peer that has a setting for it
        (gunicorn); the others ignore it."""
        why = self.missing()
        if why:
            raise RuntimeError(f"{self.name}: {why}")
        return _STARTERS[self.name](self, work, workers)


# --------------------------------------------------------------------------
# nginx + fcgiwrap
# --------------------------------------------------------------------------

NGINX_CONF = """\
# generated by cgigate demo --against nginx-fcgiwrap
{user}daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;   # cgigate's forms log every request too
    client_body_temp_path {d}/temp/client_body;
    fastcgi_temp_path {d}/temp/fastcgi;
    proxy_temp_path {d}/temp/proxy;
    uwsgi_temp_path {d}/temp/uwsgi;
    scgi_temp_path {d}/temp/scgi;
    server {{
        listen {host}:{port};
        root {root};
        location /cgi-bin/ {{
            include {params};
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_pass unix:{sock};
        }}
    }}
}}
"""


def _start_nginx_fcgiwrap(peer: Peer, work: Workdir, workers: int) -> PeerRun:
    run = PeerRun(peer)
    d = os.path.join(work.root, "nginx-fcgiwrap")
    for sub in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi"):
        os.makedirs(os.path.join(d, "temp", sub), exist_ok=True)
    sock = run.socket_path(work, "fcgiwrap.sock")
    fcgiwrap_log = os.path.join(d, "fcgiwrap.log")
    run.logs.append(fcgiwrap_log)
    try:
        fcgiwrap = _Proc("fcgiwrap", [which("fcgiwrap"), "-c", str(FCGIWRAP_CHILDREN), "-s", f"unix:{sock}"],
                         fcgiwrap_log, cwd=d)
    except OSError as e:
        raise run.fail(f"could not start fcgiwrap: {e}") from None
    # SIGTERM to the whole group: the master does not catch it, so it dies at once and respawns
    # no worker; the workers (which outlive it) and any script still running go with the group
    run._stops.append(lambda: fcgiwrap.stop(signal.SIGTERM, timeout=5, group=True))

    conf = os.path.join(d, "nginx.conf")
    run.logs += [os.path.join(d, name) for name in ("early-error.log", "error.log", "nginx.log")]
    for attempt in range(3):
        port = free_port()
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(user="user root;\n" if os.geteuid() == 0 else "", d=d, host=HOST,
                                      port=port, root=os.path.dirname(work.cgi_bin),
                                      params=FASTCGI_PARAMS, sock=sock))
        for name in ("early-error.log", "error.log"):
            open(os.path.join(d, name), "wb").close()
        try:
            nginx = _Proc("nginx", [which("nginx"), "-c", conf, "-e", os.path.join(d, "early-error.log"),
                                    "-p", d + "/"], os.path.join(d, "nginx.log"), cwd=d)
        except OSError as e:
            raise run.fail(f"could not start nginx: {e}") from None
        run.url = f"http://{HOST}:{port}/cgi-bin/hello.sh"
        why = run.wait_hello([fcgiwrap, nginx])
        if why is None:
            break
        nginx.stop(signal.SIGTERM, timeout=5)
        logs = _tail(os.path.join(d, "early-error.log")) + _tail(os.path.join(d, "error.log"))
        if "Address already in use" not in logs or attempt == 2:
            raise run.fail(why)
    # nginx first: SIGTERM is its fast shutdown (the master waits for its worker)
    run._stops.insert(0, lambda: nginx.stop(signal.SIGTERM, timeout=10))
    run.front, run.backend_roots, run.front_tree = nginx.pid, (fcgiwrap.pid,), True

    # fcgiwrap forks one process per request from each of its workers (from itself when -c 1)
    workers_ = children(fcgiwrap.pid) or [fcgiwrap.pid]
    if all(_ignores_sigchld(p) for p in workers_):
        run.notes.append(
            "fcgiwrap's workers ignore SIGCHLD, so the kernel reaps each finished script itself and "
            "its CPU time is added to no parent's cutime/cstime: the backend CPU of this row has only "
            "fcgiwrap's own forking and piping, not the scripts, and is far too low (the scripts are "
            "most of it). Compare the processes created, or the machine's total CPU, instead.")
    run.notes.append(
        f"fcgiwrap runs {FCGIWRAP_CHILDREN} pre-forked workers (-c {FCGIWRAP_CHILDREN}), each serving "
        "one request at a time; their memory counts even when idle.")
    run.notes.append("The front is nginx (C), not cgigate: compare the backend column and the "
                     "processes created with cgigate's sh row.")
    return run


# --------------------------------------------------------------------------
# flup behind cgigate's front
# --------------------------------------------------------------------------

FLUP_SCRIPT = """\
# generated by cgigate demo --against flup: {app} in flup's threaded FastCGI server
import importlib
import sys

sys.path.insert(0, {apps!r})
from flup.server.fcgi import WSGIServer

module, _, name = {app!r}.partition(":")
app = getattr(importlib.import_module(module), name)
# multiplexed=False: one request per connection at a time (flup's multiplexing wedges
# under load).  cgigate's front sets FCGI_KEEP_CONN on every request, so each connection,
# and the pool thread serving it, is reused.  debug=False: no tracebacks to clients.
# maxSpare=32: flup's thread pool starts that many threads.  With its default (5) it
# adds threads only as jobs arrive and, when two connections arrive together, queues
# one behind a thread that keeps its connection open for ever: a wedge seen here at
# concurrency 16.  cgigate's front opens at most 16 connections to one responder.
WSGIServer(app, bindAddress={sock!r}, multiplexed=False, debug=False, minSpare=1, maxSpare=32).run()
"""


def _start_flup(peer: Peer, work: Workdir, workers: int) -> PeerRun:
    run = PeerRun(peer)
    app = work.wsgi_module(0)
    sock = run.socket_path(work, "flup.sock")
    script = os.path.join(work.root, "flup_server.py")
    with open(script, "w") as f:
        f.write(FLUP_SCRIPT.format(app=app, apps=work.apps, sock=sock))
    flup_log = os.path.join(work.logs, "flup-server.log")
    run.logs.append(flup_log)
    try:
        flup = _Proc("flup", [sys.executable, script], flup_log, cwd=work.root)
    except OSError as e:
        raise run.fail(f"could not start flup: {e}") from None
    # flup's SIGTERM handling waits for its threads: SIGKILL straight away
    run._stops.append(lambda: flup.stop(signal.SIGKILL, timeout=5, group=True))

    config = work.config("flup", f'fastcgi = "unix:{sock}"')
    error_log = work.error_log("flup")
    run.logs.append(error_log)
    try:
        front = DemoDaemon(config, error_log, "")
    except (RuntimeError, OSError) as e:
        raise run.fail(f"cgigate's front did not start: {e}") from None

    def stop_front() -> None:
        front.stop()
        _signal_group(front.pid, signal.SIGKILL)

    run._stops.insert(0, stop_front)
    run.url = f"http://{HOST}:{front.port}/demo/"
    why = run.wait_hello([flup])
    if why is not None or front.proc.poll() is not None:
        raise run.fail(why or f"cgigate exited with status {front.proc.returncode}")
    run.front, run.backend_roots, run.front_tree = front.pid, (flup.pid,), False
    run.notes.append("flup runs the app in threads of one process, which share one GIL: "
                     "however many requests arrive at once, it uses about one core at most.")
    return run


# --------------------------------------------------------------------------
# gunicorn
# --------------------------------------------------------------------------

_gunicorn_flags: str | None = None


def _gunicorn_has(flag: str) -> bool:
    global _gunicorn_flags
    if _gunicorn_flags is None:
        try:
            _gunicorn_flags = subprocess.run([sys.executable, "-m", "gunicorn", "--help"],
                                             capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            _gunicorn_flags = ""
    return flag in _gunicorn_flags


def _start_gunicorn(peer: Peer, work: Workdir, workers: int) -> PeerRun:
    run = PeerRun(peer)
    app = work.wsgi_module(0)
    log = os.path.join(work.logs, "gunicorn.log")
    run.logs.append(log)
    open(log, "wb").close()
    argv = [sys.executable, "-m", "gunicorn", "--workers", str(max(1, workers)), "--worker-class", "sync",
            "--bind", f"{HOST}:0", "--chdir", work.apps, "--error-logfile", "-",
            "--graceful-timeout", "5"]
    if _gunicorn_has("--no-control-socket"):
        argv.append("--no-control-socket")     # else gunicorn 27 puts one under $HOME
    argv.append(app)
    try:
        gunicorn = _Proc("gunicorn", argv, log, cwd=work.apps)
    except OSError as e:
        raise run.fail(f"could not start gunicorn: {e}") from None
    # SIGTERM: graceful, idle sync workers leave at once
    run._stops.append(lambda: gunicorn.stop(signal.SIGTERM, timeout=10))

    deadline = time.monotonic() + START_TIMEOUT
    port = None
    while port is None:
        m = re.search(r"Listening at: http://[^\s]*:(\d+)", _tail(log, 200))
        if m:
            port = int(m.group(1))
        elif not gunicorn.alive():
            raise run.fail(f"gunicorn exited with status {gunicorn.popen.returncode}")
        elif time.monotonic() > deadline:
            raise run.fail(f"gunicorn did not listen within {START_TIMEOUT:g}s")
        else:
            time.sleep(0.05)
    run.url = f"http://{HOST}:{port}/"
    why = run.wait_hello([gunicorn], max(1.0, deadline - time.monotonic()))
    if why is not None:
        raise run.fail(why)
    run.front, run.backend_roots, run.front_tree = gunicorn.pid, (), False
    run.notes.append("gunicorn's workers parse HTTP themselves, so there is no separate front: "
                     "the front column is only the master's housekeeping, and the backend column "
                     "holds the whole cost of each request.")
    run.notes.append("Its sync workers close the connection after every response (no keep-alive), "
                     "so every request also pays for a new TCP connection.")
    return run


_STARTERS: dict[str, Callable[[Peer, Workdir, int], PeerRun]] = {
    "nginx-fcgiwrap": _start_nginx_fcgiwrap,
    "flup": _start_flup,
    "gunicorn": _start_gunicorn,
}

PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("nginx-fcgiwrap", "nginx + fcgiwrap: sh script (CGI)",
         "nginx parses the request and passes it over FastCGI to fcgiwrap, which forks a new process "
         "per request to run the same sh script. Like cgigate's sh row, a process per request: the "
         "cost is in the fork and exec, whoever does them.",
         spawns=True,
         programs=(("nginx", "apt-get install nginx"), ("fcgiwrap", "apt-get install fcgiwrap")),
         files=((FASTCGI_PARAMS, "apt-get install nginx-common"),)),
    Peer("flup", "cgigate + flup: WSGI (FastCGI)",
         "cgigate's front passes each request over FastCGI to flup, a FastCGI server written in "
         "Python that runs the same WSGI app in threads of one persistent process. Like cgigate's "
         "wsgi row with another FastCGI server: the app is loaded once, the cost is in flup's Python code.",
         spawns=False,
         modules=(("flup", "pip install flup==1.0.3"),)),
    Peer("gunicorn", "gunicorn: WSGI (sync workers)",
         "gunicorn's pre-forked worker processes accept the connections and parse HTTP themselves, "
         "then call the same WSGI app: no separate front and no FastCGI hop; all the cost is in "
         "the workers' Python code.",
         spawns=False,
         modules=(("gunicorn", "pip install gunicorn"),)),
)}
