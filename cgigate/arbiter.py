"""The pre-fork supervisor: `cgigate serve --processes N` and `cgigate fcgi`.

The arbiter opens nothing itself: the listening sockets are opened before it
starts, it forks one worker process per slot, and each worker runs
`target(slot)` on those shared sockets, so the kernel spreads connections
among them.  The arbiter runs no event loop: it blocks SIGTERM, SIGINT and
SIGCHLD and takes them one at a time with `sigtimedwait`, so nothing runs
inside a signal handler (the gunicorn arbiter habit, without handlers at
all).

- SIGCHLD: reap every exited child with `waitpid(-1, WNOHANG)`; a worker
  that died while not stopping is logged and replaced, after one second if it
  died within a second of starting (no crash loop at full speed).
- SIGTERM or SIGINT: pass SIGTERM to every worker (each stops gracefully,
  finishing its requests), wait for them, SIGKILL any that outlive
  `stop_timeout` seconds, exit 0.
- SIGQUIT: the same, at once: SIGQUIT to every worker (each cuts what runs),
  SIGKILL after 5 s.
- SIGHUP: `on_hup()` in the arbiter (the front reloads its app pools), then
  SIGHUP to every worker (each reloads what it can).
- SIGUSR1: reopen the log files, here and in every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

log = logging.getLogger("cgigate.error")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1}
RESTART_DELAY = 1.0


class Arbiter:
    def __init__(self, workers: int, target: Callable[[int], int], stop_timeout: float,
                 announce: list[str] = (), on_hup: Callable[[], None] | None = None):
        self.count = workers
        self.target = target              # runs in the child; its return value is the exit status
        self.stop_timeout = stop_timeout  # how long workers get after SIGTERM before SIGKILL
        self.announce = announce
        self.on_hup = on_hup
        self.workers: dict[int, tuple[int, float]] = {}   # pid -> (slot, start time)
        self.pending: list[tuple[float, int]] = []        # (when, slot) to start again
        self.stopping = False

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for line in self.announce:
            log.info("%s", line)
        for slot in range(self.count):
            self.spawn_worker(slot)
        while True:
            info = signal.sigtimedwait(SIGNALS, 0.5)
            if info is None:
                self.start_pending()
            elif info.si_signo == signal.SIGCHLD:
                self.reap()
                self.start_pending()
            elif info.si_signo in (signal.SIGHUP, signal.SIGUSR1):
                self.pass_on(signal.Signals(info.si_signo))
            else:
                self.stop(signal.Signals(info.si_signo).name)
                return 0

    def pass_on(self, sig: signal.Signals) -> None:
        if sig == signal.SIGUSR1:
            from cgigate import logs
            logs.reopen()
            log.info("SIGUSR1: log files reopened")
        elif self.on_hup is not None:
            self.on_hup()
        for pid in self.workers:
            send_signal(pid, sig)

    def spawn_worker(self, slot: int) -> None:
        pid = os.fork()
        if pid:
            self.workers[pid] = (slot, time.monotonic())
            log.info("worker %d started (pid %d)", slot, pid)
            return
        # until the worker sets its own handlers, a reload or log reopening
        # sent its way must not kill it (their default action)
        run_in_child(slot, SIGNALS, (signal.SIGHUP, signal.SIGUSR1), lambda: self.target(slot))

    def reap(self) -> None:
        for pid, status in reaped():
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
        now = reason == "SIGQUIT"
        log.info("%s: stopping %d worker(s) %s", reason, len(self.workers), "now" if now else "gracefully")
        for pid in self.workers:
            send_signal(pid, signal.SIGQUIT if now else signal.SIGTERM)
        deadline = time.monotonic() + (5 if now else self.stop_timeout)
        while self.workers and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
            self.reap()
        for pid in list(self.workers):
            log.error("worker pid %d still running after %s; SIGKILL", pid, "SIGQUIT" if now else "SIGTERM")
            send_signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.workers.clear()
        log.info("stopped")


def run_in_child(slot: int, blocked, ignored, target) -> None:
    """In a freshly forked worker: ignore `ignored` (its parent's business until
    it sets handlers of its own), unblock `blocked`, run `target()` and exit with
    what it returns; never returns."""
    code = 1
    try:
        for sig in ignored:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        code = target()
    except BaseException:
        log.exception("worker %d (pid %d) failed", slot, os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)


def reaped():
    """(pid, wait status) of every child that has exited, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def send_signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
