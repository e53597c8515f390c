"""Errors that carry their outcome on the wire.

A handler that fails raises `HTTPError(status, detail)`; the front turns it
into that status for the client and a log line with the detail, so no code
path has to guess a status code (the h11 `error_status_hint` habit).
"""

from __future__ import annotations

from http import HTTPStatus


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class HTTPError(Exception):
    """An error with the HTTP status it should become.

    `detail` goes to the error log, never to the client.  `close` asks the
    front to close the connection after the response (framing is no longer
    trustworthy, or the body was not read).
    """

    def __init__(self, status: int, detail: str, *, close: bool = False,
                 headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{status} {reason_phrase(status)}: {detail}")
        self.status = status
        self.detail = detail
        self.close = close
        self.headers = headers


class ClientDisconnected(Exception):
    """The HTTP client went away; there is nobody left to answer."""
