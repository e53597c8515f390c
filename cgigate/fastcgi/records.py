"""FastCGI 1.0 records and name-value pairs, as bytes: no sockets here.

FastCGI section 3.3: every record is an 8-byte header (version, type,
request id, content length, padding length, reserved), the content (at most
65535 bytes) and padding.  This module writes records padded to a multiple
of 8 bytes, as the specification recommends, and reads records with any
padding, fed in pieces of any size.

Section 3.4: a name or value shorter than 128 bytes has a 1-byte length;
a longer one a 4-byte length with the high bit set.  `PairDecoder` reads
pairs from a stream of PARAMS (or GET_VALUES) content in pieces, so a pair
split across two records is reassembled (php-fpm, flup and uWSGI parse each
record on its own and get this wrong).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

VERSION_1 = 1
HEADER_LEN = 8
MAX_CONTENT = 0xFFFF
NULL_REQUEST_ID = 0

# Record types (section 8)
BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11
MANAGEMENT_TYPES = frozenset({GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE})
TYPE_NAMES = {1: "BEGIN_REQUEST", 2: "ABORT_REQUEST", 3: "END_REQUEST", 4: "PARAMS", 5: "STDIN",
              6: "STDOUT", 7: "STDERR", 8: "DATA", 9: "GET_VALUES", 10: "GET_VALUES_RESULT",
              11: "UNKNOWN_TYPE"}

# Roles (section 5.1) and flags
RESPONDER = 1
AUTHORIZER = 2
FILTER = 3
KEEP_CONN = 1

# protocolStatus of END_REQUEST (section 5.5)
REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3

# Variables of GET_VALUES (section 4.1)
MAX_CONNS = b"FCGI_MAX_CONNS"
MAX_REQS = b"FCGI_MAX_REQS"
MPXS_CONNS = b"FCGI_MPXS_CONNS"

_HEADER = struct.Struct("!BBHHBx")
_BEGIN_BODY = struct.Struct("!HB5x")
_END_BODY = struct.Struct("!IB3x")
_UNKNOWN_BODY = struct.Struct("!B7x")


class ProtocolError(Exception):
    """The peer broke the FastCGI protocol; the connection cannot go on."""


class LimitExceeded(ProtocolError):
    """Well-formed, but more than this side accepts (a request can be refused alone)."""


def type_name(record_type: int) -> str:
    return TYPE_NAMES.get(record_type, f"type {record_type}")


@dataclass(frozen=True)
class Record:
    type: int
    request_id: int
    content: bytes = b""


def encode_record(record_type: int, request_id: int, content: bytes = b"") -> bytes:
    """One record, padded to a multiple of 8 bytes."""
    length = len(content)
    if length > MAX_CONTENT:
        raise ValueError(f"record content of {length} bytes is over {MAX_CONTENT}")
    padding = -length & 7
    return b"".join((_HEADER.pack(VERSION_1, record_type, request_id, length, padding), content,
                     b"\0" * padding))


def encode_stream(record_type: int, request_id: int, data: bytes) -> bytes:
    """`data` as records of at most 65535 bytes each (no end-of-stream record)."""
    if len(data) <= MAX_CONTENT:
        return encode_record(record_type, request_id, data) if data else b""
    view = memoryview(data)
    return b"".join(encode_record(record_type, request_id, bytes(view[i:i + MAX_CONTENT]))
                    for i in range(0, len(data), MAX_CONTENT))


def encode_begin_request(request_id: int, role: int = RESPONDER, keep_conn: bool = True) -> bytes:
    return encode_record(BEGIN_REQUEST, request_id, _BEGIN_BODY.pack(role, KEEP_CONN if keep_conn else 0))


def decode_begin_request(content: bytes) -> tuple[int, bool]:
    """(role, keep_conn) of a BEGIN_REQUEST body."""
    if len(content) != _BEGIN_BODY.size:
        raise ProtocolError(f"BEGIN_REQUEST body of {len(content)} bytes, not 8")
    role, flags = _BEGIN_BODY.unpack(content)
    return role, bool(flags & KEEP_CONN)


def encode_end_request(request_id: int, app_status: int = 0,
                       protocol_status: int = REQUEST_COMPLETE) -> bytes:
    return encode_record(END_REQUEST, request_id, _END_BODY.pack(app_status & 0xFFFFFFFF, protocol_status))


def decode_end_request(content: bytes) -> tuple[int, int]:
    """(app_status, protocol_status) of an END_REQUEST body."""
    if len(content) != _END_BODY.size:
        raise ProtocolError(f"END_REQUEST body of {len(content)} bytes, not 8")
    return _END_BODY.unpack(content)


def encode_unknown_type(record_type: int) -> bytes:
    return encode_record(UNKNOWN_TYPE, NULL_REQUEST_ID, _UNKNOWN_BODY.pack(record_type))


def decode_unknown_type(content: bytes) -> int:
    if len(content) != _UNKNOWN_BODY.size:
        raise ProtocolError(f"UNKNOWN_TYPE body of {len(content)} bytes, not 8")
    return _UNKNOWN_BODY.unpack(content)[0]


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n > 0x7FFFFFFF:
        raise ValueError(f"a name or value of {n} bytes is too long for FastCGI")
    return struct.pack("!I", n | 0x80000000)


def encode_pairs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Section 3.4 name-value pairs, back to back."""
    parts = []
    for name, value in pairs:
        parts += (_length(len(name)), _length(len(value)), name, value)
    return b"".join(parts)


