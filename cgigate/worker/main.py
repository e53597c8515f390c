"""`cgigate fcgi`: load the app (or check the CGI directory), open the
sockets, pre-fork the workers.

The app is imported once in a throwaway child before any worker starts: an
import error is reported once, with the exit status 2, instead of every
worker failing in turn (gunicorn's boot-error rule).  Each worker then
imports it itself, so that a reload (SIGHUP) runs the code on disk; the
pool's supervisor (pool.py) manages them.  With `--cgi-dir` each worker runs an event loop that forks
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
import sys
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


def run(config, scoreboard_path: str | None = None) -> int:
    settings = config.fcgi
    logs.setup("off", config.server.error_log, config.server.log_level)
    if bool(settings.app) == bool(settings.cgi_dir):
        log.error("give either --app MODULE:CALLABLE to host a WSGI app or --cgi-dir DIR to run CGI "
                  "scripts (or [fcgi] app / cgi_dir in the config file)%s",
                  "; not both" if settings.app else "")
        return 2
    try:
        if settings.cgi_dir:
            target = _cgi_dir(settings.cgi_dir)
        owner = _owner(settings.unix_socket_owner, settings.unix_socket_group)
    except ValueError as e:
        log.error("%s", e)
        return 2
    if settings.app:
        # before the socket exists: nothing connects to a pool whose app cannot load
        wrong = check_app(settings.app)
        if wrong:
            log.error("%s", wrong)
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
        return _run_app(config, listeners, announce, scoreboard_path)
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
        now = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)    # only record it
        loop.add_signal_handler(signal.SIGQUIT, lambda: (now.append(True), stop.set()))
        loop.add_signal_handler(signal.SIGUSR1, logs.reopen)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: CGI scripts are read at each "
                                                               "request; nothing to reload"))
        await stop.wait()
        for listener in servers:
            listener.close()
        deadline = loop.time() + (0 if now else settings.graceful_timeout)
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


def check_app(spec: str) -> str | None:
    """Import the app in a child process: None when it loads, else what is wrong.
    The supervisor never imports it itself, so that each generation of workers
    (SIGHUP) loads the code as it is on disk then."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            from cgigate.worker.wsgi import load_app
            try:
                load_app(spec)
            except ValueError as e:
                os.write(write_end, str(e).encode()[:4000])
                code = 2
            except BaseException as e:
                os.write(write_end, f"--app {spec!r}: importing it raised {type(e).__name__}: {e}".encode()[:4000])
                code = 2
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return message or f"--app {spec!r}: the import check exited with {os.waitstatus_to_exitcode(status)}"
    return None


def _status_answers(settings, board):
    """[fcgi] status_path and ping_path, answered by the worker from the scoreboard."""
    if not settings.status_path and not settings.ping_path:
        return None
    from cgigate import status

    status_path, ping_path = settings.status_path.encode(), settings.ping_path.encode()

    def answer(params: dict):
        path = params.get(b"SCRIPT_NAME", b"") + params.get(b"PATH_INFO", b"")
        if ping_path and path == ping_path:
            healthy = board.header()["healthy"]
            return ("200 OK", b"text/plain", b"pong\n") if healthy else \
                ("503 Service Unavailable", b"text/plain", b"unhealthy\n")
        if status_path and path == status_path:
            content_type, body = status.render({"pools": [board.snapshot()]},
                                               status.form_of(params.get(b"QUERY_STRING", b"")))
            return "200 OK", content_type, body
        return None
    return answer


def _title(text: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(f"cgigate fcgi: {text}")


def _run_app(config, listeners, announce: list[str], scoreboard_path: str | None) -> int:
    import faulthandler
    from cgigate.worker import pool as P
    from cgigate.worker.scoreboard import Scoreboard
    from cgigate.worker.server import CONNECTIONS_PER_THREAD, Worker
    from cgigate.worker.watchdog import RequestTracker

    settings = config.fcgi
    spec = settings.app
    pool = P.PoolSettings.from_config(config)
    problems = pool.problems()
    if problems:
        log.error("[fcgi] %s", "; ".join(problems))
        return 2
    name = spec.partition(":")[0]
    board = Scoreboard.create(max(pool.workers * 2, 8), name, pool.pm, scoreboard_path)
    error_log = config.server.error_log

    def worker_main(slot: int, generation: int, s: P.PoolSettings, board: Scoreboard, max_requests: int) -> int:
        stop = threading.Event()
        reason = []

        def retire(why: str) -> None:
            reason.append(why)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())   # only record it
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)          # the supervisor's business
        signal.signal(signal.SIGQUIT, lambda *_: os._exit(0))   # immediate stop: nothing to finish
        reopen = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *_: reopen.set())   # only record it
        stacks = sys.stderr if error_log == "-" else open(error_log, "a")
        faulthandler.register(signal.SIGUSR2, file=stacks, all_threads=True)
        _title(f"worker {slot} pool={name} starting")
        label = f"worker {slot} (pid {os.getpid()})"
        tracker = RequestTracker(board=board, slot=slot, generation=generation, label=label,
                                 max_requests=max_requests, max_rss_kib=s.max_rss // 1024,
                                 request_timeout=s.request_timeout,
                                 slow_request_timeout=s.slow_request_timeout, retire=retire,
                                 title=lambda state: _title(f"worker {slot} pool={name} {state}"))
        from cgigate.worker.wsgi import load_app
        try:
            app = load_app(spec)
        except BaseException as e:
            log.error("%s: cannot load the app: %s", label, e)
            return 3
        worker = Worker(app, threads=s.threads, multiprocess=True,
                        idle_timeout=settings.idle_timeout, allow=AllowList(settings.allowed_clients),
                        advertised_conns=s.workers * s.threads * CONNECTIONS_PER_THREAD, tracker=tracker,
                        special=_status_answers(settings, board))
        _freeze_heap()
        for sock, _ in listeners:
            threading.Thread(target=worker.serve_forever, args=(sock,), daemon=True,
                             name="fcgi-accept").start()
        tracker.ready(worker)
        while not stop.wait(0.2):
            if reopen.is_set():
                reopen.clear()
                logs.reopen()
        worker.stop(s.graceful_timeout)
        tracker.stop()
        return 0

    def reload_settings() -> P.PoolSettings:
        from cgigate.cli import reload_config
        return P.PoolSettings.from_config(reload_config())

    announce.append(f"app {spec}: pm {pool.pm}, {pool.workers} worker(s) x {pool.threads} thread(s), "
                    f"{'multiplexing' if pool.threads > 1 else 'one request per connection'}")
    supervisor = P.PoolSupervisor(name=name, settings=pool, listeners=listeners, board=board,
                                  worker_main=worker_main, check_app=lambda: check_app(spec),
                                  reload_settings=reload_settings, announce=announce, set_title=_title)
    return supervisor.run()
