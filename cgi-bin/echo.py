#!/usr/bin/env python3
"""Streams the request body back as it arrives (stdin to stdout, 64 KiB at a time)."""
import os
import sys

out = sys.stdout.buffer
out.write(b"Content-Type: application/octet-stream\r\n\r\n")
out.flush()
remaining = int(os.environ.get("CONTENT_LENGTH") or 0)
while remaining > 0:
    chunk = os.read(0, min(65536, remaining))
    if not chunk:
        break
    remaining -= len(chunk)
    out.write(chunk)
    out.flush()
