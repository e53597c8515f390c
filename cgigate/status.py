"""The status page and its three forms: JSON, a small HTML page, Prometheus text.

The front (`[status] path`, restricted to `[status] allow`) shows its own
counters per route, the CGI side, and every app pool it started, read from
the pool's scoreboard file; `cgigate fcgi` answers `[fcgi] status_path`
with its own pool, as php-fpm's pm.status_path does.  `?json` (the default),
`?html` and `?prometheus` choose the form.  A ping path answers `pong`, or
503 naming the pools that are unhealthy.

This module only counts and renders; it does no I/O.
"""

from __future__ import annotations

import collections
import html
import json
import time

LATENCY_SAMPLES = 1024          # the most recent requests per route the percentiles are taken over


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list
    (also the load generator's, cgigate/demo/loadgen.py)."""
    n = len(sorted_values)
    if n == 0:
        return None
    if n == 1:
        return sorted_values[0]
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


class RouteStats:
    __slots__ = ("requests", "by_class", "latencies")

    def __init__(self):
        self.requests = 0
        self.by_class = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)

    def record(self, status: int, seconds: float) -> None:
        self.requests += 1
        self.by_class[f"{status // 100}xx" if status else "none"] += 1
        self.latencies.append(seconds)

    def snapshot(self) -> dict:
        lat = sorted(self.latencies)
        ms = {f"p{q}": (None if (v := percentile(lat, q)) is None else round(v * 1000, 3))
              for q in (50, 90, 99)}
        return {"requests": self.requests, "responses": dict(sorted(self.by_class.items())),
                "latency_ms": ms, "latency_samples": len(lat)}


class FrontStats:
    """Counted by the front for every request it answers."""

    def __init__(self):
        self.started = time.time()
        self.accepted = 0
        self.routes: dict[str, RouteStats] = collections.defaultdict(RouteStats)

    def record(self, route: str, status: int, seconds: float) -> None:
        self.accepted += 1
        self.routes[route].record(status, seconds)


# --------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------

def render(snapshot: dict, form: str) -> tuple[bytes, bytes]:
    """(content type, body) of `snapshot` as "json", "html" or "prometheus"."""
    if form == "html":
        return b"text/html; charset=utf-8", to_html(snapshot).encode()
    if form == "prometheus":
        return b"text/plain; version=0.0.4; charset=utf-8", to_prometheus(snapshot).encode()
    return b"application/json", json.dumps(snapshot, indent=1).encode() + b"\n"


def form_of(query: bytes) -> str:
    words = set(query.decode("latin-1").replace("&", " ").replace("=", " ").split())
    for form in ("html", "prometheus", "openmetrics"):
        if form in words:
            return "prometheus" if form == "openmetrics" else form
    return "json"


