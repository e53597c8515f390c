"""wsgi.input (`InputStream`) with a reader thread feeding it, as in a worker:
reads larger than its buffer must gather the pieces, not wait for the whole
request to fit (which it never can: the feeder blocks at the buffer limit)."""

from __future__ import annotations

import os
import threading

import pytest

from cgigate.worker.wsgi import InputStream

LIMIT = 64 * 1024


def fed(body: bytes, piece: int = 10_000) -> InputStream:
    stream = InputStream(len(body), limit=LIMIT)

    def feed():
        for i in range(0, len(body), piece):
            stream.feed(body[i:i + piece])
        stream.finish()
    threading.Thread(target=feed, daemon=True).start()
    return stream


def run_with_timeout(call, timeout: float = 20.0):
    result = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert result, "the read never returned (waiting for more than the buffer can hold?)"
    return result[0]


@pytest.mark.parametrize("size", [None, -1, "length", "more"])
def test_read_larger_than_the_buffer(size):
    body = os.urandom(10 * LIMIT + 123)
    stream = fed(body)
    n = {"length": len(body), "more": len(body) + 1000}.get(size, size)
    assert run_with_timeout(lambda: stream.read(n)) == body
    assert stream.read() == b"" and stream.read(10) == b""


def test_read_in_exact_pieces_across_the_buffer_limit():
    body = os.urandom(5 * LIMIT)
    stream = fed(body, piece=7_777)
    first = run_with_timeout(lambda: stream.read(3 * LIMIT + 5))
    rest = run_with_timeout(lambda: stream.read(2 * LIMIT))
    assert first + rest == body and len(first) == 3 * LIMIT + 5


def test_readline_longer_than_the_buffer():
    long_line = b"x" * (4 * LIMIT) + b"\n"
    stream = fed(long_line + b"short\nlast")
    assert run_with_timeout(stream.readline) == long_line
    assert stream.readline() == b"short\n" and stream.readline() == b"last" and stream.readline() == b""


def test_never_reads_past_content_length():
    stream = InputStream(5, limit=LIMIT)
    stream.feed(b"helloEXTRA")
    stream.finish()
    assert stream.read() == b"hello" and stream.read() == b""
