"""Configuration: every option is declared once, here.

Each `Setting` names its TOML section and key, its type, its default, its
help text and (optionally) its command-line flag.  The TOML loader, the
`serve` flags, `--help` and `check-config` are all generated from the table
below, so an option cannot exist in one place and be missing in another
(the gunicorn `config.py` habit).

A bad value raises `ConfigError`, which names the file, the key and what to
do about it.  Relative paths in a file are taken relative to that file's
directory; on the command line, relative to the working directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable


class ConfigError(Exception):
    """A configuration problem, with where it is and what is wrong."""

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + reason)


# --- value converters: (raw value) -> value, raising ValueError(reason) ---

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def to_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 65536 or \"64k\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 65536, \"64k\", \"100M\" or \"1G\", got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def to_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def to_seconds_or_off(value: Any) -> float:
    """Seconds, or 0 for "off"."""
    if value in (0, "0", "off"):
        return 0.0
    return to_seconds(value)


def to_url_path(value: Any) -> str:
    """A URL path such as "/status", or "" for off."""
    text = to_str(value)
    if text and (not text.startswith("/") or any(c in text for c in "?#% ")):
        raise ValueError(f"want a plain URL path starting with '/', or \"\" for off; got {text!r}")
    return text


def to_pm(value: Any) -> str:
    text = to_str(value)
    if text not in ("static", "dynamic", "ondemand"):
        raise ValueError(f"want static, dynamic or ondemand, got {text!r}")
    return text


def to_count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"expected a whole number >= 0, got {value!r}")


def to_positive_count(value: Any) -> int:
    number = to_count(value)
    if number < 1:
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    return number


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def to_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return list(value)


def to_networks(value: Any) -> list[str]:
    """Client addresses or CIDR networks, as a list or one comma-separated string; "any" for all."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    for entry in to_str_list(value):
        if entry != "any":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an address or network; write one like "
                                 "\"192.0.2.10\", \"10.0.0.0/8\" or \"::1\", or \"any\"") from None
    return list(value)


def to_env_names(value: Any) -> list[str]:
    names = to_str_list(value)
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{name!r} is not an environment variable name (letters, digits, '_')")
    return names


def to_str_table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"expected a table of strings, got {value!r}")
    return dict(value)


def to_log_level(value: Any) -> str:
    text = to_str(value).lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ValueError(f"expected one of debug, info, warning, error; got {value!r}")
    return text


def to_octal_mode(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        try:
            mode = int(str(value), 8)
        except ValueError:
            raise ValueError(f"expected an octal file mode such as \"0660\", got {value!r}") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"expected a file mode between 0000 and 0777, got {value!r}")
    return mode


