"""Property tests (hypothesis) for the sans-I/O FastCGI 1.0 library.

Hand-written byte vectors live in test_fastcgi_records.py; here hypothesis
chooses the records, the name-value pairs, the requests, the order in which
the two sides act and where the transport cuts the byte streams, and checks
that nothing is lost, duplicated, reordered or invented on the way.

Large bodies (> 65535 bytes, so split over several records) are not drawn
byte by byte: hypothesis draws a size and a seed and `random.Random` makes
the bytes, which keeps examples small and fast to generate and to shrink.
"""

from __future__ import annotations

import random
import struct
from collections import defaultdict, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hevent
from hypothesis import strategies as st

from cgigate.fastcgi import events as ev
from cgigate.fastcgi.connection import ClientConnection, ServerConnection
from cgigate.fastcgi.records import (
    ABORT_REQUEST, AUTHORIZER, BEGIN_REQUEST, CANT_MPX_CONN, DATA, END_REQUEST, FILTER,
    GET_VALUES, GET_VALUES_RESULT, HEADER_LEN, MAX_CONNS, MAX_CONTENT, MAX_REQS, MPXS_CONNS,
    OVERLOADED, PARAMS, REQUEST_COMPLETE, RESPONDER, STDERR, STDIN, STDOUT, UNKNOWN_TYPE,
    PairDecoder, ProtocolError, Record, RecordReader, decode_end_request, decode_pairs,
    encode_begin_request, encode_pairs, encode_record, encode_stream)

# A record as the reader may hold it at most: header, 65535 bytes, 255 of padding.
MAX_PENDING = HEADER_LEN + MAX_CONTENT + 255

