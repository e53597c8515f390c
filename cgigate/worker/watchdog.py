"""Inside one app worker: its scoreboard slot, its recycling and its timeouts.

`RequestTracker` hears of every request's start and end from the worker
(`Worker.began` / `finished`) and keeps the worker's scoreboard slot up to
date: idle or busy, the request running and since when, how many it has
served.  A thread of its own wakes four times a second to

- beat the heartbeat the supervisor watches, and read the RSS;
- log the Python stack of a request running past `slow_request_timeout`
  (once per request; like php-fpm's slowlog, but the stack is Python's);
- end a request running past `request_timeout`: log its stack, answer 504
  in its place (when the app had not begun an answer), and retire the
  worker, since a thread cannot be stopped; the supervisor replaces it,
  and kills it (TERM, then KILL) if it does not go;
- retire the worker once its RSS is over `max_rss`, after the requests it
  is running; and when it begins its `max_requests`th request (plus its
  jitter), so that no request more reaches it meanwhile.

Retiring asks the worker's main thread to stop gracefully (`retire`), the
same way SIGTERM does.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

from cgigate.worker import scoreboard as sb

log = logging.getLogger("cgigate.error")

TICK = 0.25
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def rss_kib() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def python_stack(thread_ident: int) -> str:
    """The Python stack of a thread of this process, innermost call last."""
    frame = sys._current_frames().get(thread_ident)
    if frame is None:
        return "  (the thread is gone)\n"
    return "".join(traceback.format_stack(frame))


class RequestTracker:
    def __init__(self, *, board: sb.Scoreboard | None, slot: int, generation: int, label: str,
                 max_requests: int = 0, max_rss_kib: int = 0, request_timeout: float = 0.0,
                 slow_request_timeout: float = 0.0, retire=None, title=None):
        self.board = board
        self.slot = slot
        self.generation = generation
        self.label = label                    # "worker 3 (pid 1234)", for the log
        self.max_requests = max_requests      # jitter already added by the supervisor
        self.max_rss_kib = max_rss_kib
        self.request_timeout = request_timeout
        self.slow_request_timeout = slow_request_timeout
        self._retire = retire                 # ask the worker to stop gracefully: (reason) -> None
        self._title = title                   # set the process title: (state) -> None
        self.worker = None
        self.served = 0
        self.active = 0
        self.retiring = ""
        self._shown = ""                      # the state in the process title
        self.lock = threading.Lock()
        self._stop = threading.Event()
        if board is not None:
            board.write_slot(slot, pid=os.getpid(), state=sb.STARTING, generation=generation,
                             started=time.time(), heartbeat=time.monotonic(), requests=0, active=0)

    # --- from the worker ---

    def ready(self, worker) -> None:
        """The app is loaded and the worker accepts: start watching."""
        self.worker = worker
        self._state(sb.IDLE)
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def began(self, request) -> None:
        with self.lock:
            self.active += 1
            last = self.max_requests and self.served + self.active >= self.max_requests
        if last:
            # its last request: take no more from now on, not only after it
            self.retire(f"served {self.served + self.active} requests (max_requests)", recycled=True)
        with self.lock:
            if self.board is not None:
                method, _, uri = request.describe().partition(" ")
                self.board.write_slot(self.slot, state=sb.BUSY, active=self.active, method=method, uri=uri,
                                      request_start=request.started)

    def finished(self, request) -> None:
        with self.lock:
            self.active -= 1
            self.served += 1
            if self.board is not None:
                fields = {"active": self.active, "requests": self.served}
                if self.active == 0:
                    fields.update(state=sb.EXITING if self.retiring else sb.IDLE, request_start=0.0,
                                  method="", uri="")
                self.board.write_slot(self.slot, **fields)

    # --- retiring ---

    def retire(self, reason: str, recycled: bool = False) -> None:
        with self.lock:
            if self.retiring:
                return
            self.retiring = reason
            if self.board is not None:
                self.board.write_slot(self.slot, state=sb.EXITING if self.active == 0 else sb.BUSY)
        log.info("%s %s: finishing its requests and exiting%s", self.label, reason,
                 "; the supervisor starts another" if recycled else "")
        if self.worker is not None:
            self.worker.drain()      # no request more, from now
        if self._retire is not None:
            self._retire(reason)

    def stop(self) -> None:
        self._stop.set()

    # --- the watchdog thread ---

    def _state(self, state: int) -> None:
        if self.board is not None:
            self.board.write_slot(self.slot, state=state, heartbeat=time.monotonic())
        if self._title is not None:
            self._shown = sb.STATE_NAMES[state]
            self._title(self._shown)

    def _watch(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self.tick()
            except Exception:   # never let the watchdog die quietly
                log.exception("%s: watchdog failed", self.label)

    def tick(self) -> None:
        if self._title is not None:   # here, not per request: ps may lag by a tick
            state = "exiting" if self.retiring else "busy" if self.active else "idle"
            if state != self._shown:
                self._shown = state
                self._title(state)
        rss = rss_kib()
        if self.board is not None:
            self.board.write_slot(self.slot, heartbeat=time.monotonic(), rss_kib=rss)
        if self.max_rss_kib and rss > self.max_rss_kib:
            self.retire(f"uses {rss // 1024} MiB, over max_rss ({self.max_rss_kib // 1024} MiB)",
                        recycled=True)
        worker = self.worker
        if worker is None:
            return
        now = time.monotonic()
        with worker.busy:
            running = list(worker.active.values())
        for request in running:
            age = now - request.started
            if self.request_timeout and age > self.request_timeout:
                self._timed_out(request, age)
            elif self.slow_request_timeout and age > self.slow_request_timeout and not request.slow_logged:
                request.slow_logged = True
                self._count("slow")
                log.warning("%s: slow request: %s running for %.1fs (slow_request_timeout %gs); "
                            "its Python stack:\n%s", self.label, request.describe(), age,
                            self.slow_request_timeout, python_stack(request.thread))

    def _timed_out(self, request, age: float) -> None:
        if request.ended:
            return
        self._count("timed_out")
        log.error("%s: request %s timed out after %.1fs (request_timeout %gs); its Python stack:\n%s",
                  self.label, request.describe(), age, self.request_timeout, python_stack(request.thread))
        if request.connection.answer_instead(request, "504 Gateway Timeout",
                                             "504 Gateway Timeout: the application took too long\n"):
            log.error("%s: answered 504 for %s", self.label, request.describe())
        else:
            # The app had begun its answer: the only honest end is to cut the connection.
            request.connection.close()
        worker = self.worker
        with worker.busy:
            if not request.stuck:
                request.stuck = True
                worker.stuck += 1     # its thread cannot be stopped: stop() does not wait for it
                worker.busy.notify_all()
        self.retire("has a stuck request")

    def _count(self, field: str) -> None:
        if self.board is not None:
            with self.lock:
                value = self.board.read_slot(self.slot)[field]
                self.board.write_slot(self.slot, **{field: value + 1})
