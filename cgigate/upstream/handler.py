"""Answering one HTTP request with a FastCGI RESPONDER (FastCGI section 6.2).

How this works, in order:

1. a chunked request body is read into a spool (memory, then a temporary
   file), as the CGI handler does, so that CONTENT_LENGTH can be sent:
   php-fpm and most applications read exactly CONTENT_LENGTH bytes of
   FCGI_STDIN and would otherwise see no body;
2. the PARAMS are the RFC 3875 meta-variables from `cgi.environ`, the same
   builder as for CGI: SCRIPT_NAME is the route prefix without its trailing
   slash, PATH_INFO the rest of the decoded path, with a leading slash;
3. `pool.Pool.begin` sends BEGIN_REQUEST and PARAMS (sections 5.1, 5.2) on
   a pooled connection; a task then streams the body as FCGI_STDIN
   (section 5.3), waiting for the connection to drain, while this one reads
   FCGI_STDOUT, so neither side can fill a buffer and block the other;
4. STDOUT is a CGI response (section 6.2: "the same as CGI/1.1"), parsed
   with `cgi.response.ResponseHeadParser` and relayed as it arrives;
   FCGI_STDERR lines go to the error log, tagged with the request id;
5. END_REQUEST (section 5.5) ends the response.  Its protocolStatus
   FCGI_OVERLOADED or FCGI_CANT_MPX_CONN is 503, FCGI_UNKNOWN_ROLE 502.

Every way out (done, timeout, client gone, error) goes through one
`finally` that gives the FastCGI request up if END_REQUEST has not come
(FCGI_ABORT_REQUEST, or closing a connection that does not multiplex).
Failures: no connection is 502 (504 when connecting timed out), a
connection that closes or breaks the protocol mid-request 502, the route's
timeout 504; once the response has started, the client's connection is
cut instead, so a partial response cannot look complete.
"""

from __future__ import annotations

import asyncio
import logging

from cgigate.cgi.environ import meta_variables
from cgigate.cgi.handler import LocalRedirect, relay_document, warn_dropped
from cgigate.cgi.response import CGIResponseError, ResponseHeadParser
from cgigate.errors import ClientDisconnected, HTTPError
from cgigate.fastcgi.records import CANT_MPX_CONN, OVERLOADED, REQUEST_COMPLETE, UNKNOWN_ROLE
from cgigate.front.request import spooled_if_chunked
from cgigate.upstream.pool import ConnectFailed, ConnectionBroken, Exchange, Pool, PoolFull, UpstreamError

log = logging.getLogger("cgigate.error")

READ_SIZE = 65536
REDIRECT_DRAIN_LIMIT = 1024 * 1024   # body of a local redirect read and dropped, to keep the connection
RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROTOCOL_STATUS = {CANT_MPX_CONN: "FCGI_CANT_MPX_CONN", OVERLOADED: "FCGI_OVERLOADED",
                   UNKNOWN_ROLE: "FCGI_UNKNOWN_ROLE"}