FAST = settings(deadline=None, max_examples=100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEDIUM = settings(deadline=None, max_examples=40,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(deadline=None, max_examples=80,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Sizes around every boundary the format has: the 1-/4-byte pair length
# (127/128), padding to 8, and the 65535-byte record content.
BOUNDARY_SIZES = [0, 1, 7, 8, 9, 126, 127, 128, 129, 255, 256, 65527, 65534, 65535, 65536,
                  65543, 70000, 2 * MAX_CONTENT + 1]
sizes = st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(0, 300), st.integers(0, 140000))
small_sizes = st.one_of(st.sampled_from([0, 1, 127, 128, 255, 256]), st.integers(0, 300))


@st.composite
def blobs(draw, size_strategy=sizes):
    """Bytes of a drawn size: drawn directly when short, from a seeded PRNG otherwise."""
    n = draw(size_strategy)
    if n <= 64:
        return draw(st.binary(min_size=n, max_size=n))
    return random.Random(draw(st.integers(0, 2 ** 32))).randbytes(n)


def cut(data: bytes, points) -> list[bytes]:
    """`data` split at the given offsets (out-of-range and repeated ones ignored)."""
    offsets = [0] + sorted({p for p in points if 0 < p < len(data)}) + [len(data)]
    return [data[a:b] for a, b in zip(offsets, offsets[1:])]


def draw_pieces(data_strategy, blob: bytes, max_cuts: int = 40) -> list[bytes]:
    """`blob` cut at hypothesis-chosen points (so a header, a length or a pair can be split)."""
    if not blob:
        return [blob]
    points = data_strategy.draw(st.lists(st.integers(0, len(blob)), max_size=max_cuts), label="cuts")
    return cut(blob, points)


def read_all(reader: RecordReader, pieces) -> list[Record]:
    got = []
    for piece in pieces:
        got.extend(reader.feed(piece))
    return got


# --------------------------------------------------------------------------
# 1. Records
# --------------------------------------------------------------------------

record_specs = st.lists(
    st.tuples(st.integers(1, 11), st.integers(0, 0xFFFF), blobs(), st.booleans()),
    max_size=6)


def expected_records(specs) -> list[Record]:
    out = []
    for rtype, rid, content, via_stream in specs:
        if via_stream:
            out += [Record(rtype, rid, content[i:i + MAX_CONTENT])
                    for i in range(0, len(content), MAX_CONTENT)]
        else:
            out.append(Record(rtype, rid, content[:MAX_CONTENT]))
    return out


def encode_specs(specs) -> bytes:
    parts = []
    for rtype, rid, content, via_stream in specs:
        if via_stream:
            parts.append(encode_stream(rtype, rid, content))
        else:
            parts.append(encode_record(rtype, rid, content[:MAX_CONTENT]))
    return b"".join(parts)


@FAST
@given(specs=record_specs, data=st.data())
def test_records_round_trip_through_any_cuts(specs, data):
    wire = encode_specs(specs)
    want = expected_records(specs)
    # Written padded to a multiple of 8, as section 3.3 recommends.
    assert len(wire) == sum(HEADER_LEN + len(r.content) + (-len(r.content) & 7) for r in want)
    assert len(wire) % 8 == 0

    reader = RecordReader()
    assert read_all(reader, [wire]) == want
    assert reader.pending == 0

    reader = RecordReader()
    assert read_all(reader, draw_pieces(data, wire)) == want
    assert reader.pending == 0


@FAST
@given(specs=st.lists(st.tuples(st.integers(1, 11), st.integers(0, 0xFFFF),
                                st.binary(max_size=40), st.booleans()), max_size=8))
def test_records_round_trip_one_byte_at_a_time(specs):
    wire = encode_specs(specs)
    reader = RecordReader()
    got = []
    for i in range(len(wire)):
        got.extend(reader.feed(wire[i:i + 1]))
        assert reader.pending < HEADER_LEN + MAX_CONTENT + 255
    assert got == expected_records(specs)
    assert reader.pending == 0


@FAST
@given(rtype=st.integers(1, 11), rid=st.integers(0, 0xFFFF), content=blobs())
def test_encode_record_refuses_oversized_content(rtype, rid, content):
    if len(content) > MAX_CONTENT:
        with pytest.raises(ValueError):
            encode_record(rtype, rid, content)
    else:
        wire = encode_record(rtype, rid, content)
        assert len(wire) % 8 == 0 and len(wire) - HEADER_LEN - len(content) < 8
        assert wire[:7] == struct.pack("!BBHHB", 1, rtype, rid, len(content), len(wire) - 8 - len(content))


record_sizes = st.one_of(st.sampled_from([0, 1, 7, 8, 9, 65527, 65528, 65534, 65535]),
                         st.integers(0, MAX_CONTENT))


@st.composite
def hand_built_records(draw):
    rtype = draw(st.integers(1, 11))
    rid = draw(st.integers(0, 0xFFFF))
    content = draw(st.one_of(st.binary(max_size=300), blobs(record_sizes)))
    padding_len = draw(st.integers(0, 255))
    padding = draw(st.binary(min_size=padding_len, max_size=padding_len))
    reserved = draw(st.integers(0, 255))
    header = struct.pack("!BBHHBB", 1, rtype, rid, len(content), padding_len, reserved)
    return header + content + padding, Record(rtype, rid, content)


@FAST
@given(records=st.lists(hand_built_records(), min_size=1, max_size=5), data=st.data())
def test_any_padding_length_and_value_is_skipped(records, data):
    wire = b"".join(raw for raw, _ in records)
    want = [record for _, record in records]
    reader = RecordReader()
    assert read_all(reader, draw_pieces(data, wire)) == want
    assert reader.pending == 0


# --------------------------------------------------------------------------
# 2. Name-value pairs
# --------------------------------------------------------------------------

pair_sizes = st.one_of(
    st.sampled_from([0, 1, 126, 127, 128, 129, 255, 256, 65535, 65536, 70000]),
    st.integers(0, 300))
pairs_strategy = st.lists(st.tuples(blobs(pair_sizes), blobs(pair_sizes)), max_size=6)


def reference_decode(data: bytes) -> list[tuple[bytes, bytes]]:
    """Section 3.4 read literally, as an oracle independent of PairDecoder."""
    pairs, pos = [], 0
    while pos < len(data):
        lengths = []
        for _ in range(2):
            if data[pos] >> 7:
                lengths.append(struct.unpack_from("!I", data, pos)[0] & 0x7FFFFFFF)
                pos += 4
            else:
                lengths.append(data[pos])
                pos += 1
        name_len, value_len = lengths
        pairs.append((data[pos:pos + name_len], data[pos + name_len:pos + name_len + value_len]))
        pos += name_len + value_len
    assert pos == len(data)
    return pairs


def length_bytes(n: int) -> int:
    return 1 if n < 128 else 4


@FAST
@given(pairs=pairs_strategy, data=st.data())
def test_pairs_round_trip_through_any_cuts(pairs, data):
    wire = encode_pairs(pairs)
    assert len(wire) == sum(length_bytes(len(n)) + length_bytes(len(v)) + len(n) + len(v)
                            for n, v in pairs)
    assert reference_decode(wire) == pairs
    assert decode_pairs(wire, limit=1 << 24) == pairs

    decoder = PairDecoder(limit=1 << 24)
    got = []
    for piece in draw_pieces(data, wire):
        got += decoder.feed(piece)
    decoder.close()
    assert got == pairs


@FAST
@given(pairs=st.lists(st.tuples(st.binary(max_size=140), st.binary(max_size=140)), max_size=8))
def test_pairs_round_trip_one_byte_at_a_time(pairs):
    wire = encode_pairs(pairs)
    decoder = PairDecoder()
    got = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i:i + 1])
    decoder.close()
    assert got == pairs


