"""The forms the demo runs "hello" in, and the files and daemons for them.

Every form answers `Hello, world!` to a GET.  They differ only in what
happens between the front's parsing of the request and its writing of the
answer, which is what the demo measures:

    floor   the front answers by itself ([[route]] return): no backend at all
    c       a compiled C program, one process per request (CGI)
    sh      a /bin/sh script, one process per request (CGI)
    py      a Python script, one process and one interpreter start per request (CGI)
    wsgi    a Python WSGI app in persistent FastCGI workers (cgigate fcgi)

The Python forms can be given an application start-up cost: the script or
the app module burns that much CPU when it is loaded, standing for the
imports of a framework.  A CGI script pays it on every request; a worker
pays it once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

HELLO = "Hello, world!"

# The start-up cost: CPU time, not sleep, because imports are CPU work.
STARTUP_CODE = """\
import time as _time
_until = _time.process_time() + {ms} / 1000.0   # stands for {ms} ms of imports
while _time.process_time() < _until:
    pass
"""

SH_SCRIPT = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n{hello}\\n'
"""

PY_SCRIPT = """#!{python}
{startup}import sys
sys.stdout.write("Content-Type: text/plain\\r\\n\\r\\n{hello}\\n")
"""

WSGI_APP = """\
{startup}BODY = b"{hello}\\n"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
"""

C_PROGRAM = """\
#include <stdio.h>
int main(void) {
    fputs("Content-Type: text/plain\\r\\n\\r\\n%s\\n", stdout);
    return 0;
}
"""


@dataclass(frozen=True)
class Form:
    name: str
    label: str
    short: str           # for the terminal's table
    kind: str            # "floor", "cgi" or "fastcgi"
    explanation: str

    @property
    def spawns(self) -> bool:
        return self.kind == "cgi"


FORMS = {f.name: f for f in (
    Form("floor", "floor: the front alone", "floor", "floor",
         "cgigate answers by itself, with no backend. Everything else costs at least this: "
         "accepting the connection, parsing HTTP, routing, logging and writing the answer."),
    Form("c", "CGI: C program", "CGI C", "cgi",
         "A new process per request running a compiled program. What it costs above the floor is "
         "the price of a process: fork (vfork), exec, the dynamic loader, pipes, and reaping it."),
    Form("sh", "CGI: sh script", "CGI sh", "cgi",
         "A new process per request, which starts the shell and has it read the script. "
         "Like the C program plus an interpreter's start."),
    Form("py", "CGI: Python script", "CGI Python", "cgi",
         "A new process per request that starts a Python interpreter, imports what the script "
         "needs, answers and exits. The interpreter's start, and any import, is paid on every request."),
    Form("wsgi", "FastCGI: WSGI workers", "FastCGI WSGI", "fastcgi",
         "The same Python code loaded once in persistent worker processes; the front passes each "
         "request over a unix socket with the FastCGI protocol. Start-up is paid once, not per request."),
)}
DEFAULT_FORMS = ("floor", "c", "sh", "py", "wsgi")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


class Workdir:
    """The scripts, app modules and config files of a demo run, under `root`."""

    def __init__(self, root: str):
        self.root = root
        self.cgi_bin = os.path.join(root, "cgi-bin")
        self.apps = os.path.join(root, "apps")
        self.logs = os.path.join(root, "logs")
        for d in (self.cgi_bin, self.apps, self.logs):
            os.makedirs(d, exist_ok=True)
        self._write(os.path.join(self.cgi_bin, "hello.sh"), SH_SCRIPT.format(hello=HELLO), 0o755)

    @staticmethod
    def _write(path: str, text: str, mode: int = 0o644) -> None:
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)

    @staticmethod
    def _startup(ms: int) -> str:
        return STARTUP_CODE.format(ms=ms) if ms else ""

    def python_script(self, startup_ms: int) -> str:
        name = f"hello-{startup_ms}ms.py"
        self._write(os.path.join(self.cgi_bin, name),
                    PY_SCRIPT.format(python=sys.executable, startup=self._startup(startup_ms), hello=HELLO),
                    0o755)
        return name

    def wsgi_module(self, startup_ms: int) -> str:
        module = f"demo_hello_{startup_ms}ms"
        self._write(os.path.join(self.apps, module + ".py"),
                    WSGI_APP.format(startup=self._startup(startup_ms), hello=HELLO))
        return f"{module}:app"

    def c_program(self) -> str:
        """Compile hello.c; raises RuntimeError with the compiler's message."""
        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
        source = os.path.join(self.root, "hello.c")
        binary = os.path.join(self.cgi_bin, "hello-c")
        self._write(source, C_PROGRAM % HELLO)
        done = subprocess.run([cc, "-O2", "-o", binary, source], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} could not compile {source}: {done.stderr.strip()[:500]}")
        return "hello-c"

    def error_log(self, name: str) -> str:
        return os.path.join(self.logs, f"{name}.error.log")

    def config(self, name: str, route: str) -> str:
        """A config serving one route under /demo/, on a free loopback port.  Each
        `name` once: its error log is where the daemon's port is read from."""
        error_log = self.error_log(name)
        if os.path.exists(error_log):
            raise ValueError(f"a demo daemon named {name} was started already")
        text = f"""# cgigate demo: {name}
[server]
bind = ["127.0.0.1:0"]
access_log = "{os.path.join(self.logs, name + '.access.log')}"
error_log = "{error_log}"
graceful_timeout = 5

[cgi]
timeout = 60
max_children = 64

[[route]]
prefix = "/demo/"
{route}
"""
        path = os.path.join(self.root, f"{name}.toml")
        self._write(path, text)
        return path


def route_for(form: Form, work: Workdir, startup_ms: int, workers: int) -> tuple[str, str]:
    """(the [[route]] body, the URL path under /demo/) of `form`."""
    if form.name == "floor":
        return f'return = "{HELLO}\\n"', ""
    if form.name == "wsgi":
        return (f'app = "{work.wsgi_module(startup_ms)}"\nworkers = {workers}\nthreads = 1', "")
    if form.name == "c":
        script = work.c_program()
    elif form.name == "sh":
        script = "hello.sh"
    else:
        script = work.python_script(startup_ms)
    return f'cgi_dir = "{work.cgi_bin}"', script


class DemoDaemon:
    """`cgigate serve -c CONFIG` as a subprocess in its own session."""

    def __init__(self, config: str, error_log: str, pythonpath: str):
        self.error_log = error_log
        self.stderr = error_log + ".stderr"   # what it says before its log is open
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
        with open(self.stderr, "wb") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "cgigate", "serve", "-c", config],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr, env=env, start_new_session=True)
        self.port = self._wait_for_port()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        text = ""
        for path in (self.stderr, self.error_log):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text

    def _wait_for_port(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cgigate exited with status {self.proc.returncode}; "
                                   f"its log ({self.error_log}) says:\n{self.log_text()[-2000:]}")
            m = re.search(r"listening on http://[^ ]*:(\d+)/$", self.log_text(), re.M)
            if m:
                return int(m.group(1))
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"cgigate did not listen within {timeout:g}s; see {self.error_log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
