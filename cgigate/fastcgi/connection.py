"""FastCGI connections without I/O: bytes in, events out, bytes back (the h11 habit).

`ServerConnection` is the application's side (what `cgigate fcgi` workers
run); `ClientConnection` is the web server's side (what the front uses to
reach workers, flup or php-fpm).  Neither touches a socket: the caller
feeds `receive_data` whatever arrived and writes whatever the methods return.

Each request's input moves through a table of states (FastCGI sections 3.3
and 5): BEGIN_REQUEST, then the PARAMS stream, then STDIN, then (FILTER only)
DATA.  A record that the table does not allow in the request's state is a
`ProtocolError`.  Records for an inactive request id are ignored, as
section 3.3 asks ("While a request ID R is inactive, the application ignores
records with requestId == R, except for FCGI_BEGIN_REQUEST").

Bounded everywhere: the application side accepts at most `max_requests`
requests at once on a connection (one unless `multiplex`) and answers any
more with END_REQUEST(CANT_MPX_CONN or OVERLOADED) by itself; a request's
params are capped at `max_params_bytes` (END_REQUEST(OVERLOADED)); roles it
does not serve get END_REQUEST(UNKNOWN_ROLE).  Management records are
answered here too: GET_VALUES truthfully, with only the variables asked
for and known (section 4.1), any other management type with UNKNOWN_TYPE
(section 4.2).
"""

from __future__ import annotations

from cgigate.fastcgi import events as ev
from cgigate.fastcgi.records import (
    ABORT_REQUEST, BEGIN_REQUEST, CANT_MPX_CONN, DATA, END_REQUEST, FILTER, GET_VALUES,
    GET_VALUES_RESULT, MAX_CONNS, MAX_REQS, MPXS_CONNS, NULL_REQUEST_ID, OVERLOADED, PARAMS,
    REQUEST_COMPLETE, RESPONDER, STDERR, STDIN, STDOUT, UNKNOWN_ROLE, UNKNOWN_TYPE, LimitExceeded, PairDecoder,
    ProtocolError, RecordReader, decode_begin_request, decode_end_request, decode_pairs,
    decode_unknown_type, encode_begin_request, encode_end_request, encode_pairs, encode_record,
    encode_stream, encode_unknown_type, type_name)

# Input states of one request on the application side.
AWAIT_PARAMS, AWAIT_STDIN, AWAIT_DATA, INPUT_DONE = "params", "stdin", "data", "input done"

# (state, record type, empty record?) -> next state.  Anything else is a protocol error.
_INPUT = {
    (AWAIT_PARAMS, PARAMS, False): AWAIT_PARAMS,
    (AWAIT_PARAMS, PARAMS, True): AWAIT_STDIN,
    (AWAIT_STDIN, STDIN, False): AWAIT_STDIN,
    (AWAIT_STDIN, STDIN, True): INPUT_DONE,      # AWAIT_DATA instead for FILTER
    (AWAIT_DATA, DATA, False): AWAIT_DATA,
    (AWAIT_DATA, DATA, True): INPUT_DONE,
}


class _ServerRequest:
    __slots__ = ("role", "keep_conn", "state", "pairs", "params", "stderr_used")

    def __init__(self, role: int, keep_conn: bool, params_limit: int):
        self.role = role
        self.keep_conn = keep_conn
        self.state = AWAIT_PARAMS
        self.pairs = PairDecoder(params_limit)
        self.params: list[tuple[bytes, bytes]] = []
        self.stderr_used = False


