"""The demo's load generator, checked against a server whose answers are known.

A fixed-delay server answers every request after exactly DELAY seconds, so a
correct load generator must report latencies of at least DELAY (and not much
more), and at most CONCURRENCY / DELAY requests per second (and not much
less).  The upper bounds are physical limits, the lower ones are generous,
since these machines are shared.  Failures, wrong bodies and the window
signal are checked too, for the built-in client and for wrk.
"""

import asyncio
import json
import os
import subprocess
import sys
import threading

import pytest

from cgigate.demo.loadgen import parse_wrk
from conftest import ROOT, require_program

DELAY = 0.02


class FixedDelayServer:
    """HTTP/1.1 on a free loopback port: /hello answers 'Hello, world!' after DELAY,
    /fail answers 503, /wrong answers another body; keep-alive throughout."""

    def __init__(self):
        self.served = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.clients = set()
        ready.set()
        self.loop.run_forever()
        # stopped: close the server and every client before the loop goes
        self.server.close()
        for task in self.clients:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*self.clients, return_exceptions=True))
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()

    async def _client(self, reader, writer):
        task = asyncio.current_task()
        self.clients.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self.clients.discard(task)

    async def _serve(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                await asyncio.sleep(DELAY)
                status, body = ((b"503 Service Unavailable", b"busy\n") if path == b"/fail" else
                                (b"200 OK", b"Goodbye\n") if path == b"/wrong" else
                                (b"200 OK", b"Hello, world!\n"))
                self.served += 1
                writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def url(self, path="/hello"):
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def fixed():
    server = FixedDelayServer()
    yield server
    server.close()


def loadgen(*args, pass_fds=()):
    done = subprocess.run([sys.executable, "-m", "cgigate.demo.loadgen", *args, "--json"],
                          capture_output=True, text=True, cwd=ROOT, pass_fds=pass_fds, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check_against_delay(res, concurrency, duration):
    ideal = concurrency / DELAY
    lat = res["latency_ms"]
    assert res["failed"] == 0, res
    # No request can be faster than the server's delay, nor the rate above its limit.
    assert lat["p50"] >= DELAY * 1000
    assert res["rps"] <= ideal * 1.02
    # And a correct client is not far off either (generous, for a shared machine).
    assert lat["p50"] <= DELAY * 1000 + 15
    assert lat["p90"] >= lat["p50"] and lat["p99"] >= lat["p90"]
    assert res["rps"] >= ideal * 0.6
    assert abs(res["requests"] - res["rps"] * duration) <= 1


@pytest.mark.parametrize("concurrency", [1, 4])
def test_builtin_client_reports_the_known_delay(fixed, concurrency):
    res = loadgen(fixed.url(), "-c", str(concurrency), "-d", "1.5", "--warmup", "0.2")
    check_against_delay(res, concurrency, 1.5)
    assert res["latency_ms"]["min"] >= DELAY * 1000
    assert res["tasks_created_in_window"] == 0
    # sent inside the window, whether or not they also completed inside it
    assert abs(res["sent_in_window"] - res["requests"]) <= concurrency
    # and sent at all: the warm-up's, the window's and the late ones, each answered once
    assert res["sent_total"] == res["requests"] + res["warmup_requests"] + res["late_requests"]
    assert fixed.served >= res["sent_total"]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_wrk_reports_the_known_delay(fixed, concurrency):
    require_program("wrk")
    res = loadgen(fixed.url(), "--wrk", "-c", str(concurrency), "-d", "1", "--warmup", "0")
    check_against_delay(res, concurrency, res["duration_s"])
    assert res["mode"] == "wrk"
    assert res["tasks_created_in_window"] == 1 + res["wrk_threads"]
    assert res["tasks_created"] == 1 + res["wrk_threads"]   # no warm-up run
    assert res["sent_total"] == res["requests"]


def test_builtin_client_counts_failures_and_wrong_bodies(fixed):
    failing = loadgen(fixed.url("/fail"), "-c", "2", "-d", "0.5", "--warmup", "0")
    assert failing["requests"] == 0
    assert failing["non200"]["503"] == failing["failed"] > 0
    wrong = loadgen(fixed.url("/wrong"), "-c", "2", "-d", "0.5", "--warmup", "0")
    assert wrong["requests"] == 0 and wrong["bad_body"] == wrong["failed"] > 0
    anything = loadgen(fixed.url("/wrong"), "-c", "2", "-d", "0.5", "--warmup", "0", "--expect", "")
    assert anything["failed"] == 0 and anything["requests"] > 0


def test_wrk_counts_failures(fixed):
    require_program("wrk")
    res = loadgen(fixed.url("/fail"), "--wrk", "-c", "2", "-d", "1", "--warmup", "0")
    assert res["requests"] == 0 and res["failed"] > 0


def test_builtin_client_counts_refused_connections():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there now
    res = loadgen(f"http://127.0.0.1:{port}/", "-c", "1", "-d", "0.3", "--warmup", "0")
    assert res["requests"] == 0 and res["errors"].get("refused", 0) > 0


@pytest.mark.parametrize("wrk", [False, True])
def test_window_is_signalled_open_then_closed(fixed, wrk):
    if wrk:
        require_program("wrk")
    read_end, write_end = os.pipe()
    try:
        loadgen(fixed.url(), "-c", "1", "-d", "1" if wrk else "0.3", "--warmup", "0.1",
                "--window-fd", str(write_end), *(["--wrk"] if wrk else []), pass_fds=(write_end,))
        os.close(write_end)
        write_end = None
        with os.fdopen(read_end, "rb") as f:
            assert f.read() == b"se"
    finally:
        if write_end is not None:
            os.close(write_end)


WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:8765/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    31.06ms    9.03ms  53.29ms   57.14%
    Req/Sec    62.80     12.59    80.00     60.00%
  Latency Distribution
     50%  812.00us
     75%   37.49ms
     90%   42.22ms
     99%    1.02s
  63 requests in 1.01s, 8.19MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:     62.63
Transfer/sec:      8.14MB
"""


def test_parse_wrk_reads_units_and_failures():
    res = parse_wrk(WRK_OUTPUT)
    assert res["latency_ms"]["p50"] == pytest.approx(0.812)
    assert res["latency_ms"]["p90"] == pytest.approx(42.22)
    assert res["latency_ms"]["p99"] == pytest.approx(1020.0)
    assert res["latency_ms"]["mean"] == pytest.approx(31.06)
    assert res["latency_ms"]["max"] == pytest.approx(53.29)
    assert res["requests"] == 60 and res["duration_s"] == pytest.approx(1.01)
    assert res["errors"] == {"read": 2, "timeout": 1}
    assert res["failed"] == 6


def test_parse_wrk_refuses_what_it_cannot_read():
    from cgigate.demo.loadgen import ProtocolError
    with pytest.raises(ProtocolError, match="no 'N requests in T' line"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