@FAST
@given(pairs=st.lists(st.tuples(st.binary(max_size=200), st.binary(max_size=200),
                                st.booleans(), st.booleans()), max_size=6), data=st.data())
def test_pairs_with_needless_four_byte_lengths_are_read(pairs, data):
    """A 4-byte length (high bit set) is valid for any length, even under 128."""
    def length(n, wide):
        return struct.pack("!I", n | 0x80000000) if wide or n >= 128 else bytes((n,))
    wire = b"".join(length(len(n), wn) + length(len(v), wv) + n + v for n, v, wn, wv in pairs)
    want = [(n, v) for n, v, _, _ in pairs]
    decoder = PairDecoder()
    got = []
    for piece in draw_pieces(data, wire):
        got += decoder.feed(piece)
    decoder.close()
    assert got == want


@FAST
@given(pairs=st.lists(st.tuples(blobs(pair_sizes), blobs(pair_sizes)), min_size=1, max_size=4),
       data=st.data())
def test_truncated_pairs_raise_protocol_error(pairs, data):
    head = encode_pairs(pairs[:-1])
    wire = encode_pairs(pairs)
    # Cut strictly inside the last pair (its encoding is at least 2 bytes long).
    end = data.draw(st.integers(len(head) + 1, len(wire) - 1), label="truncate at")
    truncated = wire[:end]

    decoder = PairDecoder(limit=1 << 24)
    got = []
    with pytest.raises(ProtocolError):
        for piece in draw_pieces(data, truncated):
            got += decoder.feed(piece)
        decoder.close()
    assert got == pairs[:-1]
    with pytest.raises(ProtocolError):
        decode_pairs(truncated, limit=1 << 24)


# --------------------------------------------------------------------------
# 3. Whole conversations
# --------------------------------------------------------------------------

request_specs = st.fixed_dictionaries({
    "params": st.lists(st.tuples(blobs(pair_sizes), blobs(pair_sizes)), max_size=4),
    "stdin": st.lists(sizes, max_size=3),
    "output": st.lists(st.tuples(st.sampled_from(["out", "err"]), sizes), max_size=4),
    "app_status": st.integers(0, 0xFFFFFFFF),
    "keep_conn": st.booleans(),
})