class ServerConnection:
    """The application's side of one transport connection."""

    def __init__(self, *, multiplex: bool = False, max_requests: int = 1, max_conns: int = 1,
                 roles: tuple[int, ...] = (RESPONDER,), max_params_bytes: int = 1 << 20):
        self.multiplex = multiplex
        self.max_requests = max_requests if multiplex else 1
        self.max_conns = max_conns
        self.roles = frozenset(roles)
        self.max_params_bytes = max_params_bytes
        self.requests: dict[int, _ServerRequest] = {}
        self.close_after = False    # a request without KEEP_CONN ended: close when written
        self._reader = RecordReader()
        self._out: list[bytes] = []

    @property
    def pending_input(self) -> int:
        return self._reader.pending

    def receive_data(self, data: bytes) -> list[ev.Event]:
        found: list[ev.Event] = []
        for record in self._reader.feed(data):
            self._receive(record, found)
        return found

    def data_to_send(self) -> bytes:
        """Replies the connection made by itself (management, rejections)."""
        out, self._out = b"".join(self._out), []
        return out

    def _receive(self, record, found: list) -> None:
        rid, rtype, content = record.request_id, record.type, record.content
        if rid == NULL_REQUEST_ID:
            if rtype == GET_VALUES:
                asked = [name for name, _ in decode_pairs(content, self.max_params_bytes)]
                known = {MAX_CONNS: str(self.max_conns).encode(), MAX_REQS: str(self.max_requests).encode(),
                         MPXS_CONNS: b"1" if self.multiplex else b"0"}
                reply = [(name, known[name]) for name in asked if name in known]
                self._out.append(encode_record(GET_VALUES_RESULT, NULL_REQUEST_ID, encode_pairs(reply)))
            elif rtype in (BEGIN_REQUEST, ABORT_REQUEST, PARAMS, STDIN, DATA):
                raise ProtocolError(f"{type_name(rtype)} with request id 0")
            else:
                self._out.append(encode_unknown_type(rtype))   # section 4.2
            return
        if rtype == BEGIN_REQUEST:
            self._begin(rid, content, found)
            return
        if rtype in (GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE, STDOUT, STDERR, END_REQUEST) or rtype > 11:
            raise ProtocolError(f"{type_name(rtype)} record for request {rid} is not one a web "
                                "server sends to an application")
        request = self.requests.get(rid)
        if request is None:
            return   # inactive id: ignored (section 3.3)
        if rtype == ABORT_REQUEST:
            found.append(ev.AbortRequest(rid))
            return
        if rtype == DATA and request.role != FILTER:
            return   # DATA means nothing outside FILTER; flup's client sends an empty one anyway
        empty = not content
        following = _INPUT.get((request.state, rtype, empty))
        if following is None:
            raise ProtocolError(f"{type_name(rtype)} record for request {rid} while it awaits "
                                f"{request.state}")
        if following == INPUT_DONE and rtype == STDIN and request.role == FILTER:
            following = AWAIT_DATA
        request.state = following
        if rtype == PARAMS:
            try:
                request.params += request.pairs.feed(content)
                if empty:
                    request.pairs.close()
            except LimitExceeded:
                self._reject(rid, OVERLOADED, f"params over {self.max_params_bytes} bytes", found)
                return
            if empty:
                found.append(ev.Params(rid, tuple(request.params)))
                request.params = []
        elif rtype == STDIN:
            found.append(ev.StdinEnd(rid) if empty else ev.StdinData(rid, content))
        else:
            found.append(ev.FilterDataEnd(rid) if empty else ev.FilterData(rid, content))

    def _begin(self, rid: int, content: bytes, found: list) -> None:
        role, keep_conn = decode_begin_request(content)
        if rid in self.requests:
            raise ProtocolError(f"BEGIN_REQUEST for request {rid}, which is already active")
        if role not in self.roles:
            self._reject(rid, UNKNOWN_ROLE, f"role {role} is not served", found, keep_conn)
        elif self.requests and not self.multiplex:
            self._reject(rid, CANT_MPX_CONN, "a request is already active on this connection",
                         found, keep_conn)
        elif len(self.requests) >= self.max_requests:
            self._reject(rid, OVERLOADED, f"{len(self.requests)} requests already active on this "
                         "connection", found, keep_conn)
        else:
            self.requests[rid] = _ServerRequest(role, keep_conn, self.max_params_bytes)
            found.append(ev.BeginRequest(rid, role, keep_conn))

    def _reject(self, rid: int, protocol_status: int, reason: str, found: list,
                keep_conn: bool = True) -> None:
        request = self.requests.pop(rid, None)
        if request is not None:
            keep_conn = request.keep_conn
        if not keep_conn and not self.requests:
            # Without KEEP_CONN the web server wants the connection closed after
            # this reply; but not under requests that are still running on it.
            self.close_after = True
        self._out.append(encode_end_request(rid, 0, protocol_status))
        found.append(ev.RequestRejected(rid, protocol_status, reason))

    # --- what the application sends ---

    def _active(self, rid: int) -> _ServerRequest:
        request = self.requests.get(rid)
        if request is None:
            raise ValueError(f"request {rid} is not active on this connection")
        return request

    def send_stdout(self, rid: int, data: bytes) -> bytes:
        self._active(rid)
        return encode_stream(STDOUT, rid, data)

    def send_stderr(self, rid: int, data: bytes) -> bytes:
        request = self._active(rid)
        if data:
            request.stderr_used = True
        return encode_stream(STDERR, rid, data)

    def end_request(self, rid: int, app_status: int = 0, protocol_status: int = REQUEST_COMPLETE) -> bytes:
        """Close STDOUT (and STDERR if it was used) and send END_REQUEST.  The id
        becomes inactive; `close_after` tells whether the web server wants the
        connection closed now (no KEEP_CONN)."""
        request = self.requests.pop(rid, None)
        if request is None:
            raise ValueError(f"request {rid} is not active on this connection")
        if not request.keep_conn:
            self.close_after = True
        parts = [encode_record(STDOUT, rid)]
        if request.stderr_used:
            parts.append(encode_record(STDERR, rid))
        parts.append(encode_end_request(rid, app_status, protocol_status))
        return b"".join(parts)


