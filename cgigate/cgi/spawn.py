"""Child processes for CGI scripts, driven from the event loop.

`spawn` starts a script in a new session (so it leads its own process
group, which `kill_group` signals as a whole, grandchildren included) with
three fresh close-on-exec pipes and an environment that is exactly the one
given.  subprocess.Popen does the fork and exec because it uses vfork when
it can, which is what makes a process per request affordable; it is used
for nothing else.

The child is reaped through a pidfd (Linux 5.3+): when the process exits
the pidfd becomes readable and `wait4` collects it with its rusage.  That
happens in a loop callback, whatever the request handler is doing, so no
child outlives its request as a zombie and no thread is needed per child.

`PipeReader` keeps at most `HIGH_WATER` bytes of unread output before it
stops reading the pipe, so a script writing faster than the client reads
is slowed by the pipe, not buffered in the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import resource
import signal
import subprocess
from typing import Callable

log = logging.getLogger("cgigate.error")

HIGH_WATER = 256 * 1024


class PipeReader(asyncio.Protocol):
    """The read end of a pipe, as an awaitable stream of chunks."""

    def __init__(self):
        self.transport = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._waiter: asyncio.Future | None = None
        self._paused = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self):
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc):
        self._eof = True
        self._wake()

    def _wake(self):
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def force_eof(self) -> None:
        """End the stream now, even though the pipe's write end is still open."""
        self._eof = True
        if self.transport is not None:
            self.transport.close()
        self._wake()

    async def read(self) -> bytes:
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._paused and self._buffered < HIGH_WATER // 4:
                    self._paused = False
                    self.transport.resume_reading()
                if self._chunks and len(data) < 65536:
                    # Hand out what has piled up in one piece: fewer writes downstream.
                    parts = [data]
                    size = len(data)
                    while self._chunks and size < 65536:
                        more = self._chunks.popleft()
                        self._buffered -= len(more)
                        size += len(more)
                        parts.append(more)
                    data = b"".join(parts)
                return data
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class PipeWriter(asyncio.Protocol):
    """The write end of a pipe with `drain()`; a closed reader shows as BrokenPipeError."""

    def __init__(self):
        self.transport = None
        self._paused = False
        self._waiters: list[asyncio.Future] = []
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def pause_writing(self):
        self._paused = True

    def resume_writing(self):
        self._paused = False
        self._release(None)

    def connection_lost(self, exc):
        self.lost = True
        self._release(exc or BrokenPipeError())

    def _release(self, exc):
        for waiter in self._waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
        self._waiters.clear()

    async def write(self, data: bytes) -> None:
        if self.lost or self.transport.is_closing():
            raise BrokenPipeError()
        self.transport.write(data)
        if self._paused:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class LineLogger(asyncio.Protocol):
    """Sends each line a script writes to stderr to the error log, tagged."""

    MAX_LINE = 4096

    def __init__(self, tag: Callable[[], str]):
        self.tag = tag
        self._partial = b""

    def data_received(self, data):
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > self.MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line.rstrip(b"\r")[:self.MAX_LINE].decode("utf-8", "backslashreplace")
        log.warning("%s stderr: %s", self.tag(), text)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if self._partial:
            self._emit(self._partial)
            self._partial = b""


def rlimits_preexec(limits: list[tuple[int, int]]):
    """A preexec_fn setting resource limits in the child; None when there are none
    (so Popen can keep using vfork)."""
    if not limits:
        return None

    def apply():
        for which, value in limits:
            hard = value + 1 if which == resource.RLIMIT_CPU else value  # SIGXCPU, then SIGKILL
            resource.setrlimit(which, (value, hard))
    return apply


class ChildProcess:
    """A running script: its pid, its pipes, and a future for its exit."""

    def __init__(self, popen: subprocess.Popen, stdin: PipeWriter, stdout: PipeReader,
                 exited: asyncio.Future):
        self.popen = popen
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout = stdout
        self.exited = exited          # result: (exit code or -signal, rusage)
        self.killed_by: str | None = None
        self._kill_timer: asyncio.TimerHandle | None = None

    @property
    def returncode(self) -> int | None:
        return self.exited.result()[0] if self.exited.done() else None

    def kill_group(self, grace: float, reason: str) -> None:
        """SIGTERM to the whole process group, SIGKILL `grace` seconds later."""
        if self.killed_by is None:
            self.killed_by = reason
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
        self.stdin.close()
        if self.stdout.transport is not None:
            self.stdout.transport.close()


async def spawn(argv: list[bytes], env: dict[bytes, bytes], cwd: bytes,
                stderr_tag: Callable[[], str], preexec=None) -> ChildProcess:
    """Start `argv` with exactly `env`.  Raises OSError when fork or exec fails."""
    loop = asyncio.get_running_loop()
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    parent_ends = [in_w, out_r, err_r]
    try:
        popen = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err_w, env=env, cwd=cwd,
                                 start_new_session=True, close_fds=True, preexec_fn=preexec)
    except BaseException:
        for fd in parent_ends:
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)

    exited = loop.create_future()
    pidfd = os.pidfd_open(popen.pid)

    def reap():
        try:
            pid, status, rusage = os.wait4(popen.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status, rusage = popen.pid, 0, None
        if pid == 0:
            return  # spurious wake-up
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = os.waitstatus_to_exitcode(status)
        popen.returncode = code  # so Popen never waits for it again
        if not exited.done():
            exited.set_result((code, rusage))

    loop.add_reader(pidfd, reap)
    try:
        _, stdin = await loop.connect_write_pipe(PipeWriter, open(in_w, "wb", buffering=0))
        _, stdout = await loop.connect_read_pipe(PipeReader, open(out_r, "rb", buffering=0))
        await loop.connect_read_pipe(lambda: LineLogger(stderr_tag), open(err_r, "rb", buffering=0))
    except BaseException:
        os.killpg(popen.pid, signal.SIGKILL)
        raise
    return ChildProcess(popen, stdin, stdout, exited)
