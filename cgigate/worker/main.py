"""`cgigate fcgi`: load the app, open the sockets, pre-fork the workers.

The app is imported once, in the supervisor, before any worker starts: an
import error is reported once, with the exit status 2, instead of every
worker failing in turn (gunicorn's boot-error rule).  The workers inherit it
already loaded.
"""

from __future__ import annotations

import grp
import logging
import pwd
import signal
import threading

from cgigate import logs
from cgigate.arbiter import Arbiter
from cgigate.listeners import open_listeners, remove_unix_sockets
from cgigate.worker.server import Worker
from cgigate.worker.wsgi import load_app

log = logging.getLogger("cgigate.error")


def _owner(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError as e:
        raise ValueError(f"--socket-owner {spec!r}: no such user or group {e}") from None
    return entry.pw_uid, gid


def run(config) -> int:
    settings = config.fcgi
    logs.setup("off", config.server.error_log, config.server.log_level)
    if not settings.app:
        log.error("no application: give --app MODULE:CALLABLE (or [fcgi] app in the config file)")
        return 2
    try:
        app = load_app(settings.app)
        owner = _owner(settings.unix_socket_owner)
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        listeners = open_listeners(config.fcgi_binds, settings.unix_socket_mode, owner)
    except OSError as e:
        log.error("cannot listen: %s", e.strerror or e)
        return 1

    def worker_main(slot: int) -> int:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())   # only record it
        worker = Worker(app, threads=settings.threads, max_conns=settings.max_conns,
                        multiprocess=settings.workers > 1, idle_timeout=settings.idle_timeout)
        for sock, _ in listeners:
            threading.Thread(target=worker.serve_forever, args=(sock,), daemon=True,
                             name="fcgi-accept").start()
        while not stop.wait(0.5):
            pass
        worker.stop(settings.graceful_timeout)
        return 0

    announce = [f"listening on {address} (FastCGI)" for _, address in listeners]
    announce.append(f"app {settings.app}: {settings.workers} worker(s) x {settings.threads} thread(s), "
                    f"{'multiplexing' if settings.threads > 1 else 'one request per connection'}")
    try:
        return Arbiter(settings.workers, worker_main, settings.graceful_timeout + 5, announce).run()
    finally:
        remove_unix_sockets(config.fcgi_binds)
