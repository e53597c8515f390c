"""The supervisor of an app pool: `cgigate fcgi --app`, and every `[[route]] app`.

It owns the listening sockets and the scoreboard, forks the workers, and
manages them the way php-fpm's process manager does, from what the
scoreboard says each worker is doing:

    static     `workers` workers, always.
    dynamic    `start_workers` at first; then at least `min_spare` idle ones
               (more are started while fewer are idle) and at most `max_spare`
               (one idle worker a second is stopped while more are), and never
               more than `workers` in all.
    ondemand   none at first; one is started when no worker is idle and a
               connection waits or every worker is busy; a worker idle for
               `idle_worker_timeout` stops.

When every worker is busy and no more may start, the pool counts "max
children reached" (once per time it happens), and connections wait in the
listening socket's backlog (behind cgigate's front, in the front's bounded
queue, which answers 503 when full).

Recycling and timeouts are each worker's own (watchdog.py); the supervisor
starts a replacement for a worker that exits, and is the backstop for a
worker that stops answering: one whose heartbeat stops, or whose request
outlives `request_timeout` by more than its watchdog allows, has its Python
stack written to the error log (faulthandler, on SIGUSR2), then gets
SIGTERM, then SIGKILL after `kill_grace`.

A worker that dies before it was ready is a failed start: the next start
waits 0.5 s, then twice as long each time (up to 30 s), and after three in
a row the pool calls itself unhealthy, in the log and on its status page,
instead of forking at full speed.  One ready worker makes it healthy again.

Signals, as gunicorn and nginx take them; the handlers only queue
(`sigtimedwait` on blocked signals, nothing runs inside a handler):

    SIGTERM, SIGINT  graceful stop: workers finish what they run
    SIGQUIT          immediate stop: workers are killed
    SIGHUP           reload: the config file again, and the app's code in a
                     new generation of workers; the old ones get SIGTERM once
                     the new ones are ready, and finish what they run
    SIGUSR1          reopen the log files (after logrotate), workers too
    SIGTTIN/SIGTTOU  one worker more / fewer
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import time
from dataclasses import dataclass, field, replace

from cgigate import logs
from cgigate.arbiter import reaped, run_in_child, send_signal
from cgigate.worker import scoreboard as sb

log = logging.getLogger("cgigate.error")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD}
TICK = 0.1
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0
UNHEALTHY_AFTER = 3
HEARTBEAT_LOST = 10.0        # seconds without a watchdog beat: the worker is hung
WATCHDOG_SLACK = 3.0         # past request_timeout, the watchdog's time to act before we do
READY_TIMEOUT = 60.0         # a reload waits this long for the new workers to be ready


@dataclass(frozen=True)
class PoolSettings:
    pm: str = "static"
    workers: int = 2                 # static: how many; dynamic, ondemand: the most
    threads: int = 1
    min_spare: int = 1
    max_spare: int = 3
    start_workers: int = 0           # dynamic: at first (0: between min_spare and max_spare)
    idle_worker_timeout: float = 10.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_rss: int = 0                 # bytes; 0: no ceiling
    request_timeout: float = 0.0
    slow_request_timeout: float = 0.0
    graceful_timeout: float = 30.0
    kill_grace: float = 2.0

    @classmethod
    def from_config(cls, config) -> "PoolSettings":
        f = config.fcgi
        return cls(pm=f.pm, workers=f.workers, threads=f.threads, min_spare=f.min_spare, max_spare=f.max_spare,
                   start_workers=f.start_workers, idle_worker_timeout=f.idle_worker_timeout,
                   max_requests=f.max_requests, max_requests_jitter=f.max_requests_jitter, max_rss=f.max_rss,
                   request_timeout=f.request_timeout, slow_request_timeout=f.slow_request_timeout,
                   graceful_timeout=f.graceful_timeout, kill_grace=config.cgi.kill_grace)

    def problems(self) -> list[str]:
        out = []
        if self.pm not in ("static", "dynamic", "ondemand"):
            out.append(f"pm {self.pm!r}: want static, dynamic or ondemand")
        if self.pm == "dynamic":
            if not 1 <= self.min_spare <= self.max_spare:
                out.append(f"min_spare ({self.min_spare}) must be at least 1 and at most max_spare "
                           f"({self.max_spare})")
            if self.max_spare > self.workers:
                out.append(f"max_spare ({self.max_spare}) must be at most workers ({self.workers})")
        return out

    @property
    def initial(self) -> int:
        if self.pm == "static":
            return self.workers
        if self.pm == "ondemand":
            return 0
        start = self.start_workers or self.min_spare + (self.max_spare - self.min_spare) // 2
        return max(self.min_spare, min(start, self.workers))


@dataclass
class _Child:
    pid: int
    slot: int
    generation: int
    started: float
    ready: bool = False
    retiring: str = ""               # why we asked it to go ("" while we want it)
    term_at: float = 0.0             # when SIGTERM went, for the SIGKILL that may follow
    killing: bool = False
    idle_since: float = 0.0
    last_requests: int = 0


@dataclass
class PoolSupervisor:
    """`worker_main(slot, generation, settings, board, max_requests)` runs in each child
    and returns its exit status.  `check_app()` imports the app in a child and
    returns None or what is wrong.  `reload_settings()` reads the config again."""
    name: str
    settings: PoolSettings
    listeners: list
    board: sb.Scoreboard
    worker_main: object
    check_app: object
    reload_settings: object = None
    announce: list[str] = field(default_factory=list)
    set_title: object = None
    children: dict[int, _Child] = field(default_factory=dict)
    generation: int = 1
    stopping: bool = False
    failures: int = 0                # failed starts in a row
    next_start: float = 0.0          # not before then (back-off)
    reload_pending: bool = False
    at_max: bool = False
    last_scale_down: float = 0.0
    reload_started: float = 0.0

    # --- main loop ---

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for line in self.announce:
            log.info("%s", line)
        self.board.set_header(target_workers=self.target)
        for _ in range(self.settings.initial):
            self.spawn()
        self._title()
        while True:
            info = signal.sigtimedwait(SIGNALS, TICK)
            if info is not None and info.si_signo != signal.SIGCHLD:
                done = self.on_signal(signal.Signals(info.si_signo))
                if done:
                    return 0
            self.reap()
            self.watch()
            if self.reload_pending:
                self.finish_reload()
            self.maintain()
            self._title()

    @property
    def target(self) -> int:
        return self.settings.workers

    def current(self) -> list[_Child]:
        """The workers of this generation we still want."""
        return [c for c in self.children.values() if c.generation == self.generation and not c.retiring]

    # --- signals ---

    def on_signal(self, sig: signal.Signals) -> bool:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stop(sig.name, graceful=True)
            return True
        if sig == signal.SIGQUIT:
            self.stop(sig.name, graceful=False)
            return True
        if sig == signal.SIGHUP:
            self.reload()
        elif sig == signal.SIGUSR1:
            logs.reopen()
            log.info("SIGUSR1: log files reopened")
            for child in self.children.values():
                send_signal(child.pid, signal.SIGUSR1)
        elif sig in (signal.SIGTTIN, signal.SIGTTOU):
            more = sig == signal.SIGTTIN
            workers = self.settings.workers + (1 if more else -1)
            limit = self.board.slots // 2
            if not 1 <= workers <= limit:
                log.warning("%s: keeping %d worker(s) (between 1 and %d)", sig.name, self.settings.workers, limit)
                return False
            self.settings = replace(self.settings, workers=workers,
                                    max_spare=min(self.settings.max_spare, workers),
                                    min_spare=min(self.settings.min_spare, workers))
            self.board.set_header(target_workers=workers)
            log.info("%s: %s %d worker(s)", sig.name, "up to" if self.settings.pm != "static" else "now",
                     workers)
        return False

    # --- workers ---

    def spawn(self) -> bool:
        now = time.monotonic()
        if now < self.next_start:
            return False
        slot = self.board.free_slot()
        if slot is None:
            log.error("pool %s: no free scoreboard slot; not starting a worker", self.name)
            return False
        s = self.settings
        max_requests = s.max_requests + (random.randint(0, s.max_requests_jitter)
                                         if s.max_requests and s.max_requests_jitter else 0)
        generation = self.generation
        # reserve the slot before forking, so the next spawn does not take it too
        self.board.write_slot(slot, pid=-1, state=sb.STARTING, generation=generation, started=time.time(),
                              heartbeat=now, requests=0, slow=0, timed_out=0, active=0)
        pid = os.fork()
        if pid:
            self.children[pid] = _Child(pid, slot, generation, now, idle_since=now)
            log.info("worker %d started (pid %d)%s", slot, pid,
                     f", generation {generation}" if generation > 1 else "")
            return True
        # the supervisor's signals, not the worker's, until it sets its own handlers
        run_in_child(slot, SIGNALS, (signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU),
                     lambda: self.worker_main(slot, generation, s, self.board, max_requests))

    def reap(self) -> None:
        for pid, status in reaped():
            child = self.children.pop(pid, None)
            if child is None:
                continue
            slot = self.board.read_slot(child.slot)
            self.board.add(retired_requests=slot["requests"], retired_slow=slot["slow"],
                           retired_timed_out=slot["timed_out"])
            ready = child.ready or slot["state"] not in (sb.STARTING,)
            self.board.clear_slot(child.slot)
            if self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            if child.retiring:
                log.info("worker %d (pid %d) stopped (%s)", child.slot, pid, child.retiring)
            elif code == 0 and ready:
                self.board.add(recycled=1)        # it retired itself: recycling, or a stuck request
            elif not ready:
                self.failed_start(child, how)
            else:
                self.board.add(crashed=1)
                log.error("worker %d (pid %d) died: %s; starting another", child.slot, pid, how)

    def failed_start(self, child: _Child, how: str) -> None:
        self.failures += 1
        self.board.add(crashed=1)
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self.failures - 1))
        self.next_start = time.monotonic() + delay
        if self.failures == UNHEALTHY_AFTER:
            self.board.set_header(healthy=0)
            log.error("pool %s is unhealthy: %d workers in a row died before they were ready (last: %s); "
                      "starting the next in %gs, backing off up to %gs; see the errors above",
                      self.name, self.failures, how, delay, MAX_BACKOFF)
        elif self.failures < UNHEALTHY_AFTER:
            log.error("worker %d (pid %d) died before it was ready: %s; starting another in %gs",
                      child.slot, child.pid, how, delay)

    def watch(self) -> None:
        """Readiness, idleness, and the backstop for workers that stopped answering."""
        now = time.monotonic()
        s = self.settings
        for child in list(self.children.values()):
            slot = self.board.read_slot(child.slot)
            if slot["pid"] != child.pid:
                continue
            if not child.ready and slot["state"] in (sb.IDLE, sb.BUSY):
                child.ready = True
                if self.failures >= UNHEALTHY_AFTER:
                    log.info("pool %s is healthy again: worker %d is ready", self.name, child.slot)
                self.failures = 0
                self.next_start = 0.0
                self.board.set_header(healthy=1)
            if slot["state"] == sb.BUSY or slot["requests"] != child.last_requests:
                child.idle_since = now
                child.last_requests = slot["requests"]
            if child.killing:
                if now - child.term_at > s.kill_grace:
                    log.error("worker %d (pid %d) still running %gs after SIGTERM; SIGKILL",
                              child.slot, child.pid, s.kill_grace)
                    send_signal(child.pid, signal.SIGKILL)
                    child.term_at = float("inf")
                continue
            if child.retiring and child.term_at and now - child.term_at > s.graceful_timeout + s.kill_grace:
                self.kill(child, f"did not stop within {s.graceful_timeout:g}s of SIGTERM")
                continue
            if not child.ready:
                continue
            hung = now - slot["heartbeat"] > HEARTBEAT_LOST
            overdue = (s.request_timeout and slot["state"] == sb.BUSY and slot["request_start"]
                       and now - slot["request_start"] > s.request_timeout + WATCHDOG_SLACK)
            if hung or overdue:
                what = (f"no heartbeat for {now - slot['heartbeat']:.0f}s" if hung else
                        f"request {slot['method']} {slot['uri']} running for "
                        f"{now - slot['request_start']:.0f}s")
                self.kill(child, what)

    def kill(self, child: _Child, why: str) -> None:
        """The backstop: the worker's Python stack to the log, SIGTERM, and SIGKILL later."""
        log.error("worker %d (pid %d) is not answering: %s; its Python stacks follow, then SIGTERM "
                  "and SIGKILL after %gs", child.slot, child.pid, why, self.settings.kill_grace)
        send_signal(child.pid, signal.SIGUSR2)     # faulthandler writes every thread's stack
        time.sleep(0.05)
        send_signal(child.pid, signal.SIGTERM)
        self.board.add(crashed=1)
        child.killing = True
        child.retiring = child.retiring or "killed: " + why
        child.term_at = time.monotonic()

    def retire(self, child: _Child, why: str) -> None:
        child.retiring = why
        child.term_at = time.monotonic()
        send_signal(child.pid, signal.SIGTERM)

    # --- the process manager ---

    def maintain(self) -> None:
        if self.stopping:
            return
        s = self.settings
        now = time.monotonic()
        live = self.current()
        states = {c.pid: self.board.read_slot(c.slot)["state"] for c in live}
        idle = [c for c in live if states[c.pid] == sb.IDLE]
        starting = [c for c in live if states[c.pid] == sb.STARTING]
        # Workers that served nothing for a whole tick: the busy ones give connections
        # back to these (a worker idle between two tiny requests does not count).
        self.board.set_header(idle_workers=sum(1 for c in idle if now - c.idle_since >= 2 * TICK))
        if s.pm == "static":
            for _ in range(s.workers - len(live)):
                if not self.spawn():
                    break
            if len(live) > s.workers:     # after SIGTTOU
                victim = (idle or live)[-1]
                self.retire(victim, "one worker fewer (SIGTTOU)")
            return
        if s.pm == "dynamic":
            spare = len(idle) + len(starting)
            if spare < s.min_spare:
                room = s.workers - len(live)
                if room <= 0:
                    self.max_reached()
                else:
                    for _ in range(min(room, s.min_spare - spare)):
                        if not self.spawn():
                            break
                    return
            else:
                self.at_max = False
            if len(idle) > s.max_spare and now - self.last_scale_down >= 1.0:
                self.last_scale_down = now
                self.retire(max(idle, key=lambda c: now - c.idle_since), f"more than {s.max_spare} idle")
            return
        # ondemand: a worker more when one is needed: a connection waits, or all are busy
        if not idle and not starting and (self._waiting() or live):
            if len(live) < s.workers:
                self.spawn()
            else:
                self.max_reached()
        elif idle or starting:
            self.at_max = False
        for child in idle:
            if now - child.idle_since > s.idle_worker_timeout:
                self.retire(child, f"idle for {s.idle_worker_timeout:g}s")

    def max_reached(self) -> None:
        if not self.at_max:
            self.at_max = True
            self.board.add(max_children_reached=1)
            log.warning("pool %s: every worker is busy and %d is the most (workers); requests wait",
                        self.name, self.settings.workers)

    def _waiting(self) -> bool:
        """Does a connection wait on a listening socket?"""
        ready, _, _ = select.select([sock for sock, _ in self.listeners], [], [], 0)
        return bool(ready)

    # --- reload ---

    def reload(self) -> None:
        log.info("SIGHUP: reloading")
        if self.reload_settings is not None:
            try:
                settings = self.reload_settings()
            except Exception as e:
                log.error("reload failed: %s; the running workers go on", e)
                return
            problems = settings.problems()
            if problems:
                log.error("reload failed: %s; the running workers go on", "; ".join(problems))
                return
            if settings.workers * 2 > self.board.slots:
                settings = replace(settings, workers=self.board.slots // 2)
                log.warning("reload: at most %d workers fit this pool's scoreboard; restart for more",
                            settings.workers)
            self.settings = settings
        wrong = self.check_app()
        if wrong:
            log.error("reload failed: %s; the running workers go on", wrong)
            return
        self.generation += 1
        self.board.add(reloads=1)
        self.board.set_header(target_workers=self.settings.workers)
        self.failures, self.next_start = 0, 0.0
        self.reload_started = time.monotonic()
        for _ in range(self.settings.initial):
            self.spawn()
        self.reload_pending = True

    def finish_reload(self) -> None:
        """Once the new generation is ready, the old one goes (gracefully)."""
        new = self.current()
        waited = time.monotonic() - self.reload_started
        if any(not c.ready for c in new) and waited < READY_TIMEOUT:
            return
        if any(not c.ready for c in new):
            log.error("reload: new workers not ready after %gs; stopping the old ones all the same",
                      READY_TIMEOUT)
        old = [c for c in self.children.values() if c.generation < self.generation and not c.retiring]
        for child in old:
            self.retire(child, "reloaded")
        self.reload_pending = False
        log.info("reload: generation %d serving; %d old worker(s) finishing their requests",
                 self.generation, len(old))

    # --- stopping ---

    def stop(self, reason: str, graceful: bool) -> None:
        self.stopping = True
        if not graceful:
            log.info("%s: stopping %d worker(s) now", reason, len(self.children))
            for child in self.children.values():
                send_signal(child.pid, signal.SIGKILL)
        else:
            log.info("%s: stopping %d worker(s) gracefully", reason, len(self.children))
            for child in self.children.values():
                send_signal(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + (self.settings.graceful_timeout + 5 if graceful else 5)
        while self.children and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
            self.reap()
        for pid in list(self.children):
            log.error("worker pid %d still running after SIGTERM; SIGKILL", pid)
            send_signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.children.clear()
        log.info("stopped")

    def _title(self) -> None:
        if self.set_title is not None:
            live = self.current()
            self.set_title(f"supervisor pool={self.name} pm={self.settings.pm} "
                           f"workers={len(live)}/{self.settings.workers}"
                           + ("" if self.board.header()["healthy"] else " UNHEALTHY"))
