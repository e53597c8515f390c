"""A WSGI app for the app-pool tests (tests/test_pool.py).

    /pid            this worker's pid
    /sleep?S        sleep S seconds, then answer
    /grow?MB        keep MB more megabytes for the worker's lifetime
    /hang           a regular expression that backtracks for minutes without
                    letting go of the GIL: the worker hangs, watchdog and all
    /version        the text of $POOL_APP_DIR/version, as it was when this
                    worker imported the app (a reload must change it)

At import it fails when $POOL_APP_DIR/broken exists, so a test can break
the workers that start after the pool did.
"""

import os
import re
import time

HERE = os.environ.get("POOL_APP_DIR", "")
if HERE and os.path.exists(os.path.join(HERE, "broken")):
    raise RuntimeError("pool_app: broken on purpose (the test created " + os.path.join(HERE, "broken") + ")")
try:
    with open(os.path.join(HERE, "version")) as f:
        VERSION = f.read().strip()
except OSError:
    VERSION = "none"

HELD = []


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING", "")
    if path == "/sleep":
        time.sleep(float(query or 1))
        body = b"slept\n"
    elif path == "/grow":
        HELD.append(bytearray(int(query or 1) * 1024 * 1024))
        body = b"grown\n"
    elif path == "/hang":
        re.match(r"(a+)+$", "a" * 40 + "b")
        body = b"done\n"
    elif path == "/version":
        body = VERSION.encode() + b"\n"
    else:
        body = str(os.getpid()).encode() + b"\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
