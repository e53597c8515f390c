"""Shared fixtures: a real cgigate daemon as a subprocess on a free loopback port.

`daemon(...)` starts `python -m cgigate serve --bind 127.0.0.1:0 ...` and
reads the port it chose from its "listening on" log line.  At teardown it
stops the daemon with SIGTERM, expects exit status 0, and checks that it left
no zombie children behind.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CGI_BIN = os.path.join(ROOT, "cgi-bin")
TEST_CGI_BIN = os.path.join(ROOT, "tests", "cgi-bin")
IN_CI = bool(os.environ.get("CGIGATE_REQUIRE_PEERS"))


def require_program(name: str) -> str:
    """Path of `name`; skips (locally) or fails (CI sets CGIGATE_REQUIRE_PEERS) when missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        missing = f"{name} is not installed (Debian: apt-get install {name})"
        if IN_CI:
            pytest.fail(f"CGIGATE_REQUIRE_PEERS is set but {missing}")
        pytest.skip(missing)
    return path


def require_module(name: str, package: str) -> None:
    """Skips (locally) or fails (CI sets CGIGATE_REQUIRE_PEERS) when `name` cannot be imported."""
    if importlib.util.find_spec(name) is None:
        missing = f"the {name} module is not installed (pip install {package})"
        if IN_CI:
            pytest.fail(f"CGIGATE_REQUIRE_PEERS is set but {missing}")
        pytest.skip(missing)


def process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):   # ESRCH: reaped between the open and the read
        return True
    return stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X")


def wait_gone(pids, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(process_gone(p) for p in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes still alive: {[p for p in pids if not process_gone(p)]}")


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the direct children of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append((int(entry), fields[0]))
    return found


def cmdline(pid, what: str = "cmdline") -> str:
    """/proc/PID/cmdline (or `what`, such as "environ") with NULs as spaces; "" once gone."""
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Daemon:
    def __init__(self, args: list[str], env: dict | None = None):
        self.args = args
        self.log_dir = tempfile.mkdtemp(prefix="cgigate-test-")
        self.error_log = os.path.join(self.log_dir, "error.log")
        self.access_log = os.path.join(self.log_dir, "access.log")
        full_env = dict(os.environ)
        full_env.update(env or {})
        command = [sys.executable, "-m", "cgigate", "serve", *args]
        if "--bind" not in args:
            command += ["--bind", "127.0.0.1:0"]
        command += ["--error-log", self.error_log, "--access-log", self.access_log]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._stderr: list[bytes] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = self._wait_for_port()
        self.host = "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"

    def _drain(self):
        for line in self.proc.stderr:
            self._stderr.append(line)

    def _wait_for_port(self) -> int | None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cgigate exited with {self.proc.returncode}: {self.error_text()}"
                                   f"{b''.join(self._stderr).decode()}")
            # the front's own address, not a FastCGI app pool it started ("... (FastCGI)")
            m = re.search(r"listening on (?:http://[^ ]*:(\d+)/|unix:\S+)$", self.error_text(), re.M)
            if m:
                return int(m.group(1)) if m.group(1) else None
            time.sleep(0.02)
        raise RuntimeError("cgigate did not start listening within 15s: " + self.error_text())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def error_text(self) -> str:
        try:
            with open(self.error_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def access_text(self) -> str:
        try:
            with open(self.access_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0, access: bool = False) -> re.Match:
        """The first match of `pattern` in the error log (or the access log), waiting for it."""
        text = self.access_text if access else self.error_text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, text())
            if m:
                return m
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r} in:\n{text()}")

    def wait_no_children(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not children_of(self.pid):
                return
            time.sleep(0.02)
        raise AssertionError(f"daemon still has children: {children_of(self.pid)}")

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=10)
        return sock

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("daemon did not stop within the grace period after SIGTERM")
        return self.proc.returncode

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.log_dir, ignore_errors=True)


@pytest.fixture
def daemon():
    """Factory: daemon(*args) starts one; each is stopped and checked at teardown."""
    started: list[Daemon] = []

    def start(*args: str, env: dict | None = None) -> Daemon:
        d = Daemon(list(args), env=env)
        started.append(d)
        return d

    yield start
    try:
        for d in started:
            code = d.proc.poll()
            # A daemon the test stopped itself exited 0; any other exit is a crash.
            assert code in (None, 0), f"daemon died with exit status {code}:\n{d.error_text()}"
            if code is None:
                zombies = [c for c in children_of(d.pid) if c[1] == "Z"]
                # a zombie may exist for a moment between exit and reaping
                deadline = time.monotonic() + 5
                while zombies and time.monotonic() < deadline:
                    time.sleep(0.05)
                    zombies = [c for c in children_of(d.pid) if c[1] == "Z"]
                assert not zombies, f"zombie children left: {zombies}"
                code = d.stop()
                assert code == 0, f"daemon exited with {code} after SIGTERM:\n{d.error_text()}"
    finally:
        for d in started:
            d.cleanup()


@pytest.fixture
def cgi(daemon):
    """A daemon serving the sample cgi-bin/ and tests/cgi-bin/ (under /t/)."""
    config = os.path.join(tempfile.mkdtemp(prefix="cgigate-conf-"), "cgigate.toml")
    with open(config, "w") as f:
        f.write(f"""
[cgi]
timeout = 5
kill_grace = 0.5
interpreters = {{ ".py" = "{sys.executable}", ".pl" = "perl" }}

[[route]]
prefix = "/cgi-bin/"
cgi_dir = "{SAMPLE_CGI_BIN}"

[[route]]
prefix = "/t/"
cgi_dir = "{TEST_CGI_BIN}"

[[route]]
prefix = "/t/fast/"
cgi_dir = "{TEST_CGI_BIN}"
timeout = 1
""")
    d = daemon("-c", config)
    yield d
    shutil.rmtree(os.path.dirname(config), ignore_errors=True)


def raw_request(d: Daemon, data: bytes, timeout: float = 10.0, read_until_close: bool = True) -> bytes:
    """Send `data` on a fresh connection and return everything read until the server closes
    (or `timeout`)."""
    sock = d.connect()
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)
    finally:
        sock.close()