class _Req:
    def __init__(self, index, spec):
        self.index = index
        self.spec = spec
        self.rid = None
        self.client_queue = deque()   # client actions after begin_request
        self.server_queue = deque([(kind, n) for kind, n in spec["output"]] +
                                  [("end", spec["app_status"])])
        self.stdin_sent = bytearray()
        self.stdout_sent = bytearray()
        self.stderr_sent = bytearray()
        self.server_events = []
        self.client_events = []
        self.server_begun = False
        self.server_stdin_done = False


def run_conversation(data, specs, *, multiplex: bool, max_requests: int, seed: int,
                     max_steps: int = 80):
    """Client and server talking through two byte pipes that deliver
    hypothesis-chosen amounts; each side acts in a hypothesis-chosen order
    (within what the protocol allows) for the first `max_steps` steps, and
    then everything left is flushed in a fixed order."""
    rng = random.Random(seed)
    server = ServerConnection(multiplex=multiplex, max_requests=max_requests)
    client = ClientConnection(max_requests=max_requests)
    reqs = [_Req(i, spec) for i, spec in enumerate(specs)]
    not_started = deque(reqs)
    started = []
    awaiting_begin = defaultdict(deque)     # rid -> requests begun by the client, not yet seen
    server_by_rid = {}
    client_by_rid = {}
    c2s, s2c = bytearray(), bytearray()
    ended_without_keep = False
    step = 0
    max_conc = [0]

    def choose(options):
        if step < max_steps:
            return options[data.draw(st.integers(0, len(options) - 1), label="action")]
        return options[0]

    def amount(buffer):
        if step < max_steps:
            return data.draw(st.integers(1, len(buffer)), label="deliver")
        return len(buffer)

    while True:
        options = []
        if c2s:
            options.append(("c2s", None))
        if s2c:
            options.append(("s2c", None))
        for req in started:
            if req.server_queue and req.server_begun and (
                    req.server_queue[0][0] != "end" or req.server_stdin_done):
                options.append(("server", req))
        for req in started:
            if req.client_queue:
                options.append(("client", req))
        if not_started and len(client.requests) < (max_requests if multiplex else 1):
            options.append(("start", None))
        if not options:
            break
        what, req = choose(options)
        step += 1

        if what == "start":
            req = not_started.popleft()
            if multiplex and step < max_steps and data.draw(st.booleans(), label="any id"):
                rid = data.draw(st.integers(1, 0xFFFF).filter(lambda r: r not in client.requests),
                                label="rid")
            else:
                rid = client.new_request_id()
            req.rid = rid
            c2s += client.begin_request(rid, req.spec["params"], RESPONDER, req.spec["keep_conn"])
            awaiting_begin[rid].append(req)
            client_by_rid[rid] = req
            req.client_queue.extend([("stdin", n) for n in req.spec["stdin"]] + [("end_stdin", 0)])
            started.append(req)
        elif what == "client":
            kind, n = req.client_queue.popleft()
            if kind == "stdin":
                body = rng.randbytes(n)
                req.stdin_sent += body
                c2s += client.send_stdin(req.rid, body)
            else:
                c2s += client.end_stdin(req.rid)
        elif what == "c2s":
            n = amount(c2s)
            chunk, c2s[:] = bytes(c2s[:n]), c2s[n:]
            for event in server.receive_data(chunk):
                if isinstance(event, ev.BeginRequest):
                    target = awaiting_begin[event.request_id].popleft()
                    target.server_begun = True
                    server_by_rid[event.request_id] = target
                    max_conc[0] = max(max_conc[0], len(server.requests))
                else:
                    target = server_by_rid[event.request_id]
                if isinstance(event, ev.StdinEnd):
                    target.server_stdin_done = True
                target.server_events.append(event)
            assert server.data_to_send() == b""
            assert server.pending_input <= MAX_PENDING
        elif what == "server":
            kind, n = req.server_queue.popleft()
            if kind == "out":
                body = rng.randbytes(n)
                req.stdout_sent += body
                s2c += server.send_stdout(req.rid, body)
            elif kind == "err":
                body = rng.randbytes(n)
                req.stderr_sent += body
                s2c += server.send_stderr(req.rid, body)
            else:
                s2c += server.end_request(req.rid, n)
                del server_by_rid[req.rid]
                ended_without_keep |= not req.spec["keep_conn"]
                assert server.close_after == ended_without_keep
        elif what == "s2c":
            n = amount(s2c)
            chunk, s2c[:] = bytes(s2c[:n]), s2c[n:]
            for event in client.receive_data(chunk):
                target = client_by_rid[event.request_id]
                target.client_events.append(event)
                if isinstance(event, ev.EndRequest):
                    del client_by_rid[event.request_id]
            assert client.pending_input <= MAX_PENDING

    hevent(f"requests={len(reqs)} steps={'flush' if step >= max_steps else 'drawn'}")
    hevent(f"big stdin={any(len(r.stdin_sent) > MAX_CONTENT for r in reqs)}")
    hevent(f"big stdout={any(len(r.stdout_sent) > MAX_CONTENT for r in reqs)}")
    hevent(f"big params={any(len(encode_pairs(r.spec['params'])) > MAX_CONTENT for r in reqs)}")
    hevent(f"max concurrency={max_conc[0]}")
    assert not not_started
    assert not server.requests and not client.requests
    assert server.pending_input == 0 and client.pending_input == 0
    for req in reqs:
        check_server_side(req)
        check_client_side(req)


