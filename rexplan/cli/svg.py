"""Plain SVG pictures written by rex, no browser or graph tool needed: a run's time line
(``rex blame --svg``, like ``systemd-analyze plot``) and a plan's waves with its ``requires``
arrows (``rex plan --svg``). Pure code: strings in, one SVG document out.

Every name drawn may come from a host or a manifest, so every text and attribute goes through
core.text.printable (no control characters: XML 1.0 forbids them) and XML escaping; class
names are cut to ``[a-z0-9-]``. Tests and style sheets find the parts by class: ``row``
(``failed``, ``critical``), ``bar`` (with its phase), ``mark``, ``group``, ``node``, ``edge``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from rexplan.core.model import Manifest, Plan
from rexplan.core.text import printable

#: the fill of each phase's bar; any other phase is drawn grey
PHASE_COLOURS = {
    "connect": "#6c9bd2",
    "start": "#e8a838",
    "callback": "#7cb96b",
    "run": "#9a9acf",
}
_OTHER = "#b0b0b0"
_FAILED = "#d62728"
_CRITICAL = "#7b2cbf"
_LABEL_LIMIT = 60

_LABEL_W = 320
_CHART_W = 760
_ROW_H = 22
_TOP = 56
_PAD = 12

_STYLE = (
    "text{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;font-size:12px;fill:#222}"
    ".title{font-size:15px;font-weight:bold}.group text{font-weight:bold;fill:#555}"
    ".axis{stroke:#ddd;stroke-width:1}.tick{font-size:10px;fill:#777}"
    ".span{fill:#eee}.failed .label{fill:" + _FAILED + "}.mark{fill:" + _FAILED + ";"
    "font-weight:bold}.critical .label{font-weight:bold}.chain{fill:none;stroke:" + _CRITICAL + ";"
    "stroke-width:2}.node rect{fill:#f4f4f4;stroke:#555}.edge{fill:none;stroke:#555;"
    "stroke-width:1.3}"
)


@dataclass(frozen=True)
class Bar:
    """A phase of a step, from ``start`` to ``end`` seconds after the run began."""

    phase: str
    start: float
    end: float


@dataclass(frozen=True)
class Row:
    """A step of a run: its label, wave, span, phases and how it ended."""

    label: str
    group: int | None
    start: float
    end: float
    bars: tuple[Bar, ...] = ()
    state: str = ""
    note: str = ""
    failed: bool = False
    critical: bool = False


def _text(value: str) -> str:
    return escape(printable(value, _LABEL_LIMIT))


def _attr(value: str) -> str:
    return quoteattr(printable(value, 4 * _LABEL_LIMIT))


def _cls(*words: str) -> str:
    return " ".join(w for w in (re.sub(r"[^a-z0-9-]", "", word.lower()) for word in words) if w)


def _tick_step(total: float) -> float:
    """A round step (1, 2 or 5 x 10^k seconds) giving at most about 10 ticks."""
    raw = max(total, 1e-3) / 10
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw)


def _document(width: int, height: int, title: str, body: list[str]) -> str:
    head = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">\n'
        f"<title>{_text(title)}</title>\n<style>{_STYLE}</style>\n"
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>\n'
        f'<text class="title" x="{_PAD}" y="22">{_text(title)}</text>\n'
    )
    return head + "\n".join(body) + "\n</svg>\n"


def _legend(y: float, items: Sequence[tuple[str, str]]) -> list[str]:
    out, x = [], float(_PAD)
    for name, colour in items:
        out.append(
            f'<g class="legend"><rect x="{x:.1f}" y="{y - 10:.1f}" width="12" height="12" '
            f'fill="{colour}"/><text x="{x + 16:.1f}" y="{y:.1f}">{_text(name)}</text></g>'
        )
        x += 28 + 7 * len(name)
    return out


def timeline(title: str, rows: Sequence[Row], total: float, phases: Sequence[str]) -> str:
    """A run's rows, grouped by wave in order, on one time axis of ``total`` seconds: a grey
    span from a step's start to its end, a coloured bar per phase, a cross after a failed
    step, and the critical chain's steps outlined and joined."""
    total = max([total, *(r.end for r in rows), 1e-3])
    scale = _CHART_W / total
    longest = max((len(printable(r.label, _LABEL_LIMIT)) for r in rows), default=0)
    x0 = min(_LABEL_W, 40 + 7 * longest) + _PAD

    def x(t: float) -> float:
        return x0 + max(0.0, t) * scale

    lines: list[tuple[str, Row | int | None]] = []
    group: int | str | None = "none yet"
    for row in sorted(rows, key=lambda r: (r.group is None, r.group or 0)):
        if row.group != group:
            group = row.group
            lines.append(("group", row.group))
        lines.append(("row", row))
    height = _TOP + _ROW_H * len(lines) + 60
    width = x0 + _CHART_W + 2 * _PAD + 220  # room for the duration and state after a bar
    body: list[str] = []
    step = _tick_step(total)
    n = 0
    while n * step <= total + 1e-9:
        tx = x(n * step)
        body.append(
            f'<line class="axis" x1="{tx:.1f}" y1="{_TOP - 8}" x2="{tx:.1f}" '
            f'y2="{height - 48}"/><text class="tick" x="{tx + 2:.1f}" y="{_TOP - 10}">'
            f"{n * step:g}s</text>"
        )
        n += 1
    chain: list[tuple[float, float]] = []
    for i, (what, item) in enumerate(lines):
        y = _TOP + i * _ROW_H
        if what == "group":
            name = "no wave" if item is None else f"wave {item}"
            body.append(f'<g class="group"><text x="{_PAD}" y="{y + 15}">{_text(name)}</text></g>')
            continue
        assert isinstance(item, Row)
        body.append(_row(item, y, x))
        if item.critical:
            chain += [(x(item.start), y + _ROW_H / 2), (x(item.end), y + _ROW_H / 2)]
    # from the end of each wave's last step down to the start of the next wave's
    for (ax, ay), (bx, by) in zip(chain[1::2], chain[2::2], strict=False):
        body.append(
            f'<line class="chain" x1="{ax:.1f}" y1="{ay:.1f}" x2="{bx:.1f}" y2="{by:.1f}" '
            'stroke-dasharray="4 3"/>'
        )
    items = [(p, PHASE_COLOURS.get(p, _OTHER)) for p in phases]
    items += [("no phase", "#eeeeee"), ("failed", _FAILED), ("critical chain", _CRITICAL)]
    body += _legend(height - 20, items)
    return _document(width, height, title, body)


