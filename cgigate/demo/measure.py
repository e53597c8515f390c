"""Counting what a server's processes cost, from /proc (Linux).

The demo watches one process tree: the daemon (the *front*) and everything
below it (the *backend*: CGI children, or the FastCGI supervisor and its
workers).  Three counters, read at the moments the load generator's
counted window opens and closes:

* CPU time, from /proc/PID/stat: utime+stime of the front itself; for the
  backend, what the front's reaped children used (cutime+cstime: every
  finished CGI script is in there) plus utime+stime+cutime+cstime of each
  live descendant (the persistent workers).
* processes created, from the kernel's last allocated PID (the last field
  of /proc/loadavg).  PIDs are handed out in order, so the difference is
  how many processes and threads were created, by anyone in this PID
  namespace.  run.py reads it around the load generator's whole life (every
  request it sent was answered before it exited); `usage()` gives the same
  count for the window.  The load generator's own (wrk's threads) are taken
  off; anything else started on the machine meanwhile counts too, which is
  why a figure near zero is read as zero.
* the machine's busy CPU (/proc/stat), less the load generator's and the
  demo's own: a cross-check that also sees CPU no parent collects (fcgiwrap
  ignores SIGCHLD, so its scripts' CPU is in nobody's cutime).
* memory, sampled by a thread every `interval` seconds: the sum of PSS
  (proportional set size, /proc/PID/smaps_rollup) over the tree, so pages
  shared by forked workers are counted once in all; RSS where PSS cannot
  be read.  The peak of that sum is reported.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return data[data.rindex(b")") + 2:].split()


def cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(own utime+stime, reaped children's cutime+cstime) in clock ticks."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # after ")": state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17)
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/*/children."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(p) for p in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children(child))
    return out


def machine_busy_ticks() -> int:
    """CPU ticks every core of the machine spent busy since boot (/proc/stat)."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal (guest is inside user)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal


def last_pid() -> int:
    with open("/proc/loadavg", "rb") as f:
        return int(f.read().split()[-1])


def pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return int(f.read())
    except OSError:
        return 32768


def memory_kib(pid: int) -> int:
    """PSS of `pid` in KiB (RSS when smaps_rollup cannot be read); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except OSError:
        return 0


@dataclass
class Snapshot:
    at: float
    ticks: dict[int, tuple[int, int]]   # pid -> (front ticks, backend ticks) it stands for
    last_pid: int


@dataclass
class Usage:
    """What the watched processes used between two snapshots."""
    seconds: float
    front_cpu_s: float
    backend_cpu_s: float
    tasks_created: int
    peak_memory_kib: int = 0
    peak_processes: int = 0
    processes_seen: int = 0
    samples: int = 0


class TreeWatch:
    """Snapshots and a memory sampler for a server's processes.

    `front` is the process that speaks HTTP.  Its own CPU is the front's;
    its descendants, and the children it reaped, are the backend, unless
    `front_tree` says its whole tree is the front (nginx's master and its
    workers).  `backend_roots` are further trees that are all backend (a
    FastCGI server the front does not own, such as fcgiwrap or flup)."""

    def __init__(self, front: int, backend_roots: tuple[int, ...] = (), front_tree: bool = False,
                 interval: float = 0.2):
        self.front = front
        self.backend_roots = tuple(backend_roots)
        self.front_tree = front_tree
        self.interval = interval
        self._peak_kib = 0
        self._peak_processes = 0
        self._seen: set[int] = set()
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def processes(self) -> list[int]:
        out = [self.front, *descendants(self.front)]
        for root in self.backend_roots:
            out += [root, *descendants(root)]
        return out

    def snapshot(self) -> Snapshot:
        # the PID counter first: the window is read at the same moment at both ends
        at, pid_now = time.perf_counter(), last_pid()
        if cpu_ticks(self.front) is None:
            raise RuntimeError(f"process {self.front} is gone")
        ticks: dict[int, tuple[int, int]] = {}

        def add(pid: int, own_is_front: bool, reaped_is_front: bool) -> None:
            t = cpu_ticks(pid)
            if t is not None:
                own, reaped = t
                ticks[pid] = (own * own_is_front + reaped * reaped_is_front,
                              own * (not own_is_front) + reaped * (not reaped_is_front))

        add(self.front, True, self.front_tree)
        for pid in descendants(self.front):
            add(pid, self.front_tree, self.front_tree)
        for root in self.backend_roots:
            for pid in (root, *descendants(root)):
                add(pid, False, False)
        return Snapshot(at, ticks, pid_now)

    def sample_memory(self) -> None:
        tree = self.processes()
        total = sum(memory_kib(pid) for pid in tree)
        self._seen.update(tree)
        self._samples += 1
        self._peak_kib = max(self._peak_kib, total)
        self._peak_processes = max(self._peak_processes, len(tree))

    def _sampler(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample_memory()

    def start_sampling(self) -> None:
        self._peak_kib = self._peak_processes = self._samples = 0
        self._seen = set()
        self._stop.clear()
        self.sample_memory()
        self._thread = threading.Thread(target=self._sampler, name="memory-sampler", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample_memory()

    def usage(self, before: Snapshot, after: Snapshot, loadgen_tasks: int = 0) -> Usage:
        front = backend = 0
        for pid, (f, b) in after.ticks.items():
            # a process born inside the window used all of its ticks inside it
            f0, b0 = before.ticks.get(pid, (0, 0))
            front += f - f0
            backend += b - b0
        for pid, (f0, b0) in before.ticks.items():
            if pid not in after.ticks:
                # reaped inside the window: its whole life is now in a parent's
                # reaped ticks, but the part before the window does not belong here
                front -= f0
                backend -= b0
        created = after.last_pid - before.last_pid
        if created < 0:  # the PID counter wrapped around
            created += pid_max() - 300
        return Usage(seconds=after.at - before.at,
                     front_cpu_s=max(0, front) / CLK_TCK,
                     backend_cpu_s=max(0, backend) / CLK_TCK,
                     tasks_created=max(0, created - loadgen_tasks),
                     peak_memory_kib=self._peak_kib, peak_processes=self._peak_processes,
                     processes_seen=len(self._seen), samples=self._samples)
