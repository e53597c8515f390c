"""FastCGI 1.0 at the byte level: vectors written from the specification's layouts.

Each vector is fed whole, one byte at a time, and followed by the start of
another record (which must wait, not break anything), as h11's test_io does.
"""

import pytest

from cgigate.fastcgi import ClientConnection, ProtocolError, ServerConnection
from cgigate.fastcgi import events as ev
from cgigate.fastcgi import records as r


def hexb(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("|", ""))


# --- encoding: (what, bytes from the spec's layouts, section numbers) ---

ENCODED = [
    # 5.1 BEGIN_REQUEST {role RESPONDER, flags KEEP_CONN}
    ("begin", r.encode_begin_request(1, r.RESPONDER, True),
     "01 01 0001 0008 00 00 | 0001 01 0000000000"),
    ("begin, no keep-conn, id 258", r.encode_begin_request(258, r.RESPONDER, False),
     "01 01 0102 0008 00 00 | 0001 00 0000000000"),
    # 5.5 END_REQUEST {appStatus 0x01020304, protocolStatus OVERLOADED}
    ("end", r.encode_end_request(7, 0x01020304, r.OVERLOADED),
     "01 03 0007 0008 00 00 | 01020304 02 000000"),
    # 3.3 padding to a multiple of 8
    ("stdout abc", r.encode_record(r.STDOUT, 1, b"abc"), "01 06 0001 0003 05 00 | 616263 0000000000"),
    ("empty stdin", r.encode_record(r.STDIN, 1), "01 05 0001 0000 00 00"),
    ("eight bytes, no padding", r.encode_record(r.STDERR, 1, b"12345678"),
     "01 07 0001 0008 00 00 | 3132333435363738"),
    # 4.2 UNKNOWN_TYPE {type 99}
    ("unknown type", r.encode_unknown_type(99), "01 0b 0000 0008 00 00 | 63 00000000000000"),
    # 3.4 name-value pairs: 1-byte and 4-byte lengths
    ("pair, short", r.encode_pairs([(b"A", b"bc")]), "01 02 41 6263"),
    ("pair, 127", r.encode_pairs([(b"N", b"v" * 127)]), "01 7f 4e" + "76" * 127),
    ("pair, 128", r.encode_pairs([(b"N" * 128, b"")]), "80000080 00" + "4e" * 128),
    ("pair, 65536", r.encode_pairs([(b"", b"x" * 65536)]), "00 80010000" + "78" * 65536),
]


@pytest.mark.parametrize("what,encoded,expected", ENCODED, ids=[e[0] for e in ENCODED])
def test_encodings(what, encoded, expected):
    assert encoded == hexb(expected)


def test_long_streams_are_split_at_65535():
    data = bytes(range(256)) * 300   # 76,800 bytes
    wire = r.encode_stream(r.STDOUT, 3, data)
    records = list(r.RecordReader().feed(wire))
    assert [len(rec.content) for rec in records] == [65535, 76800 - 65535]
    assert b"".join(rec.content for rec in records) == data
    assert len(wire) % 8 == 0
    assert r.encode_stream(r.STDOUT, 3, b"") == b""
    with pytest.raises(ValueError):
        r.encode_record(r.STDOUT, 1, b"x" * 65536)


# --- decoding: fed whole, byte by byte, and with the next record's start behind ---

DECODE = [
    ("begin", "01 01 0001 0008 00 00 | 0001 01 0000000000", [r.Record(r.BEGIN_REQUEST, 1, hexb("0001010000000000"))]),
    ("odd padding, non-zero pad bytes", "01 04 0002 0002 03 00 | 4142 ffeedd",
     [r.Record(r.PARAMS, 2, b"AB")]),
    ("two records in one piece", "01 05 0001 0001 07 00 | 7a 00000000000000 | 01 05 0001 0000 00 00",
     [r.Record(r.STDIN, 1, b"z"), r.Record(r.STDIN, 1, b"")]),
    ("max padding", "01 06 0001 0001 ff 00 | 41" + "00" * 255, [r.Record(r.STDOUT, 1, b"A")]),
]


