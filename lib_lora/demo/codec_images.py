"""What the embedded VAE learns to encode: a broad procedural distribution of 64 px pictures.

SD's VAE is a general codec: a LoRA can only teach what the VAE can carry. The world's own scenes
(dark, near-neutral backgrounds, one object) are one narrow corner of what users bring, so the
codec trains on `broad_image`: any RGB colour for objects and backgrounds; plain, gradient,
smooth-textured, noisy, striped and checked backgrounds, light or dark; one to four objects, filled
or outlined; thin strokes; soft edges. Natural photos come from `photos.py`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import SHAPES, SUPERSAMPLE, shape_polygon

BACKGROUND_KINDS = ("plain", "gradient", "texture", "noise", "stripes", "checks")
# Patterns are rare in what users train on and cost the codec most: drawn less often.
BACKGROUND_ODDS = (0.25, 0.2, 0.2, 0.15, 0.1, 0.1)


def broad_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One picture of the broad distribution, drawn from `rng` alone."""
    pixels = background(rng, size)  # (size, size, 3) float
    for _ in range(int(rng.integers(1, 5))):
        alpha = soften(rng, object_alpha(rng, size))[..., None]
        pixels = pixels * (1.0 - alpha) + rng.uniform(0, 256, size=3) * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float (size, size, 3): a random RGB base under one of `BACKGROUND_KINDS`."""
    kind = str(rng.choice(BACKGROUND_KINDS, p=BACKGROUND_ODDS))
    base = rng.uniform(0, 256, size=3)
    ramp = (np.arange(size) + 0.5) / size  # (size,)
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # (size, size)
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
        return base * (1 - t[..., None]) + rng.uniform(0, 256, size=3) * t[..., None]
    if kind == "texture":
        grid = int(rng.integers(3, 12))
        coarse = rng.uniform(-1, 1, (3, grid, grid)).astype(np.float32)
        smooth = np.stack([np.asarray(Image.fromarray(c, "F").resize((size, size), Image.BICUBIC)) for c in coarse], -1)
        return base + rng.uniform(10, 80) * smooth
    if kind == "noise":
        return base + rng.normal(0, rng.uniform(3, 30), size=(size, size, 3))
    period = rng.uniform(4, 16)  # px
    other = rng.uniform(0, 256, size=3)
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        phase = (np.cos(angle) * np.arange(size)[None, :] + np.sin(angle) * np.arange(size)[:, None]) / period
        on = (phase % 1.0) < 0.5
    else:
        on = ((np.arange(size)[None, :] // period + np.arange(size)[:, None] // period) % 2).astype(bool)
    return np.where(on[..., None], other, base)


def object_alpha(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float (size, size) coverage of one anti-aliased object: a world shape, an ellipse or a
    stroke, filled or outlined, anywhere (it may leave the frame)."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(-0.1, 1.1, size=2) * big
    radius = rng.uniform(0.04, 0.4) * big
    outline = int(rng.uniform(1, 4) * SUPERSAMPLE) if rng.random() < 0.3 else 0
    kind = str(rng.choice(SHAPES + ("ellipse", "stroke")))
    if kind == "stroke":
        points = [tuple(p) for p in rng.uniform(0, big, size=(int(rng.integers(2, 5)), 2))]
        draw.line(points, fill=255, width=max(1, int(rng.uniform(0.5, 3) * SUPERSAMPLE)))
    elif kind in ("circle", "ring", "ellipse"):
        aspect = rng.uniform(0.4, 1.0) if kind == "ellipse" else 1.0
        box = (cx - radius, cy - radius * aspect, cx + radius, cy + radius * aspect)
        draw.ellipse(box, fill=0 if outline else 255, outline=255, width=outline or 1)
        if kind == "ring" and not outline:
            inner = radius * 0.55
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        vertices = [tuple(v) for v in shape_polygon(kind, rng.uniform(0, 360)) * radius + (cx, cy)]
        if outline:
            draw.line(vertices + vertices[:1], fill=255, width=outline, joint="curve")
        else:
            draw.polygon(vertices, fill=255)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64) / 255.0


def soften(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """A quarter of the objects get soft edges: a Gaussian blur of 0.5-3 px."""
    if rng.random() >= 0.25:
        return alpha
    image = Image.fromarray((alpha * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3)))
    return np.asarray(image, dtype=np.float64) / 255.0