def check_server_side(req):
    events = req.server_events
    kinds = [type(e) for e in events]
    assert all(e.request_id == req.rid for e in events)
    assert kinds[0] is ev.BeginRequest and kinds.count(ev.BeginRequest) == 1
    assert events[0] == ev.BeginRequest(req.rid, RESPONDER, req.spec["keep_conn"])
    assert kinds[1] is ev.Params and kinds.count(ev.Params) == 1
    assert events[1].params == tuple(tuple(p) for p in req.spec["params"])
    assert kinds[-1] is ev.StdinEnd and kinds.count(ev.StdinEnd) == 1
    assert all(k is ev.StdinData for k in kinds[2:-1]), kinds
    assert all(e.data for e in events[2:-1])   # no empty data event (that would be the end)
    assert b"".join(e.data for e in events[2:-1]) == req.stdin_sent


def check_client_side(req):
    events = req.client_events
    kinds = [type(e) for e in events]
    assert all(e.request_id == req.rid for e in events)
    assert events[-1] == ev.EndRequest(req.rid, req.spec["app_status"], REQUEST_COMPLETE)
    assert kinds.count(ev.EndRequest) == 1
    assert kinds.count(ev.StdoutEnd) == 1
    stderr_used = bool(req.stderr_sent)
    assert kinds.count(ev.StderrEnd) == (1 if stderr_used else 0)
    stdout_end = kinds.index(ev.StdoutEnd)
    assert ev.StdoutData not in kinds[stdout_end:]
    if stderr_used:
        assert ev.StderrData not in kinds[kinds.index(ev.StderrEnd):]
    assert set(kinds) <= {ev.StdoutData, ev.StdoutEnd, ev.StderrData, ev.StderrEnd, ev.EndRequest}
    assert all(e.data for e in events if isinstance(e, (ev.StdoutData, ev.StderrData)))
    assert b"".join(e.data for e in events if isinstance(e, ev.StdoutData)) == req.stdout_sent
    assert b"".join(e.data for e in events if isinstance(e, ev.StderrData)) == req.stderr_sent


@SLOW
@given(max_requests=st.integers(1, 4), specs=st.lists(request_specs, min_size=1, max_size=6),
       seed=st.integers(0, 2 ** 32), data=st.data())
def test_multiplexed_conversation(max_requests, specs, seed, data):
    run_conversation(data, specs, multiplex=True, max_requests=max_requests, seed=seed)


@SLOW
@given(specs=st.lists(request_specs, min_size=1, max_size=3), seed=st.integers(0, 2 ** 32),
       data=st.data())
