"""WSGI applications the worker tests run (`cgigate fcgi --app tests.peers.wsgi_apps:NAME`).

`router` dispatches on PATH_INFO, so one worker pool serves every case."""

import json
import os
import sys
import threading
import time

_lock = threading.Lock()
_running = 0
_max_running = 0
MARKER_DIR = os.environ.get("CGIGATE_TEST_MARKERS", "/tmp")


def _json(start_response, data, status="200 OK"):
    body = json.dumps(data, sort_keys=True).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class Closing:
    """An iterable whose close() leaves a marker file, to prove close() ran."""

    def __init__(self, name, parts):
        self.name, self.parts = name, parts

    def __iter__(self):
        for part in self.parts:
            if part == b"!":
                raise RuntimeError("failing mid-iteration")
            yield part

    def close(self):
        with open(os.path.join(MARKER_DIR, self.name), "w") as f:
            f.write("closed\n")


def router(environ, start_response):
    global _running, _max_running
    path = environ["PATH_INFO"]
    query = environ.get("QUERY_STRING", "")
    if path == "/environ":
        shown = {k: v for k, v in environ.items() if isinstance(v, (str, bool, int))}
        shown["wsgi.version"] = list(environ["wsgi.version"])
        return _json(start_response, shown)
    if path == "/input":
        stream = environ["wsgi.input"]
        how = query or "read"
        if how == "read":
            parts = [stream.read()]
        elif how == "read3":
            parts = []
            while chunk := stream.read(3):
                parts.append(chunk)
        elif how == "readline":
            parts = []
            while line := stream.readline():
                parts.append(line)
        elif how == "readline2":
            parts = [stream.readline(2), stream.readline()]
        elif how == "readlines":
            parts = stream.readlines()
        else:
            parts = list(stream)
        extra = stream.read()   # at CONTENT_LENGTH: must be empty, never block
        return _json(start_response, {"parts": [p.decode("latin-1") for p in parts],
                                      "extra": extra.decode("latin-1")})
    if path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(length))])
        stream = environ["wsgi.input"]
        return iter(lambda: stream.read(65536), b"")
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written, ")
        return [b"then returned"]
    if path == "/close":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Closing(query, [b"a", b"b"])
    if path == "/fail-after":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Closing(query, [b"partial", b"!"])
    if path == "/fail":
        raise RuntimeError("the app broke")
    if path == "/exc-info":
        try:
            raise ValueError("first attempt")
        except ValueError:
            start_response("200 OK", [("Content-Type", "text/plain")])
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"recovered"]
    if path == "/bad-header":
        start_response("200 OK", [("X-Injected", "a\r\nSet-Cookie: evil=1")])
        return [b"never"]
    if path == "/hop-header":
        start_response("200 OK", [("Connection", "close")])
        return [b"never"]
    if path == "/file":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](open(__file__, "rb"), 1000)
    if path == "/stderr":
        environ["wsgi.errors"].write("a line for the log\n")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path == "/slow":
        with _lock:
            _running += 1
            _max_running = max(_max_running, _running)
        try:
            time.sleep(float(query or "0.5"))
        finally:
            with _lock:
                _running -= 1
        return _json(start_response, {"pid": os.getpid(), "max_running": _max_running})
    if path == "/pid":
        return _json(start_response, {"pid": os.getpid()})
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"no such path\n"]
