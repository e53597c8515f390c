#!/usr/bin/env python3
"""Lists the descriptors this script inherited, with what each points at."""
import os
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass   # the descriptor listdir itself used, already closed
print("Content-Type: text/plain\r\n\r\n", end="")
for fd, target in sorted(fds.items()):
    print(fd, target)