def _row(row: Row, y: float, at: Callable[[float], float]) -> str:
    """One step's row at height ``y``; ``at`` maps seconds to the chart's x."""
    note = f" ({row.note})" if row.note else ""
    tip = f"{row.label}: {row.state}{note}, {row.end - row.start:.3f}s"
    classes = _cls("row", "failed" if row.failed else "", "critical" if row.critical else "")
    parts = [
        f'<g class="{classes}" data-step={_attr(row.label)}>',
        f"<title>{_text(tip)}</title>",
        f'<text class="label" x="{_PAD + 12}" y="{y + 15}">{_text(row.label)}</text>',
        f'<rect class="span" x="{at(row.start):.1f}" y="{y + 4}" '
        f'width="{max(1.0, at(row.end) - at(row.start)):.1f}" height="{_ROW_H - 8}"/>',
    ]
    for bar in row.bars:
        colour = PHASE_COLOURS.get(bar.phase, _OTHER)
        parts.append(
            f'<rect class="{_cls("bar", bar.phase)}" x="{at(bar.start):.1f}" y="{y + 4}" '
            f'width="{max(1.0, at(bar.end) - at(bar.start)):.1f}" height="{_ROW_H - 8}" '
            f'fill="{colour}"><title>{_text(f"{bar.phase} {bar.end - bar.start:.3f}s")}</title>'
            "</rect>"
        )
    if row.critical:
        parts.append(
            f'<rect class="chain" x="{at(row.start) - 1:.1f}" y="{y + 2}" '
            f'width="{max(1.0, at(row.end) - at(row.start)) + 2:.1f}" height="{_ROW_H - 4}"/>'
        )
    end = f"{row.end - row.start:.2f}s {row.state}{note}"
    if row.failed:
        parts.append(f'<text class="mark" x="{at(row.end) + 4:.1f}" y="{y + 15}">\u2717</text>')
    parts.append(
        f'<text class="tick" x="{at(row.end) + (18 if row.failed else 4):.1f}" y="{y + 15}">'
        f"{_text(end)}</text></g>"
    )
    return "".join(parts)


