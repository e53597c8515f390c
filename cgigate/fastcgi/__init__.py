"""FastCGI 1.0 (Open Market, 1996) without I/O: records, name-value pairs,
and the two sides of a connection.  See records.py and connection.py."""

from cgigate.fastcgi.connection import ClientConnection, ServerConnection
from cgigate.fastcgi.records import LimitExceeded, ProtocolError

__all__ = ["ClientConnection", "ServerConnection", "ProtocolError", "LimitExceeded"]