@dataclass(frozen=True)
class Bind:
    """One listening address: TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1          # an inherited listening socket (spawn-fcgi, systemd)

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        if self.fd >= 0:
            return f"fd:{self.fd}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_bind(text: str, base_dir: str | None = None) -> Bind:
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a socket path, as in unix:/run/cgigate.sock")
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        return Bind(path=os.path.abspath(path))
    if text.startswith("fd:"):
        if not text[3:].isdigit():
            raise ValueError(f"fd: needs a descriptor number, as in fd:0, got {text!r}")
        return Bind(fd=int(text[3:]))
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)|(\d+)", text.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT, [IPv6]:PORT, PORT, unix:PATH or fd:N, got {text!r}")
    host = m.group(1) or m.group(3) or "127.0.0.1"
    port = int(m.group(2) or m.group(4) or m.group(5))
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return Bind(host=host, port=port)


def to_binds(value: Any) -> list[str]:
    binds = to_str_list(value)
    if not binds:
        raise ValueError("at least one address is needed, as in [\"127.0.0.1:8080\"]")
    for text in binds:
        parse_bind(text)
    return binds


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    flag: str | None = None
    metavar: str | None = None
    is_path: bool = False

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # [server]: the HTTP/1.1 front
    S("server", "bind", to_binds, ["127.0.0.1:8080"],
      "Address to listen on: HOST:PORT, [IPv6]:PORT or unix:PATH. Repeat the flag for several.",
      flag="--bind", metavar="ADDR"),
    S("server", "unix_socket_mode", to_octal_mode, 0o660,
      "File mode of unix sockets the server creates (octal)."),
    S("server", "server_name", to_str, "",
      "SERVER_NAME when the request has no usable Host header (default: the bound address)."),
    S("server", "processes", to_positive_count, 1,
      "Front processes sharing the listening sockets; more than 1 spreads the gateway's own work over "
      "several cores.  max_connections, max_children and queue_size are divided among them.",
      flag="--processes", metavar="N"),
    S("server", "max_connections", to_positive_count, 1024,
      "Open client connections at most; past it new connections get 503 and are closed.",
      flag="--max-connections", metavar="N"),
    S("server", "keepalive_timeout", to_seconds, 5.0,
      "Seconds an idle keep-alive connection is kept open between requests.",
      flag="--keepalive-timeout", metavar="SECONDS"),
    S("server", "read_timeout", to_seconds, 30.0,
      "Seconds a client has to send a whole request head, and at most between two parts of a body (408 after).",
      flag="--read-timeout", metavar="SECONDS"),
    S("server", "max_request_line", to_size, 8192,
      "Longest request target (URI) in bytes; longer gets 414."),
    S("server", "max_header_size", to_size, 65536,
      "Largest request head (request line and all header lines) in bytes; larger gets 431."),
    S("server", "max_headers", to_positive_count, 100,
      "Most header fields in one request; more gets 431."),
    S("server", "max_body_size", to_size, 1024**3,
      "Largest request body in bytes (\"100M\", \"1G\"); larger gets 413.",
      flag="--max-body-size", metavar="SIZE"),
    S("server", "graceful_timeout", to_seconds, 30.0,
      "On SIGTERM or SIGINT, seconds in-flight requests get to finish before they are cut.",
      flag="--graceful-timeout", metavar="SECONDS"),
    S("server", "access_log", to_str, "-",
      "Access log file: a path, \"-\" for standard output, or \"off\".",
      flag="--access-log", metavar="PATH", is_path=True),
    S("server", "error_log", to_str, "-",
      "Error log file: a path or \"-\" for standard error.",
      flag="--error-log", metavar="PATH", is_path=True),
    S("server", "log_level", to_log_level, "info",
      "Error log level: debug, info, warning or error.", flag="--log-level", metavar="LEVEL"),
    # [cgi]: defaults for every CGI route
    S("cgi", "timeout", to_seconds, 60.0,
      "Wall-clock seconds a CGI script may run; then its process group is killed and the client gets 504. "
      "A [[route]] may set its own.", flag="--timeout", metavar="SECONDS"),
    S("cgi", "kill_grace", to_seconds, 2.0,
      "Seconds between SIGTERM and SIGKILL when a script's process group is killed."),
    S("cgi", "max_children", to_positive_count, 64,
      "CGI scripts running at once at most; further requests wait in the queue.",
      flag="--max-children", metavar="N"),
    S("cgi", "queue_size", to_count, 256,
      "Requests that may wait for a free CGI slot; past it they get 503."),
    S("cgi", "queue_timeout", to_seconds, 30.0,
      "Seconds a request may wait in the queue before it gets 503."),
    S("cgi", "env_pass", to_str_list, ["PATH", "LANG", "TZ"],
      "Variables of the daemon's own environment passed on to scripts; nothing else of it is."),
    S("cgi", "env", to_str_table, {},
      "Fixed variables set for every script, as a table: env = { APP_MODE = \"demo\" }."),
    S("cgi", "interpreters", to_str_table, {},
      "Interpreter for a file extension, so files need no execute bit: { \".py\" = \"python3\" }."),
    S("cgi", "pass_authorization", to_bool, False,
      "Pass the Authorization header as HTTP_AUTHORIZATION (RFC 3875 section 4.1.18 advises against)."),
    S("cgi", "isindex_argv", to_bool, True,
      "Give a query with no '=' to the script as command-line words (RFC 3875 section 4.4)."),
    S("cgi", "document_root", to_str, "",
      "DOCUMENT_ROOT, and the base of PATH_TRANSLATED (default: the route's CGI directory).", is_path=True),
    S("cgi", "local_redirect_limit", to_count, 5,
      "Local redirects (RFC 3875 section 6.2.2) followed for one request before it gets 500."),
    S("cgi", "max_response_header_size", to_size, 65536,
      "Largest header block a script may print; larger gets 502."),
    S("cgi", "limit_cpu_seconds", to_count, 0,
      "RLIMIT_CPU for each script, in CPU seconds (0: no limit)."),
    S("cgi", "limit_address_space", to_size, 0,
      "RLIMIT_AS for each script, in bytes (0: no limit)."),
    S("cgi", "limit_open_files", to_count, 0,
      "RLIMIT_NOFILE for each script (0: no limit)."),
    # [status]: the front's status page and health check
    S("status", "path", to_url_path, "",
      "URL path of the status page (\"\" : off): JSON, ?html or ?prometheus; the front's counters per "
      "route, the CGI side and every app pool's workers."),
    S("status", "ping_path", to_url_path, "",
      "URL path answering \"pong\" while every app pool is healthy, else 503 (\"\" : off)."),
    S("status", "allow", to_networks, ["127.0.0.1", "::1"],
      "Addresses or networks (CIDR) that may see the status page and ping; others get 403.  "
      "[\"any\"] allows everyone; unix-socket clients always may."),
    # [fcgi]: `cgigate fcgi`, FastCGI workers hosting a WSGI app or running CGI scripts
    S("fcgi", "bind", to_binds, ["127.0.0.1:9000"],
      "Address the workers listen on for FastCGI: HOST:PORT, unix:PATH, or fd:N for a socket "
      "inherited as descriptor N (spawn-fcgi passes fd:0).  Ignored under systemd socket activation "
      "(LISTEN_FDS).  Repeat the flag for several.",
      flag="--bind", metavar="ADDR"),
    S("fcgi", "app", to_str, "",
      "The WSGI application, as MODULE:CALLABLE.  Give this or cgi_dir.",
      flag="--app", metavar="MODULE:CALLABLE"),
    S("fcgi", "cgi_dir", to_str, "",
      "Run CGI scripts instead of an app, as fcgiwrap does: each request runs the file SCRIPT_FILENAME "
      "names (else DOCUMENT_ROOT + SCRIPT_NAME), which must lie inside this directory.  The [cgi] "
      "settings apply.", flag="--cgi-dir", metavar="DIR", is_path=True),
    S("fcgi", "allowed_clients", to_networks, ["127.0.0.1", "::1"],
      "Addresses or networks (CIDR) allowed to connect over TCP; other connections are closed and "
      "logged (php-fpm's listen.allowed_clients).  [\"any\"] allows everyone.  Unix sockets are "
      "guarded by their file mode instead.", flag="--allowed-clients", metavar="ADDR,..."),
    S("fcgi", "pass_params", to_env_names, [],
      "CGI mode: further FastCGI params passed into a script's environment, by name.  By default only "
      "the RFC 3875 meta-variables, the common web-server extensions (REQUEST_URI, DOCUMENT_ROOT, "
      "SCRIPT_FILENAME, HTTPS, ...) and HTTP_* get through: never PATH, LD_PRELOAD or BASH_ENV from "
      "a web server."),
    S("fcgi", "x_accel_redirect", to_bool, True,
      "CGI mode: answer a script's local redirect (RFC 3875 section 6.2.2, `Location: /path` alone) "
      "with an X-Accel-Redirect header next to the Location, so that nginx serves /path itself as "
      "a GET, as the RFC asks of the server."),
    S("fcgi", "workers", to_positive_count, 2,
      "Worker processes sharing the listening socket: how many (pm static), or the most (dynamic, "
      "ondemand).  One that dies is replaced.", flag="--workers", metavar="N"),
    S("fcgi", "threads", to_positive_count, 1,
      "Application threads per worker.  More than 1 lets a connection multiplex (FCGI_MPXS_CONNS=1) "
      "that many requests.", flag="--threads", metavar="T"),
    S("fcgi", "pm", to_pm, "static",
      "App pool mode, as php-fpm's: static (`workers` always), dynamic (between min_spare and max_spare "
      "idle workers, at most `workers`), ondemand (started when a request waits, stopped after "
      "idle_worker_timeout).", flag="--pm", metavar="MODE"),
    S("fcgi", "min_spare", to_positive_count, 1,
      "pm dynamic: start workers while fewer than this are idle.", flag="--min-spare", metavar="N"),
    S("fcgi", "max_spare", to_positive_count, 2,
      "pm dynamic: stop an idle worker a second while more than this are idle.",
      flag="--max-spare", metavar="N"),
    S("fcgi", "start_workers", to_count, 0,
      "pm dynamic: workers at start (0: halfway between min_spare and max_spare)."),
    S("fcgi", "idle_worker_timeout", to_seconds, 10.0,
      "pm ondemand: a worker idle this many seconds stops.", flag="--idle-worker-timeout", metavar="SECONDS"),
    S("fcgi", "max_requests", to_count, 0,
      "A worker that has served this many requests finishes and is replaced (0: never).  Guards "
      "against leaks.", flag="--max-requests", metavar="N"),
    S("fcgi", "max_requests_jitter", to_count, 0,
      "Up to this many more, at random per worker, so that workers do not all restart together.",
      flag="--max-requests-jitter", metavar="N"),
    S("fcgi", "max_rss", to_size, 0,
      "A worker whose resident memory grows past this (bytes, or \"512M\") finishes its requests and "
      "is replaced (0: no ceiling).", flag="--max-rss", metavar="SIZE"),
    S("fcgi", "request_timeout", to_seconds_or_off, 0.0,
      "A request running longer is answered 504, its Python stack logged, and its worker replaced "
      "(0: off).  Behind cgigate's front, the route timeout answers first.",
      flag="--request-timeout", metavar="SECONDS"),
    S("fcgi", "slow_request_timeout", to_seconds_or_off, 0.0,
      "A request running longer has its Python stack logged, once, and is left to run (0: off).",
      flag="--slow-request-timeout", metavar="SECONDS"),
    S("fcgi", "status_path", to_url_path, "",
      "App mode: a request whose SCRIPT_NAME + PATH_INFO is this path gets the pool's status (JSON, "
      "?html, ?prometheus) instead of the app, as php-fpm's pm.status_path (\"\" : off).  Guard it in "
      "the web server.", flag="--status-path", metavar="PATH"),
    S("fcgi", "ping_path", to_url_path, "",
      "App mode: a request for this path gets \"pong\" (php-fpm's ping.path; \"\" : off).",
      flag="--ping-path", metavar="PATH"),
    S("fcgi", "unix_socket_mode", to_octal_mode, 0o660,
      "File mode of a unix socket (octal).", flag="--socket-mode", metavar="MODE"),
    S("fcgi", "unix_socket_owner", to_str, "",
      "Owner of a unix socket, USER or USER:GROUP (default: unchanged).",
      flag="--socket-owner", metavar="USER[:GROUP]"),
    S("fcgi", "unix_socket_group", to_str, "",
      "Group of a unix socket, so that a web server in that group can connect (default: unchanged).",
      flag="--socket-group", metavar="GROUP"),
    S("fcgi", "max_conns", to_positive_count, 64,
      "CGI mode: FastCGI connections one worker serves at once (its FCGI_MAX_CONNS).  An app worker "
      "takes up to eight per thread, idle workers first.", flag="--max-conns", metavar="N"),
    S("fcgi", "idle_timeout", to_seconds, 60.0,
      "Seconds a connection may sit idle, or stall inside a record, before it is closed."),
    S("fcgi", "graceful_timeout", to_seconds, 30.0,
      "On SIGTERM or SIGINT, seconds running requests get to finish.",
      flag="--graceful-timeout", metavar="SECONDS"),
)
del S

SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))
ROUTE_KEYS = {
    "prefix": "URL prefix, such as \"/cgi-bin/\" or \"/\".",
    "cgi_dir": "Directory whose executable files are run as CGI scripts under the prefix.",
    "fastcgi": "Address of a FastCGI responder (flup, php-fpm, cgigate fcgi): HOST:PORT or unix:PATH.",
    "app": "A WSGI application, MODULE:CALLABLE, run by a pool of cgigate fcgi workers the daemon starts.",
    "return": "Text the front answers with by itself (200 text/plain), like nginx's `return 200 TEXT`.",
    "workers": "For an app route: worker processes (default 2).",
    "threads": "For an app route: threads per worker (default 1; more multiplexes).",
    "timeout": "This route's timeout in seconds (overrides [cgi] timeout).",
    "queue_size": "For an app or fastcgi route: requests that may wait for a free connection to it; "
                  "one more gets 503 (default 256).",
}
ROUTE_KINDS = ("cgi_dir", "fastcgi", "app", "return")


@dataclass
class Route:
    prefix: str
    cgi_dir: str = ""
    timeout: float | None = None
    fastcgi: str = ""       # address of an external FastCGI responder
    app: str = ""           # MODULE:CALLABLE served by workers the daemon starts
    scoreboard: str = ""    # app: the pool's scoreboard file, for the status page
    text: str | None = None  # `return`: what the front answers with by itself
    workers: int = 2
    threads: int = 1
    queue_size: int = 256

    @property
    def kind(self) -> str:
        if self.text is not None:
            return "return"
        return "app" if self.app else "fastcgi" if self.fastcgi else "cgi"


@dataclass
class Config:
    server: SimpleNamespace
    cgi: SimpleNamespace
    fcgi: SimpleNamespace = field(default_factory=SimpleNamespace)
    status: SimpleNamespace = field(default_factory=SimpleNamespace)
    routes: list[Route] = field(default_factory=list)
    source: str = "(built-in defaults)"
    binds: list[Bind] = field(default_factory=list)
    fcgi_binds: list[Bind] = field(default_factory=list)
    interpreters: dict[str, list[str]] = field(default_factory=dict)


def _normalise_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise ValueError(f"a prefix must start with '/', got {prefix!r}")
    if any(seg in (".", "..") for seg in prefix.split("/")) or "%" in prefix:
        raise ValueError(f"a prefix must be a plain path with no '.', '..' or '%', got {prefix!r}")
    return prefix.rstrip("/") + "/"


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def load(path: str | None = None, overrides: dict[str, Any] | None = None,
         cli_routes: list[dict[str, Any]] | None = None) -> Config:
    """Read `path` (or nothing), apply command-line `overrides` by setting name,
    add `cli_routes` (route tables, as in [[route]]) and check every value."""
    raw: dict[str, Any] = {}
    source = "(built-in defaults)"
    base_dir = os.getcwd()
    if path:
        source = path
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(path, "", "no such file; give an existing TOML file with -c, "
                              "or run `cgigate serve --cgi-dir DIR` without one") from None
        except OSError as e:
            raise ConfigError(path, "", f"cannot read it: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(path, "", f"not valid TOML: {e}") from None
        base_dir = os.path.dirname(os.path.abspath(path))

    by_section = {sec: {s.key: s for s in SETTINGS if s.section == sec} for sec in SECTIONS}
    for top, value in raw.items():
        if top == "route":
            continue
        if top not in by_section:
            raise ConfigError(source, top, "unknown section" + _suggest(top, [*SECTIONS, "route"]))
        if not isinstance(value, dict):
            raise ConfigError(source, top, f"expected a [{top}] table")
        for key in value:
            if key not in by_section[top]:
                raise ConfigError(source, f"[{top}] {key}", "unknown key" + _suggest(key, by_section[top]))

    sections: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
    overrides = overrides or {}
    for s in SETTINGS:
        from_cli = s.name in overrides
        value = overrides[s.name] if from_cli else raw.get(s.section, {}).get(s.key, s.default)
        where = f"{s.flag}" if from_cli else f"[{s.section}] {s.key}"
        try:
            value = s.convert(value)
        except ValueError as e:
            raise ConfigError("command line" if from_cli else source, where, str(e)) from None
        if s.is_path and value and value not in ("-", "off") and not os.path.isabs(value):
            value = os.path.abspath(os.path.join(os.getcwd() if from_cli else base_dir, value))
        sections[s.section][s.key] = value

    config = Config(server=SimpleNamespace(**sections["server"]),
                    cgi=SimpleNamespace(**sections["cgi"]), fcgi=SimpleNamespace(**sections["fcgi"]),
                    status=SimpleNamespace(**sections["status"]), source=source)
    bind_base = os.getcwd() if "server.bind" in overrides else base_dir
    config.binds = [parse_bind(b, bind_base) for b in config.server.bind]
    fcgi_base = os.getcwd() if "fcgi.bind" in overrides else base_dir
    config.fcgi_binds = [parse_bind(b, fcgi_base) for b in config.fcgi.bind]

    routes_raw = raw.get("route", [])
    if not isinstance(routes_raw, list):
        raise ConfigError(source, "route", "expected [[route]] tables")
    for i, entry in enumerate(routes_raw):
        config.routes.append(_route_from_table(entry, f"[[route]] #{i + 1}", source, base_dir, config))
    for table in cli_routes or []:
        route = _route_from_table(table, "command line route", "command line", os.getcwd(), config)
        config.routes = [r for r in config.routes if r.prefix != route.prefix] + [route]
    seen = set()
    for route in config.routes:
        if route.prefix in seen:
            raise ConfigError(source, "[[route]] prefix", f"{route.prefix} is routed twice; keep one")
        seen.add(route.prefix)
    # Longest prefix first, so /cgi-bin/admin/ wins over /cgi-bin/.
    config.routes.sort(key=lambda r: len(r.prefix), reverse=True)

    for ext, command in config.cgi.interpreters.items():
        where = f"[cgi] interpreters.\"{ext}\""
        if not ext.startswith("."):
            raise ConfigError(source, where, "an extension must start with '.', as in \".py\"")
        argv = shlex.split(command)
        if not argv:
            raise ConfigError(source, where, "empty interpreter command")
        found = shutil.which(argv[0])
        if not found:
            raise ConfigError(source, where, f"interpreter {argv[0]!r} not found on PATH; "
                              "install it, give a full path, or remove the mapping")
        config.interpreters[ext.lower()] = [found, *argv[1:]]
    return config


def _route_from_table(entry: Any, where: str, source: str, base_dir: str, config: Config) -> Route:
    if not isinstance(entry, dict):
        raise ConfigError(source, where, "expected a table with prefix and one of cgi_dir, fastcgi, app, return")
    for key in entry:
        if key not in ROUTE_KEYS:
            raise ConfigError(source, f"{where} {key}", "unknown key" + _suggest(key, ROUTE_KEYS))
    if "prefix" not in entry:
        raise ConfigError(source, f"{where} prefix", "missing; a route needs a prefix")
    kinds = [key for key in ROUTE_KINDS if key in entry]
    if len(kinds) != 1:
        raise ConfigError(source, where, "a route needs exactly one of cgi_dir, fastcgi, app or return"
                          + (f" (it has {', '.join(kinds)})" if kinds else ""))
    try:
        route = Route(prefix=_normalise_prefix(to_str(entry["prefix"])),
                      timeout=to_seconds(entry["timeout"]) if "timeout" in entry else None,
                      workers=to_positive_count(entry.get("workers", 2)),
                      threads=to_positive_count(entry.get("threads", 1)),
                      queue_size=to_count(entry.get("queue_size", 256)))
    except ValueError as e:
        raise ConfigError(source, where, str(e)) from None
    if "cgi_dir" in entry:
        try:
            cgi_dir = os.path.abspath(os.path.join(base_dir, to_str(entry["cgi_dir"])))
        except ValueError as e:
            raise ConfigError(source, f"{where} cgi_dir", str(e)) from None
        if not os.path.isdir(cgi_dir):
            raise ConfigError(source, f"{where} cgi_dir", f"{cgi_dir} is not a directory")
        route.cgi_dir = os.path.realpath(cgi_dir)
    elif "fastcgi" in entry:
        from cgigate.upstream.pool import parse_address
        try:
            address = to_str(entry["fastcgi"])
            if address.startswith("unix:") and not os.path.isabs(address[5:]):
                address = "unix:" + os.path.abspath(os.path.join(base_dir, address[5:]))
            parse_address(address)
        except ValueError as e:
            raise ConfigError(source, f"{where} fastcgi", str(e)) from None
        route.fastcgi = address
    elif "return" in entry:
        try:
            route.text = to_str(entry["return"])
        except ValueError as e:
            raise ConfigError(source, f"{where} return", str(e)) from None
    else:
        try:
            route.app = to_str(entry["app"])
        except ValueError as e:
            raise ConfigError(source, f"{where} app", str(e)) from None
        if ":" not in route.app:
            raise ConfigError(source, f"{where} app", f"want MODULE:CALLABLE, got {route.app!r}")
    return route


def describe(config: Config) -> str:
    """What would be served, for `check-config` and the start-up log."""
    lines = [f"config: {config.source}"]
    for b in config.binds:
        lines.append(f"listen: http://{b}/" if not b.is_unix else f"listen: {b}")
    for r in config.routes:
        timeout = r.timeout if r.timeout is not None else config.cgi.timeout
        if r.kind == "cgi":
            target = f"CGI scripts in {r.cgi_dir}"
        elif r.kind == "fastcgi":
            target = f"FastCGI responder at {r.fastcgi}"
        elif r.kind == "return":
            target = f"the front itself, answering {r.text[:40]!r}"
        else:
            target = f"WSGI app {r.app} ({r.workers} worker(s) x {r.threads} thread(s))"
        lines.append(f"route: {r.prefix} -> {target} (timeout {timeout:g}s)")
    if not config.routes:
        lines.append("route: none (every request gets 404)")
    for ext, argv in sorted(config.interpreters.items()):
        lines.append(f"interpreter: *{ext} -> {shlex.join(argv)}")
    if config.server.processes > 1:
        lines.append(f"front: {config.server.processes} processes")
    lines.append(f"cgi: max_children={config.cgi.max_children} queue_size={config.cgi.queue_size} "
                 f"env_pass={','.join(config.cgi.env_pass)}")
    return "\n".join(lines)
