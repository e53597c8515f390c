"""`cgigate serve | fcgi | check-config | demo`: the command line, generated from config.SETTINGS."""

from __future__ import annotations

import argparse
import sys

from cgigate import __version__, config as configuration

DESCRIPTION = """\
cgigate is a CGI/FastCGI gateway.  `serve` answers HTTP/1.1 and runs CGI
scripts (RFC 3875), one process per request."""

SERVE_EPILOG = """\
examples:
  cgigate serve --cgi-dir cgi-bin                  serve ./cgi-bin under /cgi-bin/ on 127.0.0.1:8080
  cgigate serve -c conf/cgigate.toml               everything from a config file
  cgigate serve --app examples.hello:app --workers 2          a WSGI app on FastCGI workers, under /
  cgigate serve --fastcgi 127.0.0.1:9000                      an external FastCGI responder, under /
  cgigate serve -c conf/cgigate.toml --bind 0.0.0.0:8000 --bind unix:/run/cgigate.sock

Flags override the config file.  Every [server] and [cgi] key of the file is
documented in conf/cgigate.toml; `cgigate check-config -c FILE` shows what a
file would serve.  SIGTERM or SIGINT stops gracefully, SIGQUIT at once;
SIGHUP reloads the config's routes and the apps; SIGUSR1 reopens the logs.
`[status] path` turns on a status page (JSON, ?html, ?prometheus)."""


def _add_setting_flags(parser: argparse.ArgumentParser, names) -> None:
    for setting in configuration.SETTINGS:
        if setting.flag is None or not names(setting):
            continue
        default = setting.default
        shown = (", ".join(default) if isinstance(default, list) else
                 f"{default:o}" if setting.convert is configuration.to_octal_mode else default)
        kwargs = dict(dest=setting.name, metavar=setting.metavar, default=argparse.SUPPRESS,
                      help=f"{setting.help} [{setting.section}] {setting.key}; default: {shown}")
        if setting.key == "bind":
            kwargs["action"] = "append"
        parser.add_argument(setting.flag, **kwargs)


