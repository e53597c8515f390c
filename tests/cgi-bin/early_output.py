#!/usr/bin/env python3
"""Writes 1 MiB of output before it reads a byte of its (large) body."""
import hashlib
import os
import sys
out = sys.stdout.buffer
out.write(b"Content-Type: text/plain\r\n\r\n")
out.write(b"x" * (1024 * 1024) + b"\n")
out.flush()
length = int(os.environ.get("CONTENT_LENGTH") or 0)
digest = hashlib.sha256()
remaining = length
while remaining:
    chunk = sys.stdin.buffer.read(min(remaining, 65536))
    if not chunk:
        break
    digest.update(chunk)
    remaining -= len(chunk)
out.write(f"read {length - remaining} sha256 {digest.hexdigest()}\n".encode())
