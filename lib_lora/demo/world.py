"""The synthetic world of the embedded demo: seeded, captioned images of exactly one simple object.

The tiny base model learns this world with some concepts held out (`HELD_OUT_SHAPES`,
`HELD_OUT_COLOURS`); the LoRA demo then teaches one of them, and `analyzer.analyze` checks what a
model draws. Geometry is stored in fractions of the image side, so one `Scene` renders at any size.
Edges are anti-aliased by drawing at `SUPERSAMPLE` times the size and box-downsampling.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 180, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 100, 230),
    "purple": (160, 50, 190),
    "pink": (245, 130, 190),
    "white": (240, 240, 240),
}
HELD_OUT_SHAPES = ("star",)
HELD_OUT_COLOURS = ("purple",)
SEEN_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
SEEN_COLOURS = tuple(c for c in COLOURS if c not in HELD_OUT_COLOURS)
CAPTION_STYLES = ("short", "full")

STAR_POINTS = 5
STAR_INNER_RATIO = 0.45  # inner / outer vertex radius of the star
RING_INNER_RATIO = 0.55  # hole radius / outer radius of the ring
# Outer radius of each shape per unit of `Scene.size`, chosen so all shapes cover similar areas.
EXTENT = {"circle": 0.9, "square": 1.1, "triangle": 1.25, "star": 1.25, "ring": 1.0}
# Rotation only matters modulo the shape's symmetry; sampling within it keeps scenes unique.
SYMMETRY_DEGREES = {"circle": 0.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "ring": 0.0}
SIZE_RANGE = (0.14, 0.30)  # nominal radius, fraction of the image side
SMALL_BELOW, LARGE_ABOVE = 0.19, 0.25  # size words; in between the caption says nothing
SIDE_BELOW, SIDE_ABOVE = 0.4, 0.6  # cx below: "left", above: "right"; cy: "top", "bottom"
EDGE_MARGIN = 0.03  # empty border kept around the object, fraction of the side
SUPERSAMPLE = 4
# Backgrounds are dark near-neutral greys, where every named colour stands well clear of them, or
# (with `light_share`) light, slightly tinted ones, under every colour but those too close to them.
BACKGROUND_LEVELS = (18, 70)
BACKGROUND_TINT = 6
LIGHT_LEVELS = (175, 245)
LIGHT_TINT = 18
GRADIENT_MAX = 14.0  # grey levels across the whole image
TEXTURE_MAX = 6.0  # grey levels of the smooth texture
COLOUR_JITTER = 12  # per channel, around the named colour
MIN_RANDOM_CONTRAST = 100.0  # RGB distance of a random-RGB object from its background


@dataclass(frozen=True)
class Background:
    """A plain, gradient or lightly textured dark background; deterministic from its fields."""

    rgb: tuple[int, int, int]
    gradient: tuple[float, float]  # grey levels added from left to right and top to bottom
    texture_seed: int
    texture_amplitude: float  # grey levels of the smooth texture; 0 for none


@dataclass(frozen=True)
class Scene:
    """One object on one background. Lengths and positions are fractions of the image side."""

    shape: str
    colour_name: str | None  # None for an arbitrary RGB colour
    rgb: tuple[int, int, int]
    size: float  # nominal radius; the drawn outer radius is size * EXTENT[shape]
    cx: float
    cy: float
    rotation: float  # degrees, clockwise on screen
    background: Background


@dataclass(frozen=True)
class Description:
    """The words a caption may use for a scene; `None` where the scene earns no word."""

    size: str | None
    colour: str | None
    shape: str
    position: str | None

    def text(self, style: str = "full") -> str:
        """Short: 'a red circle'; full: 'a small red circle on the left'."""
        if style not in CAPTION_STYLES:
            raise ValueError(f"unknown caption style {style!r}; expected one of {CAPTION_STYLES}")
        words = [self.size if style == "full" else None, self.colour, self.shape]
        noun = " ".join(w for w in words if w)
        article = "an" if noun[0] in "aeiou" else "a"
        tail = f" {self.position}" if style == "full" and self.position else ""
        return f"{article} {noun}{tail}"


@dataclass(frozen=True)
class Example:
    """One training pair of the world, with the scene it was drawn from."""

    image: Image.Image
    caption: str
    scene: Scene


def shape_polygon(shape: str, rotation: float = 0.0) -> np.ndarray:
    """Vertices (k, 2) of a polygonal shape with outer radius 1 about the origin, y pointing down.

    At rotation 0 one vertex points straight up; the analyzer builds its templates from this too.
    """
    if shape == "square":
        radii, count = np.ones(4), 4
    elif shape == "triangle":
        radii, count = np.ones(3), 3
    elif shape == "star":
        radii, count = np.tile([1.0, STAR_INNER_RATIO], STAR_POINTS), 2 * STAR_POINTS
    else:
        raise ValueError(f"{shape!r} is not a polygon; polygons are square, triangle and star")
    angles = np.radians(rotation) + 2 * np.pi * np.arange(count) / count  # (k,)
    return np.stack([radii * np.sin(angles), -radii * np.cos(angles)], axis=1)  # (k, 2)


def sample_scene(rng: np.random.Generator, shapes: Sequence[str] = SEEN_SHAPES,
                 colours: Sequence[str] = SEEN_COLOURS, random_rgb: bool = False,
                 light_share: float = 0.0) -> Scene:
    """Draw a scene from `shapes` and `colours` (defaults: what the base model may see).

    `random_rgb=True` ignores `colours` and paints any RGB that contrasts with the background
    (for the VAE, which must reproduce every colour); such scenes have no colour name.
    `light_share` of the scenes get a light background instead, unless their object would not stand
    out on it (white); with 0 no extra number is drawn, so earlier seeded scenes stay the same.
    """
    _check_names(shapes, SHAPES, "shape")
    _check_names(colours, COLOURS, "colour")
    background = _sample_background(rng)
    shape = str(rng.choice(shapes))
    if random_rgb:
        colour_name, rgb = None, _random_contrasting_rgb(rng, background.rgb)
    else:
        colour_name = str(rng.choice(colours))
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.add(COLOURS[colour_name], jitter), 0, 255))
    size = float(rng.uniform(*SIZE_RANGE))
    reach = size * EXTENT[shape] + EDGE_MARGIN
    cx, cy = (float(v) for v in rng.uniform(reach, 1.0 - reach, size=2))
    rotation = float(rng.uniform(0.0, SYMMETRY_DEGREES[shape]))
    if light_share and rng.random() < light_share:
        light = light_background(rng)
        if np.linalg.norm(np.subtract(rgb, light.rgb)) >= MIN_RANDOM_CONTRAST:
            background = light
    return Scene(shape, colour_name, rgb, size, cx, cy, rotation, background)


def _check_names(names: Sequence[str], known, what: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown or empty {what} list {list(names)!r}; known: {list(known)}")


def _sample_background(rng: np.random.Generator) -> Background:
    """Equal odds of plain, gradient, and gradient plus smooth texture."""
    level = rng.integers(*BACKGROUND_LEVELS)
    rgb = tuple(int(level + t) for t in rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=3))
    kind = int(rng.integers(3))
    gradient = tuple(float(g) for g in rng.uniform(-GRADIENT_MAX, GRADIENT_MAX, size=2))
    texture_seed = int(rng.integers(2**31))
    amplitude = float(rng.uniform(0.0, TEXTURE_MAX))
    return Background(rgb, gradient if kind >= 1 else (0.0, 0.0), texture_seed,
                      amplitude if kind == 2 else 0.0)


def light_background(rng: np.random.Generator) -> Background:
    """A light, slightly tinted background, plain, gradient or textured as the dark ones."""
    dark = _sample_background(rng)
    level = rng.integers(*LIGHT_LEVELS)
    rgb = tuple(int(min(255, level + t)) for t in rng.integers(-LIGHT_TINT, LIGHT_TINT + 1, size=3))
    return Background(rgb, dark.gradient, dark.texture_seed, dark.texture_amplitude)


def _random_contrasting_rgb(rng: np.random.Generator,
                            background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Uniform RGB, redrawn until it stands MIN_RANDOM_CONTRAST away from the background."""
    while True:
        rgb = rng.integers(0, 256, size=3)
        if np.linalg.norm(rgb - np.array(background)) >= MIN_RANDOM_CONTRAST:
            return tuple(int(v) for v in rgb)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Composite the anti-aliased object over its background as an RGB image of side `size`."""
    background = render_background(scene.background, size)  # (size, size, 3)
    alpha = render_alpha(scene, size)[..., None]  # (size, size, 1)
    pixels = background * (1.0 - alpha) + np.array(scene.rgb, dtype=np.float64) * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render_background(background: Background, size: int) -> np.ndarray:
    """Float (size, size, 3) background: colour + linear gradient + bicubic-upsampled 5x5 noise."""
    ramp = (np.arange(size) + 0.5) / size - 0.5  # (size,)
    grey = background.gradient[0] * ramp[None, :] + background.gradient[1] * ramp[:, None]
    if background.texture_amplitude > 0:
        coarse = np.random.default_rng(background.texture_seed).uniform(-1, 1, (5, 5))
        smooth = Image.fromarray(coarse.astype(np.float32), "F").resize((size, size), Image.BICUBIC)
        grey = grey + background.texture_amplitude * np.asarray(smooth, dtype=np.float64)
    return np.asarray(background.rgb, dtype=np.float64)[None, None, :] + grey[..., None]


def render_alpha(scene: Scene, size: int) -> np.ndarray:
    """Float (size, size) object coverage in [0, 1], box-filtered from a supersampled mask."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, radius = scene.cx * big, scene.cy * big, scene.size * EXTENT[scene.shape] * big
    if scene.shape in ("circle", "ring"):
        draw.ellipse(_disc_box(cx, cy, radius), fill=255)
        if scene.shape == "ring":
            draw.ellipse(_disc_box(cx, cy, radius * RING_INNER_RATIO), fill=0)
    else:
        vertices = shape_polygon(scene.shape, scene.rotation) * radius + (cx, cy)
        draw.polygon([tuple(v) for v in vertices], fill=255)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64) / 255.0