def test_single_request_conversations_in_turn(specs, seed, data):
    """Not multiplexed: one request at a time, id 1 reused for each."""
    run_conversation(data, specs, multiplex=False, max_requests=1, seed=seed)


@FAST
@given(multiplex=st.booleans(), max_requests=st.integers(1, 100), max_conns=st.integers(1, 1000),
       names=st.lists(st.sampled_from([MAX_CONNS, MAX_REQS, MPXS_CONNS, b"FCGI_OTHER", b""]),
                      max_size=5),
       data=st.data())
def test_get_values_answers_truthfully(multiplex, max_requests, max_conns, names, data):
    server = ServerConnection(multiplex=multiplex, max_requests=max_requests, max_conns=max_conns)
    client = ClientConnection()
    assert server.receive_data(client.get_values(names)) == []
    reply = server.data_to_send()
    got = []
    for piece in draw_pieces(data, reply):
        got += client.receive_data(piece)
    known = {MAX_CONNS: str(max_conns).encode(),
             MAX_REQS: str(max_requests if multiplex else 1).encode(),
             MPXS_CONNS: b"1" if multiplex else b"0"}
    assert got == [ev.ValuesResult(0, tuple((n, known[n]) for n in names if n in known))]


# --------------------------------------------------------------------------
# 4. Robustness
# --------------------------------------------------------------------------

def usually(common, rare, odds: int = 20):
    """`common`, except one time in `odds` or so `rare` (hypothesis has no weights)."""
    return st.integers(0, odds - 1).flatmap(lambda i: rare if i == 0 else common)


@st.composite
def raw_records(draw, side_types=(BEGIN_REQUEST, ABORT_REQUEST, PARAMS, STDIN, DATA, GET_VALUES),
                request_ids=st.one_of(st.integers(0, 3), st.integers(1, 3), st.integers(0, 0xFFFF))):
    """Records that are mostly plausible, sometimes not: mostly the types one
    side sends, but any type, odd bodies, length fields that lie, other versions."""
    version = draw(usually(st.just(1), st.integers(0, 255), odds=40))
    rtype = draw(usually(st.one_of(st.sampled_from(side_types), st.integers(1, 11)),
                         st.integers(0, 255)))
    rid = draw(request_ids)
    content = draw(st.one_of(
        st.binary(max_size=64),
        st.just(b""),
        st.builds(lambda role, flags: struct.pack("!HB5x", role, flags),
                  st.integers(0, 4), st.integers(0, 255)),
        st.builds(lambda a, p: struct.pack("!IB3x", a, p), st.integers(0, 2 ** 32 - 1),
                  st.integers(0, 255)),
        st.builds(encode_pairs, st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=20)),
                                         max_size=3)),
    ))
    length = draw(usually(st.just(len(content)), st.integers(0, 0xFFFF)))
    padding_len = draw(st.integers(0, 16))
    return (struct.pack("!BBHHBx", version, rtype, rid, length, padding_len) + content
            + b"\0" * padding_len)


def feed_expecting_only_protocol_errors(connection, pieces):
    for piece in pieces:
        try:
            found = connection.receive_data(piece)
        except ProtocolError:
            return
        assert isinstance(found, list)
        assert all(isinstance(e, ev.Event) for e in found)
        assert connection.pending_input <= MAX_PENDING


def valid_start(rid: int, role: int = RESPONDER) -> bytes:
    return encode_begin_request(rid, role) + encode_record(PARAMS, rid)


@FAST
@given(blob=st.binary(max_size=2000), data=st.data())
def test_server_survives_random_bytes(blob, data):
    feed_expecting_only_protocol_errors(ServerConnection(), [blob])
    server = ServerConnection(multiplex=True, max_requests=3)
    feed_expecting_only_protocol_errors(server, draw_pieces(data, blob))


