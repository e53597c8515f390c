"""A real flup FastCGI server for tests/test_upstream.py.

    python flup_app.py SOCKET_PATH

flup's threaded WSGIServer does not multiplex and answers FCGI_GET_VALUES
with no variables (on Python 3 it looks names up as str, gets bytes).  It
counts the FastCGI connections it accepted, which /connections reports.

What is done depends on the first segment of PATH_INFO:
  /environ             the CGI variables of the request, as JSON
  /echo                the request body, streamed back 64 KiB at a time
  /stderr              two lines on FCGI_STDERR, then "ok"
  /sleep?SECONDS       sleeps, then "slept"
  /partial             "first" at once, then sleeps 30 s before "second"
  /connections         how many FastCGI connections were accepted so far
"""

import json
import sys
import threading
import time

from flup.server import fcgi_base
from flup.server.fcgi import WSGIServer

_lock = threading.Lock()
_accepted = 0
_original_init = fcgi_base.Connection.__init__


def _counting_init(self, *args, **kwargs):
    global _accepted
    with _lock:
        _accepted += 1
    _original_init(self, *args, **kwargs)


fcgi_base.Connection.__init__ = _counting_init


def app(environ, start_response):
    path = "/" + environ.get("PATH_INFO", "").strip("/").split("/")[0]
    text = [("Content-Type", "text/plain")]
    if path == "/environ":
        shown = {k: v for k, v in environ.items() if isinstance(v, str)}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(shown).encode()]
    if path == "/echo":
        stream = environ["wsgi.input"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(length))])

        def chunks():
            left = length
            while left > 0:
                data = stream.read(min(left, 65536))
                if not data:
                    break
                left -= len(data)
                yield data
        return chunks()
    if path == "/stderr":
        errors = environ["wsgi.errors"]
        errors.write("first problem\nsecond problem\n")
        errors.flush()
        start_response("200 OK", text)
        return [b"ok"]
    if path == "/sleep":
        time.sleep(float(environ.get("QUERY_STRING") or 1))
        start_response("200 OK", text)
        return [b"slept"]
    if path == "/partial":
        start_response("200 OK", text)

        def slow():
            yield b"first"
            time.sleep(30)
            yield b"second"
        return slow()
    if path == "/connections":
        start_response("200 OK", text)
        with _lock:
            return [str(_accepted).encode()]
    start_response("404 Not Found", text)
    return [b"no such path"]


if __name__ == "__main__":
    WSGIServer(app, bindAddress=sys.argv[1]).run()
