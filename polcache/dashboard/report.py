"""`polcache report`: the dashboard's views of recorded runs as a static HTML page with PNGs.

Reads whole metrics files (and their rotated backups FILE.N, oldest first), computes the same
views as the live page (polcache.dashboard.views) and draws each with matplotlib (the `report`
extra, also part of `sim`). The CPU/GPU view is live-only: metrics files do not record load.
"""

from __future__ import annotations

import html
import json
import logging
import textwrap
from pathlib import Path
from typing import Any, Sequence

from polcache.atomic import atomic_directory
from polcache.dashboard.tail import JsonlTail
from polcache.dashboard.views import RunState
from polcache.errors import PolcacheError
from polcache.metrics.jsonl import check_metrics_input
from polcache.outputs import check_output, replaced_whole

log = logging.getLogger("polcache.dashboard")

OP_COLORS = ["#1f4e79", "#cfe2f3", "#f6b26b", "#b4a7d6"]  # compute, reuse, forecast, gate (as the page)
LEGEND_FONT = 8  # legible in a 750 px wide PNG (6 was not)
LINE_STYLES = ("-", "--", ":", "-.")  # per ten series, as the page's (app.js DASHES)
LEGEND_INSIDE = 8  # legend entries drawn inside the axes; more go beside them


def run_files(path: Path) -> list[Path]:
    """A metrics file preceded by its rotated backups, oldest first."""
    backups = sorted(path.parent.glob(f"{path.name}.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    return [p for p in backups if p.suffix[1:].isdigit()] + [path]


def load_runs(paths: Sequence[str | Path]) -> tuple[RunState, int]:
    """Every record of every file (no bound on how many); returns the state and the number of
    unreadable lines."""
    state, bad = RunState(keep=None), 0
    seen: set[Path] = set()
    for path in map(Path, paths):
        check_metrics_input(path)  # a folder, a file of another kind: as the dashboard and the writer refuse it
        if not path.exists():  # the dashboard follows one not written yet; a report has nothing to draw
            raise PolcacheError(f"{path}: no such file; expected a metrics file (JSON lines, from --metrics-file)")
        if path.resolve() in seen:  # its records would count twice
            raise PolcacheError(f"{path}: given twice")
        seen.add(path.resolve())
        context: dict[str, Any] = {"name": str(path)}
        for part in run_files(path):
            tail = JsonlTail(part)
            state.add(tail.poll(None) + tail.finish(), context)
            tail.close()
            if tail.problem:
                raise PolcacheError(tail.problem)
            bad += tail.bad_lines
    bad += state.bad_records
    if not state.records:
        raise PolcacheError(f"no metrics records in {', '.join(map(str, paths))}")
    return state, bad


def write_report(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write OUT/index.html, OUT/<view>.png and OUT/views.json, the folder whole and atomically;
    returns the page's path. An existing OUT is replaced only if it is an earlier report."""
    import matplotlib

    matplotlib.use("Agg")
    out = check_report_output(out, paths)
    state, bad = load_runs(paths)
    if bad:  # on the page too; said here, as a report of a damaged file otherwise looked whole
        log.warning("report: %d unreadable line%s skipped (damaged or cut short)", bad, "" if bad == 1 else "s")
    with atomic_directory(out) as tmp:
        tmp.mkdir()
        _write_page(tmp, paths, state, bad)
    return out / "index.html"


def is_report(path: Path) -> bool:
    """True for a folder that `write_report` wrote."""
    return replaced_whole(path) == "a report"


def check_report_output(out: str | Path, runs: Sequence[str | Path] = (), flag: str | None = "--out") -> Path:
    """Refuse, before reading the runs, an --out that is a file, a run, or a folder of something else."""
    return check_output(out, "a report folder from `polcache report`", folder=True, ours=is_report, flag=flag,
                        inputs=runs, whole=True)


def _write_page(out: Path, paths: Sequence[str | Path], state: RunState, bad: int) -> None:
    """The page, one PNG per view and views.json, into the (temporary) folder `out`."""
    views = state.views()
    meta = views.pop("_meta")
    sections = []
    for view_id, view in views.items():
        if view_id == "system":
            continue
        drew = _plot(view, out / f"{view_id}.png", meta["span_s"])
        body = (f'<img src="{view_id}.png" alt="{html.escape(view["title"])}">' if drew
                else "<p>no data in these files</p>")
        note = f'<p class="note">{html.escape(view["note"])}</p>' if view.get("note") else ""
        sections.append(f'<section><h2>{html.escape(view["title"])}</h2>{body}{note}</section>')
    errors = ", ".join(f"{k} {n}" for k, n in meta["errors"].items()) or "none"
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in meta["notes"])
    summary = _summary_table(meta["summary"])
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>polcache report</title>"
            f"<style>body{{font:13px system-ui,sans-serif;margin:12px}}section{{margin-bottom:18px}}"
            f"h2{{font-size:14px}}.note{{color:#666}}img{{max-width:100%}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ddd;padding:2px 6px;text-align:right}}</style></head><body>"
            f"<h1>polcache report</h1><p>files: {html.escape(', '.join(map(str, paths)))}<br>"
            f"robots: {html.escape(', '.join(meta['robots']))}; {meta['span_s']:.1f} s of records, "
            f"statistics per {meta['interval_s']:.1f} s; refused messages: {html.escape(errors)}; "
            f"unreadable lines: {bad}</p>{summary}{notes}{''.join(sections)}</body></html>\n")
    # with the table, the notes and the run's span: the numbers behind the page, not only behind its plots
    (out / "views.json").write_text(json.dumps({**views, "_meta": meta}))  # in the temp folder: atomic as a whole
    (out / "index.html").write_text(page)


def _summary_table(summary: dict[str, Any]) -> str:
    """The whole run per robot (RunState._summary), as the page shows it above its views."""
    if not summary["rows"]:
        return ""
    def cell(value: Any) -> str:
        return html.escape("-" if value is None else f"{value:g}" if isinstance(value, float) else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in summary["columns"])
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in summary["rows"])
    return f"<h2>whole run, per robot</h2><table><tr>{head}</tr>{rows}</table>"


