"""`cgigate fcgi`: load the app (or check the CGI directory), open the
sockets, pre-fork the workers.

The app is imported once, in the supervisor, before any worker starts: an
import error is reported once, with the exit status 2, instead of every
worker failing in turn (gunicorn's boot-error rule).  The workers inherit it
already loaded.  With `--cgi-dir` each worker runs an event loop that forks
CGI scripts (`cgigate.worker.scripts`), and `[cgi] max_children` and
`queue_size` are divided among the workers.
"""

from __future__ import annotations

import asyncio
import gc
import grp
import logging
import math
import os
import pwd
import signal
import threading

from cgigate import logs
from cgigate.arbiter import Arbiter
from cgigate.cgi.spawn import terminate_all
from cgigate.listeners import AllowList, activation_binds, open_listeners, remove_unix_sockets

log = logging.getLogger("cgigate.error")


def _owner(spec: str, group: str) -> tuple[int, int] | None:
    """(uid, gid) for the socket file, -1 where unchanged; None when neither is set."""
    if not spec and not group:
        return None
    user, _, owner_group = spec.partition(":")
    group = group or owner_group
    try:
        entry = pwd.getpwnam(user) if user else None
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid if entry else -1
    except KeyError as e:
        raise ValueError(f"--socket-owner/--socket-group {spec or group!r}: no such user or group {e}") from None
    return (entry.pw_uid if entry else -1), gid


def run(config) -> int:
    settings = config.fcgi
    logs.setup("off", config.server.error_log, config.server.log_level)
    if bool(settings.app) == bool(settings.cgi_dir):
        log.error("give either --app MODULE:CALLABLE to host a WSGI app or --cgi-dir DIR to run CGI "
                  "scripts (or [fcgi] app / cgi_dir in the config file)%s",
                  "; not both" if settings.app else "")
        return 2
    try:
        if settings.app:
            from cgigate.worker.wsgi import load_app
            target = load_app(settings.app)
        else:
            target = _cgi_dir(settings.cgi_dir)
        owner = _owner(settings.unix_socket_owner, settings.unix_socket_group)
    except ValueError as e:
        log.error("%s", e)
        return 2
    binds = activation_binds() or config.fcgi_binds
    try:
        listeners = open_listeners(binds, settings.unix_socket_mode, owner)
    except OSError as e:
        log.error("cannot listen: %s", e.strerror or e)
        return 1
    announce = [f"listening on {address} (FastCGI)" for _, address in listeners]
    if not AllowList(settings.allowed_clients).any and any(not a.startswith("unix:") for _, a in listeners):
        announce.append("TCP clients allowed: " + ", ".join(settings.allowed_clients))
    try:
        if settings.cgi_dir:
            config.fcgi.cgi_dir = target
            return _run_scripts(config, listeners, announce)
        return _run_app(config, target, listeners, announce)
    finally:
        remove_unix_sockets(binds)


def _freeze_heap() -> None:
    """What a worker holds from its start (modules, the app) lives as long as it
    does: keep the cyclic collector from walking it again in every full
    collection, a pause in the middle of some request."""
    gc.collect()
    gc.freeze()


def _cgi_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"--cgi-dir {path}: no such directory")
    return os.path.realpath(path)


def _run_scripts(config, listeners, announce: list[str]) -> int:
    from cgigate.front.server import run_loop
    from cgigate.worker.scripts import FastCGIConnection, ScriptServer

    settings = config.fcgi
    max_children = math.ceil(config.cgi.max_children / settings.workers)
    queue_size = math.ceil(config.cgi.queue_size / settings.workers)

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        server = ScriptServer(config, max_children, queue_size)
        servers = [await loop.create_server(lambda: FastCGIConnection(server), sock=sock, backlog=1024)
                   for sock, _ in listeners]
        _freeze_heap()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)    # only record it
        await stop.wait()
        for listener in servers:
            listener.close()
        deadline = loop.time() + settings.graceful_timeout
        while server.running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if server.running:
            log.warning("graceful timeout: %d request(s) still running are cut", server.running)
        for conn in list(server.connections):
            conn.close()
        await asyncio.sleep(0)
        await terminate_all(config.cgi.kill_grace)
        return 0

    announce.append(f"CGI scripts in {settings.cgi_dir}: {settings.workers} worker(s), at most "
                    f"{max_children} script(s) each, multiplexing")
    return Arbiter(settings.workers, lambda slot: run_loop(serve()),
                   settings.graceful_timeout + config.cgi.kill_grace + 5, announce).run()


def _run_app(config, app, listeners, announce: list[str]) -> int:
    from cgigate.worker.server import Worker

    settings = config.fcgi

    def worker_main(slot: int) -> int:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())   # only record it
        worker = Worker(app, threads=settings.threads, max_conns=settings.max_conns,
                        multiprocess=settings.workers > 1, idle_timeout=settings.idle_timeout,
                        allow=AllowList(settings.allowed_clients))
        _freeze_heap()
        for sock, _ in listeners:
            threading.Thread(target=worker.serve_forever, args=(sock,), daemon=True,
                             name="fcgi-accept").start()
        while not stop.wait(0.5):
            pass
        worker.stop(settings.graceful_timeout)
        return 0

    announce.append(f"app {settings.app}: {settings.workers} worker(s) x {settings.threads} thread(s), "
                    f"{'multiplexing' if settings.threads > 1 else 'one request per connection'}")
    return Arbiter(settings.workers, worker_main, settings.graceful_timeout + 5, announce).run()
