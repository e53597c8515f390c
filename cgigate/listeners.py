"""Listening sockets, opened before any worker starts.

Opening them first, in one place, lets one process serve them or several
worker processes share them (each accepts from the same socket).  Every
socket is close-on-exec, so CGI scripts never inherit one.
"""

from __future__ import annotations

import os
import socket
import stat

from cgigate.config import Bind


def remove_stale_socket(path: str) -> None:
    """A socket file left by a daemon that died is removed; a live one is an error."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; remove it or bind elsewhere")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"{path} is in use by another server")


def open_listeners(binds: list[Bind], unix_socket_mode: int = 0o660,
                   unix_socket_owner: tuple[int, int] | None = None) -> list[tuple[socket.socket, str]]:
    """(socket, address) for every bind: "HOST:PORT" or "unix:PATH".  Raises OSError."""
    opened: list[tuple[socket.socket, str]] = []
    try:
        for bind in binds:
            if bind.is_unix:
                remove_stale_socket(bind.path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(bind.path)
                os.chmod(bind.path, unix_socket_mode)
                if unix_socket_owner is not None:
                    os.chown(bind.path, *unix_socket_owner)
                address = f"unix:{bind.path}"
            else:
                family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((bind.host, bind.port))
                except OSError as e:
                    sock.close()
                    raise OSError(e.errno, f"{bind}: {e.strerror}") from None
                host, port = sock.getsockname()[:2]
                address = f"{'[' + host + ']' if ':' in host else host}:{port}"
            sock.listen(1024)
            sock.setblocking(False)
            opened.append((sock, address))
    except BaseException:
        for sock, _ in opened:
            sock.close()
        raise
    return opened


def remove_unix_sockets(binds: list[Bind]) -> None:
    for bind in binds:
        if bind.is_unix:
            try:
                os.unlink(bind.path)
            except FileNotFoundError:
                pass
