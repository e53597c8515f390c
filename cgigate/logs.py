"""The two logs an operator greps.

- Access log (logger `cgigate.access`): one line per request in the
  combined log format, followed by the request time in seconds, the backend
  that answered and the request id:

      127.0.0.1 - - [25/Nov/2026:19:32:56 +0000] "GET /cgi-bin/hello.sh HTTP/1.1" 200 14 "-" "curl/8.5" 0.004211 cgi:/cgi-bin/ rid=9f3a00002a

- Error log (logger `cgigate.error`): timestamp, level, message.  Every
  line about a request carries `rid=` (the same id as the access log) and,
  for a script, `script=` with its path, so one grep finds the whole story.
"""

from __future__ import annotations

import logging
import sys
import time

ACCESS = logging.getLogger("cgigate.access")
ERROR = logging.getLogger("cgigate.error")


class _ErrorFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%dT%H:%M:%S%z")


def setup(access_log: str, error_log: str, level: str) -> None:
    ERROR.handlers.clear()
    ERROR.propagate = False
    handler = logging.StreamHandler(sys.stderr) if error_log == "-" else logging.FileHandler(error_log)
    handler.setFormatter(_ErrorFormatter())
    ERROR.addHandler(handler)
    ERROR.setLevel(level.upper())

    ACCESS.handlers.clear()
    ACCESS.propagate = False
    if access_log == "off":
        ACCESS.disabled = True
        return
    ACCESS.disabled = False
    handler = logging.StreamHandler(sys.stdout) if access_log == "-" else logging.FileHandler(access_log)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ACCESS.addHandler(handler)
    ACCESS.setLevel(logging.INFO)


def reopen() -> None:
    """Open the log files again (SIGUSR1, after logrotate moved them)."""
    for logger in (ERROR, ACCESS):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.acquire()
                try:
                    if handler.stream is not None:
                        handler.stream.close()
                    handler.stream = handler._open()
                finally:
                    handler.release()


class _ClfTime:
    def __init__(self):
        self.second = 0
        self.value = ""

    def get(self) -> str:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(now))
        return self.value


_CLF_TIME = _ClfTime()


def _quoted(value: bytes | None) -> str:
    if not value:
        return "-"
    return value.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')


def access(request, status: int, body_bytes: int, backend: str) -> None:
    if ACCESS.disabled:
        return
    client = request.client
    host = client[0] if isinstance(client, tuple) and client else "unix:"
    line = (f'{host} - - {_CLF_TIME.get()} "{request.method} {_quoted(request.target)} '
            f'HTTP/{request.version}" {status or "-"} {body_bytes or "-"} '
            f'"{_quoted(request.header(b"referer"))}" "{_quoted(request.header(b"user-agent"))}" '
            f'{time.perf_counter() - request.start_time:.6f} {backend} rid={request.request_id}')
    ACCESS.info(line)