@pytest.mark.parametrize("what,wire,records", DECODE, ids=[d[0] for d in DECODE])
@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_record_reader(what, wire, records, mode):
    data = hexb(wire)
    reader = r.RecordReader()
    if mode == "whole":
        got = list(reader.feed(data))
    elif mode == "bytewise":
        got = [rec for i in range(len(data)) for rec in reader.feed(data[i:i + 1])]
    else:
        got = list(reader.feed(data + hexb("01 05 0001")))
        assert reader.pending == 4
    assert got == records


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version(version):
    with pytest.raises(ProtocolError, match=f"version {version}"):
        list(r.RecordReader().feed(bytes([version]) + hexb("01 0001 0000 00 00")))


def test_pairs_split_anywhere_are_reassembled():
    pairs = [(b"SCRIPT_NAME", b"/x"), (b"N" * 200, b"v" * 300), (b"EMPTY", b"")]
    wire = r.encode_pairs(pairs)
    for cut in range(len(wire) + 1):
        decoder = r.PairDecoder()
        got = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
        decoder.close()
        assert got == pairs, cut


@pytest.mark.parametrize("wire", ["05", "05 01 41", "80000080", "8000008001 41"])
def test_truncated_pairs(wire):
    decoder = r.PairDecoder()
    decoder.feed(hexb(wire))
    with pytest.raises(ProtocolError, match="inside a pair"):
        decoder.close()


def test_pair_limits():
    with pytest.raises(r.LimitExceeded):
        r.PairDecoder(limit=100).feed(r.encode_pairs([(b"A", b"x" * 200)]))
    # a length that announces 2 GB is refused before anything is buffered for it
    with pytest.raises(r.LimitExceeded):
        r.PairDecoder(limit=1 << 20).feed(hexb("01 ffffffff 41"))


# --- the application side ---

def feed(conn, wire: bytes, bytewise: bool = False):
    if not bytewise:
        return conn.receive_data(wire)
    found = []
    for i in range(len(wire)):
        found += conn.receive_data(wire[i:i + 1])
    return found


def request_wire(rid=1, params=((b"REQUEST_METHOD", b"POST"),), stdin=b"hi", role=r.RESPONDER,
                 keep_conn=True) -> bytes:
    return (r.encode_begin_request(rid, role, keep_conn)
            + r.encode_stream(r.PARAMS, rid, r.encode_pairs(params)) + r.encode_record(r.PARAMS, rid)
            + r.encode_stream(r.STDIN, rid, stdin) + r.encode_record(r.STDIN, rid))


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_whole_request(bytewise):
    server = ServerConnection()
    found = feed(server, request_wire(), bytewise)
    assert found == [ev.BeginRequest(1, r.RESPONDER, True),
                     ev.Params(1, ((b"REQUEST_METHOD", b"POST"),)),
                     ev.StdinData(1, b"hi"), ev.StdinEnd(1)]
    reply = server.send_stdout(1, b"Content-Type: text/plain\r\n\r\nok") + server.end_request(1, 0)
    assert reply.endswith(hexb("01 06 0001 0000 00 00 | 01 03 0001 0008 00 00 00000000 00 000000"))
    assert not server.close_after and not server.requests


def test_pair_split_across_params_records():
    pairs = r.encode_pairs([(b"SCRIPT_FILENAME", b"/srv/app.py")])
    wire = (r.encode_begin_request(1) + r.encode_record(r.PARAMS, 1, pairs[:5])
            + r.encode_record(r.PARAMS, 1, pairs[5:]) + r.encode_record(r.PARAMS, 1))
    found = ServerConnection().receive_data(wire)
    assert found[1] == ev.Params(1, ((b"SCRIPT_FILENAME", b"/srv/app.py"),))


def test_no_keep_conn_asks_to_close():
    server = ServerConnection()
    server.receive_data(request_wire(keep_conn=False))
    server.end_request(1)
    assert server.close_after


