"""RFC 3875 section 4.1 meta-variables, built in one place.

The same builder serves a CGI child's environment, FastCGI PARAMS and a
WSGI environ (the Go `net/http/fcgi` -> `cgi.RequestFromMap` habit).  Values
are `str` holding the wire bytes decoded as latin-1, the PEP 3333
convention; `to_environb` turns them back into the exact bytes for execve.

Choices where the RFC leaves room, matching Apache's `util_script.c`:

- Request headers become `HTTP_*` with '-' turned into '_'.  A header whose
  name has any character other than a letter, digit or '-' is dropped, so
  `X_Forwarded_For` can never pose as `X-Forwarded-For`.
- `Proxy` is never passed (httpoxy: HTTP_PROXY would be taken for a proxy
  setting), nor `Transfer-Encoding` (the script gets the decoded body), nor
  `Authorization` unless `pass_authorization` is set
  (section 4.1.18), nor Content-Length/Content-Type, which become
  CONTENT_LENGTH/CONTENT_TYPE.
- Repeated headers are joined with ", " (RFC 9110 section 5.3), Cookie with
  "; " (RFC 6265 section 5.4).
- CONTENT_LENGTH is the decoded body length, set when the request has a
  body or a Content-Length field (section 4.1.2).
- PATH_INFO and PATH_TRANSLATED are set only when there is path info;
  QUERY_STRING is always set, "" when empty (section 4.1.7).
- AUTH_TYPE and REMOTE_USER are set only when the gateway authenticated the
  request (`remote_user`); the front does no authentication yet.
- HTTPS is set to "on" only for TLS connections, which the front does not
  terminate yet.
- On a unix socket REMOTE_ADDR and REMOTE_HOST are "unix:" (as nginx's
  $remote_addr) and REMOTE_PORT is not set.
"""

from __future__ import annotations

import re

from cgigate import SERVER_SOFTWARE

_HEADER_NAME_OK = re.compile(rb"[A-Za-z0-9-]+")
_HOST = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d*))?$")
# Transfer-Encoding is hop-by-hop: the script gets the decoded body and its length.
_SKIPPED = frozenset({b"proxy", b"content-length", b"content-type", b"transfer-encoding"})


def header_variable(name: bytes) -> str | None:
    """`user-agent` -> `HTTP_USER_AGENT`, or None for a name that is not passed."""
    if not _HEADER_NAME_OK.fullmatch(name):
        return None
    return "HTTP_" + name.decode("ascii").upper().replace("-", "_")


def split_host(value: bytes) -> tuple[str, str] | None:
    """`example.com:8080` -> ("example.com", "8080"); None when not a valid host."""
    m = _HOST.match(value)
    if not m:
        return None
    host = m.group(1).decode("ascii")
    if host.startswith("["):
        host = host[1:-1]
    return host.lower(), (m.group(2) or b"").decode("ascii")


def meta_variables(request, *, script_name: str, path_info: str, script_filename: str | None,
                   document_root: str | None, default_server_name: str,
                   content_length: int | None = None, pass_authorization: bool = False,
                   remote_user: str | None = None, auth_type: str | None = None,
                   https: bool = False) -> dict[str, str]:
    """The meta-variables of `request` (a cgigate.front.request.Request)."""
    env: dict[str, str] = {}
    joined: dict[str, list[bytes]] = {}
    content_type = None
    has_length = False
    for name, value in request.headers:
        if name in _SKIPPED:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                has_length = True
            continue
        if name == b"authorization" and not pass_authorization:
            continue
        variable = header_variable(name)
        if variable is None:
            continue
        joined.setdefault(variable, []).append(value)
    for variable, values in joined.items():
        separator = b"; " if variable == "HTTP_COOKIE" else b", "
        env[variable] = separator.join(values).decode("latin-1")

    client = request.client
    if isinstance(client, tuple) and client:
        env["REMOTE_ADDR"] = env["REMOTE_HOST"] = str(client[0])
        env["REMOTE_PORT"] = str(client[1])
    else:
        env["REMOTE_ADDR"] = env["REMOTE_HOST"] = "unix:"

    server = request.server
    server_port = str(server[1]) if isinstance(server, tuple) and len(server) >= 2 else ""
    # Host header, else the configured name, else the address the request came in on
    server_name = default_server_name or (str(server[0]) if isinstance(server, tuple) and server
                                          else "localhost")
    host = request.authority if request.authority is not None else request.header(b"host")
    if host:
        parsed = split_host(host)
        if parsed is not None:
            server_name = parsed[0]
            if not server_port:
                server_port = parsed[1]
    env["SERVER_NAME"] = server_name
    env["SERVER_PORT"] = server_port or "80"
    env["SERVER_PROTOCOL"] = f"HTTP/{request.version}"
    env["SERVER_SOFTWARE"] = SERVER_SOFTWARE
    env["GATEWAY_INTERFACE"] = "CGI/1.1"
    env["REQUEST_METHOD"] = request.method
    env["REQUEST_URI"] = request.target.decode("latin-1")
    env["QUERY_STRING"] = request.query.decode("latin-1")
    env["SCRIPT_NAME"] = script_name
    if script_filename is not None:
        env["SCRIPT_FILENAME"] = script_filename
    if document_root is not None:
        env["DOCUMENT_ROOT"] = document_root
    if path_info:
        env["PATH_INFO"] = path_info
        if document_root is not None:
            env["PATH_TRANSLATED"] = document_root.rstrip("/") + path_info
    if content_length is not None:
        env["CONTENT_LENGTH"] = str(content_length)
    elif has_length:
        body = request.body
        env["CONTENT_LENGTH"] = str(body.content_length if body is not None else 0)
    if content_type is not None:
        env["CONTENT_TYPE"] = content_type.decode("latin-1")
    if remote_user is not None:
        env["REMOTE_USER"] = remote_user
        env["AUTH_TYPE"] = auth_type or ""
    if https:
        env["HTTPS"] = "on"
    return env


