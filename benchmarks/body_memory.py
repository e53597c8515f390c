"""How much memory a 100 MB request body in and out costs cgigate.

Starts `cgigate serve --cgi-dir cgi-bin` on a free port, sends SIZE bytes to
cgi-bin/echo.py (which streams stdin back to stdout) while reading the echo,
and samples the daemon's RSS from /proc every 5 ms.  Reports the largest
growth over the RSS just before the request, for a Content-Length body and
for a chunked one (which cgigate spools to a temporary file so that the
script gets CONTENT_LENGTH), as the median of --runs runs.

    .venv/bin/python benchmarks/body_memory.py [--size-mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = os.urandom(1 << 20)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_daemon(log_path: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "cgigate", "serve", "--cgi-dir", "cgi-bin",
                             "--bind", "127.0.0.1:0", "--access-log", "off", "--error-log", log_path],
                            cwd=ROOT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with open(log_path) as f:
                m = re.search(r"listening on http://127.0.0.1:(\d+)/", f.read())
        except FileNotFoundError:
            m = None
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("cgigate did not start")


def one_transfer(port: int, size: int, chunked: bool) -> tuple[int, str]:
    """Send `size` bytes to echo.py, read the echo; returns (bytes echoed, sha256)."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (f"POST /cgi-bin/echo.py HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n") + "\r\n")
    digest = hashlib.sha256()
    received = [0]

    def reader():
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        _, body = buf.split(b"\r\n\r\n", 1)
        raw = [body]
        while chunk := sock.recv(1 << 20):
            raw.append(chunk)
            received[0] += len(chunk)
        data = b"".join(raw)   # chunked framing from the daemon: undo it
        out, pos = [], 0
        while True:
            end = data.index(b"\r\n", pos)
            length = int(data[pos:end], 16)
            if length == 0:
                break
            out.append(data[end + 2:end + 2 + length])
            pos = end + 4 + length
        body = b"".join(out)
        received[0] = len(body)
        digest.update(body)

    thread = threading.Thread(target=reader)
    thread.start()
    sock.sendall(head.encode())
    sent = 0
    while sent < size:
        block = BLOCK[:min(len(BLOCK), size - sent)]
        sock.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        sent += len(block)
    if chunked:
        sock.sendall(b"0\r\n\r\n")
    thread.join()
    sock.close()
    return received[0], digest.hexdigest()


def expected_digest(size: int) -> str:
    digest = hashlib.sha256()
    sent = 0
    while sent < size:
        block = BLOCK[:min(len(BLOCK), size - sent)]
        digest.update(block)
        sent += len(block)
    return digest.hexdigest()


def measure(pid: int, port: int, size: int, chunked: bool) -> float:
    before = rss_kib(pid)
    peak = [before]
    done = threading.Event()

    def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.005)

    thread = threading.Thread(target=sampler)
    thread.start()
    got, digest = one_transfer(port, size, chunked)
    done.set()
    thread.join()
    if got != size or digest != expected_digest(size):
        raise SystemExit(f"echo mismatch: {got} bytes back of {size}")
    return (peak[0] - before) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_daemon(os.path.join(tmp, "error.log"))
        try:
            one_transfer(port, 1 << 20, False)   # warm up
            print(f"command: {' '.join([os.path.relpath(sys.executable, ROOT), *sys.argv])}")
            print(f"daemon RSS at start: {rss_kib(proc.pid) / 1024:.1f} MB")
            for chunked in (False, True):
                growth = [measure(proc.pid, port, size, chunked) for _ in range(args.runs)]
                label = "chunked (spooled)" if chunked else "Content-Length  "
                print(f"{args.size_mb} MB in and out, {label}: daemon RSS growth median "
                      f"{statistics.median(growth):.1f} MB (runs: {', '.join(f'{g:.1f}' for g in growth)})")
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
