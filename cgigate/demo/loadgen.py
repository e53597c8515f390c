"""Closed-loop load generator for `cgigate demo` and benchmarks/ (the standard library only).

Three modes, all "C workers, each doing one thing at a time, back to back":

* HTTP: C connections over raw sockets (asyncio, uvloop when importable).
  Each worker sends one GET, reads the whole response, records the latency
  with time.perf_counter() (connect time included when it had to connect),
  then sends the next one.  Keep-alive connections are reused; a response
  that says ``Connection: close``, an HTTP/1.0 response without keep-alive,
  or a close-delimited body makes the worker reconnect for the next request.
  Content-Length, chunked and close-delimited bodies are all parsed.
* spawn: C threads, each running the CGI script directly (execve via its
  shebang, like a gateway does) with a small CGI-like environment and
  reading its stdout, timing each spawn.
* wrk (--wrk): the same closed loop driven by wrk when it is installed;
  its printed figures are parsed into the same shape.  wrk counts whole
  seconds only and does not check bodies.

With --window-fd, 's' and 'e' are written to that descriptor when the
counted window opens and closes, so a watcher can read the servers' CPU
and process counters at the same moments.

Latencies are the harness's own per-request timings; there is no
coordinated-omission correction (this is a closed loop: a slow response
delays the next request of that worker, and that shows up as lower req/s).

Only requests that *complete* inside the measurement window
[start + warmup, start + warmup + duration] are counted.

`cgigate demo` and benchmarks/*.py run it as a subprocess per cell and
read one JSON object from stdout.  It also works standalone:

    python -m cgigate.demo.loadgen http://127.0.0.1:8080/cgi-bin/hello.sh -c 16 -d 5
    python -m cgigate.demo.loadgen --spawn cgi-bin/hello.sh -c 16 -d 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

from cgigate.status import percentile

__all__ = [
    "ResponseParser",
    "parse_wrk",
    "run_wrk",
    "ProtocolError",
    "http_get",
    "run_http",
    "run_spawn",
    "summarize",
    "pin_to_cpu",
]

BODY_KEEP = 64 * 1024  # how much of each body we keep (for validation only)


class ProtocolError(Exception):
    pass


# --------------------------------------------------------------------------
# Incremental HTTP/1.x response parser (for responses to GET requests)
# --------------------------------------------------------------------------

_HEAD, _BODY_CL, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _BODY_EOF, _DONE = range(8)
_AFTER_DATA = {_BODY_CL: _DONE, _CHUNK_DATA: _CHUNK_CRLF}   # where counted body bytes lead


class ResponseParser:
    """Feed bytes in with feed(); call feed_eof() when the peer closes.

    Both return True once one complete response has been read.  After that:
    status, version, headers (lower-cased names), body (first BODY_KEEP
    bytes), body_len, keep_alive (may the connection be reused?), and
    close_delimited.  Interim 1xx responses are skipped.
    """

    __slots__ = (
        "buf", "state", "status", "version", "headers", "body", "body_len",
        "remaining", "keep_alive", "close_delimited", "head_req",
    )

    MAX_HEAD = 64 * 1024

    def __init__(self, head_request: bool = False) -> None:
        self.buf = bytearray()
        self.state = _HEAD
        self.status = 0
        self.version = ""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.body_len = 0
        self.remaining = 0
        self.keep_alive = False
        self.close_delimited = False
        self.head_req = head_request

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def _body(self, data) -> None:
        self.body_len += len(data)
        room = BODY_KEEP - len(self.body)
        if room > 0:
            self.body += data[:room]

    def _parse_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > self.MAX_HEAD:
                raise ProtocolError("response head too large")
            return False
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line: {lines[0][:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise ProtocolError(f"bad status code: {lines[0][:80]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"bad header line: {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            if name in headers:
                headers[name] += ", " + value
            else:
                headers[name] = value
        if 100 <= status < 200:  # interim response: skip it, parse the next head
            return True
        self.status = status
        self.version = parts[0]
        self.headers = headers
        conn_tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        if parts[0] == "HTTP/1.0":
            self.keep_alive = "keep-alive" in conn_tokens
        else:
            self.keep_alive = "close" not in conn_tokens
        te = headers.get("transfer-encoding")
        if self.head_req or status in (204, 304):
            self.state = _DONE
        elif te is not None:
            if te.split(",")[-1].strip().lower() != "chunked":
                raise ProtocolError(f"unsupported transfer-encoding {te!r}")
            self.state = _CHUNK_SIZE
        elif "content-length" in headers:
            try:
                n = int(headers["content-length"])
            except ValueError:
                raise ProtocolError(f"bad content-length {headers['content-length']!r}") from None
            if n < 0:
                raise ProtocolError("negative content-length")
            self.remaining = n
            self.state = _BODY_CL if n else _DONE
        else:
            self.state = _BODY_EOF
            self.close_delimited = True
            self.keep_alive = False
        return True

    def feed(self, data) -> bool:
        if data:
            self.buf += data
        while True:
            st = self.state
            if st == _HEAD:
                if not self._parse_head():
                    return False
            elif st in _AFTER_DATA:     # a Content-Length body, or one chunk's data
                if not self.buf:
                    return False
                take = self.buf[: self.remaining]
                del self.buf[: len(take)]
                self.remaining -= len(take)
                self._body(take)
                if self.remaining == 0:
                    self.state = _AFTER_DATA[st]
            elif st == _CHUNK_SIZE:
                i = self.buf.find(b"\r\n")
                if i < 0:
                    if len(self.buf) > 1024:
                        raise ProtocolError("chunk size line too long")
                    return False
                line = bytes(self.buf[:i]).split(b";", 1)[0].strip()
                del self.buf[: i + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
                if size == 0:
                    self.state = _TRAILERS
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif st == _CHUNK_CRLF:
                if len(self.buf) < 2:
                    return False
                if self.buf[:2] != b"\r\n":
                    raise ProtocolError("missing CRLF after chunk data")
                del self.buf[:2]
                self.state = _CHUNK_SIZE
            elif st == _TRAILERS:
                i = self.buf.find(b"\r\n")
                if i < 0:
                    return False
                line = self.buf[:i]
                del self.buf[: i + 2]
                if not line:
                    self.state = _DONE
            elif st == _BODY_EOF:
                if self.buf:
                    self._body(self.buf)
                    self.buf.clear()
                return False
            else:  # _DONE
                if self.buf:
                    # bytes after the response (pipelining garbage): the connection
                    # can't be trusted for reuse
                    self.keep_alive = False
                return True

    def feed_eof(self) -> bool:
        if self.state == _BODY_EOF:
            self.state = _DONE
            return True
        if self.state == _DONE:
            self.keep_alive = False
            return True
        if self.state == _HEAD and not self.buf:
            raise ConnectionResetError("connection closed before any response")
        raise ProtocolError("connection closed mid-response")


# --------------------------------------------------------------------------
# Small synchronous GET, used for readiness checks and body verification
# --------------------------------------------------------------------------

def http_get(host: str, port: int, path: str, timeout: float = 5.0,
             close: bool = True) -> ResponseParser:
    """One GET on a fresh connection; returns the parsed response (raises on error).

    With close=False the request is the same one the load generator sends (no
    Connection header), so the response's keep_alive tells whether the server
    would let the connection be reused; the socket is closed either way.
    """
    req = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "User-Agent: cgibench\r\nAccept: */*\r\n"
        + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode()
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(req)
        p = ResponseParser()
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            data = s.recv(65536)
            if not data:
                p.feed_eof()
                return p
            if p.feed(data):
                return p


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------

def summarize(latencies_s: list[float], duration: float) -> dict:
    lat = sorted(latencies_s)
    ms = lambda v: None if v is None else round(v * 1000.0, 4)  # noqa: E731
    return {
        "requests": len(lat),
        "rps": round(len(lat) / duration, 3) if duration > 0 else None,
        "latency_ms": {
            "min": ms(lat[0]) if lat else None,
            "mean": ms(sum(lat) / len(lat)) if lat else None,
            "p50": ms(percentile(lat, 50)),
            "p90": ms(percentile(lat, 90)),
            "p99": ms(percentile(lat, 99)),
            "p99.9": ms(percentile(lat, 99.9)),
            "max": ms(lat[-1]) if lat else None,
        },
    }


class _Recorder:
    """Per-request outcomes; only completions inside the window count."""

    def __init__(self, t_start: float, warmup: float, duration: float) -> None:
        self.win_start = t_start + warmup
        self.win_end = self.win_start + duration
        self.latencies: list[float] = []
        self.non200: Counter = Counter()
        self.errors: Counter = Counter()
        self.bad_body = 0
        self.warmup_requests = 0
        self.late_requests = 0
        self.connects = 0
        self.sent = 0        # requests sent inside the window (however they ended)
        self.sent_total = 0  # requests sent at all, warm-up included
        self.lock = threading.Lock()  # only used by the threaded spawn mode

    def in_window(self, t_end: float) -> bool:
        return self.win_start <= t_end <= self.win_end

    def ok(self, t0: float, t1: float) -> None:
        if t1 < self.win_start:
            self.warmup_requests += 1
        elif t1 > self.win_end:
            self.late_requests += 1
        else:
            self.latencies.append(t1 - t0)

    def status(self, t1: float, code: int) -> None:
        if self.in_window(t1):
            self.non200[str(code)] += 1

    def error(self, t1: float, kind: str) -> None:
        if self.in_window(t1):
            self.errors[kind] += 1

    def badbody(self, t1: float) -> None:
        if self.in_window(t1):
            self.bad_body += 1

    def result(self, duration: float, **extra) -> dict:
        out = summarize(self.latencies, duration)
        out.update(
            duration_s=duration,
            non200=dict(self.non200),
            errors=dict(self.errors),
            bad_body=self.bad_body,
            failed=sum(self.non200.values()) + sum(self.errors.values()) + self.bad_body,
            sent_in_window=self.sent,
            sent_total=self.sent_total,
            warmup_requests=self.warmup_requests,
            late_requests=self.late_requests,
        )
        out.update(extra)
        return out


# --------------------------------------------------------------------------
# HTTP mode (asyncio)
# --------------------------------------------------------------------------

class _ClientProto(asyncio.Protocol):
    __slots__ = ("transport", "parser", "waiter", "closed")

    def __init__(self) -> None:
        self.transport = None
        self.parser: ResponseParser | None = None
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, req: bytes, fut: asyncio.Future) -> None:
        self.parser = ResponseParser()
        self.waiter = fut
        self.transport.write(req)

    def _finish(self, exc: BaseException | None = None) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            if exc is None:
                w.set_result(self.parser)
            else:
                w.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # unsolicited bytes between requests: don't reuse this connection
            self.closed = True
            self.transport.close()
            return
        try:
            if self.parser.feed(data):
                self._finish()
        except Exception as e:  # ProtocolError etc.
            self._finish(e)
            self.closed = True
            self.transport.close()

    def eof_received(self):
        self.closed = True
        if self.waiter is not None:
            try:
                self.parser.feed_eof()
                self._finish()
            except Exception as e:
                self._finish(e)
        return False  # let the transport close itself

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None:
            if self.parser is not None and self.parser.state == _BODY_EOF and exc is None:
                self.parser.feed_eof()
                self._finish()
            else:
                self._finish(exc or ConnectionResetError("connection lost"))


def _error_kind(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, ProtocolError):
        return "protocol"
    return type(e).__name__


async def _http_main(host, port, path, concurrency, duration, warmup, timeout, expect, window_fd):
    loop = asyncio.get_running_loop()
    if window_fd is not None:
        # tell whoever watches the servers when the counted window opens and closes
        loop.call_later(warmup, os.write, window_fd, b"s")
        loop.call_later(warmup + duration, os.write, window_fd, b"e")
    req = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "User-Agent: cgibench\r\nAccept: */*\r\n\r\n"
    ).encode()
    t_start = time.perf_counter()
    rec = _Recorder(t_start, warmup, duration)
    stop_at = rec.win_end
    requests_per_conn: list[int] = []

    def on_timeout(fut):
        if not fut.done():
            fut.set_exception(TimeoutError())

    stale_retries = 0

    async def worker():
        nonlocal stale_retries
        proto: _ClientProto | None = None
        served = 0
        retry_t0 = None
        while True:
            t0 = time.perf_counter() if retry_t0 is None else retry_t0
            retried, retry_t0 = retry_t0 is not None, None
            if t0 >= stop_at and not retried:
                break
            if not retried:
                rec.sent_total += 1
                if t0 >= rec.win_start:
                    rec.sent += 1
            try:
                if proto is None or proto.closed:
                    if proto is not None:
                        requests_per_conn.append(served)
                    served = 0
                    _, proto = await asyncio.wait_for(
                        loop.create_connection(_ClientProto, host, port), timeout
                    )
                    rec.connects += 1
                fut = loop.create_future()
                th = loop.call_later(timeout, on_timeout, fut)
                proto.send(req, fut)
                try:
                    resp = await fut
                finally:
                    th.cancel()
            except Exception as e:
                t1 = time.perf_counter()
                if (isinstance(e, ConnectionResetError) and served and not retried
                        and proto is not None and proto.parser is not None
                        and proto.parser.state == _HEAD and not proto.parser.buf):
                    # a reused keep-alive connection was closed before any byte of the
                    # answer: retry once on a new connection, like real clients do
                    # (the latency keeps the original start time)
                    stale_retries += 1
                    if proto.transport is not None:
                        proto.transport.abort()
                    proto.closed = True
                    retry_t0 = t0
                    continue
                rec.error(t1, _error_kind(e))
                if proto is not None and proto.transport is not None:
                    proto.transport.abort()
                    proto.closed = True
                # don't spin on a dead server
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            served += 1
            if resp.status != 200:
                rec.status(t1, resp.status)
            elif expect and expect not in resp.body:
                rec.badbody(t1)
            else:
                rec.ok(t0, t1)
            if not resp.keep_alive and not proto.closed:
                proto.closed = True
                proto.transport.close()
        if proto is not None:
            requests_per_conn.append(served)
            if proto.transport is not None:
                proto.transport.close()

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    # Workers stop on their own after stop_at (finishing their in-flight request);
    # the timeout guards against a hung server.
    done, pending = await asyncio.wait(tasks, timeout=warmup + duration + timeout + 5)
    for t in pending:
        t.cancel()
    for t in done:
        t.result()  # re-raise harness bugs
    await asyncio.sleep(0)
    return rec.result(
        duration,
        connects=rec.connects,
        mean_requests_per_connection=(
            round(sum(requests_per_conn) / len(requests_per_conn), 2) if requests_per_conn else None
        ),
        cancelled_workers=len(pending),
        stale_connection_retries=stale_retries,
    )


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, path with query) of an http:// URL."""
    u = urlsplit(url)
    if u.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    return u.hostname or "127.0.0.1", u.port or 80, (u.path or "/") + (f"?{u.query}" if u.query else "")