@pytest.mark.parametrize("wire,message", [
    (r.encode_record(r.BEGIN_REQUEST, 1, b"\0\1\1\0\0\0\0"), "body of 7 bytes"),
    (r.encode_begin_request(0), "request id 0"),
    (request_wire()[:16] + request_wire()[:16], "already active"),
    (r.encode_begin_request(1) + r.encode_record(r.STDIN, 1, b"x"), "awaits params"),
    (request_wire() + r.encode_record(r.PARAMS, 1, b"\1\1AB"), "awaits input done"),
    (r.encode_begin_request(1) + r.encode_record(r.PARAMS, 1, b"\5") + r.encode_record(r.PARAMS, 1),
     "inside a pair"),
    (r.encode_record(99, 1, b"x"), "not one a web server sends"),
    (r.encode_record(r.STDOUT, 1, b"x"), "not one a web server sends"),
    (r.encode_record(r.GET_VALUES, 3, b""), "not one a web server sends"),
])
def test_protocol_errors(wire, message):
    with pytest.raises(ProtocolError, match=message):
        ServerConnection().receive_data(wire)


def test_records_for_inactive_ids_are_ignored():
    server = ServerConnection()
    assert server.receive_data(r.encode_record(r.STDIN, 9, b"stray") + r.encode_record(r.ABORT_REQUEST, 9)) == []
    server.receive_data(request_wire())
    server.end_request(1)
    assert server.receive_data(r.encode_record(r.STDIN, 1, b"late")) == []
    assert server.data_to_send() == b""


@pytest.mark.parametrize("role", [r.AUTHORIZER, r.FILTER, 99])
def test_roles_not_served_get_unknown_role(role):
    server = ServerConnection()
    found = server.receive_data(request_wire(role=role))
    assert found == [ev.RequestRejected(1, r.UNKNOWN_ROLE, f"role {role} is not served")]
    assert server.data_to_send() == hexb("01 03 0001 0008 00 00 | 00000000 03 000000")


def test_filter_role_when_served():
    server = ServerConnection(roles=(r.RESPONDER, r.FILTER))
    wire = request_wire(role=r.FILTER, stdin=b"") + r.encode_record(r.DATA, 1, b"file") + r.encode_record(r.DATA, 1)
    found = server.receive_data(wire)
    assert found[-3:] == [ev.StdinEnd(1), ev.FilterData(1, b"file"), ev.FilterDataEnd(1)]


def test_data_records_for_a_responder_are_ignored():
    """flup's FastCGI client sends an empty DATA record after STDIN, whatever the role."""
    server = ServerConnection()
    wire = request_wire() + r.encode_record(r.DATA, 1, b"x") + r.encode_record(r.DATA, 1)
    assert [type(e) for e in server.receive_data(wire)] == [ev.BeginRequest, ev.Params, ev.StdinData,
                                                            ev.StdinEnd]


def test_second_request_without_multiplexing():
    server = ServerConnection(multiplex=False)
    found = server.receive_data(request_wire(1) + request_wire(2))
    assert ev.RequestRejected(2, r.CANT_MPX_CONN, "a request is already active on this connection") in found
    assert [e for e in found if e.request_id == 2 and not isinstance(e, ev.RequestRejected)] == []
    assert server.data_to_send() == hexb("01 03 0002 0008 00 00 | 00000000 01 000000")
    # once the first ends, the connection takes the next one on id 2 again
    server.end_request(1)
    assert server.receive_data(request_wire(2))[0] == ev.BeginRequest(2, r.RESPONDER, True)


def test_overloaded_past_max_requests():
    server = ServerConnection(multiplex=True, max_requests=2)
    found = server.receive_data(request_wire(1) + request_wire(2) + request_wire(3))
    assert ev.RequestRejected(3, r.OVERLOADED, "2 requests already active on this connection") in found


def test_params_over_the_limit_get_overloaded():
    server = ServerConnection(max_params_bytes=1000)
    found = server.receive_data(request_wire(params=[(b"BIG", b"x" * 5000)]))
    assert found[0] == ev.BeginRequest(1, r.RESPONDER, True)
    assert found[1].protocol_status == r.OVERLOADED and len(found) == 2   # its stdin is ignored
    assert server.data_to_send() == hexb("01 03 0001 0008 00 00 | 00000000 02 000000")


