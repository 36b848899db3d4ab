"""Small bar charts as inline SVG for the HTML report (histod.daemon.report_html): no script, no font, no
network, readable in any browser and a few kilobytes each.

Written out rather than drawn with matplotlib: the service writes a report every report_interval_s (and at every
stop), and matplotlib would add a second of import and ~40 MiB to the service process for four bar charts.
Every text that reaches the SVG is escaped (category names come from the data: failure reasons, hours)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 860
HEIGHT = 240
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 46
MAX_X_LABELS = 14
FONT = 'font-family="sans-serif" font-size="11"'


@dataclass(frozen=True)
class Series:
    name: str
    color: str
    values: Sequence[float]


def nice_step(top: float, ticks: int = 5) -> float:
    """A round step (1, 2 or 5 times a power of ten) that covers ``top`` in about ``ticks`` steps."""
    if top <= 0:
        return 1.0
    raw = top / ticks
    power = 10 ** math.floor(math.log10(raw))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2g}"


def _frame(body: list[str], label: str, height: int = HEIGHT) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" '
        f'role="img" aria-label="{escape(label)}" {FONT}>' + "".join(body) + "</svg>"
    )


def _y_axis(top: float, plot_h: float, unit: str) -> tuple[list[str], float]:
    step = nice_step(top)
    high = max(step, math.ceil(top / step) * step)
    out = []
    n = round(high / step)
    for i in range(n + 1):
        v = i * step
        y = TOP + plot_h - plot_h * v / high
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{_number(v)}</text>')
    if unit:
        out.append(
            f'<text x="12" y="{TOP + plot_h / 2:.1f}" transform="rotate(-90 12 {TOP + plot_h / 2:.1f})" '
            f'text-anchor="middle" fill="#555">{escape(unit)}</text>'
        )
    return out, high


def bars(
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    label: str,
    unit: str = "",
    marker: tuple[float, str] | None = None,
    edges: bool = False,
) -> str:
    """Vertical bars, one slot per category, the series stacked in each slot. ``marker`` (position in slots,
    text) draws a dashed vertical line, e.g. the decision threshold on a histogram. With ``edges`` each
    category names where its slot starts (a histogram's bin edge) and is written under the slot's left edge,
    else under its middle."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    totals = [sum(s.values[i] for s in series) for i in range(len(categories))]
    body, high = _y_axis(max(totals, default=0), plot_h, unit)
    slot = plot_w / max(1, len(categories))
    gap = min(2.0, slot * 0.15)
    for i, category in enumerate(categories):
        base = 0.0
        for s in series:
            v = s.values[i]
            if v <= 0:
                continue
            h = plot_h * v / high
            y = TOP + plot_h - plot_h * base / high - h
            body.append(
                f'<rect x="{LEFT + i * slot + gap / 2:.1f}" y="{y:.1f}" width="{max(0.5, slot - gap):.1f}" '
                f'height="{h:.1f}" fill="{s.color}"><title>{escape(category)}: {escape(s.name)} '
                f"{_number(v)}</title></rect>"
            )
            base += v
    every = max(1, math.ceil(len(categories) / MAX_X_LABELS))
    for i in range(0, len(categories), every):
        x = LEFT + (i if edges else i + 0.5) * slot
        body.append(
            f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" fill="#555">{escape(categories[i])}</text>'
        )
    if marker is not None:
        x = LEFT + marker[0] * slot
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#222" stroke-dasharray="4 3"/>'
            f'<text x="{x + 4:.1f}" y="{TOP + 10}" fill="#222">{escape(marker[1])}</text>'
        )
    body.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#888"/>')
    return _frame(body, label)


def hbars(items: Sequence[tuple[str, float]], *, label: str, color: str = "#b4543a") -> str:
    """Horizontal bars, one per (name, value), largest first as given."""
    row = 22
    height = TOP + BOTTOM // 2 + row * max(1, len(items))
    name_w = 220
    plot_w = WIDTH - name_w - RIGHT - 60
    top = max((v for _, v in items), default=0) or 1
    body = []
    for i, (name, value) in enumerate(items):
        y = TOP + i * row
        w = plot_w * value / top
        body.append(
            f'<text x="{name_w - 8}" y="{y + 15}" text-anchor="end" fill="#333">{escape(name[:40])}</text>'
            f'<rect x="{name_w}" y="{y + 3}" width="{max(1.0, w):.1f}" height="{row - 6}" fill="{color}">'
            f"<title>{escape(name)}: {_number(value)}</title></rect>"
            f'<text x="{name_w + w + 6:.1f}" y="{y + 15}" fill="#333">{_number(value)}</text>'
        )
    return _frame(body, label, height)
