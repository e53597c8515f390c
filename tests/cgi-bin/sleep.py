#!/usr/bin/env python3
"""Starts a grandchild, writes both pids to the file named by the query, then sleeps.
With ?ignore-term=1&pidfile=... it ignores SIGTERM."""
import os
import signal
import subprocess
import sys
import time
from urllib.parse import parse_qs

query = parse_qs(os.environ.get("QUERY_STRING", ""))
if query.get("ignore-term"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL)
with open(query["pidfile"][0], "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}\n")
if query.get("headers"):
    sys.stdout.write("Content-Type: text/plain\r\n\r\nstarted\n")
    sys.stdout.flush()
time.sleep(300)
