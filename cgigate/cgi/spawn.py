"""Child processes for CGI scripts, driven from the event loop.

`spawn` starts a script in a new session (so it leads its own process
group, which `kill_group` signals as a whole, grandchildren included), with
pipes for stdout and stderr, a pipe or /dev/null for stdin, and exactly the
environment given.  It uses `os.posix_spawn`, which glibc implements with
`clone(CLONE_VM | CLONE_VFORK)`: the daemon's memory is never copied, so a
process per request costs little more than the exec itself.  posix_spawn
cannot change directory, so the daemon changes its own working directory
around the call and straight back; that is safe because the event loop is
the only thread and nothing in the daemon uses relative paths once the
config is loaded.  Resource limits need code to run in the child, so only
when some are configured does `subprocess.Popen` with a `preexec_fn` do the
fork instead.

Every descriptor the daemon opens is close-on-exec (PEP 446), so a script
inherits only its three standard streams.  Signals the daemon ignores
(SIGPIPE, SIGXFSZ) are reset to their defaults, as a script expects.

The pipes are read and written with `loop.add_reader`/`add_writer` only
while someone waits on them, so an unread pipe simply fills and stops its
writer: no output is buffered in the daemon beyond one read.  The child is
reaped through a pidfd (Linux 5.3+): when it exits the pidfd becomes
readable and `wait4` collects it with its rusage, whatever the request
handler is doing, so no child outlives its request as a zombie.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import subprocess
from typing import Callable

log = logging.getLogger("cgigate.error")

READ_SIZE = 65536
_RESET_SIGNALS = tuple(s for s in (signal.SIGPIPE, getattr(signal, "SIGXFSZ", None)) if s is not None)
_devnull: int | None = None
_home: int | None = None
# Process groups of scripts that may still have members (a script's leader
# may be reaped while a background process of its group lives on).
_groups: set[int] = set()


def _devnull_fd() -> int:
    global _devnull
    if _devnull is None:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull


def _home_fd() -> int:
    """The daemon's own working directory, to return to after each spawn."""
    global _home
    if _home is None:
        _home = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _home


class PipeReader:
    """The non-blocking read end of a pipe; `read()` returns b"" at its end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int):
        self.loop = loop
        self.fd = fd
        self._eof = False
        self._waiter: asyncio.Future | None = None
        self._fresh = True   # a script just started has written nothing yet: wait before reading

    @property
    def at_eof(self) -> bool:
        return self._eof

    async def read(self) -> bytes:
        while not self._eof:
            try:
                if self._fresh:
                    self._fresh = False
                    raise BlockingIOError
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                self._waiter = waiter = self.loop.create_future()
                self.loop.add_reader(self.fd, _wake, waiter)
                try:
                    await waiter
                finally:
                    self._waiter = None
                    if self.fd >= 0:
                        self.loop.remove_reader(self.fd)
                continue
            if data:
                return data
            self.close()
        return b""

    def force_eof(self) -> None:
        """End the stream now, although the pipe's write end is still open."""
        self.close()
        if self._waiter is not None:
            _wake(self._waiter)

    def close(self) -> None:
        self._eof = True
        if self.fd >= 0:
            if self._waiter is not None:
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


