"""The hand-drawn SVG loss chart."""

import math
import xml.etree.ElementTree as ET

import pytest

from lib_lora.ui import chart

SVG = "{http://www.w3.org/2000/svg}"


def points(svg: str, colour: str) -> list[tuple[float, float]]:
    root = ET.fromstring(svg)
    line = next(p for p in root.iter(SVG + "polyline") if p.get("stroke") == colour)
    return [tuple(map(float, xy.split(","))) for xy in line.get("points").split()]


@pytest.mark.parametrize("window", [1, 3, 10])
def test_moving_average_is_the_trailing_mean(window):
    values = [float(v * v % 7) for v in range(30)]
    averaged = chart.moving_average(values, window)
    for i, value in enumerate(averaged):
        part = values[max(0, i - window + 1):i + 1]
        assert value == pytest.approx(sum(part) / len(part))


def test_chart_is_valid_svg_with_raw_and_average_lines_inside_the_frame():
    losses = [(s, 1.0 / s + 0.05 * math.sin(s)) for s in range(1, 61)]
    svg = chart.loss_chart_svg(losses, total_steps=120, validation=[(30, 0.2), (60, 0.15)])
    root = ET.fromstring(svg)
    assert root.tag == SVG + "svg" and root.find(SVG + "title").text == "Training loss"
    raw, average = points(svg, chart.RAW_COLOUR), points(svg, chart.AVERAGE_COLOUR)
    assert len(raw) == len(average) == 60
    for x, y in raw + average:
        assert chart.MARGIN_LEFT <= x <= chart.WIDTH - chart.MARGIN_RIGHT and chart.MARGIN_TOP <= y <= chart.HEIGHT - chart.MARGIN_BOTTOM
    assert raw[-1][0] < (chart.MARGIN_LEFT + chart.WIDTH - chart.MARGIN_RIGHT) / 2 + 5  # x runs to total_steps: half done
    assert raw[0][1] < raw[-1][1]  # the loss falls: SVG y grows downwards, so the line ends lower on screen
    assert len(list(root.iter(SVG + "circle"))) == 2


def test_empty_and_non_finite_values():
    assert "appears with the first training step" in chart.loss_chart_svg([])
    svg = chart.loss_chart_svg([(1, 0.5), (2, float("nan")), (3, float("inf")), (4, 0.4)])
    assert len(points(svg, chart.RAW_COLOUR)) == 2
    ET.fromstring(chart.loss_chart_svg([(1, 0.5)]))  # one point, zero span


def test_long_runs_are_downsampled():
    svg = chart.loss_chart_svg([(s, 1.0) for s in range(1, 10_001)])
    assert len(points(svg, chart.RAW_COLOUR)) == chart.MAX_POINTS
    assert len(svg) < 60_000


@pytest.mark.parametrize("values", [[1.1001, 1.095], [0.2, 0.05], [3.0], [100.0, 300.0], [1e-4, 3e-4]])
def test_ticks_cover_the_values_with_distinct_labels(values):
    low, high = chart.value_range(values)
    ticks = chart.nice_ticks(low, high)
    assert low <= min(values) <= max(values) <= high
    assert all(low - 1e-12 <= t <= high + 1e-12 for t in ticks) and len(ticks) >= 1
    labels = [chart.tick_label(t, ticks) for t in ticks]
    assert len(set(labels)) == len(labels)


def test_title_is_escaped():
    assert "&lt;b&gt;" in chart.loss_chart_svg([(1, 1.0)], title="<b>")