@dataclass(frozen=True)
class Node:
    """A program of a plan: its name, wave and a second line (its step count)."""

    name: str
    wave: int
    detail: str = ""


def plan_graph(title: str, nodes: Sequence[Node], edges: Sequence[tuple[str, str]]) -> str:
    """A plan: one row per program grouped by wave, its box in its wave's column, and an
    arrow from each requirement to the program that waits for it."""
    waves = sorted({n.wave for n in nodes})
    column = {w: i for i, w in enumerate(waves)}
    box_w, gap = 200, 60
    x0 = _PAD
    lines: list[Node | int] = []
    for w in waves:
        lines.append(w)
        lines += [n for n in nodes if n.wave == w]
    height = _TOP + _ROW_H * len(lines) + 24
    width = x0 + len(waves) * (box_w + gap) + _PAD
    body = [
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
        "</defs>"
    ]
    where: dict[str, tuple[float, float]] = {}
    for i, item in enumerate(lines):
        y = _TOP + i * _ROW_H
        if isinstance(item, int):
            body.append(
                f'<g class="group"><text x="{x0 + column[item] * (box_w + gap):.1f}" y="{y + 15}">'
                f"{_text(f'wave {item}')}</text></g>"
            )
            continue
        bx = x0 + column[item.wave] * (box_w + gap)
        where[item.name] = (bx, y + _ROW_H / 2)
        label = item.name + (f" ({item.detail})" if item.detail else "")
        body.append(
            f'<g class="node" data-program={_attr(item.name)}><title>{_text(label)}</title>'
            f'<rect x="{bx:.1f}" y="{y + 3}" width="{box_w}" height="{_ROW_H - 6}" rx="3"/>'
            f'<text x="{bx + 6:.1f}" y="{y + 15}">{_text(label)}</text></g>'
        )
    for src, dst in edges:
        if src not in where or dst not in where:
            continue
        (sx, sy), (dx, dy) = where[src], where[dst]
        sx += box_w
        mid = (sx + dx) / 2
        body.append(
            f'<path class="edge" data-from={_attr(src)} data-to={_attr(dst)} '
            f'd="M{sx:.1f},{sy:.1f} C{mid:.1f},{sy:.1f} {mid:.1f},{dy:.1f} {dx:.1f},{dy:.1f}" '
            'marker-end="url(#arrow)"/>'
        )
    return _document(width, height, title, body)


def plan_svg(plan: Plan, manifest: Manifest) -> str:
    """``rex plan --svg``: the waves' programs (with their step counts) and the ``requires``
    arrows between them, the picture of ``rex plan --dot`` drawn by rex."""
    nodes: list[Node] = []
    for wave in plan.waves:
        counts: dict[str, int] = {}
        for s in wave:
            counts[s.program] = counts.get(s.program, 0) + 1
        nodes += [
            Node(name, wave[0].wave, f"{n} step{'s' if n != 1 else ''}")
            for name, n in counts.items()
        ]
    present = {n.name for n in nodes}
    edges = [
        (required, program.name)
        for program in manifest.programs
        if program.name in present
        for required in program.requires
        if required in present
    ]
    return plan_graph(f"rex plan {manifest.path}", nodes, edges)
