"""RFC 3875 section 6: reading a CGI script's response header, without I/O.

Feed the script's stdout to `ResponseHeadParser.feed` until it returns a
`CGIHead`; whatever followed the blank line is in `CGIHead.body`.  Anything
that is not a well-formed header block raises `CGIResponseError`, whose
`status` (502) is what the client gets.

Lines may end in CRLF or a bare LF (section 6.2 allows either in practice:
scripts print "\\n").  The strict parts, each a 502:

- a line without a colon, a name that is empty or not a token, a space
  before the colon, a continuation line (obs-fold), NUL or CR in a value;
- `Status` that is not three digits from 200 to 599 with an optional
  reason phrase (1xx is not a final response), or given twice;
- `Location` given twice;
- no CGI field at all (none of Content-Type, Location, Status; section 6.2);
- a header block larger than `max_size`.

Hop-by-hop fields (Connection, Transfer-Encoding, ...) are dropped and
listed in `CGIHead.dropped`, since the front frames the response itself.

The kind of response (section 6.2):
- "local-redirect": `Location: /path` (a path, not `//host`) with no
  Status: the server fetches that path itself (6.2.2); the body is ignored.
- "document": everything else, including client redirects (6.2.3, 6.2.4):
  an absolute or relative `Location` without Status gets 302.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cgigate.front.request import HOP_BY_HOP

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_STATUS = re.compile(rb"^([2-5][0-9][0-9])(?:[ \t]+([^\x00-\x08\x0a-\x1f\x7f]*))?$")


class CGIResponseError(Exception):
    status = 502

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


@dataclass
class CGIHead:
    kind: str                      # "document" or "local-redirect"
    status: int
    reason: str | None
    headers: list[tuple[bytes, bytes]]
    location: bytes | None = None
    body: bytes = b""
    dropped: list[bytes] = field(default_factory=list)


class ResponseHeadParser:
    def __init__(self, max_size: int = 65536):
        self.max_size = max_size
        self._buffer = bytearray()
        self._scan = 0          # where to look for the next line end
        self._headers: list[tuple[bytes, bytes]] = []
        self._dropped: list[bytes] = []
        self._status: int | None = None
        self._reason: str | None = None
        self._location: bytes | None = None
        self._content_type = False

    def feed(self, data: bytes) -> CGIHead | None:
        buffer = self._buffer
        buffer += data
        while True:
            end = buffer.find(b"\n", self._scan)
            if end < 0:
                break
            line = bytes(buffer[self._scan:end])
            if line.endswith(b"\r"):
                line = line[:-1]
            self._scan = end + 1
            if not line:
                head = self._finish()
                head.body = bytes(buffer[self._scan:])
                return head
            self._take(line)  # each line is checked as it comes: a bad one fails at once
        if len(buffer) > self.max_size or self._scan > self.max_size:
            raise CGIResponseError(f"response header block over {self.max_size} bytes "
                                   "(cgi.max_response_header_size)")
        return None

    def eof(self) -> None:
        """The script's output ended; called when feed never returned a head."""
        if not self._buffer:
            raise CGIResponseError("end of script output before headers (the script printed nothing)")
        raise CGIResponseError("end of script output before the blank line that ends the headers; "
                               f"output began {bytes(self._buffer[:60])!r}")

    def _take(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t"):
            raise CGIResponseError(f"continuation line in the response header: {line[:60]!r}")
        name, colon, value = line.partition(b":")
        if not colon:
            raise CGIResponseError(f"response header line without a colon: {line[:60]!r}")
        if not _TOKEN.match(name):
            raise CGIResponseError(f"bad response header name {name[:60]!r}")
        value = value.strip(b" \t")
        if b"\x00" in value or b"\r" in value:
            raise CGIResponseError(f"NUL or CR in the value of response header {name.decode()!r}")
        lower = name.lower()
        if lower == b"status":
            if self._status is not None:
                raise CGIResponseError("Status given twice")
            m = _STATUS.match(value)
            if not m:
                raise CGIResponseError(f"bad Status {value[:60]!r}: want three digits 200-599 "
                                       "and an optional reason phrase")
            self._status = int(m.group(1))
            self._reason = m.group(2).decode("latin-1").strip() if m.group(2) else None
            return
        if lower == b"location":
            if self._location is not None:
                raise CGIResponseError("Location given twice")
            if not value:
                raise CGIResponseError("empty Location")
            self._location = value
        elif lower == b"content-type":
            self._content_type = True
        elif lower == b"content-length":
            if not value.isdigit():
                raise CGIResponseError(f"bad Content-Length {value[:60]!r}")
        if lower in HOP_BY_HOP:
            self._dropped.append(name)
            return
        self._headers.append((name, value))

    def _finish(self) -> CGIHead:
        status, location = self._status, self._location
        if status is None and location is None and not self._content_type:
            raise CGIResponseError("no Content-Type, Location or Status in the response header "
                                   "(RFC 3875 section 6.2 needs at least one)")
        if location is not None and status is None and location.startswith(b"/") \
                and not location.startswith(b"//"):
            return CGIHead("local-redirect", 200, None, [], location=location, dropped=self._dropped)
        if status is None:
            status = 302 if location is not None else 200
        return CGIHead("document", status, self._reason, self._headers, location=location,
                       dropped=self._dropped)
