"""The analyzer reads the world's images (also blurred and JPEG-compressed), rejects broken ones.

Broken images reuse the world's backgrounds and colours so only the object itself is wrong.
"""
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from lib_lora.demo import world
from lib_lora.demo.analyzer import Analysis, analyze

ALL_COLOURS = tuple(world.COLOURS)
SIDE = 64
BIG = SIDE * world.SUPERSAMPLE


def _jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


def _composite(scene: world.Scene, mask: Image.Image) -> Image.Image:
    """Paint a supersampled mask (mode L, BIG x BIG) in the scene's colour over its background."""
    alpha = np.asarray(mask.resize((SIDE, SIDE), Image.BOX), dtype=np.float64)[..., None] / 255.0
    background = world.render_background(scene.background, SIDE)
    pixels = background * (1 - alpha) + np.array(scene.rgb) * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _scene(rng) -> world.Scene:
    return world.sample_scene(rng, world.SHAPES, ALL_COLOURS)


def _polygon_mask(points) -> Image.Image:
    """Mask with one polygon given in fractions of the image side."""
    mask = Image.new("L", (BIG, BIG), 0)
    ImageDraw.Draw(mask).polygon([(x * BIG, y * BIG) for x, y in points], fill=255)
    return mask


def _radial_points(rng, radii):
    """Outline points at evenly spaced angles with the given radii (fractions of the side)."""
    cx, cy = rng.uniform(0.4, 0.6, 2)
    angles = np.linspace(0, 2 * np.pi, len(radii), endpoint=False) + rng.uniform(0, 2 * np.pi)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]


def _blob_radii(rng):
    """A smooth random outline: low harmonics with amplitudes large enough to be no world shape."""
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 6):
        radius += rng.uniform(0.04, 0.16) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return rng.uniform(0.18, 0.28) * radius / radius.max()


def broken_blob(rng):
    """A sharp-edged irregular blob."""
    return _composite(_scene(rng), _polygon_mask(_radial_points(rng, _blob_radii(rng))))


def broken_lobed_blob(rng):
    """A rounded 3-, 4- or 5-lobed flower: radial peaks like a world polygon, but no corners."""
    lobes = int(rng.integers(3, 6))
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    radii = 1 + rng.uniform(0.1, 0.45) * np.cos(lobes * theta)
    radii = rng.uniform(0.16, 0.3) * radii / radii.max()
    return _composite(_scene(rng), _polygon_mask(_radial_points(rng, radii)))


def broken_blurry_blob(rng):
    """A world object or a blob, blurred with radius 3 to 6 (a mushy generation)."""
    image = world.render(_scene(rng), SIDE) if rng.random() < 0.5 else broken_blob(rng)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(3.0, 6.0)))


def broken_ellipse(rng):
    """An ellipse with aspect 1.35 to 2.2, turned."""
    scene, mask = _scene(rng), Image.new("L", (BIG, BIG), 0)
    a = rng.uniform(0.17, 0.27) * BIG
    b = a / rng.uniform(1.35, 2.2)
    ImageDraw.Draw(mask).ellipse((BIG / 2 - a, BIG / 2 - b, BIG / 2 + a, BIG / 2 + b), fill=255)
    return _composite(scene, mask.rotate(rng.uniform(0, 180), resample=Image.BILINEAR))


def broken_irregular_polygon(rng):
    """Three to seven vertices at random angles and radii."""
    count = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = rng.uniform(0.12, 0.3, count)
    cx, cy = rng.uniform(0.4, 0.6, 2)
    points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
    return _composite(_scene(rng), _polygon_mask(points))


def broken_regular_polygon(rng):
    """Shapes the world never draws: pentagon, hexagon, 4- and 6-point stars, rectangles."""
    kind = int(rng.integers(5))
    size = rng.uniform(0.16, 0.3)
    if kind == 0:
        radii = [size] * 5
    elif kind == 1:
        radii = [size] * 6
    elif kind in (2, 3):
        radii = [size, size * world.STAR_INNER_RATIO] * (4 if kind == 2 else 6)
    else:
        return _rectangle(rng, size)
    return _composite(_scene(rng), _polygon_mask(_radial_points(rng, radii)))


def _rectangle(rng, size):
    half_long, half_short = size, size / rng.uniform(1.4, 2.2)
    corners = [(-half_long, -half_short), (half_long, -half_short),
               (half_long, half_short), (-half_long, half_short)]
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    return _composite(_scene(rng), _polygon_mask([(0.5 + c * x - s * y, 0.5 + s * x + c * y)
                                                  for x, y in corners]))