# What a CGI script run for a FastCGI request (`cgigate fcgi --cgi-dir`) may
# receive of the web server's params: the RFC 3875 meta-variables, the
# extensions web servers commonly send, and HTTP_* request headers.
PASSED_PARAMS = frozenset({
    # RFC 3875 section 4.1
    b"AUTH_TYPE", b"CONTENT_LENGTH", b"CONTENT_TYPE", b"GATEWAY_INTERFACE", b"PATH_INFO",
    b"PATH_TRANSLATED", b"QUERY_STRING", b"REMOTE_ADDR", b"REMOTE_HOST", b"REMOTE_IDENT",
    b"REMOTE_USER", b"REQUEST_METHOD", b"SCRIPT_NAME", b"SERVER_NAME", b"SERVER_PORT",
    b"SERVER_PROTOCOL", b"SERVER_SOFTWARE",
    # Apache and nginx (fastcgi_params) extensions
    b"REQUEST_URI", b"DOCUMENT_URI", b"DOCUMENT_ROOT", b"SCRIPT_FILENAME", b"REMOTE_PORT",
    b"SERVER_ADDR", b"HTTPS", b"REQUEST_SCHEME", b"REDIRECT_STATUS", b"CONTEXT_PREFIX",
    b"CONTEXT_DOCUMENT_ROOT", b"SERVER_ADMIN", b"UNIQUE_ID",
})
_HEADER_PARAM = re.compile(rb"HTTP_[A-Z0-9_]+")   # fullmatch: "$" would let "\n" end a name


def params_variables(params, *, pass_authorization: bool = False,
                     extra: frozenset[bytes] = frozenset()) -> tuple[dict[str, str], list[str]]:
    """The meta-variables among a web server's FastCGI PARAMS, for a CGI script,
    and the names dropped.  fcgiwrap passes every param into the environment,
    so a web server config (or anyone who can reach the socket) sets PATH,
    LD_PRELOAD or BASH_ENV for the script; here only `PASSED_PARAMS`, HTTP_*
    (never HTTP_PROXY, HTTP_AUTHORIZATION only with `pass_authorization`) and
    the `extra` names an operator listed get through.  A repeated name: the
    last wins.  A value holding NUL cannot go into an environment: dropped."""
    env: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in params:
        if name in PASSED_PARAMS or name in extra:
            ok = True
        elif _HEADER_PARAM.fullmatch(name):
            ok = name != b"HTTP_PROXY" and (pass_authorization or name != b"HTTP_AUTHORIZATION")
        else:
            ok = False
        if not ok or b"\x00" in value:
            dropped.append(name.decode("latin-1"))
            continue
        env[name.decode("latin-1")] = value.decode("latin-1")
    return env, dropped


def to_environb(env: dict[str, str]) -> dict[bytes, bytes]:
    """The exact bytes for execve: latin-1 undoes the latin-1 decoding above."""
    return {k.encode("latin-1"): v.encode("latin-1") for k, v in env.items()}