def test_abort():
    server = ServerConnection()
    found = server.receive_data(request_wire()[:16] + r.encode_record(r.ABORT_REQUEST, 1))
    assert found == [ev.BeginRequest(1, r.RESPONDER, True), ev.AbortRequest(1)]
    reply = server.end_request(1, 0)
    assert reply.count(hexb("01 03 0001")) == 1   # exactly one END_REQUEST
    with pytest.raises(ValueError):
        server.end_request(1)


# --- management records (section 4) ---

def test_get_values_truthfully():
    ask = r.encode_record(r.GET_VALUES, 0, r.encode_pairs(
        [(r.MAX_CONNS, b""), (r.MAX_REQS, b""), (r.MPXS_CONNS, b""), (b"FCGI_UNKNOWN_NAME", b"")]))
    for server, expected in [
            (ServerConnection(), [(r.MAX_CONNS, b"1"), (r.MAX_REQS, b"1"), (r.MPXS_CONNS, b"0")]),
            (ServerConnection(multiplex=True, max_requests=50, max_conns=8),
             [(r.MAX_CONNS, b"8"), (r.MAX_REQS, b"50"), (r.MPXS_CONNS, b"1")])]:
        assert server.receive_data(ask) == []
        records = list(r.RecordReader().feed(server.data_to_send()))
        assert [(rec.type, rec.request_id) for rec in records] == [(r.GET_VALUES_RESULT, 0)]
        assert r.decode_pairs(records[0].content) == expected


def test_get_values_first_middle_and_after():
    server = ServerConnection()
    ask = r.encode_record(r.GET_VALUES, 0, r.encode_pairs([(r.MPXS_CONNS, b"")]))
    wire = ask + request_wire()[:16] + ask + request_wire()[16:] + ask   # records are never split by others
    server.receive_data(wire)
    assert server.data_to_send().count(hexb("01 0a 0000")) == 3


def test_unknown_management_type():
    server = ServerConnection()
    assert server.receive_data(r.encode_record(99, 0, b"whatever")) == []
    assert server.data_to_send() == hexb("01 0b 0000 0008 00 00 | 63 00000000000000")


# --- the web server side ---

def test_client_request_and_reply():
    client = ClientConnection(max_requests=2)
    assert client.new_request_id() == 1
    wire = client.begin_request(1, [(b"A", b"b")]) + client.send_stdin(1, b"x") + client.end_stdin(1)
    assert wire.startswith(hexb("01 01 0001 0008 00 00 | 0001 01 0000000000"))
    assert client.new_request_id() == 2
    reply = (r.encode_record(r.STDOUT, 1, b"out") + r.encode_record(r.STDERR, 1, b"err")
             + r.encode_record(r.STDOUT, 1) + r.encode_end_request(1, 3))
    assert feed(client, reply, bytewise=True) == [ev.StdoutData(1, b"out"), ev.StderrData(1, b"err"),
                                                  ev.StdoutEnd(1), ev.EndRequest(1, 3, 0)]
    assert client.new_request_id() == 1   # free again


@pytest.mark.parametrize("reply,message", [
    (r.encode_record(r.STDOUT, 5, b"x"), "not active"),
    (r.encode_record(r.STDOUT, 1) + r.encode_record(r.STDOUT, 1, b"more"), "after its end"),
    (r.encode_record(r.END_REQUEST, 1, b"\0" * 4), "body of 4 bytes"),
    (r.encode_record(r.PARAMS, 1, b""), "not one an application sends"),
    (r.encode_record(r.STDOUT, 0, b"x"), "request id 0"),
])
def test_client_protocol_errors(reply, message):
    client = ClientConnection()
    client.begin_request(1, [])
    with pytest.raises(ProtocolError, match=message):
        client.receive_data(reply)


def test_client_management_replies():
    client = ClientConnection()
    found = client.receive_data(r.encode_record(r.GET_VALUES_RESULT, 0, r.encode_pairs([(r.MPXS_CONNS, b"1")]))
                                + r.encode_unknown_type(42))
    assert found == [ev.ValuesResult(0, ((r.MPXS_CONNS, b"1"),)), ev.UnknownTypeReply(0, 42)]
