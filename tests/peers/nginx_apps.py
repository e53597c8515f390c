"""The WSGI app tests/test_nginx.py runs behind nginx: `router` from wsgi_apps,
plus the paths it lacks.

  /big?N       N bytes of random.Random(N).randbytes(N), with a Content-Length
  /slurp       reads the whole request body with one read(CONTENT_LENGTH),
               then sends it back.  (nginx stops sending a request body once
               the response header has arrived, so an app that echoes while
               it reads, like router's /echo, stalls behind nginx as soon as
               the body outgrows the socket buffers.)
  /sockets     the inodes of the sockets this worker process holds open (its
               listening socket and its FastCGI connections), from /proc
"""

import json
import os
import random

from tests.peers.wsgi_apps import router


def big_body(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def _socket_inodes() -> list[int]:
    inodes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(int(target[8:-1]))
    return sorted(inodes)


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/big":
        body = big_body(int(environ.get("QUERY_STRING") or 0))
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/slurp":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/sockets":
        body = json.dumps({"pid": os.getpid(), "sockets": _socket_inodes()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return router(environ, start_response)