def run_http(url: str, concurrency: int, duration: float, warmup: float = 0.5,
             timeout: float = 10.0, expect: bytes | None = b"Hello, world!",
             window_fd: int | None = None) -> dict:
    host, port, path = split_url(url)
    loop_name = "asyncio"
    try:
        import uvloop  # type: ignore

        loop_factory = uvloop.new_event_loop
        loop_name = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop_factory = asyncio.new_event_loop
    loop = loop_factory()
    try:
        res = loop.run_until_complete(
            _http_main(host, port, path, concurrency, duration, warmup, timeout, expect, window_fd)
        )
    finally:
        loop.close()
    res.update(mode="http", url=url, concurrency=concurrency, warmup_s=warmup, event_loop=loop_name,
               tasks_created_in_window=0, tasks_created=0)
    return res


# --------------------------------------------------------------------------
# wrk mode: the same closed loop, driven by wrk (C, multi-threaded) when installed
# --------------------------------------------------------------------------

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _wrk_ms(text: str) -> float:
    """'812.00us', '1.25ms', '2.01s' in milliseconds."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ProtocolError(f"unreadable wrk time {text!r}")
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def parse_wrk(output: str) -> dict:
    """What `wrk --latency` printed, in summarize()'s shape (plus the failure counts)."""
    m = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h)", output, re.M)
    if not m:
        raise ProtocolError("wrk printed no 'N requests in T' line:\n" + output[-2000:])
    requests, duration_s = int(m.group(1)), _wrk_ms(m.group(2) + m.group(3)) / 1000.0
    latency: dict[str, float | None] = {"min": None, "p99.9": None}
    stats = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", output, re.M)
    if stats:
        latency["mean"], latency["max"] = _wrk_ms(stats.group(1)), _wrk_ms(stats.group(3))
    for q in ("50", "90", "99"):
        p = re.search(rf"^\s*{q}(?:\.0+)?%\s+(\S+)", output, re.M)
        latency[f"p{q}"] = _wrk_ms(p.group(1)) if p else None
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = {}
    if socket_errors:
        errors = {kind: int(n) for kind, n in zip(("connect", "read", "write", "timeout"),
                                                    socket_errors.groups()) if int(n)}
    failed = (int(non2xx.group(1)) if non2xx else 0) + sum(errors.values())
    ok = max(0, requests - (int(non2xx.group(1)) if non2xx else 0))
    return {"requests": ok, "rps": round(ok / duration_s, 3) if duration_s else None,
            "latency_ms": {k: (round(v, 4) if v is not None else None) for k, v in latency.items()},
            "duration_s": duration_s, "non200": {"non-2xx/3xx": int(non2xx.group(1))} if non2xx else {},
            "errors": errors, "bad_body": 0, "failed": failed}


