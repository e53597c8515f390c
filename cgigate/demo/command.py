"""`cgigate demo`: its command line."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys

from cgigate.demo import forms as F

DESCRIPTION = """\
Measure, on this machine, what a request costs when every request is a new
process (CGI) against persistent workers (FastCGI), and where the time goes.
cgigate starts itself on a free loopback port and runs the same "hello" as a
C program, a sh script and a Python script (CGI), as a WSGI app in FastCGI
workers, and as the front alone (the floor), under the same load."""

EPILOG = """\
examples:
  cgigate demo                                   everything, about a minute; report in ./demo-report/
  cgigate demo --forms py,wsgi --concurrency 1,16 --duration 3
  cgigate demo --against nginx-fcgiwrap,flup,gunicorn      add the peers installed here as rows
  cgigate demo --url http://127.0.0.1:8080/cgi-bin/hello.sh --concurrency 1,16   measure a running server

forms: floor (the front answering by itself), c (compiled C, CGI), sh (sh script,
CGI), py (Python script, CGI), wsgi (Python WSGI app on FastCGI workers).
Every figure is measured: latencies by the load generator per request, CPU,
processes and memory from /proc.  The machine should be otherwise idle."""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"want comma-separated whole numbers, got {text!r}")
    return values


def _names(known, what: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        if names == ("none",):
            return ()
        if known is None:   # checked later, against a module `cgigate serve` need not import
            return names
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; "
                                             f"choose from {', '.join(known)}")
        return names
    return parse


def _seconds(minimum: float, inclusive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want a number of seconds, got {text!r}") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(
                f"want {'at least' if inclusive else 'more than'} {minimum:g} seconds, got {text!r}")
        return value
    return parse


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"want a whole number of at least 1, got {text!r}")
    return value


def add_parser(commands) -> argparse.ArgumentParser:
    demo = commands.add_parser("demo", help="measure CGI against FastCGI on this machine",
                               description=DESCRIPTION, epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--duration", type=_seconds(0, inclusive=False), default=1.5, metavar="SECONDS",
                      help="measured seconds per point; default: 1.5")
    demo.add_argument("--warmup", type=_seconds(0, inclusive=True), default=0.3, metavar="SECONDS",
                      help="seconds of load before each point is measured; default: 0.3")
    demo.add_argument("--concurrency", type=_int_list, default=(1, 4, 16, 64), metavar="N,N,...",
                      help="concurrent clients to sweep; default: 1,4,16,64")
    demo.add_argument("--forms", type=_names(tuple(F.FORMS), "form"), default=None, metavar="FORM,...",
                      help=f"forms to run ({','.join(F.FORMS)}, or none); default: all "
                           "(none when --url is given)")
    demo.add_argument("--startup", type=_int_list, default=(0, 10, 50), metavar="MS,MS,...",
                      help="app start-up costs (ms of imports) for the Python forms; default: 0,10,50")
    demo.add_argument("--startup-concurrency", type=_at_least_one, default=1, metavar="N",
                      help="concurrency of the start-up sweep and the cost model; default: 1")
    demo.add_argument("--against", type=_names(None, "peer"), default=(), metavar="PEER,...",
                      help="add peers installed here as rows: nginx-fcgiwrap, flup, gunicorn")
    demo.add_argument("--url", metavar="URL",
                      help="also measure the server at this http:// URL (throughput and latency only)")
    demo.add_argument("--loadgen", choices=("builtin", "wrk"), default="builtin",
                      help="builtin: cgigate's own asyncio client (checks every body, per-request "
                           "latencies); wrk: wrk when installed (whole seconds, and its percentiles "
                           "carry its coordinated-omission correction); default: builtin")
    demo.add_argument("--workers", type=_at_least_one, default=None, metavar="N",
                      help="FastCGI worker processes; default: the number of CPUs (at most 4)")
    demo.add_argument("-o", "--output", default="demo-report", metavar="DIR",
                      help="folder for report.html, chart.png and report.json; default: ./demo-report/")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--keep-workdir", action="store_true",
                      help="keep the generated scripts, configs and logs (for a look at them)")
    return demo


def run_command(args) -> int:
    from cgigate.demo import report
    from cgigate.demo.peers import PEERS
    from cgigate.demo.run import Settings, run

    unknown = [n for n in args.against if n not in PEERS]
    if unknown:
        print(f"cgigate demo: unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)}",
              file=sys.stderr)
        return 2

    if args.url and not args.url.startswith("http://"):
        print(f"cgigate demo: --url wants an http:// URL, got {args.url!r}", file=sys.stderr)
        return 2
    if args.loadgen == "wrk" and not shutil.which("wrk"):
        print("cgigate demo: --loadgen wrk, but wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if 0 in args.concurrency:
        print("cgigate demo: concurrency must be at least 1", file=sys.stderr)
        return 2
    forms = args.forms if args.forms is not None else (() if args.url else F.DEFAULT_FORMS)
    if not forms and not args.url and not args.against:
        print("cgigate demo: nothing to measure: give --forms, --against or --url", file=sys.stderr)
        return 2
    settings = Settings(duration=args.duration, warmup=args.warmup, concurrency=tuple(sorted(set(args.concurrency))),
                        forms=forms, startup_ms=tuple(sorted(set(args.startup))),
                        startup_concurrency=args.startup_concurrency, against=args.against, url=args.url,
                        loadgen=args.loadgen, keep_workdir=args.keep_workdir)
    if args.workers:
        settings.workers = args.workers

    def terminate(signum, frame):
        raise KeyboardInterrupt   # so that every server the demo started is stopped

    signal.signal(signal.SIGTERM, terminate)
    try:
        result = run(settings, quiet=args.quiet)
    except KeyboardInterrupt:
        print("cgigate demo: interrupted; the servers it started are stopped", file=sys.stderr)
        return 130
    paths = report.write(result, os.path.abspath(args.output))
    report.print_summary(result, paths)
    return 0 if result["rows"] else 1
