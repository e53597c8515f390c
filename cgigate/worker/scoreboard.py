"""The scoreboard: what every worker of a pool is doing, in shared memory.

Like php-fpm's scoreboard: a memory map the supervisor creates before it
forks, with a header for the pool and one slot per worker.  Each worker
writes only its own slot (its state, the request it is running and since
when, how many it has served, its RSS); the supervisor writes the header
and reads the slots to manage the pool; a status page reads it all.  The
map is backed by a file when other processes (the front's status page)
must read it, else anonymous.

No lock crosses processes.  A slot has a sequence number that its writer
makes odd while it writes and even again after (a seqlock): a reader that
sees it odd, or changed across its read, reads again.  Counters that
several processes would add to (requests in all) are kept per slot and
summed by the reader; the supervisor adds a worker's final counts to the
header when it reaps it.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time

# header: pool, mode, started (wall clock), then counters kept by the supervisor
HEADER_COUNTERS = ("retired_requests", "retired_slow", "retired_timed_out", "max_children_reached",
                   "recycled", "crashed", "reloads")
HEADER = struct.Struct("<64s16sd" + "Q" * len(HEADER_COUNTERS) + "IIIB")
# slot: seq, pid, state, generation, started, requests, slow, timed_out,
# request_start (monotonic), heartbeat (monotonic), method, uri, rss_kib, active
SLOT = struct.Struct("<IiBIdQQQdd8s200sQI")
SLOT_FIELDS = ("seq", "pid", "state", "generation", "started", "requests", "slow", "timed_out",
               "request_start", "heartbeat", "method", "uri", "rss_kib", "active")

_SEQ = struct.Struct("<I")


def _field_table() -> dict[str, tuple[int, struct.Struct]]:
    """Where each slot field lies, and its own packer (the layout SLOT's format gives)."""
    table, at = {}, 0
    for name, code in zip(SLOT_FIELDS, ("I", "i", "B", "I", "d", "Q", "Q", "Q", "d", "d", "8s", "200s", "Q", "I")):
        table[name] = (at, struct.Struct("<" + code))
        at += struct.calcsize("<" + code)
    assert at == SLOT.size, "the field table must match SLOT"
    return table


_FIELD_AT = _field_table()

EMPTY, STARTING, IDLE, BUSY, EXITING = range(5)
STATE_NAMES = ("empty", "starting", "idle", "busy", "exiting")


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


class Scoreboard:
    def __init__(self, mm: mmap.mmap, slots: int):
        self.mm = mm
        self.slots = slots
        self._local = threading.Lock()   # one writer per slot, but a worker has threads

    # --- creating and opening ---

    @staticmethod
    def size(slots: int) -> int:
        return HEADER.size + slots * SLOT.size

    @classmethod
    def create(cls, slots: int, pool: str, mode: str, path: str | None = None) -> "Scoreboard":
        size = cls.size(slots)
        if path is None:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        board = cls(mm, slots)
        HEADER.pack_into(mm, 0, pool.encode()[:64], mode.encode()[:16], time.time(),
                         *([0] * len(HEADER_COUNTERS)), slots, 0, 0, 1)
        return board

    @classmethod
    def open(cls, path: str) -> "Scoreboard":
        """A read-only view of a scoreboard another process created at `path`."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        slots = HEADER.unpack_from(mm, 0)[-4]
        return cls(mm, slots)

    # --- the header (the supervisor's) ---

    def header(self) -> dict:
        values = HEADER.unpack_from(self.mm, 0)
        out = {"pool": _text(values[0]), "mode": _text(values[1]), "started": values[2]}
        out.update(zip(HEADER_COUNTERS, values[3:3 + len(HEADER_COUNTERS)]))
        out["slots"], out["target_workers"], out["idle_workers"] = values[-4], values[-3], values[-2]
        out["healthy"] = bool(values[-1])
        return out

    def set_header(self, **fields) -> None:
        values = list(HEADER.unpack_from(self.mm, 0))
        names = ["pool", "mode", "started", *HEADER_COUNTERS, "slots", "target_workers", "idle_workers", "healthy"]
        for name, value in fields.items():
            i = names.index(name)
            values[i] = value.encode()[:64] if isinstance(value, str) else int(value) \
                if not isinstance(value, float) else value
        HEADER.pack_into(self.mm, 0, *values)

    def add(self, **counters) -> None:
        head = self.header()
        self.set_header(**{name: head[name] + n for name, n in counters.items()})

    _IDLE_AT = HEADER.size - 5        # idle_workers: the I before the final B

    def idle_workers(self) -> int:
        """How many workers were idle at the supervisor's last look (cheap: one field)."""
        return struct.unpack_from("<I", self.mm, self._IDLE_AT)[0]

    # --- the slots ---

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError(f"scoreboard slot {slot} of {self.slots}")
        return HEADER.size + slot * SLOT.size

    def read_slot(self, slot: int) -> dict:
        offset = self._offset(slot)
        for _ in range(100):
            values = SLOT.unpack_from(self.mm, offset)
            if values[0] % 2 == 0 and SLOT.unpack_from(self.mm, offset)[0] == values[0]:
                break
            time.sleep(0)
        out = dict(zip(SLOT_FIELDS, values))
        out["method"], out["uri"] = _text(out["method"]), _text(out["uri"])
        return out

    def write_slot(self, slot: int, **fields) -> None:
        """Set some fields of `slot`, each packed in place (twice per request: kept cheap)."""
        offset = self._offset(slot)
        mm = self.mm
        with self._local:
            seq = _SEQ.unpack_from(mm, offset)[0]
            _SEQ.pack_into(mm, offset, (seq + 1) & 0xFFFFFFFF)      # odd: writing
            for name, value in fields.items():
                at, packer = _FIELD_AT[name]
                if name in ("method", "uri"):
                    value = value.encode("utf-8", "replace")
                packer.pack_into(mm, offset + at, value)
            _SEQ.pack_into(mm, offset, (seq + 2) & 0xFFFFFFFF)      # even: done

    def clear_slot(self, slot: int) -> None:
        self.write_slot(slot, pid=0, state=EMPTY, generation=0, started=0.0, requests=0, slow=0,
                        timed_out=0, request_start=0.0, heartbeat=0.0, method="", uri="", rss_kib=0,
                        active=0)

    def free_slot(self) -> int | None:
        for slot in range(self.slots):
            if self.read_slot(slot)["state"] == EMPTY:
                return slot
        return None

    # --- the whole picture, for a status page ---

    def snapshot(self) -> dict:
        now = time.monotonic()
        head = self.header()
        workers = []
        for slot in range(self.slots):
            s = self.read_slot(slot)
            if s["state"] == EMPTY:
                continue
            busy = s["state"] == BUSY and s["request_start"] > 0
            workers.append({
                "slot": slot, "pid": s["pid"], "state": STATE_NAMES[s["state"]],
                "generation": s["generation"], "started": s["started"], "requests": s["requests"],
                "active_requests": s["active"], "slow_requests": s["slow"], "timed_out": s["timed_out"],
                "rss_kib": s["rss_kib"],
                "current_request": ({"method": s["method"], "uri": s["uri"],
                                     "duration_s": round(now - s["request_start"], 3)} if busy else None),
            })
        idle = sum(1 for w in workers if w["state"] == "idle")
        active = sum(1 for w in workers if w["state"] == "busy")
        return {
            "pool": head["pool"], "mode": head["mode"], "start_time": head["started"],
            "start_since_s": round(time.time() - head["started"], 1),
            "accepted_requests": head["retired_requests"] + sum(w["requests"] for w in workers),
            "slow_requests": head["retired_slow"] + sum(w["slow_requests"] for w in workers),
            "timed_out_requests": head["retired_timed_out"] + sum(w["timed_out"] for w in workers),
            "max_children_reached": head["max_children_reached"], "recycled_workers": head["recycled"],
            "crashed_workers": head["crashed"], "reloads": head["reloads"],
            "idle_workers": idle, "active_workers": active, "total_workers": len(workers),
            "target_workers": head["target_workers"], "healthy": head["healthy"], "workers": workers,
        }