def _plot(view: dict[str, Any], path: Path, span_s: float) -> bool:
    """`span_s`: the run's records' span, every time line's x axis (the views' axes lined up)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    drew = _draw(ax, view, span_s)
    if drew:
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")  # legends placed outside the axes included
    plt.close(fig)
    return drew


def _draw(ax, view: dict[str, Any], span_s: float) -> bool:
    """One view on `ax`, titled: a PNG pasted into a ticket or a slide says what it shows (the title
    was only the page's heading)."""
    from matplotlib.ticker import MaxNLocator

    if view["type"] == "line" and span_s > 0:  # first: a reference line held for part of the run is placed in it
        ax.set_xlim(0.0, span_s)
    drew = {"line": _line, "hist": _hist, "bars": _bars, "heatmap": _heatmap}[view["type"]](ax, view)
    if drew:
        ax.set_title(textwrap.fill(view["title"], 100), fontsize=9, loc="left")
        if view.get("integer"):  # counts: a few safe stops had ticks at 0.5, 1.5, 2.5
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return drew


def _pen(i: int) -> dict[str, str]:
    """Series i's colour and line style: the page's ten colours, then the same ones dashed, dotted...
    (the eleventh robot drawn as the first was: two robots' lines read as one)."""
    return {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)]}


def _line(ax, view) -> bool:
    for i, s in enumerate(view["series"]):
        ax.plot(s["x"], [float("nan") if v is None else v for v in s["y"]], label=s["name"], linewidth=1.2,
                marker="." if len(s["x"]) < 20 else None, **_pen(i))  # a short run's few points visible
    for h in view.get("hlines", []):  # as the page; one held for part of the run only spans that part
        ax.axhline(h["y"], xmin=_axis_fraction(ax, h.get("x0"), 0.0), xmax=_axis_fraction(ax, h.get("x1"), 1.0),
                   color="#c00", linestyle="--", linewidth=1, label=f"{h['name']}: {h['y']:g}")
    ax.set_xlabel("seconds since start")
    low, high = ax.get_ylim()  # from 0, as on the page: a 0.1% dip in a rate zoomed to fill the axis read as a collapse
    low = min(low, 0.0)
    ax.set_ylim(low, high + 0.05 * (high - low))  # headroom: a steady 50 Hz rate ran along the frame's top edge
    if view["series"]:
        _legend(ax, len(view["series"]) + len(view.get("hlines", [])), loc="best")
    return bool(view["series"])


def _axis_fraction(ax, x: float | None, default: float) -> float:
    """Where time `x` is across the axes (0 to 1), or `default` for none."""
    if x is None:
        return default
    low, high = ax.get_xlim()
    return min(max((x - low) / (high - low), 0.0), 1.0) if high > low else default


def _legend(ax, entries: int, **where) -> None:
    """Inside the axes while it fits; beside them, in columns, for many robots (it covered the plot)."""
    if entries <= LEGEND_INSIDE:
        ax.legend(fontsize=LEGEND_FONT, **where)
    else:
        ax.legend(fontsize=LEGEND_FONT, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + entries // 14)


def _hist(ax, view) -> bool:
    for i, s in enumerate(view["series"]):
        ax.stairs(s["counts"], s["edges"], fill=True, alpha=0.35, label=s["name"], **_pen(i))
    for v in view.get("vlines", []):
        ax.axvline(v["x"], color="#c00", linestyle="--", linewidth=1, label=f"{v['name']}: {v['x']:g}")
    unit = view.get("title", "").rpartition("(")[2].rstrip(")")  # the unit the title ends with: ms
    # and the values past the last bar, which it counts (the page says so beside it): a PNG alone read a run's
    # worst period error as 0.1 ms where it was 17
    ax.set_xlabel(f"{unit}; {view['note']}" if view.get("note") else unit)
    ax.set_ylabel("count")
    if view["series"]:
        _legend(ax, len(view["series"]) + len(view.get("vlines", [])))
    return bool(view["series"])


def _bars(ax, view) -> bool:
    cats = view["categories"]
    left = [0.0] * len(cats)
    for i, s in enumerate(view["stacks"]):
        values = [v or 0.0 for v in s["values"]]
        ax.barh(cats, values, left=left, label=s["name"], color=f"C{s.get('color', i) % 10}")  # as on the page
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("ms")
    if cats:  # below the axis label: inside the axes it covered the bars
        ax.legend(fontsize=LEGEND_FONT, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return bool(cats)


def _heatmap(ax, view) -> bool:
    if not view["rows"]:
        return False
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ax.imshow(view["z"], aspect="auto", interpolation="nearest", cmap=ListedColormap(OP_COLORS), vmin=-0.5, vmax=3.5)
    ax.set_yticks(range(len(view["rows"])), view["rows"], fontsize=5)
    ax.set_xlabel("denoising step")
    ax.legend(handles=[Patch(color=OP_COLORS[int(op)], label=name) for op, name in view["legend"].items()],
              fontsize=LEGEND_FONT, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return True
