"""Connections to one FastCGI application, shared by every request that goes to it.

How this works.  The first request opens a connection and sends
FCGI_GET_VALUES for FCGI_MAX_CONNS, FCGI_MAX_REQS and FCGI_MPXS_CONNS
(FastCGI section 4.1).  FCGI_MPXS_CONNS=1 means the application
multiplexes (section 3.3): up to min(FCGI_MAX_REQS, `max_requests`)
requests then share one connection, each with the lowest free request id.
No answer within `probe_timeout`, an answer without FCGI_MPXS_CONNS=1 (flup
on Python 3 answers with no variables at all) or FCGI_UNKNOWN_TYPE
(section 4.2) means one request per connection at a time, the nginx and
Apache habit.  Either way at most min(FCGI_MAX_CONNS, `max_connections`)
connections are open.  FCGI_MAX_REQS is taken per connection, as
`cgigate.fastcgi.ServerConnection` reports it.

Every BEGIN_REQUEST sets FCGI_KEEP_CONN (section 5.1), so the application
leaves the connection open after END_REQUEST and the next request reuses
it.  A request goes to the open connection with a free slot and the fewest
requests on it (among idle ones, the one used last), else to a new
connection, else it waits in a bounded first-come queue.  At most
`max_idle` idle connections are kept (default: all `max_connections`), each closed after
`idle_timeout`.

A request ends when its END_REQUEST (section 5.5) arrives; that frees its
request id at once.  A request given up before that (client gone, timeout,
bad response) is aborted: on a multiplexed connection with
FCGI_ABORT_REQUEST (section 5.4), and its id stays taken, its output
dropped, until the application answers END_REQUEST; if none comes within
`abort_timeout` the connection takes no new requests and is closed when its
others are done.  On a connection that does not multiplex, the connection
is closed instead: an application busy with a request it was told nothing
about cannot be trusted with the next one.  A connection that closes or
breaks the protocol fails the requests on it and no others.

Flow control.  FastCGI has none of its own (a record stream per request,
no window), so it is done at the transport: records are read 64 KiB at a
time (`asyncio.BufferedProtocol`), and reading stops while any request on
the connection holds more than `HIGH_WATER` bytes of STDOUT its client has
not taken yet, so one request holds at most HIGH_WATER + 64 KiB.  On a
multiplexed connection a slow client therefore holds up the others on it,
the price of bounded memory.  STDIN waits for the transport's write buffer
to drain, and the request body is read only as fast as STDIN drains.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

from cgigate.fastcgi import ClientConnection, ProtocolError
from cgigate.fastcgi import events as ev
from cgigate.fastcgi.records import CANT_MPX_CONN, MAX_CONNS, MAX_REQS, MPXS_CONNS

log = logging.getLogger("cgigate.error")

READ_SIZE = 64 * 1024
HIGH_WATER = 192 * 1024     # unread STDOUT of one request that pauses reading until it is read
WRITE_HIGH_WATER = 64 * 1024
STDERR_LINE_MAX = 4096


class UpstreamError(Exception):
    """The application failed a request; `detail` (for the error log) says how."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class ConnectFailed(UpstreamError):
    """No connection could be opened (refused, no such socket, timed out)."""

    def __init__(self, detail: str, timed_out: bool = False):
        super().__init__(detail)
        self.timed_out = timed_out


class ConnectionBroken(UpstreamError):
    """The connection closed, was reset or broke the protocol with the request on it."""

    def __init__(self, detail: str, protocol: bool = False):
        super().__init__(detail)
        self.protocol = protocol


class PoolFull(UpstreamError):
    """Every connection is busy and the queue is full (or the pool is closed)."""


