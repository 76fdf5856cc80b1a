"""`studio-engine postmortem --html`: one self-contained page (no script, no network).

The page is drawn as inline SVG, not with a vendored Mermaid: nothing to load, nothing to
execute, so it opens the same offline, in a mail attachment or under a strict CSP.

* a Gantt of every load: one row per load, one bar per phase (resolve, kill, settle, spawn,
  warm), every row on the scale of the longest load so proportions compare at a glance;
  failed, cancelled and interrupted loads are highlighted;
* incidents and anomalies (contract violations marked);
* the machine's states with the transitions this journal took and their counts;
* the timeline, folded.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from html import escape

from engine.core.machine import STATES
from engine.core.postmortem import PHASES, LoadReport, Report
from engine.core.timeline import clock, key_fields

PHASE_COLOURS = {
    "resolve": "#6c8ebf",
    "kill": "#b85450",
    "settle": "#d6b656",
    "spawn": "#9673a6",
    "warm": "#82b366",
}
BAD_OUTCOMES = ("failed", "cancelled", "interrupted", "refused")

# Where each state sits in the machine drawing: the load path left to right, the rest below.
_LAYOUT = {
    "idle": (0, 0),
    "resolving": (1, 0),
    "killing": (2, 0),
    "settling": (3, 0),
    "spawning": (4, 0),
    "warming": (5, 0),
    "ready": (6, 0),
    "failed": (3, 1),
    "crashed": (6, 1),
    "unloading": (1, 1),
    "recovering": (0, 1),
}

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; }
tr.bad td, .violation { color: #a40000; font-weight: 600; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; }
pre { background: #f6f6f6; padding: 6px; max-width: 900px; white-space: pre-wrap; }
svg text { font: 12px system-ui, sans-serif; }
"""


def transition_counts(records: Iterable[tuple[str, str]]) -> Counter[tuple[str, str, str]]:
    """(state before, event type, state after) -> times taken, from (event type, state after)
    pairs in stream order starting at the first event."""
    counts: Counter[tuple[str, str, str]] = Counter()
    before = "idle"
    for event_type, after in records:
        counts[(before, event_type, after)] += 1
        before = after
    return counts


