"""Request paths: percent-decoded once, dot segments removed, hostile input refused.

The policy, chosen to match Apache's defaults and to leave nothing for a
later layer to misread:

- `%XX` escapes are decoded exactly once (so `%252e` is the literal name
  `%2e`, never `.`); a malformed escape is 400.
- An encoded slash (`%2F`) or backslash (`%5C`) is 404, as Apache's
  `AllowEncodedSlashes Off`: it must not be able to hide a separator from the
  check that decides which script runs.
- A decoded NUL or other control character (`%00`, `%0a`) is 400: such a
  name cannot go into an environment variable or an argv, and `%0a` is the
  CVE-2019-11043 trigger.
- Empty and `.` segments are dropped (`//cgi-bin/./x` is `/cgi-bin/x`), and
  `..` removes the segment before it (RFC 3986 section 5.2.4); a `..` that
  would climb above the root is 400.

The result is a list of decoded segments (bytes); routing and the script
lookup work only on those.
"""

from __future__ import annotations

import re

from cgigate.errors import HTTPError

_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def decode_segments(raw_path: bytes) -> list[bytes]:
    if not raw_path.startswith(b"/"):
        raise HTTPError(400, f"path {raw_path[:100]!r} does not start with '/'")
    if b"%" in raw_path:
        if raw_path.count(b"%") != len(_ESCAPE.findall(raw_path)):
            raise HTTPError(400, f"malformed percent-escape in {raw_path[:200]!r}")
        lowered = raw_path.lower()
        if b"%2f" in lowered or b"%5c" in lowered:
            raise HTTPError(404, f"encoded slash in {raw_path[:200]!r} (not allowed)")
        decoded = _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), raw_path)
    else:
        decoded = raw_path
    if _CONTROL.search(decoded):
        raise HTTPError(400, f"control character in path {raw_path[:200]!r}")
    segments: list[bytes] = []
    for segment in decoded.split(b"/"):
        if segment == b"" or segment == b".":
            continue
        if segment == b"..":
            if not segments:
                raise HTTPError(400, f"path {raw_path[:200]!r} climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    return segments