def _disc_box(cx: float, cy: float, radius: float) -> tuple[float, float, float, float]:
    return (cx - radius, cy - radius, cx + radius, cy + radius)


def describe(scene: Scene) -> Description:
    """Size, colour, shape and position words that agree with the scene's geometry."""
    if scene.size < SMALL_BELOW:
        size_word = "small"
    elif scene.size > LARGE_ABOVE:
        size_word = "large"
    else:
        size_word = None
    position = _position_phrase(scene.cx, scene.cy)
    return Description(size_word, scene.colour_name, scene.shape, position)


def _position_phrase(cx: float, cy: float) -> str:
    horizontal = "left" if cx < SIDE_BELOW else "right" if cx > SIDE_ABOVE else None
    vertical = "top" if cy < SIDE_BELOW else "bottom" if cy > SIDE_ABOVE else None
    if horizontal and vertical:
        return f"in the {vertical} {horizontal}"
    if horizontal:
        return f"on the {horizontal}"
    if vertical:
        return f"at the {vertical}"
    return "in the center"


def caption(scene: Scene, style: str = "full") -> str:
    """The scene's caption in one of `CAPTION_STYLES`."""
    return describe(scene).text(style)


def make_example(seed: int, size: int = 64, shapes: Sequence[str] = SEEN_SHAPES,
                 colours: Sequence[str] = SEEN_COLOURS, random_rgb: bool = False,
                 style: str | None = None) -> Example:
    """The example for `seed`: the same seed always gives the same pixels and caption.

    `style=None` picks a caption style from the seed, so a dataset mixes short and full captions.
    """
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, shapes, colours, random_rgb)
    chosen = style if style is not None else str(rng.choice(CAPTION_STYLES))
    return Example(render(scene, size), caption(scene, chosen), scene)
