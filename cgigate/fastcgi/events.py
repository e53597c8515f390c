"""What a FastCGI connection reports, one frozen dataclass per kind of event.

The application side (`ServerConnection`) reports what the web server
sent; the web-server side (`ClientConnection`) reports what the application
sent.  A stream's data events are followed by one `...End` event when its
empty record arrives (FastCGI section 3.3, "stream records").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    request_id: int


# --- received by the application ---

@dataclass(frozen=True)
class BeginRequest(Event):
    role: int
    keep_conn: bool


@dataclass(frozen=True)
class Params(Event):
    """The whole PARAMS stream, once its empty record has arrived."""
    params: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class StdinData(Event):
    data: bytes


@dataclass(frozen=True)
class StdinEnd(Event):
    pass


@dataclass(frozen=True)
class FilterData(Event):
    data: bytes


@dataclass(frozen=True)
class FilterDataEnd(Event):
    pass


@dataclass(frozen=True)
class AbortRequest(Event):
    pass


@dataclass(frozen=True)
class RequestRejected(Event):
    """The connection answered END_REQUEST with this protocol status itself
    (CANT_MPX_CONN, OVERLOADED or UNKNOWN_ROLE); nothing more will come of it."""
    protocol_status: int
    reason: str


# --- received by the web server ---

@dataclass(frozen=True)
class StdoutData(Event):
    data: bytes


@dataclass(frozen=True)
class StdoutEnd(Event):
    pass


@dataclass(frozen=True)
class StderrData(Event):
    data: bytes


@dataclass(frozen=True)
class StderrEnd(Event):
    pass


@dataclass(frozen=True)
class EndRequest(Event):
    app_status: int
    protocol_status: int


@dataclass(frozen=True)
class ValuesResult(Event):
    """GET_VALUES_RESULT (request id 0)."""
    values: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class UnknownTypeReply(Event):
    """UNKNOWN_TYPE (request id 0): the application did not understand `record_type`."""
    record_type: int
