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
import socket
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
        self.address = f"unix:{self.socket}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        server = self.config.server
        command = [sys.executable, "-m", "cgigate", "fcgi", "--app", self.route.app,
                   "--bind", self.address, "--workers", str(self.route.workers),
                   "--threads", str(self.route.threads), "--socket-mode", "600",
                   "--error-log", server.error_log, "--log-level", server.log_level,
                   "--graceful-timeout", str(server.graceful_timeout)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the workers for app {self.route.app} exited with status "
                                   f"{self.process.returncode} (see the error log above)")
            if _accepts(self.socket):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the workers for app {self.route.app} did not listen within {START_TIMEOUT:g}s")

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


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


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
                log.info("app %s: %d worker(s) x %d thread(s) on %s", route.app, route.workers,
                         route.threads, pool.address)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for pool in self.pools:
            pool.stop()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
