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

A process group is signalled only while its leader is unreaped: the
leader's pid (and so the group id) cannot be reused before that.  So when a
leader exits, a pending kill is finished (SIGKILL to the group) before it
is reaped, and a leader whose stdout is still held open by a background
process stays a zombie for up to `EXIT_LINGER` seconds while that process
gets the chance to finish, then its group is killed.  Background processes
that do not hold stdout are left alone when a script exits normally, as
Apache leaves them.

The pipes are watched with `loop.add_reader`/`add_writer` only while
someone reads or writes them (a reader's watch stays on between reads, and
goes off the first time the pipe is readable with nobody waiting), so an
unread pipe simply fills and stops its writer: no output is buffered in the
daemon beyond one read.  The child is
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
# Scripts whose leader has not been reaped yet.  Only these process groups
# are ever signalled: an unreaped leader pins its pid, so the group id cannot
# have been reused by an unrelated process.
_unreaped: set["ChildProcess"] = set()
EXIT_LINGER = 1.0   # seconds stdout may stay open after the script exited


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
        self._watching = False
        self._fresh = True   # a script just started has written nothing yet: wait before reading
        self.on_close: Callable[[], None] | None = None

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
                if not self._watching:
                    self._watching = True
                    self.loop.add_reader(self.fd, self._readable)
                try:
                    await waiter
                finally:
                    self._waiter = None
                continue
            if data:
                return data
            self.close()
        return b""

    def _readable(self) -> None:
        # The watch stays on between reads (each add/remove costs system calls);
        # readable with nobody waiting means the reader is behind: stop
        # watching, so an unread pipe neither spins the loop nor is drained.
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        elif self._watching:
            self._watching = False
            self.loop.remove_reader(self.fd)

    def force_eof(self) -> None:
        """End the stream now, although the pipe's write end is still open."""
        self.close()
        if self._waiter is not None:
            _wake(self._waiter)

    def close(self) -> None:
        self._eof = True
        if self.fd >= 0:
            if self._watching:
                self._watching = False
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
            on_close, self.on_close = self.on_close, None   # and no reference cycle with the child
            if on_close is not None:
                on_close()


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

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, tag: Callable[[], str],
                 copy: Callable[[bytes], None] | None = None):
        self.loop = loop
        self.fd = fd
        self.tag = tag
        self.copy = copy      # also gets the bytes as read (FastCGI: FCGI_STDERR)
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
        if self.copy is not None:
            self.copy(data)
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
    """A running script: its pid, its pipes, and a future for its exit status."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int, pidfd: int, stdin: PipeWriter | None,
                 stdout: PipeReader, stderr: StderrLogger, tag: Callable[[], str], grace: float):
        self.loop = loop
        self.pid = pid
        self.pidfd = pidfd
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.tag = tag
        self.grace = grace
        self.exited: asyncio.Future = loop.create_future()   # (exit code or -signal)
        self.reaped = False
        self.kill_requested = False
        self._timers: list[asyncio.TimerHandle] = []
        loop.add_reader(pidfd, self._exit_seen)
        stdout.on_close = self._stdout_closed
        _unreaped.add(self)

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    def kill_group(self) -> None:
        """SIGTERM to the whole process group, SIGKILL `grace` seconds later."""
        if self.reaped or self.kill_requested:
            return
        self.kill_requested = True
        self._signal_group(signal.SIGTERM)
        self._timers.append(self.loop.call_later(self.grace, self._signal_group, signal.SIGKILL))

    def kill_group_at(self, when: float) -> None:
        """kill_group() at loop time `when`, unless the script is reaped first."""
        if not self.reaped:
            self._timers.append(self.loop.call_at(when, self.kill_group))

    def _signal_group(self, signum: int) -> None:
        if self.reaped:
            return
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _exit_seen(self) -> None:
        # Read the status without reaping (WNOWAIT): the zombie keeps the group id ours.
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
        if info is None:
            return
        self.loop.remove_reader(self.pidfd)
        if not self.exited.done():
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            self.exited.set_result(code)
        if self.kill_requested:
            self._signal_group(signal.SIGKILL)   # what ignored SIGTERM goes with its leader
            self._reap()
        elif not self.stdout.at_eof:
            self._timers.append(self.loop.call_later(EXIT_LINGER, self._linger_over))
        else:
            self._reap()

    def _stdout_closed(self) -> None:
        # The usual order: the exit is seen in the same wake-up as the last
        # output, before that output is read.  Once stdout is done, reap.
        if self.exited.done() and not self.kill_requested:
            self._reap()

    def _linger_over(self) -> None:
        if not self.stdout.at_eof:
            log.warning("%s exited but its stdout is still open %gs later (a background "
                        "process?); ending the response and killing its process group",
                        self.tag(), EXIT_LINGER)
            self.stdout.force_eof()
            self.kill_requested = True
            self._signal_group(signal.SIGTERM)
            self._timers.append(self.loop.call_later(self.grace, self._kill_and_reap))
        else:
            self._reap()

    def _kill_and_reap(self) -> None:
        self._signal_group(signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.reaped:
            return
        try:
            os.waitpid(self.pid, 0)   # a zombie by now: does not block
        except ChildProcessError:
            pass
        self.reaped = True
        _unreaped.discard(self)
        os.close(self.pidfd)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.stdout.on_close = None

    def close_pipes(self) -> None:
        """Our ends of stdin and stdout; stderr closes itself at its end of file."""
        if self.stdin is not None:
            self.stdin.close()
        self.stdout.close()


def spawn(argv: list[bytes], env: dict[bytes, bytes], cwd: bytes, stderr_tag: Callable[[], str],
          with_stdin: bool, grace: float, preexec=None,
          stderr_copy: Callable[[bytes], None] | None = None) -> ChildProcess:
    """Start `argv` (argv[0] an absolute path) with exactly `env` in `cwd`.
    Its stderr is logged line by line, and handed to `stderr_copy` too.
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
            popen.returncode = 0  # reaped through the pidfd; Popen must not wait for it
            pid = popen.pid
    except BaseException:
        for fd in parent_ends:
            os.close(fd)
        raise
    finally:
        for fd in child_ends:
            os.close(fd)
    for fd in parent_ends:
        os.set_blocking(fd, False)
    stdin = PipeWriter(loop, in_w) if with_stdin else None
    return ChildProcess(loop, pid, os.pidfd_open(pid), stdin, PipeReader(loop, out_r),
                        StderrLogger(loop, err_r, stderr_tag, stderr_copy), stderr_tag, grace)


async def terminate_all(grace: float) -> int:
    """At shutdown: SIGTERM every script still running, SIGKILL its group
    `grace` seconds later.  Returns how many there were."""
    children = list(_unreaped)
    for child in children:
        child.kill_group()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace + 0.5
    while _unreaped and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return len(children)