@FAST
@given(prefix=st.booleans(), records=st.lists(raw_records(), max_size=12),
       multiplex=st.booleans(), max_requests=st.integers(1, 3),
       roles=st.sampled_from([(RESPONDER,), (RESPONDER, FILTER), (RESPONDER, AUTHORIZER, FILTER)]),
       max_params_bytes=st.one_of(st.just(1 << 20), st.integers(0, 200)), data=st.data())
def test_server_survives_random_records(prefix, records, multiplex, max_requests, roles,
                                        max_params_bytes, data):
    blob = (valid_start(1) + valid_start(2, FILTER) if prefix else b"") + b"".join(records)
    server = ServerConnection(multiplex=multiplex, max_requests=max_requests, roles=roles,
                              max_params_bytes=max_params_bytes)
    feed_expecting_only_protocol_errors(server, draw_pieces(data, blob))
    server.data_to_send()


@FAST
@given(blob=st.binary(max_size=2000), active=st.integers(0, 3), data=st.data())
def test_client_survives_random_bytes(blob, active, data):
    client = ClientConnection(max_requests=3)
    for rid in range(1, active + 1):
        client.begin_request(rid, [(b"A", b"B")])
    feed_expecting_only_protocol_errors(client, draw_pieces(data, blob))


@FAST
@given(records=st.lists(raw_records((END_REQUEST, STDOUT, STDERR, GET_VALUES_RESULT, UNKNOWN_TYPE)),
                       max_size=12),
       active=st.integers(0, 3), data=st.data())
def test_client_survives_random_records(records, active, data):
    client = ClientConnection(max_requests=3)
    for rid in range(1, active + 1):
        client.begin_request(rid, [])
    feed_expecting_only_protocol_errors(client, draw_pieces(data, b"".join(records)))


def test_pending_input_stays_bounded_when_fed_one_byte_at_a_time():
    body = bytes(range(256)) * 256
    body = body[:MAX_CONTENT]
    server_wire = struct.pack("!BBHHBx", 1, STDIN, 7, MAX_CONTENT, 255) + body + b"\xff" * 255
    client_wire = struct.pack("!BBHHBx", 1, STDOUT, 1, MAX_CONTENT, 255) + body + b"\xff" * 255
    assert len(server_wire) == MAX_PENDING

    server = ServerConnection()       # request 7 is inactive: its STDIN is ignored
    for i in range(len(server_wire)):
        assert server.receive_data(server_wire[i:i + 1]) == []
        assert server.pending_input <= MAX_PENDING
        assert server.pending_input == (i + 1) % MAX_PENDING
    assert server.data_to_send() == b""

    client = ClientConnection()
    client.begin_request(1, [])
    found = []
    for i in range(len(client_wire)):
        found += client.receive_data(client_wire[i:i + 1])
        assert client.pending_input <= MAX_PENDING
    assert found == [ev.StdoutData(1, body)]
    assert client.pending_input == 0


# --------------------------------------------------------------------------
# 5. Limits
# --------------------------------------------------------------------------

def only_end_request(wire: bytes, rid: int, protocol_status: int) -> None:
    records = list(RecordReader().feed(wire))
    assert [(r.type, r.request_id) for r in records] == [(END_REQUEST, rid)]
    assert decode_end_request(records[0].content) == (0, protocol_status)


@st.composite
def progress_of(draw, rid):
    """The bytes of a request that got somewhere: begun, params done, stdin done."""
    stage = draw(st.integers(0, 3))
    wire = encode_begin_request(rid, RESPONDER, draw(st.booleans()))
    if stage >= 1:
        wire += encode_record(PARAMS, rid, encode_pairs([(b"SCRIPT_NAME", b"/x")]))
    if stage >= 2:
        wire += encode_record(PARAMS, rid)
    if stage >= 3:
        wire += encode_record(STDIN, rid, b"body") + encode_record(STDIN, rid)
    return wire


@FAST
@given(ids=st.lists(st.integers(1, 0xFFFF), min_size=2, max_size=2, unique=True),
       keep_conn=st.booleans(), max_requests=st.integers(1, 5), data=st.data())