def run_wrk(url: str, concurrency: int, duration: float, warmup: float = 0.5,
            timeout: float = 10.0, window_fd: int | None = None, wrk: str = "wrk") -> dict:
    """wrk counts only whole seconds, so the measured part is `duration` rounded up;
    the warm-up is a separate wrk run whose figures are dropped."""
    split_url(url)
    threads = max(1, min(concurrency, os.cpu_count() or 1, 4))
    seconds = max(1, math.ceil(duration))
    base = [wrk, "-t", str(threads), "-c", str(concurrency), "--latency",
            "--timeout", f"{max(1, math.ceil(timeout))}s"]
    warm_sent = runs = 0
    if warmup > 0:
        warm = subprocess.run(base + ["-d", f"{max(1, math.ceil(warmup))}s", url],
                              capture_output=True, text=True, check=False)
        runs += 1
        try:
            w = parse_wrk(warm.stdout)
            warm_sent = w["requests"] + w["failed"]
        except ProtocolError:
            pass
    if window_fd is not None:
        os.write(window_fd, b"s")
    done = subprocess.run(base + ["-d", f"{seconds}s", url], capture_output=True, text=True)
    if window_fd is not None:
        os.write(window_fd, b"e")
    if done.returncode != 0:
        raise ProtocolError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    res = parse_wrk(done.stdout)
    res.update(mode="wrk", url=url, concurrency=concurrency, warmup_s=warmup, wrk_threads=threads,
               # the process wrk is and its threads are created inside the window too
               tasks_created_in_window=1 + threads, tasks_created=(1 + threads) * (runs + 1),
               # (wrk reports completed requests; up to `concurrency` more were in flight)
               sent_total=warm_sent + res["requests"] + res["failed"])
    return res