class PipeWriter:
    """The non-blocking write end of a pipe.  A reader that went away shows as
    BrokenPipeError."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int):
        self.loop = loop
        self.fd = fd

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.fd < 0:
                raise BrokenPipeError()
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                waiter = self.loop.create_future()
                self.loop.add_writer(self.fd, _wake, waiter)
                try:
                    await waiter
                finally:
                    if self.fd >= 0:
                        self.loop.remove_writer(self.fd)
                continue
            view = view[written:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StderrLogger:
    """Sends each line a script writes to stderr to the error log, tagged."""

    MAX_LINE = 4096

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, tag: Callable[[], str]):
        self.loop = loop
        self.fd = fd
        self.tag = tag
        self._partial = b""
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if self._partial:
                self._emit(self._partial)
                self._partial = b""
            self.close()
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > self.MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line.rstrip(b"\r")[:self.MAX_LINE].decode("utf-8", "backslashreplace")
        log.warning("%s stderr: %s", self.tag(), text)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def rlimits_preexec(limits: list[tuple[int, int]]):
    """A preexec_fn setting resource limits in the child; None when there are none."""
    if not limits:
        return None

    def apply():
        for which, value in limits:
            hard = value + 1 if which == resource.RLIMIT_CPU else value  # SIGXCPU, then SIGKILL
            resource.setrlimit(which, (value, hard))
    return apply


class ChildProcess:
    """A running script: its pid, its pipes, and a future for its exit."""

    def __init__(self, pid: int, stdin: PipeWriter | None, stdout: PipeReader, stderr: StderrLogger,
                 exited: asyncio.Future):
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.exited = exited          # result: (exit code or -signal, rusage)
        self._kill_timer: asyncio.TimerHandle | None = None

    @property
    def returncode(self) -> int | None:
        return self.exited.result()[0] if self.exited.done() else None

    def kill_group(self, grace: float) -> None:
        """SIGTERM to the whole process group, SIGKILL `grace` seconds later."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        if self._kill_timer is None:
            self._kill_timer = asyncio.get_running_loop().call_later(grace, self._kill_now)

    def _kill_now(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close_pipes(self) -> None:
        """Our ends of stdin and stdout; stderr closes itself at its end of file."""
        if self.stdin is not None:
            self.stdin.close()
        self.stdout.close()


def spawn(argv: list[bytes], env: dict[bytes, bytes], cwd: bytes, stderr_tag: Callable[[], str],
          with_stdin: bool, preexec=None) -> ChildProcess:
    """Start `argv` (argv[0] an absolute path) with exactly `env` in `cwd`.
    Raises OSError when the fork or the exec fails."""
    loop = asyncio.get_running_loop()
    parent_ends: list[int] = []
    child_ends: list[int] = []
    try:
        if with_stdin:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            child_ends.append(in_r)
            parent_ends.append(in_w)
        else:
            in_r, in_w = _devnull_fd(), -1
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        parent_ends.append(out_r)
        child_ends.append(out_w)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        parent_ends.append(err_r)
        child_ends.append(err_w)
        if preexec is None:
            home = _home_fd()
            os.chdir(cwd)
            try:
                pid = os.posix_spawn(argv[0], argv, env, file_actions=[
                    (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2)],
                    setsid=True, setsigdef=_RESET_SIGNALS, setsigmask=())
            finally:
                os.fchdir(home)
        else:
            popen = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err_w, env=env, cwd=cwd,
                                     start_new_session=True, close_fds=True, preexec_fn=preexec)
            popen.returncode = 0  # reaped below, through the pidfd; Popen must not wait for it
            pid = popen.pid
    except BaseException:
        for fd in parent_ends:
            os.close(fd)
        raise
    finally:
        for fd in child_ends:
            os.close(fd)

    exited = loop.create_future()
    pidfd = os.pidfd_open(pid)

    def reap():
        try:
            reaped, status, rusage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            reaped, status, rusage = pid, 0, None
        if reaped == 0:
            return  # not yet
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _forget_group_if_empty(pid)
        if not exited.done():
            exited.set_result((os.waitstatus_to_exitcode(status), rusage))

    loop.add_reader(pidfd, reap)
    if len(_groups) > 1024:
        for pgid in list(_groups):
            _forget_group_if_empty(pgid)
    _groups.add(pid)
    for fd in parent_ends:
        os.set_blocking(fd, False)
    stdin = PipeWriter(loop, in_w) if with_stdin else None
    return ChildProcess(pid, stdin, PipeReader(loop, out_r), StderrLogger(loop, err_r, stderr_tag), exited)


def _forget_group_if_empty(pgid: int) -> None:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        _groups.discard(pgid)


async def terminate_all(grace: float) -> int:
    """At shutdown: SIGTERM every script process group still alive, SIGKILL
    what is left `grace` seconds later.  Returns how many groups were signalled."""
    for pgid in list(_groups):
        _forget_group_if_empty(pgid)
    if not _groups:
        return 0
    signalled = len(_groups)
    for pgid in list(_groups):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            _groups.discard(pgid)
    deadline = asyncio.get_running_loop().time() + grace
    while _groups and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        for pgid in list(_groups):
            _forget_group_if_empty(pgid)
    for pgid in list(_groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    await asyncio.sleep(0.05)  # let the pidfd callbacks reap the leaders
    return signalled
