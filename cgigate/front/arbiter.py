"""The pre-fork supervisor for `[server] workers` > 1.

The arbiter opens nothing itself: it is handed the listening sockets, forks
one worker process per slot, and each worker runs the ordinary event loop
(`server.serve`) on those shared sockets, so the kernel spreads connections
among them.  The arbiter runs no event loop: it blocks SIGTERM, SIGINT and
SIGCHLD and takes them one at a time with `sigtimedwait`, so nothing runs
inside a signal handler (the gunicorn arbiter habit, without handlers at
all).

- SIGCHLD: reap every exited child with `waitpid(-1, WNOHANG)`; a worker
  that died while not stopping is logged and replaced, after one second if it
  died within a second of starting (no crash loop at full speed).
- SIGTERM or SIGINT: pass SIGTERM to every worker (each stops gracefully,
  finishing its requests within `graceful_timeout`), wait for them, SIGKILL
  any that outlive `graceful_timeout + kill_grace + 5` seconds, exit 0.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
from types import SimpleNamespace

from cgigate.config import Config

log = logging.getLogger("cgigate.error")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
RESTART_DELAY = 1.0


def worker_config(config: Config) -> Config:
    """The config one worker runs with: the process-wide limits divided among workers."""
    n = config.server.workers
    share = copy.copy(config)
    share.server = SimpleNamespace(**vars(config.server))
    share.cgi = SimpleNamespace(**vars(config.cgi))
    share.server.max_connections = math.ceil(config.server.max_connections / n)
    share.cgi.max_children = math.ceil(config.cgi.max_children / n)
    share.cgi.queue_size = math.ceil(config.cgi.queue_size / n)
    return share


class Arbiter:
    def __init__(self, config: Config, listeners):
        self.config = config
        self.listeners = listeners
        self.workers: dict[int, tuple[int, float]] = {}   # pid -> (slot, start time)
        self.pending: list[tuple[float, int]] = []        # (when, slot) to start again
        self.stopping = False

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        from cgigate.front.server import _describe_routes
        for _, address in self.listeners:
            log.info("listening on %s", address)
        for line in _describe_routes(self.config):
            log.info("%s", line)
        for slot in range(self.config.server.workers):
            self.spawn_worker(slot)
        while True:
            info = signal.sigtimedwait(SIGNALS, 0.5)
            if info is None:
                self.start_pending()
            elif info.si_signo == signal.SIGCHLD:
                self.reap()
                self.start_pending()
            else:
                self.stop(signal.Signals(info.si_signo).name)
                return 0

    def spawn_worker(self, slot: int) -> None:
        pid = os.fork()
        if pid:
            self.workers[pid] = (slot, time.monotonic())
            log.info("worker %d started (pid %d)", slot, pid)
            return
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            from cgigate.front.server import run_loop, serve
            code = run_loop(serve(worker_config(self.config), self.listeners, announce=False))
        except BaseException:
            log.exception("worker %d (pid %d) failed", slot, os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot, started = self.workers.pop(pid, (None, 0.0))
            if slot is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            crashed_early = time.monotonic() - started < RESTART_DELAY
            log.error("worker %d (pid %d) died: %s; starting another%s", slot, pid, how,
                      f" in {RESTART_DELAY:g}s" if crashed_early else "")
            self.pending.append((time.monotonic() + (RESTART_DELAY if crashed_early else 0), slot))

    def start_pending(self) -> None:
        now = time.monotonic()
        due = [slot for when, slot in self.pending if when <= now]
        self.pending = [(when, slot) for when, slot in self.pending if when > now]
        for slot in due:
            self.spawn_worker(slot)

    def stop(self, reason: str) -> None:
        self.stopping = True
        log.info("%s: stopping %d worker(s) gracefully", reason, len(self.workers))
        for pid in self.workers:
            _signal(pid, signal.SIGTERM)
        limit = self.config.server.graceful_timeout + self.config.cgi.kill_grace + 5
        deadline = time.monotonic() + limit
        while self.workers and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
            self.reap()
        for pid in list(self.workers):
            log.error("worker pid %d still running %gs after SIGTERM; SIGKILL", pid, limit)
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.workers.clear()
        log.info("stopped")


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
