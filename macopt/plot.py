"""Dependency-free SVG charts: lines with markers, axes, ticks, labels and a legend.

No matplotlib (the GPU machine and CI are offline and do not have it): each chart is a small
SVG document as text, to write to a ``.svg`` file or to place beside others with
:func:`side_by_side`.

>>> svg = line_chart({"mac": [(0.1, 1.0), (0.5, 1.01)], "exact": [(1.0, 1.0)]},
...                  x_label="keys read / full", y_label="perplexity ratio")
>>> svg.startswith("<svg") and "exact" in svg
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

Point = tuple[float, float]
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
_MARGIN = {"left": 70, "right": 160, "top": 40, "bottom": 55}  # px around the plot area


def line_chart(series: Mapping[str, Sequence[Point]], x_label: str = "", y_label: str = "",
               title: str = "", log_x: bool = False, width: int = 640,
               height: int = 400) -> str:
    """One chart: each series a line through its points (sorted by x) with a marker at each.

    Points with a non-finite coordinate (or x <= 0 on a ``log_x`` axis) are left out; a
    series with none left still gets its legend entry.
    """
    kept = {name: sorted((float(x), float(y)) for x, y in points
                         if math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x))
            for name, points in series.items()}
    xs = [x for points in kept.values() for x, _ in points]
    ys = [y for points in kept.values() for _, y in points]
    fx = math.log10 if log_x else float
    x_lo, x_hi = _span([fx(x) for x in xs])
    y_lo, y_hi = _span(ys)
    left, top = _MARGIN["left"], _MARGIN["top"]
    plot_w = width - left - _MARGIN["right"]
    plot_h = height - top - _MARGIN["bottom"]

    def px(x: float) -> float:
        return left + (fx(x) - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left + plot_w / 2:.1f}" y="{top - 15}" text-anchor="middle" '
           f'font-size="14">{escape(title)}</text>']
    for x in _log_ticks(x_lo, x_hi) if log_x else _ticks(x_lo, x_hi):
        out.append(_tick(px(x), top + plot_h, "x", _label(x)))
    for y in _ticks(y_lo, y_hi):
        out.append(_tick(left, py(y), "y", _label(y)))
    out.append(f'<rect class="axes" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
               'fill="none" stroke="black"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    for i, (name, points) in enumerate(kept.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = [(px(x), py(y)) for x, y in points]
        if len(coords) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in coords)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                       'stroke-width="1.5"/>')
        out += [f'<circle class="point" cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{color}"/>'
                for a, b in coords]
        ly = top + 10 + 18 * i
        out.append(f'<g class="legend"><line x1="{left + plot_w + 12}" y1="{ly}" '
                   f'x2="{left + plot_w + 32}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
                   f'<text x="{left + plot_w + 38}" y="{ly + 4}">{escape(name)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def side_by_side(charts: Sequence[str]) -> str:
    """Several charts from :func:`line_chart` in one SVG, left to right."""
    parts, x, height = [], 0, 0
    for chart in charts:
        w, h = (int(_attribute(chart, name)) for name in ("width", "height"))
        parts.append(chart.replace("<svg ", f'<svg x="{x}" y="0" ', 1))
        x, height = x + w, max(height, h)
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{x}" height="{height}">',
                      *parts, "</svg>"])


def _attribute(svg: str, name: str) -> str:
    start = svg.index(f' {name}="') + len(name) + 3
    return svg[start:svg.index('"', start)]


def _span(values: list[float]) -> tuple[float, float]:
    """The axis range: the data's, padded by 5% (a unit around a single value)."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        return lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart) inside ``[lo, hi]``."""
    raw = (hi - lo) / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step)
    return [k * step for k in range(first, math.floor(hi / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values (not logs) for a log10 axis spanning ``[lo, hi]`` in log10 units."""
    mantissas = (1, 2, 5) if hi - lo < 3 else (1,)
    values = [m * 10.0**e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in mantissas]
    return [v for v in values if lo <= math.log10(v) <= hi]


def _label(value: float) -> str:
    return f"{value:.6g}" if value != 0 else "0"


def _tick(x: float, y: float, axis: str, label: str) -> str:
    if axis == "x":
        return (f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 5}" stroke="black"/>'
                f'<text x="{x:.1f}" y="{y + 18}" text-anchor="middle">{label}</text>')
    return (f'<line x1="{x - 5}" y1="{y:.1f}" x2="{x}" y2="{y:.1f}" stroke="black"/>'
            f'<text x="{x - 8}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
