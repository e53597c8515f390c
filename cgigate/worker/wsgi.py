"""PEP 3333 for one FastCGI request: environ, wsgi.input, start_response.

`WSGIRequest` is created from the PARAMS a web server sent (the RFC 3875
meta-variables, see cgigate.cgi.environ) and runs the application in the
calling thread.  Output leaves through `send(bytes)` as a CGI response (a
`Status:` line, the headers, a blank line, the body), which is what a
FastCGI responder writes to FCGI_STDOUT.

PEP 3333 points and how they are met:
- wsgi.input: reads never go past CONTENT_LENGTH (a missing one means no
  body), `read()`, `read(n)`, `readline()`, `readline(n)`, `readlines()` and
  iteration; it blocks until the web server's STDIN records arrive.
- start_response: status must be "NNN reason", header names tokens, no
  CR, LF or NUL anywhere, no hop-by-hop fields (PEP 3333 "Other HTTP
  Features"); a second call without exc_info is an error; with exc_info
  after the headers were sent, the exception is re-raised.
- headers go out with the first non-empty body string (or at the end);
  `write()` works; the iterable's `close()` is always called.
- an exception before the headers were sent becomes a plain 500 with no
  traceback for the client (the traceback goes to wsgi.errors); after, the
  response is cut (`ResponseCut`) so the web server cannot take it for
  complete.
"""

from __future__ import annotations

import re
import sys
import threading
import traceback
from typing import Callable