def parse_address(text: str) -> tuple[str, object]:
    """`unix:/run/app.sock` -> ("unix", path); `host:port`, `[v6]:port` -> ("tcp", (host, port))."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a socket path, as in unix:/run/app.sock")
        return "unix", path
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]/\s]+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"expected unix:PATH, HOST:PORT or [IPv6]:PORT, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port}")
    return "tcp", (host, port)


@dataclass
class PoolStats:
    connections_opened: int = 0
    connect_failures: int = 0
    connections_broken: int = 0     # closed or broken with requests on them
    requests: int = 0
    aborts: int = 0                 # FCGI_ABORT_REQUEST records sent
    peak_connections: int = 0
    peak_buffered: int = 0          # most unread STDOUT bytes one request held
    peak_waiting: int = 0           # most requests waiting for a connection at once
    queue_full: int = 0             # requests refused (503) with the queue full


class Exchange:
    """One request on one connection, as the handler sees it: send STDIN,
    read STDOUT, wait for END_REQUEST, then `finish`."""

    def __init__(self, conn: "BackendConnection", rid: int, on_stderr: Callable[[bytes], None] | None,
                 reused: bool):
        self.conn = conn
        self.rid = rid
        self.reused = reused            # the connection had served a request before
        self.on_stderr = on_stderr
        self.records = 0                # records received for this request
        self.end: ev.EndRequest | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.stdout_done = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._stderr = b""
        self._waiter: asyncio.Future | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # --- fed by the connection ---

    def _stdout(self, data: bytes) -> None:
        self.records += 1
        if self.abandoned:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        stats = self.conn.pool.stats
        if self._buffered > stats.peak_buffered:
            stats.peak_buffered = self._buffered
        if self._buffered > HIGH_WATER:
            self.conn._hold(self)
        self._wake()

    def _stdout_end(self) -> None:
        self.records += 1
        self.stdout_done = True
        self._wake()

    def _stderr_data(self, data: bytes) -> None:
        self.records += 1
        *lines, rest = (self._stderr + data).split(b"\n")
        if len(rest) > STDERR_LINE_MAX:
            lines.append(rest)
            rest = b""
        self._stderr = rest
        for line in lines:
            self._emit(line)

    def _stderr_end(self) -> None:
        self.records += 1
        if self._stderr:
            self._emit(self._stderr)
            self._stderr = b""

    def _emit(self, line: bytes) -> None:
        if self.on_stderr is not None:
            self.on_stderr(line.rstrip(b"\r")[:STDERR_LINE_MAX])

    def _ended(self, event: ev.EndRequest) -> None:
        self.records += 1
        self._stderr_end()
        self.end = event
        self.stdout_done = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        self._wake()

    def _failed(self, error: BaseException) -> None:
        if self._stderr:
            self._emit(self._stderr)
            self._stderr = b""
        if self.end is None and self.error is None:
            self.error = error
            self._wake()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # --- the handler's side ---

    @property
    def writable(self) -> bool:
        """STDIN may still be sent: the request is live and its connection open."""
        return self.end is None and self.error is None and not self.abandoned and not self.conn.closed

    async def send_stdin(self, data: bytes) -> bool:
        """Send `data` as STDIN and wait for the transport to drain.  False when
        the request already ended (the application need not read all its input)."""
        if not self.writable:
            return False
        conn = self.conn
        conn._write(conn.fcgi.send_stdin(self.rid, data))
        await conn._drain()
        return True

    def end_stdin(self) -> None:
        if self.writable:
            self.conn._write(self.conn.fcgi.end_stdin(self.rid))

    async def read(self) -> bytes:
        """The STDOUT received so far (waiting for some); b"" at the end of the stream.
        Raises the connection's `ConnectionBroken`, or what `fail` was given."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                self.conn._unhold(self)
                return data
            if self.error is not None:
                raise self.error
            if self.stdout_done:
                return b""
            await self._wait()

    async def wait_end(self) -> ev.EndRequest:
        while self.end is None:
            if self.error is not None:
                raise self.error
            await self._wait()
        return self.end

    def fail(self, error: BaseException) -> None:
        """Make the reader raise `error` (the request body failed, say)."""
        self._failed(error)

    def finish(self) -> str | None:
        """The handler is done.  After END_REQUEST nothing is left to do; before it
        the request is given up.  Returns how ("abort", "close") or None."""
        self._chunks.clear()
        self._buffered = 0
        self.conn._unhold(self)
        if self.end is not None or self.abandoned:
            return None
        return self.conn._abandon(self)


