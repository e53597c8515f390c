"""The FastCGI client side of the HTTP front: routes answered by a FastCGI
application (flup, php-fpm, `cgigate fcgi`) instead of a CGI script.

How this works.  `pool.Pool` holds the connections to one application
address and learns, with FCGI_GET_VALUES (FastCGI section 4.1), whether it
may run several requests on one connection (section 3.3, multiplexing);
`pool.Exchange` is one request on one of those connections.
`handler.FastCGIHandler` is the route handler: it turns an HTTP request
into BEGIN_REQUEST, PARAMS and STDIN (sections 5.1-5.3) and the STDOUT
stream back into an HTTP response (a CGI response, RFC 3875 section 6).
The bytes of the protocol come from `cgigate.fastcgi`; nothing here
encodes a record by hand.
"""

from cgigate.upstream.handler import FastCGIHandler
from cgigate.upstream.pool import (
    ConnectFailed, ConnectionBroken, Exchange, Pool, PoolFull, UpstreamError, parse_address)

__all__ = ["FastCGIHandler", "Pool", "Exchange", "UpstreamError", "ConnectFailed", "ConnectionBroken",
           "PoolFull", "parse_address"]
