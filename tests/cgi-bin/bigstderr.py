#!/usr/bin/env python3
"""Writes 256 KiB to stderr before any stdout: the gateway must drain both."""
import sys
for i in range(4096):
    sys.stderr.write(f"noise line {i:05d} " + "x" * 48 + "\n")
sys.stderr.flush()
sys.stdout.write("Content-Type: text/plain\r\n\r\nsurvived\n")