def _bad(load: LoadReport) -> bool:
    return load.outcome.startswith(BAD_OUTCOMES)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def gantt(report: Report, width: int = 900) -> str:
    """One row per load, one <rect class="phase"> per phase span."""
    label_w, row_h, top = 210, 22, 24
    longest = max((load.total_s or 0.0 for load in report.loads), default=0.0) or 1e-3
    scale = (width - label_w - 10) / longest
    height = top + row_h * max(len(report.loads), 1) + 10
    parts = [
        f'<svg id="gantt" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
    ]
    for tick in range(5):  # time axis: 0 .. the longest load
        x = label_w + (width - label_w - 10) * tick / 4
        anchor = "end" if tick == 4 else "middle"
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{top - 8}" text-anchor="{anchor}">'
            f"{_ms(longest * tick / 4)}</text>"
        )
    for index, load in enumerate(report.loads):
        y = top + index * row_h
        cls = "load bad" if _bad(load) else "load"
        fill = "#fde2e2" if _bad(load) else ("#f4f4f4" if index % 2 else "#fff")
        parts.append(
            f'<g class="{cls}" data-load="{escape(load.load_id)}">'
            f'<rect x="0" y="{y}" width="{width}" height="{row_h}" fill="{fill}"/>'
            f'<text x="4" y="{y + 15}">#{load.seq} {escape(load.load_id)} '
            f"{escape(load.outcome[:14])}</text>"
        )
        for phase, start, end in load.spans:
            x = label_w + (start - load.requested_at) * scale
            w = max((end - start) * scale, 1.0)  # a 0 ms phase still shows
            parts.append(
                f'<rect class="phase" data-phase="{phase}" x="{x:.1f}" y="{y + 4}" '
                f'width="{w:.1f}" height="{row_h - 8}" fill="{PHASE_COLOURS.get(phase, "#999")}">'
                f"<title>{phase}: {_ms(end - start)}</title></rect>"
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def machine_svg(counts: Counter[tuple[str, str, str]]) -> str:
    """Every state of the machine; an arrow per (source, destination) the journal took,
    labelled with its events and counts."""
    col_w, row_h, box_w, box_h, pad = 175, 210, 96, 30, 110
    positions = dict(_LAYOUT)
    extra = [s for s in STATES if s not in positions]  # states added later still get drawn
    for i, state in enumerate(extra):
        positions[state] = (i, 2)
    rows = max(r for _, r in positions.values()) + 1
    width = 2 * pad + 6 * col_w + box_w
    height = row_h * rows + pad

    def centre(state: str) -> tuple[float, float]:
        c, r = positions[state]
        return pad + c * col_w + box_w / 2, pad + r * row_h + box_h / 2

    def label(x: float, y: float, lines: list[str], upwards: bool = False) -> str:
        """Multi-line label centred on x; the first line at y (growing up when `upwards`)."""
        step = -12 if upwards else 12
        spans = "".join(
            f'<tspan x="{x:.1f}" y="{y + i * step:.1f}">{escape(line)}</tspan>'
            for i, line in enumerate(lines)
        )
        return f'<text text-anchor="middle" font-size="10">{spans}</text>'

    taken: dict[tuple[str, str], list[str]] = {}
    for (source, event, dest), n in sorted(counts.items()):
        if source in positions and dest in positions:
            taken.setdefault((source, dest), []).append(f"{event} x{n}")
    parts = [
        f'<svg id="machine" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
        'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>'
    ]
    for (source, dest), labels in taken.items():
        (x1, y1), (x2, y2) = centre(source), centre(dest)
        text = "; ".join(labels)
        if source == dest:  # a loop above the box
            top = y1 - box_h / 2
            parts.append(
                f'<path class="transition" d="M{x1 - 14},{top} C{x1 - 30},{top - 40} '
                f'{x1 + 30},{top - 40} {x1 + 14},{top}" fill="none" stroke="#555" '
                f'marker-end="url(#arrow)"><title>{escape(text)}</title></path>'
                + label(x1, top - 34, labels, upwards=True)
            )
            continue
        # Curve each arrow (a -> b and b -> a bend to opposite sides), longer ones more, so
        # that an arrow skipping a state passes beside it, not through it.
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        length = math.hypot(x2 - x1, y2 - y1) or 1.0
        nx, ny = -(y2 - y1) / length, (x2 - x1) / length
        bend = 14 + 0.22 * length
        cx, cy = mx + nx * bend, my + ny * bend
        ex, ey = _border(x2, y2, cx, cy, box_w, box_h)
        parts.append(
            f'<path class="transition" d="M{x1:.1f},{y1:.1f} Q{cx:.1f},{cy:.1f} '
            f'{ex:.1f},{ey:.1f}" fill="none" stroke="#555" marker-end="url(#arrow)">'
            f"<title>{escape(text)}</title></path>"
            + label((mx + cx) / 2, (my + cy) / 2 + (8 if ny >= 0 else -4), labels, ny < 0)
        )
    visited = {s for s, _, _ in counts} | {d for _, _, d in counts}
    for state in positions:
        x, y = centre(state)
        fill = "#dae8fc" if state in visited else "#f5f5f5"
        parts.append(
            f'<g class="state" data-state="{state}"><rect x="{x - box_w / 2}" '
            f'y="{y - box_h / 2}" width="{box_w}" height="{box_h}" rx="8" fill="{fill}" '
            f'stroke="#6c8ebf"/><text x="{x}" y="{y + 4}" text-anchor="middle">{state}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _border(x: float, y: float, fx: float, fy: float, w: float, h: float) -> tuple[float, float]:
    """Where the line from (fx, fy) to the centre (x, y) of a w x h box enters the box."""
    dx, dy = fx - x, fy - y
    if dx == 0 and dy == 0:
        return x, y
    t = min((w / 2) / abs(dx) if dx else math.inf, (h / 2) / abs(dy) if dy else math.inf)
    return x + dx * t, y + dy * t


def render_html(report: Report, journal: str, counts: Counter[tuple[str, str, str]]) -> str:
    bad_loads = sum(_bad(load) for load in report.loads)
    legend = "".join(
        f'<span><i style="background:{PHASE_COLOURS[p]}"></i>{p}</span>' for p in PHASES
    )
    load_rows = "".join(
        f'<tr class="{"bad" if _bad(load) else ""}"><td>#{load.seq}</td>'
        f"<td>{clock(load.requested_at)}</td><td>{escape(load.load_id)}</td>"
        f"<td>{escape(load.outcome)}</td><td>{_ms(load.total_s) if load.total_s else '-'}</td>"
        f"<td>{escape(load.model)}</td><td>{escape(load.error or '')}"
        + "".join(f"<br>ladder rung {n}: {escape(rung)}" for n, rung in enumerate(load.rungs, 1))
        + (f"<br>gave up: {escape(load.fallback_reason)}" if load.fallback_reason else "")
        + "</td></tr>"
        for load in report.loads
    )
    restarts = "".join(
        f"<tr><td>#{r.seq}</td><td>{clock(r.at)}</td><td>{escape(r.kind)}</td>"
        f"<td>{escape(r.detail)}</td></tr>"
        for r in report.restarts
    )
    incidents = "".join(
        f'<tr class="bad"><td>#{i.seq}</td><td>{clock(i.at)}</td><td>{escape(i.kind)}'
        + (f" [{escape(i.failure_kind)}]" if i.failure_kind else "")
        + "</td>"
        f"<td>{escape(i.load_id or '-')}</td><td>{escape(i.error)}"
        + (f"<pre>{escape(i.log_tail[-2000:])}</pre>" if i.log_tail else "")
        + "</td></tr>"
        for i in report.incidents
    )
    anomalies = "".join(
        f'<tr class="{"violation" if a.violation else ""}"><td>#{a.seq}</td>'
        f"<td>{clock(a.at)}</td><td>{'VIOLATION ' if a.violation else ''}{escape(a.kind)}</td>"
        f"<td>{escape(a.message)}</td></tr>"
        for a in report.anomalies
    )
    timeline = "".join(
        f"<tr><td>{r.seq}</td><td>{clock(r.at)}</td><td>{r.type}</td><td>{r.state}</td>"
        f"<td>{escape(key_fields(r.event))}</td></tr>"
        for r in report.timeline
    )
    title = f"postmortem of slot {report.slot!r}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
<p>{escape(journal)}: {report.events} events, final state <b>{report.final_state}</b>;
{len(report.loads)} loads ({bad_loads} failed, cancelled or interrupted),
{len(report.incidents)} incidents, {len(report.recoveries)} recoveries,
<span class="{"violation" if report.violations else ""}">{len(report.anomalies)} anomalies
({len(report.violations)} contract violations)</span>.</p>
<h2>Loads, phase by phase</h2>
<p class="legend">{legend}</p>
{gantt(report)}
<table id="loads"><tr><th>seq</th><th>requested (UTC)</th><th>load</th><th>outcome</th>
<th>total</th><th>model</th><th>error</th></tr>{load_rows}</table>
<h2>Incidents</h2>
<table id="incidents">{incidents or "<tr><td>none</td></tr>"}</table>
<h2>Respawns and idle unloads</h2>
<table id="restarts">{restarts or "<tr><td>none</td></tr>"}</table>
<h2>Anomalies</h2>
<table id="anomalies">{anomalies or "<tr><td>none</td></tr>"}</table>
<h2>The machine: transitions this journal took</h2>
{machine_svg(counts)}
<h2>Timeline</h2>
<details><summary>{len(report.timeline)} events</summary>
<table id="timeline">{timeline}</table></details>
</body></html>
"""
