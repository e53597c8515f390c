"""`[[route]] return = "TEXT"`: the front answers by itself, like nginx's
`return 200 "TEXT"`.

No backend, no process, no socket: this is the floor of what any request
costs through cgigate (HTTP parsing, routing, the access log, one write),
which is what `cgigate demo` compares every backend with.  It also serves
as a health check that does not depend on any script or worker.
"""

from __future__ import annotations


class FixedHandler:
    """200 text/plain with the route's text, to any method (HEAD gets no body)."""

    def __init__(self, route):
        self.label = f"return:{route.prefix}"
        body = route.text.encode("utf-8")
        self.body = body
        self.headers = [(b"Content-Type", b"text/plain; charset=utf-8"),
                        (b"Content-Length", b"%d" % len(body))]

    async def handle(self, request, response, segments: list[bytes]):
        if request.body is not None:
            request.body.discard()
        response.start(200, self.headers)
        await response.write(self.body)
        await response.end()