def test_second_request_without_multiplexing_gets_cant_mpx_conn(ids, keep_conn, max_requests, data):
    first, second = ids
    server = ServerConnection(multiplex=False, max_requests=max_requests)
    server.receive_data(data.draw(progress_of(first), label="first"))
    assert first in server.requests
    assert server.data_to_send() == b""

    found = server.receive_data(encode_begin_request(second, RESPONDER, keep_conn))
    assert [(type(e), e.request_id) for e in found] == [(ev.RequestRejected, second)]
    assert found[0].protocol_status == CANT_MPX_CONN
    only_end_request(server.data_to_send(), second, CANT_MPX_CONN)
    assert set(server.requests) == {first}

    # What follows for the refused id is ignored (its id is inactive); the first goes on.
    assert server.receive_data(encode_record(PARAMS, second) + encode_record(STDIN, second)) == []
    assert server.receive_data(encode_record(ABORT_REQUEST, first)) == [ev.AbortRequest(first)]
    # Once the first is over, the second id may begin.
    server.end_request(first)
    assert server.receive_data(encode_begin_request(second)) == [ev.BeginRequest(second, RESPONDER, True)]


@FAST
@given(k=st.integers(1, 6), ids=st.lists(st.integers(1, 0xFFFF), min_size=9, max_size=9, unique=True),
       keep_conn=st.booleans(), data=st.data())
def test_request_beyond_max_requests_gets_overloaded(k, ids, keep_conn, data):
    server = ServerConnection(multiplex=True, max_requests=k)
    for rid in ids[:k]:
        found = server.receive_data(data.draw(progress_of(rid), label=f"request {rid}"))
        assert found[0] == ev.BeginRequest(rid, RESPONDER, found[0].keep_conn)
        assert not any(isinstance(e, ev.RequestRejected) for e in found)
    assert server.data_to_send() == b""

    extra = ids[k]
    found = server.receive_data(encode_begin_request(extra, RESPONDER, keep_conn))
    assert [(type(e), e.request_id) for e in found] == [(ev.RequestRejected, extra)]
    assert found[0].protocol_status == OVERLOADED
    only_end_request(server.data_to_send(), extra, OVERLOADED)
    assert set(server.requests) == set(ids[:k])

    # One ends, and there is room for one more (and again only one).
    server.end_request(ids[0])
    assert server.receive_data(encode_begin_request(ids[k + 1])) == [ev.BeginRequest(ids[k + 1], RESPONDER, True)]
    found = server.receive_data(encode_begin_request(ids[k + 2]))
    assert [(type(e), e.protocol_status) for e in found] == [(ev.RequestRejected, OVERLOADED)]


@FAST
@given(active=st.lists(st.integers(1, 0xFFFF), max_size=4, unique=True),
       ended=st.lists(st.integers(1, 0xFFFF), max_size=2, unique=True),
       unknown=st.integers(1, 0xFFFF), multiplex=st.booleans(), data=st.data())
def test_abort_for_an_unknown_id_is_ignored(active, ended, unknown, multiplex, data):
    ended = [rid for rid in ended if rid not in active]
    server = ServerConnection(multiplex=True, max_requests=8)
    if not multiplex:
        server = ServerConnection(multiplex=False)
        active = active[:1]
        ended = []
    for rid in ended:          # once active, then over: inactive again
        server.receive_data(valid_start(rid))
        server.end_request(rid)
    for rid in active:
        server.receive_data(data.draw(progress_of(rid), label=f"request {rid}"))
    before = set(server.requests)
    assert before == set(active)

    for rid in [unknown] + ended:
        if rid in active:
            continue
        assert server.receive_data(encode_record(ABORT_REQUEST, rid)) == []
        assert server.data_to_send() == b""
        assert set(server.requests) == before
    for rid in active:
        assert server.receive_data(encode_record(ABORT_REQUEST, rid)) == [ev.AbortRequest(rid)]
