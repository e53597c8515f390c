"""Listening sockets, opened before any worker starts.

Opening them first, in one place, lets one process serve them or several
worker processes share them (each accepts from the same socket).  Every
socket is close-on-exec, so CGI scripts never inherit one.

Sockets can also be inherited: `fd:N` adopts descriptor N (spawn-fcgi
passes its socket as fd 0), and under systemd socket activation
(`LISTEN_PID` is this process, `LISTEN_FDS` counts descriptors from 3, as
sd_listen_fds(3) says) those descriptors replace the configured addresses.
`AllowList` is php-fpm's `listen.allowed_clients`: TCP peers not on it are
turned away.
"""

from __future__ import annotations

import ipaddress
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


SD_LISTEN_FDS_START = 3


def activation_binds() -> list[Bind]:
    """The sockets systemd passed to this process, as fd: binds; [] when none.
    The variables are removed so that no child takes them for its own."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if not (pid.isdigit() and count.isdigit()) or int(pid) != os.getpid():
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return [Bind(fd=SD_LISTEN_FDS_START + i) for i in range(int(count))]


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name if isinstance(name, str) else os.fsdecode(name)}"
    host, port = name[:2]
    return f"{'[' + host + ']' if ':' in host else host}:{port}"


def adopt_socket(fd: int) -> socket.socket:
    """The listening stream socket inherited as descriptor `fd`.  Raises OSError."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        hint = (" (started from a terminal? spawn-fcgi and systemd pass a listening socket there)"
                if fd == 0 else "")
        raise OSError(e.errno, f"fd:{fd} is not a socket: {e.strerror}{hint}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise OSError(f"fd:{fd} is not a listening stream socket")
    sock.set_inheritable(False)
    return sock


def open_listeners(binds: list[Bind], unix_socket_mode: int = 0o660,
                   unix_socket_owner: tuple[int, int] | None = None) -> list[tuple[socket.socket, str]]:
    """(socket, address) for every bind: "HOST:PORT" or "unix:PATH".  Raises OSError.
    `unix_socket_owner` is (uid, gid), either -1 to leave it unchanged."""
    opened: list[tuple[socket.socket, str]] = []
    try:
        for bind in binds:
            if bind.fd >= 0:
                sock = adopt_socket(bind.fd)
                sock.setblocking(False)
                opened.append((sock, _address(sock)))
                continue
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
                address = _address(sock)
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


class AllowList:
    """Which TCP peers may connect: addresses and networks, or "any"."""

    def __init__(self, entries: list[str]):
        self.any = "any" in entries
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries if e != "any"]

    def allows(self, peer) -> bool:
        """`peer` as accept() gives it: (host, port, ...) for TCP, a path or "" for unix."""
        if self.any or not isinstance(peer, tuple):
            return True
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
