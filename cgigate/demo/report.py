"""What the demo writes: a table in the terminal, report.json, chart.png and
report.html (self-contained: the chart is inside it) in the output folder."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import sys

MARKERS = "osD^vPX*"


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


COLUMNS = ("form", "c", "req/s", "p50 ms", "p90 ms", "p99 ms", "procs/req",
           "CPU ms/req front", "CPU ms/req backend", "peak MiB", "machine CPU ms/req")
SHORT_COLUMNS = ("form", "c", "req/s", "p50", "p90", "p99 ms", "procs/req", "CPU front", "CPU back ms",
                 "peak MiB")


def table_rows(result: dict, short: bool = False) -> list[list[str]]:
    out = []
    for row in result["rows"]:
        for cell in row["cells"]:
            lat = cell["latency_ms"]
            cpu = cell["cpu_ms_per_request"] or {}
            out.append([row["short"] if short else row["label"], str(cell["concurrency"]), _fmt(cell["rps"], 1),
                        _fmt(lat.get("p50")), _fmt(lat.get("p90")), _fmt(lat.get("p99")), _fmt(cell["processes_per_request"]),
                        _fmt(cpu.get("front"), 3), _fmt(cpu.get("backend"), 3), _fmt(cell["peak_memory_mib"], 1),
                        _fmt(cell.get("machine_cpu_ms_per_request"), 3)])
    return out


def model_lines(result: dict) -> list[str]:
    m = result["model"]
    lines = [f"Cost model per request, fitted on mean latency at concurrency {m['concurrency']}:"]
    lines += ["  " + line for line in m["lines_text"]]
    if m["latency_check"]:
        lines.append("  model against measurement (mean latency at c=%d):" % m["concurrency"])
        for c in m["latency_check"]:
            lines.append(f"    {c['label']:<48} measured {c['measured_ms']:8.2f} ms   model {c['model_ms']:8.2f} ms")
    if m["cpu_bound"]:
        lines.append(f"  CPU bound: {result['machine']['usable_cpus']} cores / the machine's CPU per request "
                     "(less the load generator's), against what was measured at the highest concurrency:")
        for b in m["cpu_bound"]:
            lines.append(f"    {b['label']:<48} {_fmt(b['cpu_ms_per_request'], 3):>7} ms CPU -> at most "
                         f"{_fmt(b['cpu_bound_rps'], 0):>7} req/s; measured {_fmt(b['measured_rps'], 0)}")
    return lines


def print_summary(result: dict, paths: dict[str, str], file=None) -> None:
    file = file or sys.stdout
    rows = [r[:len(SHORT_COLUMNS)] for r in table_rows(result, short=True)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        console = Console(file=file, width=None if file.isatty() else 120)
        table = Table(title="cgigate demo: the same hello in every form (CPU is per request)",
                      title_justify="left")
        for i, col in enumerate(SHORT_COLUMNS):
            table.add_column(col, justify="left" if i == 0 else "right")
        last = None
        for r in rows:
            table.add_row(*(["" if r[0] == last else r[0]] + r[1:]))
            last = r[0]
        console.print(table)
    else:
        widths = [max(len(SHORT_COLUMNS[i]), *(len(r[i]) for r in rows)) for i in range(len(SHORT_COLUMNS))] \
            if rows else []
        print("  ".join(c.ljust(w) for c, w in zip(SHORT_COLUMNS, widths)), file=file)
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)), file=file)
    print(file=file)
    for line in model_lines(result):
        print(line, file=file)
    for row in result["rows"]:
        for n in row["notes"]:
            print(f"{row['short']}: {n}", file=file)
    for s in result["skipped"]:
        print(f"skipped {s['what']}: {s['reason'].splitlines()[0]}", file=file)
    for c in result["checks"]:
        print(f"note: {c}", file=file)
    print(file=file)
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=file)


# --------------------------------------------------------------------------
# chart
# --------------------------------------------------------------------------

def chart_png(result: dict) -> bytes | None:
    """Throughput and latency by form and concurrency, and latency by app start-up cost."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sweep = [r for r in result["rows"] if r["startup_ms"] == 0 and len(r["cells"]) > 0]
    startup_rows = [r for r in result["rows"] if r["system"] == "cgigate" and r["form"] in ("py", "wsgi")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    ax_rps, ax_lat, ax_start = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour_of = {}
    for i, row in enumerate(sweep):
        colour_of[(row["system"], row["form"])] = colours[i % len(colours)]
    for i, row in enumerate(sweep):
        cells = sorted(row["cells"], key=lambda c: c["concurrency"])
        xs = [c["concurrency"] for c in cells]
        colour = colours[i % len(colours)]
        marker = MARKERS[i % len(MARKERS)]
        ax_rps.plot(xs, [c["rps"] or 0 for c in cells], marker=marker, color=colour, label=row["label"])
        ax_lat.plot(xs, [c["latency_ms"]["p50"] for c in cells], marker=marker, color=colour,
                    label=f"{row['label']} p50")
        ax_lat.plot(xs, [c["latency_ms"]["p99"] for c in cells], marker=marker, color=colour,
                    linestyle="--", alpha=0.6)
    for ax in (ax_rps, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.grid(True, which="both", alpha=0.3)
        levels = result["settings"]["concurrency"]
        ax.set_xticks(levels, [str(c) for c in levels])
    ax_rps.set_ylabel("throughput (requests per second, log scale)")
    ax_rps.set_title("Throughput")
    handles, labels = ax_rps.get_legend_handles_labels()
    ax_lat.set_ylabel("latency (milliseconds, log scale)")
    ax_lat.set_title("Latency: p50 solid, p99 dashed")
    c1 = result["settings"]["startup_concurrency"]
    for i, form in enumerate(("py", "wsgi")):
        points = sorted((r["startup_ms"], c["latency_ms"]["mean"]) for r in startup_rows if r["form"] == form
                        for c in r["cells"] if c["concurrency"] == c1 and c["requests"])
        if not points:
            continue
        label = "CGI: Python script" if form == "py" else "FastCGI: WSGI workers"
        colour = colour_of.get(("cgigate", form), colours[(3 + i) % len(colours)])
        ax_start.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS[i], linestyle="none",
                      color=colour, label=f"{label} (measured)")
        line = result["model"]["lines"].get(form)
        if line and line.get("slope") is not None:
            xs = [0, max(p[0] for p in points)]
            ax_start.plot(xs, [line["intercept_ms"] + line["slope"] * x for x in xs],
                          color=colour, alpha=0.7,
                          label=f"model: {line['intercept_ms']:.2f} ms + {line['slope']:.2f} x start-up")
    ax_start.set_xlabel("app start-up cost (milliseconds of imports)")
    ax_start.set_ylabel(f"mean latency at {c1} client (milliseconds)")
    ax_start.set_title("What start-up costs each request")
    ax_start.grid(True, alpha=0.3)
    if ax_start.lines:
        ax_start.legend(fontsize=8)
    fig.suptitle(f"cgigate demo, {result['started']}: {result['machine']['usable_cpus']} CPUs, "
                 f"{result['settings']['duration_s']:g} s per point, load generator {result['settings']['loadgen']}")
    # the forms' legend under the two sweeps, where it hides no line
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5) or 1, fontsize=9,
               bbox_to_anchor=(0.35, 0.0))
    rows_of_legend = (len(labels) + 4) // 5
    fig.tight_layout(rect=(0, 0.05 * rows_of_legend + 0.02, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------

HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
dt { font-weight: bold; margin-top: 0.6em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.note { color: #8a4b00; }
"""


def report_html(result: dict, png: bytes | None) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             "<title>cgigate demo report</title>", f"<style>{HTML_STYLE}</style></head><body>",
             "<h1>What a request costs when every request is a new process</h1>",
             f"<p>Measured by <code>cgigate demo</code> {e(result['cgigate_version'])} on "
             f"{e(result['started'])}: {result['machine']['usable_cpus']} CPUs, Linux "
             f"{e(result['machine']['kernel'])}, Python {e(result['machine']['python'])}. "
             f"Each point is {result['settings']['duration_s']:g} s of load after "
             f"{result['settings']['warmup_s']:g} s of warm-up, from the load generator "
             f"<code>{e(result['settings']['loadgen'])}</code>"
             + ("; every answer was checked to say <code>Hello, world!</code>.</p>"
                if result["settings"]["loadgen"] == "builtin" else " (wrk checks status codes, not bodies).</p>")]
    if png:
        parts.append(f"<img alt='Throughput and latency by form and concurrency' "
                     f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append("<h2>The forms</h2><dl>")
    seen = set()
    for row in result["rows"]:
        key = (row["system"], row["form"])
        if key in seen:
            continue
        seen.add(key)
        parts.append(f"<dt>{e(row['label'].split(', app start-up')[0])}</dt><dd>{e(row['explanation'])}"
                     + "".join(f"<br><span class='note'>{e(n)}</span>" for n in row["notes"]) + "</dd>")
    parts.append("</dl>")
    parts.append("<h2>Every figure</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in COLUMNS) + "</tr>")
    for r in table_rows(result):
        parts.append("<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>")
    parts.append("</table>")
    parts.append("""<p><b>How to read it.</b> <i>req/s</i> is how many answers a second the server gave
while that many clients each sent a request as soon as the previous one was answered. <i>p50/p90/p99</i>
are the latencies half, nine in ten and 99 in 100 requests stayed under. <i>procs/req</i> counts the
processes (and threads) the kernel created during the run, divided by the requests: a CGI form makes at
least one per request, persistent workers none. <i>CPU ms/req</i> is processor time per request, split
into the front (the process that speaks HTTP) and the backend (the CGI processes, or the FastCGI
workers). <i>peak MiB</i> is the largest total memory (PSS) of all the server's processes seen during
the run. <i>machine CPU ms/req</i> is the whole machine's busy time less the load generator's and the
demo's own, per request: it should be close to front plus backend, and it also sees CPU that no
parent process collects (fcgiwrap's scripts).</p>""")
    parts.append("<h2>Where the time goes</h2><pre>" + e("\n".join(model_lines(result))) + "</pre>")
    parts.append("""<p>The cost model adds up what a request pays at one client, where nothing waits in a
queue. A CGI request pays for a new process, an interpreter's start and the application's imports every
time; a FastCGI request pays only to pass the request to a worker that did all of that once. The
start-up sweep makes this visible: the CGI line rises one millisecond per millisecond of imports, the
FastCGI line stays flat. With more clients than cores, throughput is bounded by CPU per request, which is
why the gap grows with concurrency.</p>""")
    if result["skipped"] or result["checks"]:
        parts.append("<h2>Notes on this run</h2><ul>")
        for s in result["skipped"]:
            parts.append(f"<li>skipped {e(s['what'])}: {e(s['reason'].splitlines()[0])}</li>")
        for c in result["checks"]:
            parts.append(f"<li>{e(c)}</li>")
        parts.append("</ul>")
    parts.append("<p>The numbers behind this page are in <code>report.json</code> next to it.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(result: dict, folder: str) -> dict[str, str]:
    """Write report.json, chart.png and report.html into `folder`; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    png = chart_png(result)
    if png is not None:
        paths["chart"] = os.path.join(folder, "chart.png")
        with open(paths["chart"], "wb") as f:
            f.write(png)
    else:
        result["checks"].append("matplotlib is not installed, so there is no chart "
                                "(pip install 'cgigate[demo]')")
    paths["report"] = os.path.join(folder, "report.html")
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write(report_html(result, png))
    paths["json"] = os.path.join(folder, "report.json")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return paths