# The application's output streams (section 5.3): record type -> (data event, end event).
_OUTPUT_STREAMS = {STDOUT: (ev.StdoutData, ev.StdoutEnd), STDERR: (ev.StderrData, ev.StderrEnd)}


class _ClientRequest:
    __slots__ = ("ended_streams",)

    def __init__(self):
        self.ended_streams: set[int] = set()   # STDOUT/STDERR whose empty record has come


class ClientConnection:
    """The web server's side of one transport connection."""

    def __init__(self, max_requests: int = 1):
        self.max_requests = max_requests
        self.requests: dict[int, _ClientRequest] = {}
        self._reader = RecordReader()

    @property
    def pending_input(self) -> int:
        return self._reader.pending

    def new_request_id(self) -> int:
        """The lowest id not in use (nginx always uses 1; so do we, unless multiplexing)."""
        rid = 1
        while rid in self.requests:
            rid += 1
        if rid > 0xFFFF or len(self.requests) >= self.max_requests:
            raise ValueError(f"{len(self.requests)} requests already active on this connection")
        return rid

    def begin_request(self, rid: int, params, role: int = RESPONDER, keep_conn: bool = True) -> bytes:
        """BEGIN_REQUEST and the whole PARAMS stream, with its empty end record."""
        if rid in self.requests:
            raise ValueError(f"request {rid} is already active")
        self.requests[rid] = _ClientRequest()
        return b"".join((encode_begin_request(rid, role, keep_conn),
                         encode_stream(PARAMS, rid, encode_pairs(params)), encode_record(PARAMS, rid)))

    def send_stdin(self, rid: int, data: bytes) -> bytes:
        return encode_stream(STDIN, rid, data)

    def end_stdin(self, rid: int) -> bytes:
        return encode_record(STDIN, rid)

    def abort_request(self, rid: int) -> bytes:
        return encode_record(ABORT_REQUEST, rid)

    def get_values(self, names=(MAX_CONNS, MAX_REQS, MPXS_CONNS)) -> bytes:
        return encode_record(GET_VALUES, NULL_REQUEST_ID, encode_pairs((n, b"") for n in names))

    def receive_data(self, data: bytes) -> list[ev.Event]:
        found: list[ev.Event] = []
        for record in self._reader.feed(data):
            rid, rtype, content = record.request_id, record.type, record.content
            if rid == NULL_REQUEST_ID:
                if rtype == GET_VALUES_RESULT:
                    found.append(ev.ValuesResult(0, tuple(decode_pairs(content))))
                elif rtype == UNKNOWN_TYPE:
                    found.append(ev.UnknownTypeReply(0, decode_unknown_type(content)))
                else:
                    raise ProtocolError(f"{type_name(rtype)} with request id 0 from the application")
                continue
            request = self.requests.get(rid)
            if request is None:
                raise ProtocolError(f"{type_name(rtype)} for request {rid}, which is not active")
            if rtype in _OUTPUT_STREAMS:
                data_event, end_event = _OUTPUT_STREAMS[rtype]
                if rtype in request.ended_streams:
                    raise ProtocolError(f"{type_name(rtype)} for request {rid} after its end")
                if content:
                    found.append(data_event(rid, content))
                else:
                    request.ended_streams.add(rtype)
                    found.append(end_event(rid))
            elif rtype == END_REQUEST:
                app_status, protocol_status = decode_end_request(content)
                del self.requests[rid]
                found.append(ev.EndRequest(rid, app_status, protocol_status))
            else:
                raise ProtocolError(f"{type_name(rtype)} record for request {rid} is not one an "
                                    "application sends")
        return found