_STATUS = re.compile(r"^[1-5][0-9][0-9] [^\x00-\x1f\x7f]*$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                         "trailer", "upgrade"})


class ResponseCut(Exception):
    """The application failed after its headers were sent."""


class InputStream:
    """wsgi.input: the request body as the web server sends it, never more
    than CONTENT_LENGTH.  Fed by the connection's reader thread; `limit`
    bytes at most are buffered before `feed` blocks (back-pressure)."""

    def __init__(self, content_length: int, limit: int = 1 << 20):
        self.remaining = content_length    # bytes the app may still read
        self.limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._aborted = False
        self._cond = threading.Condition()

    # --- the connection's side ---

    def feed(self, data: bytes) -> None:
        with self._cond:
            while len(self._buffer) >= self.limit and not self._aborted:
                self._cond.wait()
            self._buffer += data
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def complete(self) -> bool:
        """Every byte the web server will send has arrived."""
        return self._eof

    def abort(self) -> None:
        with self._cond:
            self._aborted = self._eof = True
            self._buffer.clear()
            self._cond.notify_all()

    # --- the application's side ---

    def _take(self, count: int, parts: list[bytes]) -> int:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        parts.append(data)
        self._cond.notify_all()       # room again for the reader thread
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        """`size` bytes (all that is left when negative), fewer only at the end of
        the input.  A request larger than the buffer is gathered piece by piece."""
        with self._cond:
            if size is None or size < 0 or size > self.remaining:
                size = self.remaining
            parts: list[bytes] = []
            got = 0
            while got < size:
                while not self._buffer and not self._eof:
                    self._cond.wait()
                if not self._buffer:
                    break
                got += self._take(min(size - got, len(self._buffer)), parts)
            self.remaining -= got
            return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        with self._cond:
            limit = self.remaining if size is None or size < 0 else min(size, self.remaining)
            parts: list[bytes] = []
            got = 0
            while got < limit:
                want = limit - got
                newline = self._buffer.find(b"\n", 0, want)
                if newline >= 0:
                    got += self._take(newline + 1, parts)
                    break
                if len(self._buffer) >= want or self._eof:
                    got += self._take(min(want, len(self._buffer)), parts)
                    break
                if len(self._buffer) >= self.limit:
                    got += self._take(len(self._buffer), parts)   # a line longer than the buffer
                    continue
                self._cond.wait()
            self.remaining -= got
            return b"".join(parts)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class ErrorStream:
    """wsgi.errors: text to FCGI_STDERR."""

    def __init__(self, send: Callable[[bytes], None]):
        self._send = send

    def write(self, text: str) -> int:
        self._send(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


class FileWrapper:
    """wsgi.file_wrapper: a file-like object as an iterable of blocks."""

    def __init__(self, filelike, blksize: int = 65536):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        while block := self.filelike.read(self.blksize):
            yield block


def build_environ(params, stdin: InputStream, errors: ErrorStream, multithread: bool,
                  multiprocess: bool) -> dict:
    """PEP 3333 environ from FastCGI PARAMS (bytes pairs; the last of a repeated name wins)."""
    environ = {name.decode("latin-1"): value.decode("latin-1") for name, value in params}
    environ.setdefault("SCRIPT_NAME", "")
    if "PATH_INFO" not in environ:
        # A web server that sends no PATH_INFO (nginx's stock fastcgi_params)
        # mounts the app at "/": the whole path is the app's PATH_INFO.
        environ["PATH_INFO"] = environ["SCRIPT_NAME"]
        environ["SCRIPT_NAME"] = ""
    environ.setdefault("QUERY_STRING", "")
    environ.setdefault("SERVER_NAME", "localhost")
    environ.setdefault("SERVER_PORT", "80")
    environ.setdefault("SERVER_PROTOCOL", "HTTP/1.0")
    environ.setdefault("REQUEST_METHOD", "GET")
    https = environ.get("HTTPS", "").lower() in ("on", "1", "yes", "true")
    environ.update({
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https" if https else "http",
        "wsgi.input": stdin,
        "wsgi.errors": errors,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
    })
    return environ


def content_length_of(params) -> int:
    """CONTENT_LENGTH of the params (the last one, as in build_environ); 0 if absent or bad."""
    length = b""
    for name, value in params:
        if name == b"CONTENT_LENGTH":
            length = value
    return int(length) if length.isdigit() else 0


def _check_headers(status: str, headers) -> None:
    if not isinstance(status, str) or not _STATUS.match(status):
        raise ValueError(f"bad WSGI status {status!r}: want a str such as '200 OK'")
    if not isinstance(headers, list):
        raise TypeError(f"WSGI headers must be a list, got {type(headers).__name__}")
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise TypeError(f"a WSGI header must be a (str, str) tuple, got {item!r}")
        name, value = item
        if not _TOKEN.match(name):
            raise ValueError(f"bad header name {name!r}")
        if _BAD_VALUE.search(value):
            raise ValueError(f"CR, LF or NUL in the value of header {name!r}")
        if name.lower() in _HOP_BY_HOP:
            raise ValueError(f"hop-by-hop header {name!r} is not allowed from a WSGI app (PEP 3333)")
        value.encode("latin-1")   # raises UnicodeEncodeError: not latin-1


def run_app(app, environ: dict, send: Callable[[bytes], None]) -> int:
    """Call `app` per PEP 3333, sending the CGI response through `send`.
    Returns the FastCGI appStatus (0, or 1 when the app failed)."""
    state = {"status": None, "headers": None, "sent": False}

    def head() -> bytes:
        lines = [f"Status: {state['status']}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in state["headers"]]
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def write(data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"WSGI body parts must be bytes, got {type(data).__name__}")
        if state["status"] is None:
            raise AssertionError("write() before start_response()")
        if not state["sent"]:
            state["sent"] = True
            send(head() + bytes(data))
        elif data:
            send(bytes(data))

    def start_response(status, headers, exc_info=None):
        if exc_info:
            try:
                if state["sent"]:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif state["status"] is not None:
            raise AssertionError("start_response() called twice without exc_info")
        _check_headers(status, headers)
        state["status"], state["headers"] = status, list(headers)
        return write

    errors = environ["wsgi.errors"]
    result = None
    try:
        result = app(environ, start_response)
        for data in result:
            if data:
                write(data)
            elif not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"WSGI body parts must be bytes, got {type(data).__name__}")
        if state["status"] is None:
            raise AssertionError("the application returned without calling start_response()")
        if not state["sent"]:
            write(b"")
        return 0
    except Exception:
        errors.write(f"{environ.get('REQUEST_METHOD')} {environ.get('REQUEST_URI', environ.get('PATH_INFO'))}: "
                     f"the application failed\n{traceback.format_exc()}")
        if state["sent"]:
            raise ResponseCut() from None
        body = b"500 Internal Server Error\n"
        send(b"Status: 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return 1
    finally:
        if hasattr(result, "close"):
            try:
                result.close()
            except Exception:
                errors.write(f"the application's close() failed\n{traceback.format_exc()}")


def load_app(spec: str):
    """'package.module:callable' -> the callable.  Raises ValueError saying what is wrong."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--app {spec!r}: want MODULE:CALLABLE, such as examples.hello:app")
    import importlib
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--app {spec!r}: cannot import {module_name}: {e}") from None
    app = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise ValueError(f"--app {spec!r}: {module_name} has no {attribute}") from None
    if not callable(app):
        raise ValueError(f"--app {spec!r}: {attribute} is not callable")
    return app
