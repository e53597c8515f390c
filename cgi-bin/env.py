#!/usr/bin/env python3
"""Dumps what a CGI program sees as JSON: environment, argv, cwd and the body.

The test suite reads this to check RFC 3875 meta-variables, so the values are
passed through byte-exact (decoded as latin-1, the way PEP 3333 does).
"""
import json
import os
import sys

body = sys.stdin.buffer.read()
out = {
    "environ": {k.decode("latin-1"): v.decode("latin-1") for k, v in os.environb.items()},
    "argv": [os.fsencode(a).decode("latin-1") for a in sys.argv[1:]],
    "cwd": os.getcwd(),
    "stdin_length": len(body),
    "stdin": body[:4096].decode("latin-1"),
}
sys.stdout.buffer.write(b"Content-Type: application/json\r\n\r\n")
sys.stdout.buffer.write(json.dumps(out, sort_keys=True).encode())