# --------------------------------------------------------------------------
# spawn mode (threads + subprocess)
# --------------------------------------------------------------------------

def spawn_env(script: str, path_env: str) -> dict:
    """A small CGI-like environment, roughly what a gateway hands a GET."""
    name = "/cgi-bin/" + os.path.basename(script)
    return {
        "PATH": path_env,
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_SOFTWARE": "cgibench-spawn-loop",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": name,
        "SCRIPT_FILENAME": os.path.abspath(script),
        "QUERY_STRING": "",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": "",
    }


def run_spawn(script: str, concurrency: int, duration: float, warmup: float = 0.5,
              path_env: str = "/usr/local/bin:/usr/bin:/bin",
              expect: bytes | None = b"Hello, world!") -> dict:
    script = os.path.abspath(script)
    env = spawn_env(script, path_env)
    cwd = os.path.dirname(script)
    t_start = time.perf_counter()
    rec = _Recorder(t_start, warmup, duration)
    stop_at = rec.win_end

    def worker():
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                # no timeout=: subprocess's timeout path polls waitpid() with sleeps and
                # adds ~0.6 ms per spawn; the harness bounds the whole run instead.
                cp = subprocess.run([script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, env=env, cwd=cwd)
            except Exception as e:
                t1 = time.perf_counter()
                with rec.lock:
                    rec.error(t1, type(e).__name__)
                continue
            t1 = time.perf_counter()
            with rec.lock:
                if cp.returncode != 0:
                    rec.error(t1, f"exit {cp.returncode}")
                elif expect and expect not in cp.stdout:
                    rec.badbody(t1)
                else:
                    rec.ok(t0, t1)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = rec.result(duration)
    res.update(mode="spawn", script=script, concurrency=concurrency, warmup_s=warmup,
               spawn="subprocess.run([script]) in %d threads" % concurrency)
    return res


# --------------------------------------------------------------------------
# CPU pinning and CLI
# --------------------------------------------------------------------------

def pin_to_cpu(cpu: int = 1) -> list[int] | None:
    """Pin this process to `cpu` if there is more than one CPU; returns the new set."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        return None
    target = cpu if cpu in cpus else max(cpus)
    os.sched_setaffinity(0, {target})
    return sorted(os.sched_getaffinity(0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="http://host:port/path, or a script path with --spawn")
    ap.add_argument("--spawn", action="store_true", help="spawn-loop mode: run TARGET as a CGI script")
    ap.add_argument("--wrk", action="store_true",
                    help="drive the load with wrk instead of the built-in client (whole seconds only)")
    ap.add_argument("--window-fd", type=int, default=None, metavar="FD",
                    help="write 's' to FD when the counted window opens and 'e' when it closes")
    ap.add_argument("-c", "--concurrency", type=int, default=1)
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds run but not counted")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (HTTP)")
    ap.add_argument("--expect", default="Hello, world!",
                    help="body must contain this to count as OK ('' to disable)")
    ap.add_argument("--path-env", default="/usr/local/bin:/usr/bin:/bin",
                    help="PATH given to the script in spawn mode")
    ap.add_argument("--pin", type=int, default=None, metavar="CPU",
                    help="pin this process to CPU (only if the machine has >1 CPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    args = ap.parse_args(argv)

    pinned = pin_to_cpu(args.pin) if args.pin is not None else None
    expect = args.expect.encode() if args.expect else None
    gc.collect()
    gc.disable()  # no collector pauses inside the timed loop
    try:
        if args.spawn:
            res = run_spawn(args.target, args.concurrency, args.duration, args.warmup,
                            args.path_env, expect)
        elif args.wrk:
            res = run_wrk(args.target, args.concurrency, args.duration, args.warmup,
                          args.timeout, args.window_fd)
        else:
            res = run_http(args.target, args.concurrency, args.duration, args.warmup,
                           args.timeout, expect, args.window_fd)
    finally:
        gc.enable()
    res["loadgen_cpus"] = pinned if pinned is not None else sorted(os.sched_getaffinity(0))
    res["loadgen_pinned"] = pinned is not None
    if args.json:
        json.dump(res, sys.stdout)
        sys.stdout.write("\n")
    else:
        lat = res["latency_ms"]
        print(f"{res['requests']} ok in {res['duration_s']}s = {res['rps']} req/s; "
              f"p50 {lat['p50']} ms, p99 {lat['p99']} ms; failed {res['failed']} "
              f"(non200 {res['non200']}, errors {res['errors']}, bad body {res['bad_body']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
