"""The daemon's front: listening sockets, routing, and a graceful stop.

`Server.dispatch` is the one place a request meets a backend: it decodes
the path, picks the route with the longest matching prefix, runs its
handler, follows local redirects, turns `HTTPError` into a response, and
writes the access log line.  Whatever a handler raises, the connection and
the daemon keep going.

Signals only set a flag (`loop.add_signal_handler`); `serve` then stops
accepting, lets in-flight requests finish for `graceful_timeout` seconds,
cuts what is left (which kills its scripts) and returns.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import math
import os
import signal
import time
from types import SimpleNamespace

from cgigate import logs
from cgigate.arbiter import Arbiter
from cgigate.cgi import spawn
from cgigate.cgi.handler import CGIHandler, ChildLimiter, LocalRedirect
from cgigate.config import Config, ConfigError
from cgigate.errors import ClientDisconnected, HTTPError
from cgigate.front.apps import AppPools
from cgigate.front.fixed import FixedHandler
from cgigate.front.statuspage import StatusHandler
from cgigate.front.http import HTTPConnection
from cgigate.listeners import open_listeners, remove_unix_sockets
from cgigate.status import FrontStats
from cgigate.front.paths import decode_segments
from cgigate.upstream import FastCGIHandler, Pool

log = logging.getLogger("cgigate.error")


class Server:
    def __init__(self, config: Config):
        self.config = config
        self.connections: set[HTTPConnection] = set()
        self.request_count = 0
        self.shutting_down = False
        self.limiter = ChildLimiter(config.cgi.max_children, config.cgi.queue_size,
                                    config.cgi.queue_timeout)
        self.pools: dict[str, Pool] = {}   # one per FastCGI address, shared by its routes
        self.routes = self.build_routes(config)
        self.stats = FrontStats()
        self.status = StatusHandler.for_config(self, config)
        self.redirect_limit = config.cgi.local_redirect_limit
        self.listeners: list[asyncio.AbstractServer] = []
        self.addresses: list[str] = []

    def build_routes(self, config: Config) -> list:
        routes = []
        for route in config.routes:
            prefix_segments = [s.encode("latin-1") for s in route.prefix.split("/") if s]
            if route.kind == "cgi":
                handler = CGIHandler(route, config, self.limiter)
            elif route.kind == "return":
                handler = FixedHandler(route)
            else:
                pool = self.pools.get(route.fastcgi)
                if pool is None:
                    pool = self.pools[route.fastcgi] = Pool(route.fastcgi, queue_size=route.queue_size)
                handler = FastCGIHandler(route.fastcgi, route.prefix, config, route.timeout, pool=pool)
                if route.kind == "app":
                    handler.label = f"app:{route.app}"
            routes.append((prefix_segments, handler))
        return routes

    def reload(self, apps: AppPools | None) -> None:
        """SIGHUP: the config file again for the routes, and each app pool reloads
        its app (new workers first, then the old ones finish their requests)."""
        from cgigate import cli
        source = self.config.source
        if cli.ARGS is not None:
            try:
                new = cli.reload_config()
            except ConfigError as e:
                log.error("SIGHUP: %s; still serving the old config", e)
                new = None
            if new is not None:
                old_apps = {(r.prefix, r.app) for r in self.config.routes if r.kind == "app"}
                new_apps = {(r.prefix, r.app) for r in new.routes if r.kind == "app"}
                if old_apps != new_apps:
                    log.warning("SIGHUP: the app routes changed; restart cgigate to start or stop app "
                                "pools (the other routes are reloaded)")
                    new.routes = [r for r in new.routes if r.kind != "app"] + \
                        [r for r in self.config.routes if r.kind == "app"]
                    new.routes.sort(key=lambda r: len(r.prefix), reverse=True)
                for route in new.routes:   # app routes keep their running pools
                    if route.kind == "app":
                        running = next(r for r in self.config.routes if r.kind == "app" and r.prefix == route.prefix)
                        route.fastcgi, route.scoreboard = running.fastcgi, running.scoreboard
                if new.server.processes > 1:
                    new = worker_config(new)
                self.routes = self.build_routes(new)
                self.config = new
                self.status = StatusHandler.for_config(self, new)
                log.info("SIGHUP: config %s reloaded: %d route(s)", source, len(self.routes))
        if apps is not None:   # (under --processes the arbiter tells them)
            apps.reload()

    def match(self, segments: list[bytes]):
        for prefix, handler in self.routes:
            if segments[:len(prefix)] == prefix:
                return handler, segments[len(prefix):]
        return None, segments

    async def dispatch(self, request, response) -> None:
        backend = "-"
        status = 0
        try:
            if request.error is not None:
                raise request.error
            current = request
            if self.status is not None and self.status.serves(request.path):
                backend = self.status.label
                await self.status.handle(request, response, [])
            else:
                while True:
                    segments = decode_segments(current.path)
                    handler, rest = self.match(segments)
                    if handler is None:
                        raise HTTPError(404, "no route for this path")
                    backend = handler.label
                    result = await handler.handle(current, response, rest)
                    if not isinstance(result, LocalRedirect):
                        break
                    if current.redirects >= self.redirect_limit:
                        raise HTTPError(500, f"more than {self.redirect_limit} local redirects, last to "
                                        f"{result.target[:200]!r} (cgi.local_redirect_limit)")
                    log.debug("rid=%s local redirect to %r", request.request_id, result.target)
                    current = current.redirected(result.target)
            status = response.status
        except HTTPError as e:
            status = e.status
            # A client's mistake is news, a refusal under load a warning, a failure an error.
            level = logging.INFO if e.status < 500 else logging.WARNING if e.status == 503 else logging.ERROR
            log.log(level, "rid=%s %s %s -> %d: %s", request.request_id, request.method,
                    _target(request), e.status, e.detail)
            if not response.started and not request.connection.closed:
                if e.close:
                    response.will_close()
                try:
                    await response.send_simple(e.status, headers=[
                        (k.encode(), v.encode()) for k, v in e.headers])
                except ClientDisconnected:
                    pass
            elif response.started:
                request.connection.close()  # a response cut short must not look complete
        except ClientDisconnected:
            status = response.status or 499
        except asyncio.CancelledError:
            status = response.status or 499
            logs.access(request, status, response.body_bytes, backend)
            self.stats.record(backend, status, time.perf_counter() - request.start_time)
            raise
        except Exception:
            status = 500
            log.exception("rid=%s %s %s -> 500: unexpected error", request.request_id, request.method,
                          _target(request))
            if not response.started and not request.connection.closed:
                response.will_close()
                try:
                    await response.send_simple(500)
                except ClientDisconnected:
                    pass
            else:
                request.connection.close()
        logs.access(request, status, response.body_bytes, backend)
        self.stats.record(backend, status, time.perf_counter() - request.start_time)

    # --- lifecycle ---

    async def start(self, listeners) -> None:
        loop = asyncio.get_running_loop()
        for sock, address in listeners:
            self.listeners.append(await loop.create_server(lambda: HTTPConnection(self), sock=sock,
                                                           backlog=1024))
            self.addresses.append(_url(address))

    async def stop(self, reason: str) -> None:
        # SIGQUIT: now, cutting what runs; otherwise running requests get graceful_timeout
        grace = 0.0 if reason == "SIGQUIT" else self.config.server.graceful_timeout
        self.shutting_down = True
        for listener in self.listeners:
            listener.close()
        busy = [c for c in self.connections if c.task is not None or c.pipeline]
        log.info("%s: stopped accepting; waiting up to %gs for %d request(s) in flight",
                 reason, grace, len(busy))
        for conn in list(self.connections):
            if conn.task is None and not conn.pipeline:
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
            for conn in list(self.connections):
                if conn.task is None and not conn.pipeline:
                    conn.close()
        if self.connections:
            log.warning("graceful timeout: cutting %d connection(s)", len(self.connections))
            for conn in list(self.connections):
                if conn.task is not None:
                    conn.task.cancel()
                conn.close()
            await asyncio.sleep(0.1)  # let the cancelled handlers kill their scripts
        for pool in self.pools.values():
            pool.close()
        killed = await spawn.terminate_all(self.config.cgi.kill_grace)
        if killed:
            log.warning("stopped %d script process group(s) still running", killed)


def _url(address: str) -> str:
    return address if address.startswith("unix:") else f"http://{address}/"


def _target(request) -> str:
    return request.target.decode("latin-1")[:200]


async def serve(config: Config, listeners, announce: bool = True, apps: AppPools | None = None) -> int:
    """Serve `listeners` until SIGTERM or SIGINT, then stop gracefully.  SIGHUP
    reloads (the routes, and the apps), SIGUSR1 reopens the log files."""
    loop = asyncio.get_running_loop()
    server = Server(config)
    await server.start(listeners)
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)   # only record it; the main loop acts
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, on_signal, sig)
    # queued to the loop: the handlers run as ordinary callbacks, not inside the signal
    loop.add_signal_handler(signal.SIGHUP, server.reload, apps)
    loop.add_signal_handler(signal.SIGUSR1, _reopen_logs, apps)
    # Everything allocated so far lives as long as the daemon: keep the
    # cyclic garbage collector from walking it again on every collection.
    gc.collect()
    gc.freeze()
    if announce:
        for address in server.addresses:
            log.info("listening on %s", address)
        for line in _describe_routes(config):
            log.info("%s", line)
    await stop.wait()
    await server.stop(received[0])
    if received[0] == "SIGQUIT" and apps is not None:
        apps.signal(signal.SIGQUIT)   # its pools stop at once too
    log.info("stopped")
    return 0


def _reopen_logs(apps: AppPools | None) -> None:
    logs.reopen()
    if apps is not None:   # (under --processes the arbiter tells them)
        log.info("SIGUSR1: log files reopened")
        apps.signal(signal.SIGUSR1)


def _describe_routes(config: Config):
    from cgigate.config import describe
    return [line for line in describe(config).splitlines() if not line.startswith("listen")]


def run_loop(coroutine) -> int:
    """Run `coroutine` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def run(config: Config) -> int:
    logs.setup(config.server.access_log, config.server.error_log, config.server.log_level)
    _ensure_standard_fds()
    try:
        listeners = open_listeners(config.binds, config.server.unix_socket_mode)
    except OSError as e:
        log.error("cannot listen: %s", e.strerror or e)
        return 1
    try:
        apps = AppPools(config)
    except RuntimeError as e:
        log.error("%s", e)
        for sock, _ in listeners:
            sock.close()
        remove_unix_sockets(config.binds)
        return 1
    try:
        if config.server.processes > 1:
            share = worker_config(config)
            announce = [f"listening on {_url(address)}" for _, address in listeners] + _describe_routes(config)
            stop_timeout = config.server.graceful_timeout + config.cgi.kill_grace + 5
            return Arbiter(config.server.processes, lambda slot: run_loop(serve(share, listeners, False)),
                           stop_timeout, announce, on_hup=apps.reload).run()
        return run_loop(serve(config, listeners, apps=apps))
    finally:
        apps.stop()
        remove_unix_sockets(config.binds)


def worker_config(config: Config) -> Config:
    """The config one of `processes` front processes runs with: the process-wide
    limits divided among them."""
    n = config.server.processes
    share = copy.copy(config)
    share.server = SimpleNamespace(**vars(config.server))
    share.cgi = SimpleNamespace(**vars(config.cgi))
    share.server.max_connections = math.ceil(config.server.max_connections / n)
    share.cgi.max_children = math.ceil(config.cgi.max_children / n)
    share.cgi.queue_size = math.ceil(config.cgi.queue_size / n)
    return share


def _ensure_standard_fds() -> None:
    """A daemon started with fd 0, 1 or 2 closed would hand those numbers to
    pipes, and a script's dup2 onto its standard streams would go wrong."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