def unhealthy(snapshot: dict) -> list[str]:
    return [p["pool"] for p in snapshot.get("pools", []) if not p.get("healthy", True)]


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_prometheus(snapshot: dict) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        if not samples:
            return
        out.append(f"# HELP cgigate_{name} {help_text}")
        out.append(f"# TYPE cgigate_{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            number = format(value, ".15g")
            out.append(f"cgigate_{name}{{{text}}} {number}" if text else f"cgigate_{name} {number}")

    front = snapshot.get("front")
    if front:
        metric("start_time_seconds", "gauge", "When the front started (Unix time).", [({}, front["start_time"])])
        metric("requests_total", "counter", "Requests answered by the front.", [({}, front["accepted_requests"])])
        routes = front["routes"]
        metric("route_requests_total", "counter", "Requests answered, by route.",
               [({"route": r}, v["requests"]) for r, v in routes.items()])
        metric("route_responses_total", "counter", "Responses by route and status class.",
               [({"route": r, "class": c}, n) for r, v in routes.items() for c, n in v["responses"].items()])
        metric("route_latency_seconds", "gauge", "Latency quantiles of the route's recent requests.",
               [({"route": r, "quantile": q[1:] and str(int(q[1:]) / 100)}, ms / 1000)
                for r, v in routes.items() for q, ms in v["latency_ms"].items() if ms is not None])
    cgi = snapshot.get("cgi")
    if cgi:
        metric("cgi_children_running", "gauge", "CGI scripts running now.", [({}, cgi["children_running"])])
        metric("cgi_children_spawned_total", "counter", "CGI scripts started.", [({}, cgi["spawned"])])
        metric("cgi_killed_on_timeout_total", "counter", "CGI scripts killed past their timeout.",
               [({}, cgi["killed_on_timeout"])])
        metric("cgi_queue_length", "gauge", "Requests waiting for a CGI slot.", [({}, cgi["waiting"])])
        metric("cgi_queue_length_max", "gauge", "Most requests that waited for a CGI slot.",
               [({}, cgi["peak_waiting"])])
        metric("cgi_refused_total", "counter", "Requests refused with 503 (queue full or too long).",
               [({}, cgi["refused"])])
    pools = snapshot.get("pools", [])
    per_pool = [
        ("pool_healthy", "gauge", "1 while the pool's workers start; 0 in a crash loop.",
         lambda p: 1 if p["healthy"] else 0),
        ("pool_workers", "gauge", "Workers by state.", None),
        ("pool_accepted_requests_total", "counter", "Requests the pool's workers served.",
         lambda p: p["accepted_requests"]),
        ("pool_max_children_reached_total", "counter", "Times every worker was busy and no more could start.",
         lambda p: p["max_children_reached"]),
        ("pool_slow_requests_total", "counter", "Requests past slow_request_timeout.",
         lambda p: p["slow_requests"]),
        ("pool_timed_out_requests_total", "counter", "Requests past request_timeout.",
         lambda p: p["timed_out_requests"]),
        ("pool_recycled_workers_total", "counter", "Workers replaced by max_requests, max_rss or a timeout.",
         lambda p: p["recycled_workers"]),
        ("pool_crashed_workers_total", "counter", "Workers that died or were killed.",
         lambda p: p["crashed_workers"]),
        ("pool_queue_length", "gauge", "Requests waiting at the front for a connection to the pool.",
         lambda p: p.get("queue", {}).get("waiting")),
        ("pool_queue_length_max", "gauge", "Most requests that waited at the front.",
         lambda p: p.get("queue", {}).get("peak_waiting")),
        ("pool_queue_full_total", "counter", "Requests refused with 503, the queue full.",
         lambda p: p.get("queue", {}).get("queue_full")),
    ]
    for name, kind, help_text, get in per_pool:
        if get is None:
            metric(name, kind, help_text,
                   [({"pool": p["pool"], "state": s}, p[f"{s}_workers"]) for p in pools for s in ("idle", "active")])
        else:
            metric(name, kind, help_text, [({"pool": p["pool"]}, get(p)) for p in pools])
    metric("pool_worker_requests_total", "counter", "Requests served, by worker.",
           [({"pool": p["pool"], "pid": w["pid"]}, w["requests"]) for p in pools for w in p["workers"]])
    metric("pool_worker_rss_bytes", "gauge", "Resident memory, by worker.",
           [({"pool": p["pool"], "pid": w["pid"]}, w["rss_kib"] * 1024) for p in pools for w in p["workers"]])
    return "\n".join(out) + "\n"


STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.2em .6em;"
         "text-align:right}th:first-child,td:first-child{text-align:left}.bad{color:#b00020;font-weight:bold}")


def _table(rows: list[list], head: list[str]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e('-' if v is None else str(v))}</td>" for v in row) + "</tr>"
                      for row in rows) + "</table>")


def to_html(snapshot: dict) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>cgigate status</title>",
             f"<style>{STYLE}</style></head><body><h1>cgigate status</h1>"]
    front = snapshot.get("front")
    if front:
        parts.append(f"<p>front pid {front['pid']}, up {front['uptime_s']:.0f} s, "
                     f"{front['accepted_requests']} requests, {front['connections']} connections open</p>")
        parts.append(_table([[r, v["requests"], " ".join(f"{c}:{n}" for c, n in v["responses"].items()),
                              v["latency_ms"]["p50"], v["latency_ms"]["p90"], v["latency_ms"]["p99"]]
                             for r, v in front["routes"].items()],
                            ["route", "requests", "responses", "p50 ms", "p90 ms", "p99 ms"]))
    cgi = snapshot.get("cgi")
    if cgi:
        parts.append("<h2>CGI</h2>" + _table([[cgi["children_running"], cgi["max_children"], cgi["spawned"],
                                               cgi["killed_on_timeout"], cgi["waiting"], cgi["peak_waiting"],
                                               cgi["refused"]]],
                                             ["running", "max_children", "spawned", "killed on timeout",
                                              "waiting", "most waiting", "refused (503)"]))
    for p in snapshot.get("pools", []):
        health = "" if p["healthy"] else " <span class='bad'>UNHEALTHY</span>"
        queue = p.get("queue", {})
        parts.append(f"<h2>pool {e(p['pool'])} ({e(p['mode'])}){health}</h2>")
        parts.append(_table([[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["start_time"])),
                              p["accepted_requests"], queue.get("waiting"), queue.get("peak_waiting"),
                              p["idle_workers"], p["active_workers"], p["total_workers"],
                              p["max_children_reached"], p["slow_requests"], p["timed_out_requests"],
                              p["recycled_workers"], p["crashed_workers"]]],
                            ["started", "accepted", "queue", "max queue", "idle", "active", "total",
                             "max children reached", "slow", "timed out", "recycled", "crashed"]))
        parts.append(_table([[w["pid"], w["state"], w["requests"],
                              (w["current_request"] or {}).get("method"), (w["current_request"] or {}).get("uri"),
                              (w["current_request"] or {}).get("duration_s"), w["rss_kib"] // 1024]
                             for w in p["workers"]],
                            ["pid", "state", "requests", "method", "current request", "running s", "RSS MiB"]))
    parts.append("<p>Also as <a href='?json'>JSON</a> and <a href='?prometheus'>Prometheus text</a>.</p>")
    parts.append("</body></html>")
    return "".join(parts)
