"""WSGI apps behind the front: `[[route]] app = ...` and `cgigate serve --app`.

For each app route the daemon starts `cgigate fcgi` itself, as a child
process, on a unix socket in a private directory (mode 0700), and routes
to it like to any FastCGI responder.  That supervisor pre-forks the
workers and replaces any that die; the front stops it (SIGTERM, then its
own graceful stop) when the front stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

log = logging.getLogger("cgigate.error")

START_TIMEOUT = 30.0


class AppPool:
    def __init__(self, route, config, directory: str, index: int):
        self.route = route
        self.config = config
        self.socket = os.path.join(directory, f"app-{index}.sock")
        self.scoreboard = os.path.join(directory, f"app-{index}.scoreboard")
        self.address = f"unix:{self.socket}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        server = self.config.server
        command = [sys.executable, "-m", "cgigate", "fcgi", "--app", self.route.app,
                   "--bind", self.address, "--workers", str(self.route.workers),
                   "--threads", str(self.route.threads), "--socket-mode", "600",
                   "--error-log", server.error_log, "--log-level", server.log_level,
                   "--graceful-timeout", str(server.graceful_timeout), "--scoreboard", self.scoreboard]
        if self.config.source != "(built-in defaults)":
            # its [fcgi] pool settings (pm, recycling, timeouts), read again on SIGHUP
            command[4:4] = ["-c", self.config.source]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the workers for app {self.route.app} exited with status "
                                   f"{self.process.returncode} (see the error log above)")
            # The pool writes its scoreboard once its socket listens and its app
            # loads; a probing connection would make an ondemand pool start a worker.
            if os.path.exists(self.scoreboard) and os.path.exists(self.socket):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the workers for app {self.route.app} did not listen within {START_TIMEOUT:g}s")

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.config.server.graceful_timeout + 10)
        except subprocess.TimeoutExpired:
            log.error("the workers for app %s did not stop; SIGKILL", self.route.app)
            self.process.kill()
            self.process.wait()


class AppPools:
    """Starts the worker pools of every app route; `stop()` ends them all."""

    def __init__(self, config):
        self.pools: list[AppPool] = []
        self.directory: str | None = None
        routes = [route for route in config.routes if route.kind == "app"]
        if not routes:
            return
        self.directory = tempfile.mkdtemp(prefix="cgigate-apps-")
        try:
            for index, route in enumerate(routes):
                pool = AppPool(route, config, self.directory, index)
                self.pools.append(pool)
                pool.start()
                route.fastcgi = pool.address
                route.scoreboard = pool.scoreboard
                log.info("app %s: %d worker(s) x %d thread(s) on %s", route.app, route.workers,
                         route.threads, pool.address)
        except BaseException:
            self.stop()
            raise

    def signal(self, signum: int) -> None:
        for pool in self.pools:
            pool.signal(signum)

    def reload(self) -> None:
        """Each pool reloads its app: new workers first, then the old ones finish."""
        self.signal(signal.SIGHUP)

    def stop(self) -> None:
        for pool in self.pools:
            pool.stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