class PairDecoder:
    """Reads name-value pairs from content fed in any pieces.

    `limit` bounds the bytes buffered for one pair and the total of all
    pairs; past it `feed` raises ProtocolError rather than growing."""

    def __init__(self, limit: int = 1 << 20):
        self.limit = limit
        self.total = 0
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.total += len(data)
        if self.total > self.limit:
            raise LimitExceeded(f"name-value pairs over {self.limit} bytes")
        buffer = self._buffer
        buffer += data
        pairs = []
        pos = 0
        end = len(buffer)
        while pos < end:
            lengths = []
            p = pos
            for _ in range(2):
                if p >= end:
                    break
                if buffer[p] < 0x80:
                    lengths.append(buffer[p])
                    p += 1
                else:
                    if p + 4 > end:
                        break
                    lengths.append(int.from_bytes(buffer[p:p + 4], "big") & 0x7FFFFFFF)
                    p += 4
            if len(lengths) < 2:
                break
            name_len, value_len = lengths
            if name_len + value_len > self.limit:
                raise LimitExceeded(f"a name-value pair of {name_len + value_len} bytes is over "
                                    f"{self.limit}")
            if p + name_len + value_len > end:
                break
            pairs.append((bytes(buffer[p:p + name_len]), bytes(buffer[p + name_len:p + name_len + value_len])))
            pos = p + name_len + value_len
        del buffer[:pos]
        return pairs

    def close(self) -> None:
        """The stream ended: bytes left over are half a pair."""
        if self._buffer:
            raise ProtocolError(f"name-value stream ends inside a pair ({len(self._buffer)} bytes left)")


def decode_pairs(data: bytes, limit: int = 1 << 20) -> list[tuple[bytes, bytes]]:
    decoder = PairDecoder(limit)
    pairs = decoder.feed(data)
    decoder.close()
    return pairs


class RecordReader:
    """Splits a byte stream into records.  Holds at most one partial record
    (8 + 65535 + 255 bytes), however the bytes arrive."""

    def __init__(self):
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of a record not yet complete (for a stalled-peer timeout)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[Record]:
        buffer = self._buffer
        buffer += data
        pos = 0
        end = len(buffer)
        records = []
        while end - pos >= HEADER_LEN:
            version, record_type, request_id, length, padding = _HEADER.unpack_from(buffer, pos)
            if version != VERSION_1:
                raise ProtocolError(f"unsupported FastCGI version {version} (want 1)")
            total = HEADER_LEN + length + padding
            if end - pos < total:
                break
            start = pos + HEADER_LEN
            records.append(Record(record_type, request_id, bytes(buffer[start:start + length])))
            pos += total
        del buffer[:pos]
        return iter(records)