def broken_two_objects(rng):
    """Two world objects: apart, or overlapping, in the same or different colours."""
    first, second = _scene(rng), _scene(rng)
    small = dict(size=rng.uniform(0.14, 0.18))
    first = replace(first, cx=0.3, cy=0.5, **small)
    gap = 0.42 if rng.random() < 0.5 else 0.2
    second = replace(second, cx=0.3 + gap, cy=0.5 + rng.uniform(-0.1, 0.1), **small,
                      background=first.background)
    if rng.random() < 0.5:
        second = replace(second, rgb=first.rgb)
    base = world.render(first, SIDE)
    alpha = world.render_alpha(second, SIDE)[..., None]
    pixels = np.asarray(base, dtype=np.float64) * (1 - alpha) + np.array(second.rgb) * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def broken_stretched(rng):
    """A world object squashed to 1/1.5..1/2 of its height, then turned."""
    scene = replace(_scene(rng), cx=0.5, cy=0.5, size=rng.uniform(0.2, 0.3))
    alpha = world.render_alpha(scene, BIG)
    mask = Image.fromarray((alpha * 255).astype(np.uint8), "L")
    squashed = mask.resize((BIG, int(BIG / rng.uniform(1.5, 2.0))), Image.BILINEAR)
    canvas = Image.new("L", (BIG, BIG), 0)
    canvas.paste(squashed, (0, (BIG - squashed.height) // 2))
    return _composite(scene, canvas.rotate(rng.uniform(0, 180), resample=Image.BILINEAR))


def broken_fragments(rng):
    """Three to seven scattered shards."""
    scene, mask = _scene(rng), Image.new("L", (BIG, BIG), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0.15, 0.85, 2) * BIG
        points = [(cx + dx, cy + dy) for dx, dy in rng.uniform(-0.13, 0.13, (3, 2)) * BIG]
        draw.polygon(points, fill=255)
    return _composite(scene, mask)


def broken_half_shape(rng):
    """A world object with a slab cut away through or near its centre (half circle, C ring,
    star missing arms). Triangles are cut across a corner: a cut parallel to a side would
    leave a smaller, unbroken triangle."""
    scene = replace(_scene(rng), cx=0.5, cy=0.5, size=rng.uniform(0.18, 0.3))
    mask = Image.fromarray((world.render_alpha(scene, BIG) * 255).astype(np.uint8), "L")
    if scene.shape == "triangle":
        corner = world.shape_polygon("triangle", scene.rotation)[int(rng.integers(3))]
        angle = np.arctan2(corner[1], corner[0]) + rng.uniform(-0.35, 0.35)
    else:
        angle = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(-0.2, 0.25) * scene.size * BIG
    ys, xs = np.mgrid[0:BIG, 0:BIG]
    cut = ((xs - BIG / 2) * np.cos(angle) + (ys - BIG / 2) * np.sin(angle)) > offset
    pixels = np.asarray(mask).copy()
    pixels[cut] = 0
    return _composite(scene, Image.fromarray(pixels, "L"))


def broken_holey(rng):
    """A circle or square with an off-centre hole."""
    scene = replace(_scene(rng), shape=str(rng.choice(["circle", "square"])), cx=0.5, cy=0.5,
                     size=rng.uniform(0.22, 0.3))
    mask = Image.fromarray((world.render_alpha(scene, BIG) * 255).astype(np.uint8), "L")
    radius = scene.size * BIG * rng.uniform(0.2, 0.55)
    angle, shift = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.4) * scene.size * BIG
    hx, hy = BIG / 2 + shift * np.cos(angle), BIG / 2 + shift * np.sin(angle)
    ImageDraw.Draw(mask).ellipse((hx - radius, hy - radius, hx + radius, hy + radius), fill=0)
    return _composite(scene, mask)


def broken_noise(rng):
    """Pure colour noise, or a world image drowned in strong noise."""
    if rng.random() < 0.5:
        return Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), "RGB")
    pixels = np.asarray(world.render(_scene(rng), SIDE), dtype=np.float64)
    pixels = pixels + rng.normal(0, 60, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def broken_empty(rng):
    """Background only."""
    scene = _scene(rng)
    return Image.fromarray(world.render_background(scene.background, SIDE).astype(np.uint8), "RGB")


BROKEN = [broken_blob, broken_lobed_blob, broken_blurry_blob, broken_ellipse, broken_stretched,
          broken_irregular_polygon, broken_regular_polygon, broken_two_objects, broken_fragments,
          broken_half_shape, broken_holey, broken_noise, broken_empty]


def _world_images(count, degrade=lambda image, rng: image):
    """(image, scene) for seeds 0..count-1 over every shape and named colour, held-out ones too."""
    for seed in range(count):
        example = world.make_example(seed, shapes=world.SHAPES, colours=ALL_COLOURS)
        yield degrade(example.image, np.random.default_rng(seed)), example.scene


def _accuracy(pairs) -> tuple[float, list]:
    misses = []
    total = 0
    for image, scene in pairs:
        total += 1
        analysis = analyze(image)
        if (analysis.colour, analysis.shape) != (scene.colour_name, scene.shape):
            misses.append((scene.shape, scene.colour_name, analysis))
    return 1 - len(misses) / total, misses


def _soft_and_compressed(image, rng):
    """What a generator's output may look like: blur radius 1, a colour cast, JPEG artefacts."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
    cast = np.clip(blurred + rng.uniform(-10, 10, 3), 0, 255).astype(np.uint8)
    return _jpeg(Image.fromarray(cast, "RGB"), quality=75)


def test_reads_world_images():
    pairs = list(_world_images(300))
    assert {s.shape for _, s in pairs} == set(world.SHAPES)
    assert {s.colour_name for _, s in pairs} == set(world.COLOURS)
    accuracy, misses = _accuracy(pairs)
    print(f"analyzer accuracy on 300 world images: {accuracy:.3f}")
    assert accuracy >= 0.97, misses[:5]
    held_out = [(i, s) for i, s in pairs if s.shape == "star" or s.colour_name == "purple"]
    assert _accuracy(held_out)[0] >= 0.97


def test_reads_blurred_compressed_world_images():
    accuracy, misses = _accuracy(_world_images(200, _soft_and_compressed))
    print(f"analyzer accuracy on 200 blurred, tinted, JPEG world images: {accuracy:.3f}")
    assert accuracy >= 0.95, misses[:5]


@pytest.mark.parametrize("side", [32, 48, 128, 256])
def test_reads_other_sizes(side):
    pairs = ((world.render(scene, side), scene) for _, scene in _world_images(30))
    accuracy, misses = _accuracy(pairs)
    assert accuracy >= 0.9, misses[:5]


def test_rejects_broken_images():
    rejected, total, report = 0, 0, []
    for make in BROKEN:
        shapes = [analyze(make(np.random.default_rng(10_000 + i))).shape for i in range(25)]
        kind_rejected = shapes.count(None)
        report.append(f"{make.__name__}: {kind_rejected}/25")
        assert kind_rejected >= 20, f"{make.__name__} accepted as {shapes}"
        rejected, total = rejected + kind_rejected, total + len(shapes)
    print(f"rejection rate on {total} broken images: {rejected / total:.3f} ({', '.join(report)})")
    assert rejected / total >= 0.95


def test_shape_without_a_named_colour():
    example = world.make_example(3, shapes=("ring",), colours=ALL_COLOURS)
    brown = replace(example.scene, rgb=(130, 80, 40), colour_name=None)  # 50+ delta E from any name
    analysis = analyze(world.render(brown))
    assert analysis.shape == "ring" and analysis.colour is None


def test_confidence_and_reason():
    accepted = analyze(world.make_example(0, shapes=world.SHAPES, colours=ALL_COLOURS).image)
    rejected = analyze(broken_ellipse(np.random.default_rng(0)))
    assert 0 < accepted.confidence <= 1 and accepted.reason
    assert rejected == Analysis(rejected.colour, None, 0.0, rejected.reason) and rejected.reason


def test_numpy_input_matches_pil():
    image = world.make_example(5, shapes=world.SHAPES, colours=ALL_COLOURS).image
    assert analyze(np.asarray(image)) == analyze(image)


@pytest.mark.parametrize("bad, error", [
    (np.zeros((64, 64, 3), np.float32), ValueError),
    (np.zeros((64, 64), np.uint8), ValueError),
    (Image.new("RGB", (31, 64)), ValueError),
    ("image.png", TypeError),
])
def test_rejects_unusable_input(bad, error):
    with pytest.raises(error):
        analyze(bad)
