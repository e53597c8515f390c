"""`[status] path` and `ping_path` on the front: what is going on, for an operator.

The snapshot has the front's own counters (requests per route with latency
percentiles), the CGI side (scripts running, started, killed on timeout,
the queue), and, for every app route, its pool: the scoreboard the pool's
supervisor keeps in a file (every worker's state, request, duration and
RSS), and the front's queue of requests waiting for a connection to it.
With `[server] processes` above 1, the front counters are those of the
process that answered.
"""

from __future__ import annotations

import os
import time

from cgigate import status
from cgigate.errors import HTTPError
from cgigate.listeners import AllowList


class StatusHandler:
    def __init__(self, server, settings):
        self.server = server
        self.label = "status"
        self.path = settings.path.encode()
        self.ping_path = settings.ping_path.encode()
        self.allow = AllowList(settings.allow)
        self.boards: dict[str, object] = {}

    @classmethod
    def for_config(cls, server, config) -> "StatusHandler | None":
        """The handler `config`'s [status] asks for, or None when it is off."""
        settings = config.status
        return cls(server, settings) if settings.path or settings.ping_path else None

    def serves(self, path: bytes) -> bool:
        return bool(path) and path in (self.path, self.ping_path)

    async def handle(self, request, response, segments) -> None:
        if not self.allow.allows(request.client if request.client else ""):
            raise HTTPError(403, f"status page asked by {request.client[0]}, not in [status] allow")
        if request.body is not None:
            request.body.discard()
        snapshot = self.snapshot()
        if request.path == self.ping_path:
            sick = status.unhealthy(snapshot)
            if sick:
                body = f"unhealthy: {', '.join(sick)}\n".encode()
                await response.send_simple(503, body, headers=[(b"Cache-Control", b"no-store")])
            else:
                await response.send_simple(200, b"pong\n", headers=[(b"Cache-Control", b"no-store")])
            return
        content_type, body = status.render(snapshot, status.form_of(request.query or b""))
        response.start(200, [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body)),
                             (b"Cache-Control", b"no-store")])
        await response.write(body)
        await response.end()

    def snapshot(self) -> dict:
        server = self.server
        stats = server.stats
        limiter = server.limiter
        config = server.config
        out = {
            "front": {"pid": os.getpid(), "start_time": stats.started,
                      "uptime_s": round(time.time() - stats.started, 1), "accepted_requests": stats.accepted,
                      "connections": len(server.connections),
                      "routes": {name: r.snapshot() for name, r in sorted(stats.routes.items())}},
            "cgi": {"children_running": limiter.running, "max_children": limiter.limit,
                    "spawned": limiter.spawned, "killed_on_timeout": limiter.killed_on_timeout,
                    "waiting": limiter.waiting, "peak_waiting": limiter.peak_waiting,
                    "queue_size": limiter.queue_size, "refused": limiter.refused},
            "pools": [],
        }
        for route in config.routes:
            if route.kind != "app" or not route.scoreboard:
                continue
            pool = self._board(route.scoreboard)
            entry = pool.snapshot() if pool is not None else {
                "pool": route.app, "healthy": False, "workers": [], "note": "no scoreboard"}
            entry["route"] = route.prefix
            upstream = server.pools.get(route.fastcgi)
            if upstream is not None:
                entry["queue"] = {"waiting": upstream.waiting, "peak_waiting": upstream.stats.peak_waiting,
                                  "queue_size": upstream.queue_size, "queue_full": upstream.stats.queue_full,
                                  "connections": len(upstream.connections)}
            out["pools"].append(entry)
        return out

    def _board(self, path: str):
        from cgigate.worker.scoreboard import Scoreboard
        board = self.boards.get(path)
        if board is None:
            try:
                board = self.boards[path] = Scoreboard.open(path)
            except OSError:
                return None
        return board
