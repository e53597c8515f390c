"""RFC 3875 section 6 response parsing, from tables of literal script output."""

import pytest

from cgigate.cgi.response import CGIResponseError, ResponseHeadParser

GOOD = [
    # output, kind, status, reason, headers sent on, body
    (b"Content-Type: text/plain\r\n\r\nhi", "document", 200, None,
     [(b"Content-Type", b"text/plain")], b"hi"),
    (b"Content-Type: text/plain\n\nbare lf", "document", 200, None,
     [(b"Content-Type", b"text/plain")], b"bare lf"),
    (b"Content-Type: text/plain\r\nX-A: 1\n\r\nmixed", "document", 200, None,
     [(b"Content-Type", b"text/plain"), (b"X-A", b"1")], b"mixed"),
    (b"Status: 404\r\nContent-Type: text/html\r\n\r\n", "document", 404, None,
     [(b"Content-Type", b"text/html")], b""),
    (b"Status: 418 I'm a teapot\r\n\r\n", "document", 418, "I'm a teapot", [], b""),
    (b"Location: /other/path?x=1\r\n\r\nignored", "local-redirect", 200, None, [], b"ignored"),
    (b"Location: http://example.com/\r\n\r\n", "document", 302, None,
     [(b"Location", b"http://example.com/")], b""),
    (b"Location: //example.com/x\r\n\r\n", "document", 302, None,
     [(b"Location", b"//example.com/x")], b""),
    (b"Status: 301 Moved\r\nLocation: http://e.com/\r\nContent-Type: text/html\r\n\r\n<a>",
     "document", 301, "Moved", [(b"Location", b"http://e.com/"), (b"Content-Type", b"text/html")], b"<a>"),
    (b"Status: 302\r\nLocation: /relative\r\n\r\n", "document", 302, None,
     [(b"Location", b"/relative")], b""),
    (b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\r\n\r\n\xff", "document", 200, None,
     [(b"Content-Type", b"application/octet-stream")], b"\x00\x01\r\n\r\n\xff"),
    (b"content-type:text/plain\r\nX-Empty:\r\n\r\n", "document", 200, None,
     [(b"content-type", b"text/plain"), (b"X-Empty", b"")], b""),
    (b"Content-Type: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n", "document", 200,
     None, [(b"Content-Type", b"a")], b""),
]

BAD = [
    (b"hello world\n\n", "without a colon"),
    (b"Content-Type: text/plain\r\n folded\r\n\r\n", "continuation"),
    (b": no name\r\n\r\n", "bad response header name"),
    (b"Content-Type : text/plain\r\n\r\n", "bad response header name"),
    (b"Status: 20\r\n\r\n", "bad Status"),
    (b"Status: 099\r\n\r\n", "bad Status"),
    (b"Status: 600 Too High\r\n\r\n", "bad Status"),
    (b"Status: 100 Continue\r\n\r\n", "bad Status"),
    (b"Status: HTTP/1.1 200 OK\r\n\r\n", "bad Status"),
    (b"Status: 200\r\nStatus: 404\r\n\r\n", "Status given twice"),
    (b"Location: /a\r\nLocation: /b\r\n\r\n", "Location given twice"),
    (b"X-Only: 1\r\n\r\nbody", "no Content-Type, Location or Status"),
    (b"\r\nbody", "no Content-Type, Location or Status"),
    (b"Content-Type: a\x00b\r\n\r\n", "NUL or CR"),
    (b"Content-Type: a\rb\r\n\r\n", "NUL or CR"),
    (b"Content-Length: 12x\r\nContent-Type: a\r\n\r\n", "bad Content-Length"),
]


def feed_all(output: bytes, step: int | None):
    parser = ResponseHeadParser(65536)
    if step is None:
        return parser.feed(output)
    head = None
    for i in range(0, len(output), step):
        head = parser.feed(output[i:i + step])
        if head is not None:
            rest = output[i + step:]
            head.body += rest
            return head
    return head


@pytest.mark.parametrize("step", [None, 1, 3])
@pytest.mark.parametrize("output,kind,status,reason,headers,body", GOOD)
def test_good_responses(output, kind, status, reason, headers, body, step):
    head = feed_all(output, step)
    assert head is not None
    assert (head.kind, head.status, head.reason, head.headers, head.body) == (kind, status, reason,
                                                                              headers, body)


def test_hop_by_hop_fields_are_reported():
    head = ResponseHeadParser().feed(b"Content-Type: a\r\nConnection: close\r\nKeep-Alive: 5\r\n\r\n")
    assert head.dropped == [b"Connection", b"Keep-Alive"]


@pytest.mark.parametrize("output,reason", BAD)
def test_bad_responses(output, reason):
    parser = ResponseHeadParser(65536)
    with pytest.raises(CGIResponseError, match=reason) as info:
        parser.feed(output)
    assert info.value.status == 502


def test_incomplete_head_waits_for_more():
    parser = ResponseHeadParser()
    assert parser.feed(b"Content-Type: text/plain\r\n") is None
    assert parser.feed(b"\r") is None
    head = parser.feed(b"\nbody")
    assert head.body == b"body"


def test_eof_before_headers():
    parser = ResponseHeadParser()
    with pytest.raises(CGIResponseError, match="printed nothing"):
        parser.eof()
    parser.feed(b"Content-Type: text/plain\r\n")
    with pytest.raises(CGIResponseError, match="before the blank line"):
        parser.eof()


def test_header_block_size_limit():
    parser = ResponseHeadParser(max_size=1024)
    with pytest.raises(CGIResponseError, match="over 1024 bytes"):
        parser.feed(b"X-Big: " + b"a" * 2000)
    parser = ResponseHeadParser(max_size=1024)
    with pytest.raises(CGIResponseError, match="over 1024 bytes"):
        for _ in range(100):
            parser.feed(b"X-Line: 0123456789\r\n")
