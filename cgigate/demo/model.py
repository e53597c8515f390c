"""The cost model the demo fits: where the time of one request goes.

At concurrency 1 nothing queues, so the mean latency of a form is the sum
of what one request costs in it:

    floor          = http                      (client, loopback, the front itself)
    CGI, C         = http + spawn              (fork/exec, loader, pipes, reaping)
    CGI, sh        = http + spawn + sh start
    CGI, Python    = http + spawn + python start + k_cgi  * app start + work
    FastCGI, WSGI  = http + ipc                + k_fcgi * app start + work

The start-up sweep gives the Python forms at several app start-up costs S,
and a least-squares line through (S, latency) gives each form's intercept
and slope k.  A CGI script pays its start-up on every request, so k_cgi
comes out near 1; a worker paid it once, so k_fcgi comes out near 0.  The
terms are differences of measured means, so each is only as exact as the
noise allows; a negative term is shown as measured, not hidden.  The work
of a "hello" is nil, so it is folded into the intercepts.

A second view uses CPU instead of time: with every core busy, throughput
cannot exceed cores / (CPU per request), which the demo compares with the
throughput it measured at its highest concurrency.  It takes the machine's
CPU per request (less the load generator's), which sees every process,
including scripts whose CPU no parent collects.
"""

from __future__ import annotations


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of y = a + b x; None with fewer than two x values."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    return my - slope * mx, slope


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def fit(latency_c1: dict[str, float], startup: dict[str, list[tuple[float, float]]]) -> dict:
    """The model's terms in milliseconds.

    `latency_c1`: mean latency at concurrency 1 by form name with no app start-up
    ("floor", "c", "sh", "py", "wsgi"; any may be missing).  `startup`: for "py"
    and "wsgi", (app start-up ms, mean latency ms) points at concurrency 1.
    """
    floor = latency_c1.get("floor")
    c = latency_c1.get("c")
    terms: dict[str, float | None] = {
        "http": floor,
        "spawn": _diff(c, floor),
        "sh_start": _diff(latency_c1.get("sh"), c),
    }
    lines = {}
    for form in ("py", "wsgi"):
        points = list(startup.get(form, []))
        if form in latency_c1 and not any(x == 0 for x, _ in points):
            points.append((0.0, latency_c1[form]))
        line = fit_line(points)
        if line is None and points:
            line = (points[0][1], None) if points[0][0] == 0 else None
        lines[form] = line
    py, wsgi = lines.get("py"), lines.get("wsgi")
    if py is not None:
        terms["python_start"] = _diff(py[0], c) if c is not None else None
        terms["spawn_and_python_start"] = _diff(py[0], floor)
        terms["k_cgi"] = py[1]
    if wsgi is not None:
        terms["ipc"] = _diff(wsgi[0], floor)
        terms["k_fcgi"] = wsgi[1]
    return {"terms_ms": {k: _round(v) for k, v in terms.items()},
            "lines": {form: None if line is None else {"intercept_ms": _round(line[0]), "slope": _round(line[1])}
                      for form, line in lines.items()}}


def predict(terms: dict, form: str, startup_ms: float) -> float | None:
    """The model's latency at concurrency 1 for `form` at an app start-up cost."""
    t = terms
    try:
        if form == "floor":
            return t["http"]
        if form == "c":
            return t["http"] + t["spawn"]
        if form == "sh":
            return t["http"] + t["spawn"] + t["sh_start"]
        if form == "py":
            return t["http"] + t["spawn_and_python_start"] + (t["k_cgi"] or 0) * startup_ms
        if form == "wsgi":
            return t["http"] + t["ipc"] + (t["k_fcgi"] or 0) * startup_ms
    except (KeyError, TypeError):
        return None
    return None


def cpu_bound(cores: int, cpu_ms_per_request: float | None) -> float | None:
    """The most requests per second `cores` can serve at that CPU cost each."""
    if not cpu_ms_per_request or cpu_ms_per_request <= 0:
        return None
    return cores * 1000.0 / cpu_ms_per_request


def describe(model: dict) -> list[str]:
    """The fitted model in plain lines, for the terminal and the report."""
    t = model["terms_ms"]

    def ms(v):
        return f"{_num(v)} ms"

    if t.get("http") is None:
        return ["(the model is built on the floor form at the start-up concurrency: "
                "run with --forms floor,... to see where the time goes)"]
    out = [f"every request: {ms(t['http'])} for HTTP through the front (the floor)"]
    if t.get("spawn") is not None:
        out.append(f"CGI, C program:  + {ms(t['spawn'])} to create, run and reap a process (spawn)")
    if t.get("sh_start") is not None:
        out.append(f"CGI, sh script:  + spawn + {ms(t['sh_start'])} to start the shell")
    if "k_cgi" in t:
        if t.get("python_start") is not None:
            start = f"spawn + {ms(t['python_start'])} to start Python"
        else:
            start = f"{ms(t.get('spawn_and_python_start'))} to spawn and start Python"
        out.append(f"CGI, Python:     + {start} + {_num(t.get('k_cgi'))} x app start-up, on every request")
    if "k_fcgi" in t:
        out.append(f"FastCGI, WSGI:   + {ms(t.get('ipc'))} to pass the request to a worker and back (IPC) + "
                   f"{_num(t.get('k_fcgi'))} x app start-up "
                   "(paid once per worker, not per request)")
    out.append("+ work: a hello does none; an app's own work adds the same to every form")
    return out


def _num(v: float | None) -> str:
    """Two decimals, "?" for unknown, and never "-0.00"."""
    if v is None:
        return "?"
    text = f"{v:.2f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _round(v):
    return None if v is None else round(v, 4)
