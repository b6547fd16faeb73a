"""The loss chart as a self-contained SVG string: raw loss, its moving average, validation points.

Drawn by hand so that it shows the same in every Gradio version (a `gr.HTML`), with no plotting
dependency. Colours use `currentColor` for text and axes so the chart follows the webui's light
or dark theme.
"""

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 560, 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 24, 36
MAX_POINTS = 600  # per line; longer series are averaged into this many buckets
RAW_COLOUR, AVERAGE_COLOUR, VALIDATION_COLOUR = "#9ab8e8", "#e8590c", "#2f9e44"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def default_window(count: int) -> int:
    """About a twentieth of the run: at least 5 steps (or all there are), at most 100."""
    return max(1, min(100, max(min(count, 5), count // 20)))


def value_range(values: Sequence[float]) -> tuple[float, float]:
    """min..max padded by 5%, and at least 2% of the largest value wide (early runs barely move)."""
    low, high = min(values), max(values)
    span = max(high - low, 0.02 * max(abs(high), abs(low)), 1e-6)
    middle = (low + high) / 2
    return middle - span * 0.55, middle + span * 0.55


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """Enough decimals to tell neighbouring ticks apart."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    decimals = max(0, -math.floor(math.log10(step)) + (0 if round(step / 10 ** math.floor(math.log10(step)), 6) in (1, 2, 5) else 1))
    return f"{value:.{decimals}f}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k) covering low..high."""
    if not high > low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def _downsample(points: Sequence[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return list(points)
    size = len(points) / limit
    chunks = [points[int(i * size):int((i + 1) * size)] for i in range(limit)]
    return [(sum(p[0] for p in c) / len(c), sum(p[1] for p in c) / len(c)) for c in chunks if c]


class _Frame:
    """Maps data coordinates to SVG pixels inside the margins."""

    def __init__(self, x_max: float, y_low: float, y_high: float):
        self.x_max, self.y_low, self.y_high = max(x_max, 1), y_low, y_high

    def x(self, step: float) -> float:
        return MARGIN_LEFT + step / self.x_max * (WIDTH - MARGIN_LEFT - MARGIN_RIGHT)

    def y(self, value: float) -> float:
        span = self.y_high - self.y_low or 1.0
        return HEIGHT - MARGIN_BOTTOM - (value - self.y_low) / span * (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM)

    def polyline(self, points: Sequence[tuple[float, float]], colour: str, width: float) -> str:
        coords = " ".join(f"{self.x(s):.1f},{self.y(v):.1f}" for s, v in points)
        return f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="{width}" stroke-linejoin="round"/>'


def _axes(frame: _Frame, y_ticks: list[float], x_ticks: list[float]) -> list[str]:
    parts = [f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{WIDTH - MARGIN_LEFT - MARGIN_RIGHT}" '
             f'height="{HEIGHT - MARGIN_TOP - MARGIN_BOTTOM}" fill="none" stroke="currentColor" stroke-opacity="0.3"/>']
    for value in y_ticks:
        y = frame.y(value)
        parts.append(f'<line x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="currentColor" stroke-opacity="0.12"/>')
        parts.append(f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick_label(value, y_ticks)}</text>')
    for step in x_ticks:
        x = frame.x(step)
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - MARGIN_BOTTOM + 16}" text-anchor="middle">{step:g}</text>')
    parts.append(f'<text x="{WIDTH - MARGIN_RIGHT}" y="{HEIGHT - 4}" text-anchor="end" fill-opacity="0.7">step</text>')
    return parts


def _legend(window: int, has_validation: bool) -> str:
    items = [(RAW_COLOUR, "loss"), (AVERAGE_COLOUR, f"average of {window}")] + ([(VALIDATION_COLOUR, "validation")] if has_validation else [])
    parts, x = [], MARGIN_LEFT
    for colour, label in items:
        parts.append(f'<rect x="{x}" y="8" width="12" height="4" fill="{colour}"/><text x="{x + 16}" y="14">{escape(label)}</text>')
        x += 28 + 8 * len(label)
    return "".join(parts)


def loss_chart_svg(losses: Sequence[tuple[int, float]], total_steps: int = 0, validation: Sequence[tuple[int, float]] = (),
                   window: int | None = None, title: str = "Training loss") -> str:
    """An SVG chart of (step, loss) pairs; the x axis runs to `total_steps` so progress shows."""
    losses = [(s, v) for s, v in losses if math.isfinite(v)]
    validation = [(s, v) for s, v in validation if math.isfinite(v)]
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
            f'class="train-lora-chart" font-family="sans-serif" font-size="13" fill="currentColor"><title>{escape(title)}</title>')
    if not losses:
        empty = head.replace(f'viewBox="0 0 {WIDTH} {HEIGHT}"', f'viewBox="0 0 {WIDTH} 40"')
        return empty + '<text x="8" y="24" fill-opacity="0.6">Loss chart: appears with the first training step</text></svg>'
    window = window or default_window(len(losses))
    average = list(zip((s for s, _ in losses), moving_average([v for _, v in losses], window)))
    values = [v for _, v in losses] + [v for _, v in validation]
    low, high = value_range(values)
    y_ticks = nice_ticks(low, high)
    x_max = max(total_steps, losses[-1][0], *(s for s, _ in validation or [(0, 0)]))
    frame = _Frame(x_max, low, high)
    parts = _axes(frame, y_ticks, nice_ticks(0, x_max))
    parts.append(frame.polyline(_downsample(losses), RAW_COLOUR, 1))
    parts.append(frame.polyline(_downsample(average), AVERAGE_COLOUR, 2))
    parts += [f'<circle cx="{frame.x(s):.1f}" cy="{frame.y(v):.1f}" r="3" fill="{VALIDATION_COLOUR}"/>' for s, v in validation]
    return head + "".join(parts) + _legend(window, bool(validation)) + "</svg>"
