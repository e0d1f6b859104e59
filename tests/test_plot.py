"""``macopt.plot``: SVG charts that parse as XML, with every point inside the axes."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from macopt.plot import line_chart, side_by_side

_SVG = "{http://www.w3.org/2000/svg}"


def _axes_and_points(root: ET.Element) -> tuple[tuple[float, float, float, float], list]:
    axes = next(e for e in root.iter(f"{_SVG}rect") if e.get("class") == "axes")
    x, y = float(axes.get("x")), float(axes.get("y"))
    box = (x, y, x + float(axes.get("width")), y + float(axes.get("height")))
    points = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(f"{_SVG}circle")]
    return box, points


@pytest.mark.parametrize("log_x", [False, True])
def test_chart_is_svg_with_every_point_inside_the_axes_and_a_legend(log_x):
    series = {"mac": [(0.05, 1.002), (0.2, 1.0005), (0.6, 1.0)],
              "topk_phi <budget>": [(0.02, 1.3), (0.1, 1.05)], "exact": [(1.0, 1.0)]}
    svg = line_chart(series, x_label="keys read / full", y_label="ppl ratio", title="quality",
                     log_x=log_x)
    root = ET.fromstring(svg)
    assert root.tag == f"{_SVG}svg"
    (x0, y0, x1, y1), points = _axes_and_points(root)
    assert len(points) == 6
    assert all(x0 < x < x1 and y0 < y < y1 for x, y in points)
    texts = [t.text for t in root.iter(f"{_SVG}text")]
    assert {"mac", "topk_phi <budget>", "exact", "quality", "ppl ratio"} <= set(texts)
    ticks = [t for t in texts if t and t[0].isdigit()]
    assert len(ticks) >= 4  # both axes are labelled


def test_points_keep_their_order_on_the_axes():
    svg = line_chart({"a": [(3, 30), (1, 10), (2, 20)]})
    _, points = _axes_and_points(ET.fromstring(svg))
    assert [p[0] for p in points] == sorted(p[0] for p in points)  # drawn left to right
    assert [p[1] for p in points] == sorted((p[1] for p in points), reverse=True)  # up is more


def test_non_finite_points_are_left_out_and_a_single_point_still_plots():
    svg = line_chart({"a": [(1.0, math.nan), (2.0, 5.0)], "b": [(math.inf, 1.0)]}, log_x=True)
    root = ET.fromstring(svg)
    (x0, y0, x1, y1), points = _axes_and_points(root)
    assert len(points) == 1 and x0 < points[0][0] < x1 and y0 < points[0][1] < y1
    assert "b" in [t.text for t in root.iter(f"{_SVG}text")]


def test_side_by_side_places_charts_left_to_right():
    charts = [line_chart({"a": [(0, 0), (1, 1)]}, width=300), line_chart({"b": [(0, 1)]})]
    root = ET.fromstring(side_by_side(charts))
    inner = root.findall(f"{_SVG}svg")
    assert [e.get("x") for e in inner] == ["0", "300"]
    assert root.get("width") == str(300 + 640)