class BackendConnection(asyncio.BufferedProtocol):
    """One transport connection to the application."""

    def __init__(self, pool: "Pool", serial: int):
        self.pool = pool
        self.serial = serial
        self.fcgi = ClientConnection(max_requests=1)
        self.transport: asyncio.Transport | None = None
        self.exchanges: dict[int, Exchange] = {}
        self.multiplexed = False
        self.capacity = 1
        self.closed = False
        self.retired = False            # takes no new requests
        self.started = 0                # requests begun on it
        self.idle_since = 0.0
        self._buffer = bytearray(READ_SIZE)
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._holding: set[Exchange] = set()
        self._read_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._values: asyncio.Future | None = None

    def __repr__(self) -> str:
        return f"<fastcgi connection #{self.serial} to {self.pool.address}: {len(self.exchanges)} requests>"

    # --- asyncio ---

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def get_buffer(self, sizehint: int):
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            events = self.fcgi.receive_data(bytes(memoryview(self._buffer)[:nbytes]))
        except ProtocolError as e:
            log.warning("fastcgi=%s protocol error, connection closed: %s", self.pool.address, e)
            self.close(ConnectionBroken(f"fastcgi={self.pool.address} broke the FastCGI protocol: {e}",
                                        protocol=True))
            return
        for event in events:
            self._dispatch(event)

    def eof_received(self):
        return False    # close; connection_lost follows

    def connection_lost(self, exc) -> None:
        why = f": {exc}" if exc else ""
        self._closed(ConnectionBroken(f"fastcgi={self.pool.address} closed the connection{why}"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()

    # --- records in ---

    def _dispatch(self, event) -> None:
        kind = type(event)
        if kind is ev.ValuesResult or kind is ev.UnknownTypeReply:
            if self._values is not None and not self._values.done():
                self._values.set_result(event)
            return
        exchange = self.exchanges.get(event.request_id)
        if exchange is None:
            return
        if kind is ev.StdoutData:
            exchange._stdout(event.data)
        elif kind is ev.StderrData:
            exchange._stderr_data(event.data)
        elif kind is ev.StdoutEnd:
            exchange._stdout_end()
        elif kind is ev.StderrEnd:
            exchange._stderr_end()
        elif kind is ev.EndRequest:
            del self.exchanges[event.request_id]
            self._unhold(exchange)
            exchange._ended(event)
            if event.protocol_status == CANT_MPX_CONN:
                self.pool._cannot_multiplex(self)
            self.pool._slot_freed(self)

    # --- flow control ---

    def _hold(self, exchange: Exchange) -> None:
        self._holding.add(exchange)
        if not self._read_paused and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def _unhold(self, exchange: Exchange) -> None:
        """`exchange` was read (its client takes everything it holds at once) or ended."""
        if exchange not in self._holding:
            return
        self._holding.discard(exchange)
        if not self._holding and self._read_paused and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionBroken(f"fastcgi={self.pool.address} connection is closed")
        self.transport.write(data)

    async def _drain(self) -> None:
        if self._write_paused and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._drain_waiters:
                    self._drain_waiters.remove(waiter)
        if self.closed:
            raise ConnectionBroken(f"fastcgi={self.pool.address} connection is closed")

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- requests ---

    @property
    def has_slot(self) -> bool:
        return not self.closed and not self.retired and len(self.exchanges) < self.capacity

    def begin(self, params, on_stderr, stdin_empty: bool) -> Exchange:
        """BEGIN_REQUEST (with FCGI_KEEP_CONN), the PARAMS stream and, without a
        body, the empty STDIN record, in one write."""
        rid = self.fcgi.new_request_id()
        data = self.fcgi.begin_request(rid, params, keep_conn=True)
        if stdin_empty:
            data += self.fcgi.end_stdin(rid)
        exchange = Exchange(self, rid, on_stderr, reused=self.started > 0)
        self.started += 1
        self.exchanges[rid] = exchange
        self._disarm_idle()
        self._write(data)
        return exchange

    def _abandon(self, exchange: Exchange) -> str | None:
        exchange.abandoned = True
        if self.closed or self.exchanges.get(exchange.rid) is not exchange:
            return None
        if not self.multiplexed:
            self.close(ConnectionBroken(f"fastcgi={self.pool.address} request {exchange.rid} was given up"))
            return "close"
        self._write(self.fcgi.abort_request(exchange.rid))
        self.pool.stats.aborts += 1
        loop = asyncio.get_running_loop()
        exchange._abort_timer = loop.call_later(self.pool.abort_timeout, self._abort_overdue, exchange)
        return "abort"

    def _abort_overdue(self, exchange: Exchange) -> None:
        exchange._abort_timer = None
        if self.closed or self.exchanges.get(exchange.rid) is not exchange:
            return
        log.warning("fastcgi=%s request %d did not end within %gs of FCGI_ABORT_REQUEST; the "
                    "connection takes no new requests", self.pool.address, exchange.rid,
                    self.pool.abort_timeout)
        self.retired = True
        self._close_if_spent()

    def _close_if_spent(self) -> None:
        """A retired connection closes once only abandoned requests are left on it."""
        if self.retired and not self.closed and all(x.abandoned for x in self.exchanges.values()):
            self.close(ConnectionBroken(f"fastcgi={self.pool.address} connection retired"))

    # --- closing ---

    def close(self, error: UpstreamError, graceful: bool = False) -> None:
        """Close now, failing whatever is still on the connection."""
        if self.closed:
            return
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()
        self._closed(error)

    def _closed(self, error: UpstreamError) -> None:
        first = not self.closed
        self.closed = True
        self._disarm_idle()
        live = [x for x in self.exchanges.values() if not x.abandoned]
        if first and live:
            self.pool.stats.connections_broken += 1
        for exchange in list(self.exchanges.values()):
            exchange._failed(error)
        self.exchanges.clear()
        self._holding.clear()
        self._wake_writers()
        if self._values is not None and not self._values.done():
            self._values.set_result(None)
        self.pool._forget(self)

    def _arm_idle(self, seconds: float) -> None:
        self._disarm_idle()
        self._idle_timer = asyncio.get_running_loop().call_later(seconds, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.exchanges:
            self.close(ConnectionBroken("idle"), graceful=True)


class Pool:
    """The connections to one FastCGI application address."""

    def __init__(self, address: str, *, max_connections: int = 16, max_requests: int = 8,
                 max_idle: int | None = None, idle_timeout: float = 60.0, connect_timeout: float = 5.0,
                 probe_timeout: float = 1.0, abort_timeout: float = 5.0, queue_size: int = 1024):
        self.address = address
        self.kind, self.target = parse_address(address)
        self.max_connections = max_connections
        self.max_requests = max_requests
        # Keeping every connection the pool may open costs nothing while idle;
        # closing some makes a busy pool reconnect (and its workers start a
        # thread) over and over, as a profile showed.
        self.max_idle = max_connections if max_idle is None else max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.probe_timeout = probe_timeout
        self.abort_timeout = abort_timeout
        self.queue_size = queue_size
        self.connections: list[BackendConnection] = []
        self.multiplexed: bool | None = None    # None until GET_VALUES was asked
        self.per_connection = 1
        self.connection_limit = max_connections
        self.closed = False
        self.stats = PoolStats()
        self._probe: asyncio.Task | None = None
        self._opening = 0
        self._serial = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def active(self) -> int:
        return sum(len(c.exchanges) for c in self.connections)

    @property
    def idle(self) -> int:
        return sum(1 for c in self.connections if not c.exchanges)

    def describe(self) -> str:
        if self.multiplexed is None:
            return "not asked yet"
        if self.multiplexed:
            return (f"multiplexes: up to {self.per_connection} requests on each of up to "
                    f"{self.connection_limit} connections")
        return f"does not multiplex: one request per connection, up to {self.connection_limit} connections"

    async def begin(self, params, on_stderr: Callable[[bytes], None] | None = None,
                    stdin_empty: bool = False) -> Exchange:
        """Start a RESPONDER request on some connection (waiting for one if all are
        busy).  Raises ConnectFailed or PoolFull."""
        if self.multiplexed is None:
            await self._ensure_probed()
        while True:
            if self.closed:
                raise PoolFull(f"fastcgi={self.address} pool is closed")
            conn = self._pick()
            if conn is None and self._can_open():
                conn = await self._open()
                if self.closed:
                    conn.close(ConnectionBroken("pool closed"))
                    continue
                if conn.closed:
                    raise ConnectionBroken(f"fastcgi={self.address} closed the connection as soon as "
                                           "it was opened")
                self._adopt(conn)
            if conn is not None:
                self.stats.requests += 1
                return conn.begin(params, on_stderr, stdin_empty)
            await self._wait_turn()

    def close(self) -> None:
        """Close every connection and refuse new requests (at shutdown)."""
        self.closed = True
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
        for conn in list(self.connections):
            conn.close(ConnectionBroken(f"fastcgi={self.address} pool closed (shutting down)"))
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --- choosing a connection ---

    def _pick(self) -> BackendConnection | None:
        best = None
        for conn in self.connections:
            if not conn.has_slot:
                continue
            if best is None:
                best = conn
                continue
            load, best_load = len(conn.exchanges), len(best.exchanges)
            if load < best_load or (load == best_load and conn.idle_since > best.idle_since):
                best = conn
        return best

    def _can_open(self) -> bool:
        return len(self.connections) + self._opening < self.connection_limit

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def _wait_turn(self) -> None:
        if len(self._waiters) >= self.queue_size:
            self.stats.queue_full += 1
            raise PoolFull(f"fastcgi={self.address}: {self.active} requests on {len(self.connections)} "
                           f"connections and {len(self._waiters)} waiting (queue full)")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.stats.peak_waiting = max(self.stats.peak_waiting, len(self._waiters))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()    # our turn came as we gave up: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # --- opening ---

    async def _open(self) -> BackendConnection:
        loop = asyncio.get_running_loop()
        self._serial += 1
        conn = BackendConnection(self, self._serial)
        self._opening += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.kind == "unix":
                    await loop.create_unix_connection(lambda: conn, self.target)
                else:
                    host, port = self.target
                    await loop.create_connection(lambda: conn, host, port)
        except TimeoutError:
            self._connect_failed()
            raise ConnectFailed(f"cannot connect to fastcgi={self.address}: no answer within "
                                f"{self.connect_timeout:g}s", timed_out=True) from None
        except OSError as e:
            self._connect_failed()
            reason = os.strerror(e.errno) if e.errno else str(e)   # asyncio rewrites strerror
            raise ConnectFailed(f"cannot connect to fastcgi={self.address}: {reason}") from None
        finally:
            self._opening -= 1
        self.stats.connections_opened += 1
        conn.multiplexed = bool(self.multiplexed)
        conn.capacity = conn.fcgi.max_requests = self.per_connection
        return conn

    def _connect_failed(self) -> None:
        self.stats.connect_failures += 1
        if not self.connections:
            # The application may come back as something else: ask again then.
            self.multiplexed = None
            self._probe = None
        self._wake_one()    # a waiter may try its own connection

    def _adopt(self, conn: BackendConnection) -> None:
        self.connections.append(conn)
        self.stats.peak_connections = max(self.stats.peak_connections, len(self.connections))

    async def _ensure_probed(self) -> None:
        probe = self._probe
        if probe is None or (probe.done() and (probe.cancelled() or probe.exception() is not None)):
            probe = self._probe = asyncio.get_running_loop().create_task(self._run_probe())
        try:
            await asyncio.shield(probe)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if probe.cancelled() and task is not None and not task.cancelling():
                raise PoolFull(f"fastcgi={self.address} pool is closed") from None
            raise

    async def _run_probe(self) -> None:
        """FCGI_GET_VALUES on the first connection, which then serves requests."""
        conn = await self._open()
        loop = asyncio.get_running_loop()
        conn._values = loop.create_future()
        answer = None
        try:
            conn._write(conn.fcgi.get_values((MAX_CONNS, MAX_REQS, MPXS_CONNS)))
            async with asyncio.timeout(self.probe_timeout):
                answer = await conn._values
        except (TimeoutError, UpstreamError):
            pass
        except BaseException:
            conn.close(ConnectionBroken("probe cancelled"))
            raise
        finally:
            conn._values = None
        multiplexed, max_reqs, max_conns, why = _capabilities(answer)
        self.multiplexed = multiplexed
        cap = self.max_requests
        self.per_connection = max(1, min(max_reqs or cap, cap)) if multiplexed else 1
        self.connection_limit = max(1, min(max_conns or self.max_connections, self.max_connections))
        log.info("fastcgi=%s %s (%s)", self.address, self.describe(), why)
        if conn.closed or self.closed:
            conn.close(ConnectionBroken("closed during FCGI_GET_VALUES"))
            return
        conn.multiplexed = multiplexed
        conn.capacity = conn.fcgi.max_requests = self.per_connection
        self._adopt(conn)
        self._went_idle(conn)

    # --- the connections' news ---

    def _slot_freed(self, conn: BackendConnection) -> None:
        if conn.closed:
            return
        if conn.retired:
            conn._close_if_spent()
            return
        if self._waiters:
            self._wake_one()
        if not conn.exchanges:
            self._went_idle(conn)

    def _went_idle(self, conn: BackendConnection) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        conn._arm_idle(self.idle_timeout)
        if self._waiters:
            return
        idle = [c for c in self.connections if not c.exchanges and not c.closed]
        if len(idle) > self.max_idle:
            oldest = min(idle, key=lambda c: c.idle_since)
            oldest.close(ConnectionBroken("too many idle connections"), graceful=True)

    def _forget(self, conn: BackendConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            self._wake_one()    # room for a new connection

    def _cannot_multiplex(self, conn: BackendConnection) -> None:
        if self.per_connection > 1:
            log.warning("fastcgi=%s answered FCGI_CANT_MPX_CONN although it announced "
                        "FCGI_MPXS_CONNS=1; one request per connection from now on", self.address)
        self.per_connection = 1
        for c in self.connections:
            c.capacity = 1


def _capabilities(answer) -> tuple[bool, int | None, int | None, str]:
    """(multiplexes, FCGI_MAX_REQS, FCGI_MAX_CONNS, why) from the GET_VALUES answer."""
    if answer is None:
        return False, None, None, "no answer to FCGI_GET_VALUES"
    if isinstance(answer, ev.UnknownTypeReply):
        return False, None, None, "FCGI_GET_VALUES answered with FCGI_UNKNOWN_TYPE"
    values = dict(answer.values)

    def number(name: bytes) -> int | None:
        try:
            n = int(values[name])
        except (KeyError, ValueError):
            return None
        return n if n > 0 else None

    shown = ", ".join(f"{k.decode('latin-1')}={v.decode('latin-1')}" for k, v in answer.values)
    why = f"FCGI_GET_VALUES: {shown}" if shown else "FCGI_GET_VALUES answered with no variables"
    multiplexed = values.get(MPXS_CONNS, b"0").strip() == b"1"
    return multiplexed, number(MAX_REQS), number(MAX_CONNS), why
