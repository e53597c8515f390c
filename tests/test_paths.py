"""Request path decoding: one decode, dot segments removed, hostile input refused."""

import pytest

from cgigate.errors import HTTPError
from cgigate.front.paths import decode_segments

GOOD = [
    (b"/", []),
    (b"/cgi-bin/x.sh", [b"cgi-bin", b"x.sh"]),
    (b"//cgi-bin//x.sh", [b"cgi-bin", b"x.sh"]),
    (b"/./cgi-bin/./x.sh", [b"cgi-bin", b"x.sh"]),
    (b"/cgi-bin/../cgi-bin/x.sh", [b"cgi-bin", b"x.sh"]),
    (b"/cgi-bin/%2e%2e/etc/passwd", [b"etc", b"passwd"]),   # routed elsewhere: never under cgi-bin
    (b"/a%20b/%C3%A9", [b"a b", b"\xc3\xa9"]),
    (b"/cgi-bin/%%32%65", None),                              # malformed escape
    (b"/cgi-bin/%252e%252e/x", [b"cgi-bin", b"%2e%2e", b"x"]),  # decoded once only
]


@pytest.mark.parametrize("raw,segments", [g for g in GOOD if g[1] is not None])
def test_decoding(raw, segments):
    assert decode_segments(raw) == segments


@pytest.mark.parametrize("raw,status", [
    (b"/cgi-bin/%%32%65", 400),
    (b"/cgi-bin/%zz", 400),
    (b"/cgi-bin/%2", 400),
    (b"/../etc/passwd", 400),
    (b"/cgi-bin/../../bin/sh", 400),
    (b"/cgi-bin/%2e%2e/%2e%2e/bin/sh", 400),
    (b"/cgi-bin/x%00.sh", 400),
    (b"/cgi-bin/x.sh%0a", 400),
    (b"/cgi-bin/x.sh%0d", 400),
    (b"/cgi-bin/a%2Fb", 404),
    (b"/cgi-bin/a%2fb", 404),
    (b"/cgi-bin/a%5cb", 404),
    (b"cgi-bin/x", 400),
])
def test_refused(raw, status):
    with pytest.raises(HTTPError) as info:
        decode_segments(raw)
    assert info.value.status == status
