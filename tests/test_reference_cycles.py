"""A finished request must leave no reference cycles behind.

Every cycle per request is garbage only the cyclic collector can free: at
1,000 scripts a second that made full collections of ~10,000 objects, 40 ms
pauses in the middle of requests.  These run a real script on a real event
loop, with the collector off, and count what `gc.collect()` then finds."""

from __future__ import annotations

import asyncio
import gc
import os

from cgigate import config as configuration
from cgigate.cgi.spawn import spawn
from cgigate.fastcgi import ClientConnection
from cgigate.fastcgi import events as ev
from cgigate.worker.scripts import FastCGIConnection, ScriptServer
from conftest import SAMPLE_CGI_BIN


def cyclic_garbage_after(make_requests) -> int:
    async def main() -> int:
        await make_requests()              # once, so lazily created state exists
        gc.collect()
        gc.disable()
        try:
            await make_requests()
            await asyncio.sleep(0.05)
            return gc.collect()
        finally:
            gc.enable()
    return asyncio.run(main())


def test_a_reaped_script_leaves_no_cycle():
    async def run_scripts():
        for _ in range(3):
            child = spawn([b"/bin/sh", b"-c", b"echo hi; echo there >&2"], {}, b"/", lambda: "test", False, 0.5)
            while await child.stdout.read():
                pass
            await child.exited
            child.close_pipes()
            while not child.reaped:
                await asyncio.sleep(0.01)
    assert cyclic_garbage_after(run_scripts) == 0


class Transport(asyncio.Transport):
    """What the connection writes, kept; enough of a transport for the glue."""

    def __init__(self):
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data):
        self.out += data

    def close(self):
        self.closed = True

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def test_a_finished_fastcgi_request_leaves_no_cycle():
    config = configuration.load(None, {"fcgi.cgi_dir": SAMPLE_CGI_BIN})
    config.fcgi.cgi_dir = os.path.realpath(SAMPLE_CGI_BIN)

    async def run_requests():
        server = ScriptServer(config, 4, 4)
        for _ in range(3):
            conn = FastCGIConnection(server)
            transport = Transport()
            conn.connection_made(transport)
            client = ClientConnection()
            params = [(b"SCRIPT_FILENAME", os.fsencode(os.path.join(SAMPLE_CGI_BIN, "hello.sh"))),
                      (b"REQUEST_METHOD", b"GET"), (b"CONTENT_LENGTH", b"")]
            conn.data_received(client.begin_request(1, params) + client.end_stdin(1))
            events = []
            while not any(isinstance(e, ev.EndRequest) for e in events):
                await asyncio.sleep(0.01)
                events += client.receive_data(bytes(transport.out))
                transport.out.clear()
            assert b"Hello, world!" in b"".join(e.data for e in events if isinstance(e, ev.StdoutData))
            conn.connection_lost(None)
            await asyncio.sleep(0.05)     # the script reaped
    assert cyclic_garbage_after(run_requests) == 0
