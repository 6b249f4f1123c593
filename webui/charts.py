"""Server-rendered SVG charts: a sparkline and a time-series line chart with axis labels.

Pure functions from numbers to an SVG string marked safe for the templates: no script, no external asset,
every piece of text escaped. A missing value (None) leaves a gap in the line. Each chart carries
`data-points` (the values drawn), which is what tests count.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from markupsafe import Markup, escape

__all__ = ["line_chart", "number", "sparkline"]


def number(value: float) -> str:
    """A short label: 3-4 significant digits, k/M for large values."""
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.3g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.3g}k"
    if magnitude >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.3g}"


def _range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:  # a flat line sits in the middle, not on an edge
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def _segments(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive known values (a None ends a run)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, y))
    return [r for r in runs if r]


def _polylines(runs: list[list[tuple[float, float]]]) -> str:
    out = []
    for run in runs:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
        out.append(f'<polyline class="line" points="{coords}"/>')
        if len(run) == 1:  # a lone value is still visible
            x, y = run[0]
            out.append(f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="2"/>')
    return "".join(out)


def sparkline(values: Sequence[float | None], label: str, width: int = 240, height: int = 48) -> Markup:
    """A small line of evenly spaced values (e.g. messages per minute), scaled from zero to the peak."""
    known = [v for v in values if v is not None]
    peak = max(known, default=0) or 1
    step = width / max(len(values) - 1, 1)
    pad = 3
    points = [
        (i * step, None if v is None else pad + (height - 2 * pad) * (1 - v / peak)) for i, v in enumerate(values)
    ]
    title = escape(label)
    return Markup(
        f'<svg class="chart spark" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" '
        f'aria-label="{title}" data-points="{len(known)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{title}</title>"
        f'<line class="base" x1="0" y1="{height - pad}" x2="{width}" y2="{height - pad}"/>'
        f"{_polylines(_segments(points))}</svg>"
    )


def _time_label(ts: float, span: float) -> str:
    moment = dt.datetime.fromtimestamp(ts)
    return moment.strftime("%d %b %H:%M" if span > 86400 else "%H:%M:%S" if span < 600 else "%H:%M")


def line_chart(
    points: Sequence[tuple[float, float | None]],
    title: str,
    unit: str = "",
    width: int = 420,
    height: int = 170,
) -> Markup:
    """Values over time: y labels (min, middle, max, with the unit), x labels (first and last time)."""
    left, right, top, bottom = 40, 8, 22, 22
    inner_w, inner_h = width - left - right, height - top - bottom
    known = [(t, v) for t, v in points if v is not None]
    head = escape(title) + (escape(f" ({unit})") if unit else "")
    svg = (
        f'<svg class="chart line-chart" viewBox="0 0 {width} {height}" role="img" aria-label="{head}" '
        f'data-points="{len(known)}" xmlns="http://www.w3.org/2000/svg"><title>{head}</title>'
        f'<text class="head" x="{left}" y="15">{head}</text>'
    )
    if not known:
        return Markup(svg + f'<text x="{left}" y="{top + inner_h / 2:.0f}">no values</text></svg>')
    t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
    low, high = _range([v for _, v in known])
    span_t = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return left + inner_w * ((t - t0) / span_t if t1 > t0 else 0.5)

    def y(v: float) -> float:
        return top + inner_h * (1 - (v - low) / (high - low))

    grid = []
    for value in (low, (low + high) / 2, high):
        gy = y(value)
        grid.append(
            f'<line class="grid" x1="{left}" y1="{gy:.1f}" x2="{width - right}" y2="{gy:.1f}"/>'
            f'<text class="y" x="{left - 4}" y="{gy + 4:.1f}" text-anchor="end">{escape(number(value))}</text>'
        )
    axis_y = height - 6
    labels = (
        f'<text class="x" x="{left}" y="{axis_y}">{escape(_time_label(t0, t1 - t0))}</text>'
        f'<text class="x" x="{width - right}" y="{axis_y}" text-anchor="end">{escape(_time_label(t1, t1 - t0))}</text>'
    )
    scaled = [(x(t), None if v is None else y(v)) for t, v in points]
    return Markup(svg + "".join(grid) + labels + _polylines(_segments(scaled)) + "</svg>")