FCGI_EPILOG = """\
examples:
  cgigate fcgi --app examples.hello:app                         127.0.0.1:9000, 2 workers
  cgigate fcgi --app myproject.wsgi:application --bind unix:/run/app.sock --workers 4 --threads 8
  cgigate fcgi --cgi-dir /srv/www/cgi-bin --bind unix:/run/cgigate/cgi.sock --socket-group www-data
  spawn-fcgi -s /run/cgi.sock -- cgigate fcgi --cgi-dir /srv/www/cgi-bin --bind fd:0

nginx:  location / { include fastcgi_params; fastcgi_pass 127.0.0.1:9000; }
        location /cgi-bin/ { include fastcgi_params; fastcgi_pass unix:/run/cgigate/cgi.sock;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name; }
Working server blocks: conf/nginx/.  Under systemd socket activation (LISTEN_FDS)
the passed sockets replace --bind.  A worker that dies is replaced.  Signals:
SIGTERM or SIGINT stop gracefully, SIGQUIT at once; SIGHUP reloads the config
and the app (new workers first); SIGUSR1 reopens the logs; SIGTTIN/SIGTTOU
add or remove a worker.  --pm chooses static, dynamic or ondemand.
With --cgi-dir the [cgi] settings apply (timeout, max_children, env_pass,
interpreters, limits); give them in a config file."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgigate", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cgigate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP front", description=DESCRIPTION,
                                epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("-c", "--config", metavar="FILE",
                       help="TOML config file (see conf/cgigate.toml); without it, built-in defaults")
    serve.add_argument("--cgi-dir", metavar="DIR",
                       help="serve the executable files in DIR as CGI scripts under --cgi-prefix "
                            "(replaces a config route with the same prefix)")
    serve.add_argument("--cgi-prefix", metavar="PREFIX", default="/cgi-bin/",
                       help="URL prefix for --cgi-dir; default: /cgi-bin/")
    serve.add_argument("--app", metavar="MODULE:CALLABLE",
                       help="serve a WSGI app under --app-prefix through a pool of FastCGI workers "
                            "(cgigate fcgi) that the daemon starts on private unix sockets")
    serve.add_argument("--app-prefix", metavar="PREFIX", default="/", help="URL prefix for --app; default: /")
    serve.add_argument("--workers", metavar="N", type=int, default=2,
                       help="worker processes for --app; default: 2")
    serve.add_argument("--threads", metavar="T", type=int, default=1,
                       help="threads per --app worker (more than 1 multiplexes); default: 1")
    serve.add_argument("--fastcgi", metavar="ADDR",
                       help="send requests under --fastcgi-prefix to the FastCGI responder at ADDR "
                            "(HOST:PORT or unix:PATH: flup, php-fpm, cgigate fcgi)")
    serve.add_argument("--fastcgi-prefix", metavar="PREFIX", default="/",
                       help="URL prefix for --fastcgi; default: /")
    _add_setting_flags(serve, lambda s: s.section in ("server", "cgi"))

    fcgi = commands.add_parser(
        "fcgi", help="run FastCGI workers hosting a WSGI app or running CGI scripts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pre-forks worker processes that answer FastCGI RESPONDER requests with a WSGI "
                    "application (PEP 3333, --app) or by running CGI scripts (RFC 3875, --cgi-dir, "
                    "as fcgiwrap does), for nginx's fastcgi_pass or cgigate's own front.",
        epilog=FCGI_EPILOG)
    fcgi.add_argument("-c", "--config", metavar="FILE", help="TOML config file; its [fcgi] and [cgi] sections")
    _add_setting_flags(fcgi, lambda s: s.section in ("fcgi", "cgi") or s.name in ("server.error_log",
                                                                                   "server.log_level"))
    fcgi.add_argument("--scoreboard", metavar="FILE",
                      help="keep the app pool's scoreboard in FILE, for a status page in another process "
                           "(cgigate serve passes this to the pools it starts)")

    check = commands.add_parser("check-config", help="validate a config file and show what it serves")
    check.add_argument("-c", "--config", metavar="FILE", required=True, help="TOML config file")
    from cgigate.demo.command import add_parser as add_demo_parser
    add_demo_parser(commands)
    return parser


ARGS = None   # the command line, for reload_config()


def load_config(args) -> configuration.Config:
    overrides = {s.name: getattr(args, s.name) for s in configuration.SETTINGS
                 if s.flag is not None and hasattr(args, s.name)}
    if "fcgi.app" in overrides and "fcgi.cgi_dir" not in overrides:
        overrides["fcgi.cgi_dir"] = ""     # --app on the command line chooses the app mode
    routes = []
    if getattr(args, "cgi_dir", None):
        routes.append({"prefix": args.cgi_prefix, "cgi_dir": args.cgi_dir})
    if getattr(args, "app", None):
        routes.append({"prefix": args.app_prefix, "app": args.app, "workers": args.workers,
                       "threads": args.threads})
    if getattr(args, "fastcgi", None):
        routes.append({"prefix": args.fastcgi_prefix, "fastcgi": args.fastcgi})
    return configuration.load(args.config, overrides, routes)


def reload_config() -> configuration.Config:
    """The config file again, with the same command line (SIGHUP)."""
    return load_config(ARGS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from cgigate.demo.command import run_command
        return run_command(args)
    global ARGS
    ARGS = args
    try:
        config = load_config(args)
    except configuration.ConfigError as e:
        print(f"cgigate: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(configuration.describe(config))
        print("config OK")
        return 0
    if args.command == "fcgi":
        from cgigate.worker.main import run
        return run(config, args.scoreboard)
    if not config.routes:
        print("cgigate: nothing to serve: give --cgi-dir DIR, --app MODULE:CALLABLE, --fastcgi ADDR, "
              "or -c FILE with a [[route]]",
              file=sys.stderr)
        return 2
    from cgigate.front.server import run
    return run(config)