class FastCGIHandler:
    """Serves one route from the FastCGI application at `address`.

    `config` is the daemon's `Config` (server.server_name, server.max_body_size
    and cgi.max_response_header_size are used); `timeout` bounds the whole
    exchange (default: cgi.timeout).  Unlike a CGI script, an application
    gets HTTP_AUTHORIZATION unless `pass_authorization` is False: it does its
    own authentication (nginx's fastcgi_params and Apache's mod_proxy_fcgi
    pass it too).  `pool` lets routes to
    the same address share connections; without it the handler makes its own
    from `pool_options` (see `Pool`).  `script_filename` and `document_root`
    become SCRIPT_FILENAME and DOCUMENT_ROOT (php-fpm needs the first to be
    the PHP file); `params` are extra PARAMS, set last, so they override.
    """

    def __init__(self, address: str, route_prefix: str, config, timeout: float | None = None, *,
                 pool: Pool | None = None, script_filename: str | None = None,
                 document_root: str | None = None, params: dict[str, str] | None = None,
                 pass_authorization: bool = True, **pool_options):
        self.address = address
        self.prefix = route_prefix.rstrip("/") + "/"
        self.script_name = route_prefix.rstrip("/")
        self.pool = pool if pool is not None else Pool(address, **pool_options)
        self.server_config = config.server
        self.max_head = config.cgi.max_response_header_size
        self.pass_authorization = pass_authorization
        self.timeout = timeout if timeout is not None else config.cgi.timeout
        self.script_filename = script_filename
        self.document_root = document_root
        self.extra_params = dict(params or {})
        self.label = f"fastcgi:{address}"

    async def handle(self, request, response, segments: list[bytes]):
        async with spooled_if_chunked(request.body, self.server_config.max_body_size) as (spool, length):
            params = self._params(request, segments, length)
            return await self._run(request, response, params, spool)

    def _params(self, request, segments: list[bytes], content_length: int | None):
        """The PARAMS, as (name, value) bytes: the meta-variables encoded back to wire bytes."""
        path_info = "/" + b"/".join(segments).decode("latin-1")
        if segments and request.path.endswith(b"/"):
            path_info += "/"     # /app/admin/ and /app/admin are different to most applications
        env = meta_variables(
            request, script_name=self.script_name, path_info=path_info,
            script_filename=self.script_filename or self.script_name or "/",
            document_root=self.document_root,
            default_server_name=self.server_config.server_name,
            content_length=content_length, pass_authorization=self.pass_authorization)
        env.update(self.extra_params)
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in env.items()]

    async def _run(self, request, response, params, spool):
        tag = f"rid={request.request_id} fastcgi={self.address}"

        def on_stderr(line: bytes) -> None:
            log.warning("%s stderr: %s", tag, line.decode("utf-8", "backslashreplace"))

        loop = asyncio.get_running_loop()
        has_body = request.body is not None
        # Each retry spends one reused connection the application closed (a worker
        # recycled, or a pool reloading closes several at once), so at most that many.
        retries = self.pool.max_connections if not has_body and request.method in RETRY_METHODS else 0
        exchange: Exchange | None = None
        feeder: asyncio.Task | None = None
        outcome = "client gone"
        try:
            async with asyncio.timeout_at(loop.time() + self.timeout):
                while True:
                    exchange = await self.pool.begin(params, on_stderr, stdin_empty=not has_body)
                    if has_body:
                        feeder = loop.create_task(_feed(exchange, request.body, spool))
                    try:
                        result = await self._relay(response, exchange, tag)
                        break
                    except ConnectionBroken as e:
                        if not (retries and exchange.reused and exchange.records == 0 and not e.protocol):
                            raise
                        # A reused connection the application closed just as we
                        # sent on it (php-fpm's pm.max_requests, a reload): nothing
                        # was answered, a bodiless GET is safe to send again.
                        retries -= 1
                        log.info("%s reused connection closed before any answer; retrying on another",
                                 tag)
            outcome = "done"
            return result
        except TimeoutError:
            outcome = "timeout"
            if exchange is None:
                pool = self.pool
                message = (f"had no free connection within the route's {self.timeout:g}s timeout "
                           f"({pool.active} requests on {len(pool.connections)} connections)")
            else:
                message = f"did not finish within the route's {self.timeout:g}s timeout; request aborted"
            if not response.started:
                raise HTTPError(504, f"fastcgi={self.address} {message}") from None
            log.error("%s %s; response cut short", tag, message)
            request.connection.close()
            raise ClientDisconnected() from None
        except UpstreamError as e:
            outcome = "error"
            raise self._http_error(e, request, response) from None
        except HTTPError:
            outcome = "error"
            raise
        finally:
            if feeder is not None:
                feeder.cancel()
            if exchange is not None:
                how = exchange.finish()
                if how is not None and outcome == "client gone":
                    log.warning("%s client went away; %s", tag, "FCGI_ABORT_REQUEST sent"
                                if how == "abort" else "connection to the application closed")

    def _http_error(self, e: UpstreamError, request, response) -> HTTPError:
        if isinstance(e, ConnectFailed):
            return HTTPError(504 if e.timed_out else 502, e.detail)
        if isinstance(e, PoolFull):
            return HTTPError(503, e.detail, headers=(("Retry-After", "1"),))
        if response.started:
            request.connection.close()   # a response cut short must not look complete
            return HTTPError(502, f"{e.detail}; response cut short")
        return HTTPError(502, e.detail)

    async def _relay(self, response, exchange: Exchange, tag: str):
        parser = ResponseHeadParser(self.max_head)
        head = None
        while head is None:
            data = await exchange.read()
            if not data:
                end = await exchange.wait_end()
                self._check_end(end, exchange)
                try:
                    parser.eof()
                except CGIResponseError as e:
                    raise HTTPError(502, f"fastcgi={self.address} {e.detail}"
                                    f"{_describe_status(end.app_status)}") from None
            try:
                head = parser.feed(data)
            except CGIResponseError as e:
                raise HTTPError(502, f"fastcgi={self.address} {e.detail}") from None
        warn_dropped(head, tag)
        if head.kind == "local-redirect":
            await _drain_quietly(exchange)
            return LocalRedirect(head.location)
        await relay_document(response, head, exchange.read)
        end = await exchange.wait_end()
        if end.protocol_status != REQUEST_COMPLETE:
            log.warning("%s END_REQUEST with %s after a response", tag,
                        PROTOCOL_STATUS.get(end.protocol_status, f"protocolStatus {end.protocol_status}"))
        if end.app_status:
            log.warning("%s application status %d", tag, end.app_status)
        if exchange.error is not None:
            raise exchange.error   # the request body failed: what came is not the whole answer
        await response.end()
        return None

    def _check_end(self, end, exchange: Exchange) -> None:
        """END_REQUEST with no response: was the request refused?"""
        status = end.protocol_status
        if status in (OVERLOADED, CANT_MPX_CONN):
            raise HTTPError(503, f"fastcgi={self.address} refused request {exchange.rid} with "
                            f"{PROTOCOL_STATUS[status]}", headers=(("Retry-After", "1"),))
        if status != REQUEST_COMPLETE:
            name = PROTOCOL_STATUS.get(status, f"protocolStatus {status}")
            raise HTTPError(502, f"fastcgi={self.address} refused request {exchange.rid} with {name}"
                            + (" (it does not serve the RESPONDER role)" if status == UNKNOWN_ROLE else ""))


async def _feed(exchange: Exchange, body, spool) -> None:
    """The request body as FCGI_STDIN, then its empty end record.  Stops quietly
    when the application ended the request without reading it all."""
    try:
        if spool is not None:
            while data := spool.read(READ_SIZE):
                if not await exchange.send_stdin(data):
                    return
        else:
            while data := await body.read():
                if not await exchange.send_stdin(data):
                    return
        exchange.end_stdin()
    except (HTTPError, ClientDisconnected) as e:
        exchange.fail(e)        # the client stalled or left mid-body: the reader raises it
    except UpstreamError:
        pass                    # the reader sees the connection's failure itself


async def _drain_quietly(exchange: Exchange) -> None:
    """Read a local redirect's body to END_REQUEST so the connection can serve
    again; past REDIRECT_DRAIN_LIMIT bytes it is given up instead."""
    dropped = 0
    try:
        while data := await exchange.read():
            dropped += len(data)
            if dropped > REDIRECT_DRAIN_LIMIT:
                return
        await exchange.wait_end()
    except UpstreamError:
        pass


def _describe_status(app_status: int) -> str:
    return f"; application status {app_status}" if app_status else ""

