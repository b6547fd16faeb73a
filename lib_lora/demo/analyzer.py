"""A strict reader of synthetic-world images: which named colour and which shape, or a rejection.

Everything is a deterministic measurement, made at a working side of `WORK_SIDE` pixels:
1. the background is a plane fitted to the border pixels (the world draws plain or gradient
   backgrounds), with outliers dropped;
2. pixels far from it in RGB are foreground; exactly one connected object may remain once specks
   are ignored, it must not touch the image edge, and it must be one colour;
3. its coverage `alpha` (projection of each pixel onto the object colour, so anti-aliased and
   mildly blurred edges keep sub-pixel positions) gives an edge width, rejecting blurry blobs;
4. the colour is the nearest named colour in CIELAB, unnamed beyond `COLOUR_REJECT_DELTA_E` or
   when two named colours are about as near;
5. the shape must pass its own positive test on the radial profile r(theta), the integral of alpha
   along rays from the centroid (which every ray must cross once): constant radius (circle), a
   concentric round hole (ring), or 3 / 4 / 5 evenly spaced, prominent, pointed radial peaks
   that fit the world's own polygon (triangle, square, star).
An object failing every test is rejected (shape None): a lenient reader would call blobs stars.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .world import COLOURS, STAR_POINTS, SYMMETRY_DEGREES, shape_polygon

WORK_SIDE = 64  # analysis resolution; thresholds below are in pixels at this side
BORDER = 3  # border strip used to fit the background
MAX_BACKGROUND_NOISE = 25.0  # median RGB residual of the border around its plane
MIN_BORDER_INLIERS = 0.6
MIN_CONTRAST = 40.0  # RGB distance of the object from the background
NOISE_MARGIN = 2.5  # foreground stands this many border noise levels above the background
SPECK_FRACTION = 0.004  # components smaller than this fraction of the image are ignored
SPECK_OF_MAIN = 0.05  # ... as are components under this fraction of the main object
MIN_OBJECT_FRACTION = 0.01
MAX_OFF_COLOUR = 0.1  # fraction of object pixels off the object's colour line
OFF_COLOUR_DISTANCE = 0.4  # perpendicular distance to the colour line, in units of contrast
MAX_EDGE_WIDTH = 2.9  # pixels with 0.25 < alpha < 0.75 per pixel of perimeter (sharp: ~0.5)
COLOUR_REJECT_DELTA_E = 35.0  # farther than this from every named colour: no name
COLOUR_AMBIGUITY_DELTA_E = 6.0  # the runner-up must be at least this much farther
RAYS = 180
RAY_STEP = 0.25
MAX_MULTI_CROSSING = 0.03  # fraction of rays allowed to cross the outline more than once
CIRCLE_MAX_DEVIATION = 0.075  # max |r / mean(r) - 1|
HOLE_MAX_DEVIATION = 0.2
HOLE_RATIO_RANGE = (0.4, 0.7)  # hole radius / outer radius
MIN_HOLE_PIXELS = 4
MIN_CORE_PIXELS = 4  # fully covered pixels needed to read the colour from them alone
POLYGON_CORNERS = {"triangle": 3, "square": 4, "star": STAR_POINTS}
POLYGON_MAX_RESIDUAL = {"triangle": 0.08, "square": 0.06, "star": 0.12}  # RMS of r / mean(r)
PEAK_SPACING_TOLERANCE = 0.25  # fraction of the ideal spacing 360 / n
PEAK_PROMINENCE_SHARE = 0.35  # a peak needs this share of the template's own prominence
# Pointed corners: share of rays in the top 30% of the profile's range. A rounded lobe (cosine)
# spends acos(0.4) / pi = 37% there, the world's straight-edged corners 11-18%, blurred ones < 30%.
TIP_LEVEL = 0.7
MAX_TIP_SHARE = 0.325
_RING_4 = ((-1, 0), (1, 0), (0, -1), (0, 1))  # neighbour offsets (dy, dx)
_RING_8 = _RING_4 + ((-1, -1), (-1, 1), (1, -1), (1, 1))


@dataclass(frozen=True)
class Analysis:
    """What `analyze` read. `confidence` is 0 at the acceptance limits (or on rejection), 1 when
    every measurement matches exactly; `reason` names the deciding measurement."""

    colour: str | None
    shape: str | None
    confidence: float
    reason: str


@dataclass(frozen=True)
class _Object:
    alpha: np.ndarray  # (H, W) coverage in [0, 1], zero outside the object
    mask: np.ndarray  # (H, W) bool, alpha > 0.5
    rgb: np.ndarray  # (3,) median colour of the object's core


@dataclass(frozen=True)
class _ShapeTest:
    """The outcome of one shape's positive test."""

    shape: str
    passed: bool
    score: float  # 1 - error / limit: in (0, 1] when passed
    detail: str


class _Rejection(Exception):
    """Raised inside the analyzer when a measurement rules the image out; carries the reason."""


def analyze(image) -> Analysis:
    """Read the one object of a world image (PIL image or uint8 HxWx3 array, side >= 32)."""
    pixels = _working_pixels(image)
    try:
        obj = _segment(pixels)
    except _Rejection as rejection:
        return Analysis(None, None, 0.0, str(rejection))
    colour, colour_score, delta_e = _name_colour(obj.rgb)
    try:
        match = _match_shape(obj)
    except _Rejection as rejection:
        return Analysis(colour, None, 0.0, str(rejection))
    scores = [match.score] + ([colour_score] if colour else [])
    reason = f"{match.detail}; colour delta E {delta_e:.1f}"
    return Analysis(colour, match.shape, round(float(min(scores)), 3), reason)


def _working_pixels(image) -> np.ndarray:
    """Float (H, W, 3) pixels whose shorter side is WORK_SIDE."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image, "RGB")
    elif isinstance(image, Image.Image):
        image = image.convert("RGB")
    else:
        raise TypeError(f"expected a PIL image or numpy array, got {type(image).__name__}")
    if min(image.size) < 32:
        raise ValueError(f"image {image.size} is too small; the shorter side must be >= 32")
    scale = WORK_SIDE / min(image.size)
    if scale != 1.0:
        resample = Image.BOX if scale < 1 else Image.BILINEAR
        image = image.resize((round(image.width * scale), round(image.height * scale)), resample)
    return np.asarray(image, dtype=np.float64)


def _segment(pixels: np.ndarray) -> _Object:
    """The single object's coverage and colour, or a rejection saying why there is none."""
    plane, noise = _fit_background(pixels)
    diff = pixels - plane  # (H, W, 3)
    distance = np.linalg.norm(diff, axis=-1)  # (H, W)
    main = _single_component(distance, max(MIN_CONTRAST / 2, NOISE_MARGIN * noise))
    object_diff = _object_colour_offset(diff[main], distance[main])
    contrast = float(np.linalg.norm(object_diff))
    if contrast < MIN_CONTRAST:
        raise _Rejection(f"no object: contrast {contrast:.0f} below {MIN_CONTRAST:.0f}")
    _check_one_colour(diff[main & (distance > 0.75 * contrast)], object_diff)
    alpha = np.clip(diff @ object_diff / contrast**2, 0.0, 1.0) * _dilate(main, 2)  # (H, W)
    mask = alpha > 0.5
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        raise _Rejection("object touches the image edge")
    _check_edge_width(alpha)
    core = alpha > 0.9
    rgb = np.median(pixels[core if core.sum() >= MIN_CORE_PIXELS else mask], axis=0)
    return _Object(alpha, mask, rgb)


def _fit_background(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-pixel background (H, W, 3), a colour plane least-squares fitted to the border, and
    the median RGB distance of the border from it."""
    h, w, _ = pixels.shape
    ys, xs = np.mgrid[0:h, 0:w]
    border = np.zeros((h, w), bool)
    border[:BORDER], border[-BORDER:], border[:, :BORDER], border[:, -BORDER:] = (True,) * 4
    design = np.stack([np.ones((h, w)), xs / w - 0.5, ys / h - 0.5], axis=-1)  # (H, W, 3)
    keep = border.copy()
    for _ in range(3):
        coeffs, *_ = np.linalg.lstsq(design[keep], pixels[keep], rcond=None)  # (3, 3)
        residual = np.linalg.norm(pixels - design @ coeffs, axis=-1)  # (H, W)
        noise = float(np.median(residual[keep]))
        keep = border & (residual <= max(3.0 * noise, 8.0))
    if noise > MAX_BACKGROUND_NOISE:
        raise _Rejection(f"background too noisy: border residual {noise:.1f}")
    if keep.sum() < MIN_BORDER_INLIERS * border.sum():
        raise _Rejection("background is not plain: border pixels disagree")
    return design @ coeffs, noise


def _object_colour_offset(diffs: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Median offset (3,) from the background of the object's strongest pixels (its core, not
    its anti-aliased rim)."""
    strongest = distances >= 0.8 * np.percentile(distances, 95)
    return np.median(diffs[strongest], axis=0)


def _single_component(distance: np.ndarray, threshold: float) -> np.ndarray:
    """The mask of the one significant component of `distance > threshold`; rejects none or several.

    The threshold is fixed, not relative to the main object, so a fainter second object still
    counts; a component is significant by its pixels that stand out by MIN_CONTRAST, so compression
    halos and noise specks are not objects."""
    labels, ids, _ = _components(distance > threshold, diagonal=True)
    if len(ids) == 0:
        raise _Rejection("no object: nothing stands out from the background")
    sizes = np.bincount(labels[distance > MIN_CONTRAST], minlength=distance.size + 1)[ids]
    if sizes.max() < MIN_OBJECT_FRACTION * distance.size:
        raise _Rejection("no object: foreground too small")
    speck = max(SPECK_FRACTION * distance.size, SPECK_OF_MAIN * sizes.max())
    significant = int((sizes >= speck).sum())
    if significant > 1:
        raise _Rejection(f"{significant} objects, expected exactly one")
    return labels == ids[np.argmax(sizes)]


def _check_one_colour(object_diffs: np.ndarray, object_diff: np.ndarray) -> None:
    """Reject objects whose pixels leave the line from background to object colour (two colours)."""
    contrast_sq = float(object_diff @ object_diff)
    along = object_diffs @ object_diff / contrast_sq  # (N,)
    off_line = np.linalg.norm(object_diffs - along[:, None] * object_diff, axis=-1)  # (N,)
    off_share = float(np.mean(off_line > OFF_COLOUR_DISTANCE * np.sqrt(contrast_sq)))
    if off_share > MAX_OFF_COLOUR:
        raise _Rejection(f"more than one colour: {off_share:.0%} of the object is off-colour")


def _check_edge_width(alpha: np.ndarray) -> None:
    """Reject blurry blobs: partial-coverage pixels per pixel of outline (total variation)."""
    gy, gx = np.gradient(alpha)
    perimeter = float(np.hypot(gx, gy).sum())
    width = float(((alpha > 0.25) & (alpha < 0.75)).sum()) / max(perimeter, 1.0)
    if width > MAX_EDGE_WIDTH:
        raise _Rejection(f"edges too soft: width {width:.1f} px, limit {MAX_EDGE_WIDTH}")


def _name_colour(rgb: np.ndarray) -> tuple[str | None, float, float]:
    """Nearest named colour in CIELAB (delta E 1976), its score, and the distance; no name when
    too far from every named colour or about as near to two of them."""
    distances = np.linalg.norm(_palette_lab() - _lab(rgb), axis=-1)  # (colours,)
    nearest, runner_up = np.argsort(distances)[:2]
    delta_e = float(distances[nearest])
    ambiguous = distances[runner_up] - delta_e < COLOUR_AMBIGUITY_DELTA_E
    if delta_e > COLOUR_REJECT_DELTA_E or ambiguous:
        return None, 0.0, delta_e
    return list(COLOURS)[nearest], 1.0 - delta_e / COLOUR_REJECT_DELTA_E, delta_e


@lru_cache(maxsize=1)
def _palette_lab() -> np.ndarray:
    return _lab(np.array(list(COLOURS.values()), dtype=np.float64))


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in 0..255 to CIELAB (..., 3), D65 white (IEC 61966-2-1 and CIE 15)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805],
                       [0.2126, 0.7152, 0.0722],
                       [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def _match_shape(obj: _Object) -> _ShapeTest:
    """Run the shape tests and keep the best that passes; objects with a hole may only be rings."""
    hole = _hole_mask(obj.mask)
    if hole.sum() >= MIN_HOLE_PIXELS:
        outcomes = [_ring_test(obj, hole)]
    else:
        profile = _radial_profile(obj.alpha, _centroid(obj.alpha))  # (RAYS,)
        outcomes = [_circle_test(profile)] + [_polygon_test(s, profile) for s in POLYGON_CORNERS]
    passed = [o for o in outcomes if o.passed]
    if not passed:
        raise _Rejection("no shape test passed: " + "; ".join(o.detail for o in outcomes))
    return max(passed, key=lambda o: o.score)


def _hole_mask(mask: np.ndarray) -> np.ndarray:
    """Background pixels enclosed by the object (not 4-connected to the image border)."""
    labels, ids, _ = _components(~mask, diagonal=False)
    edge_ids = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return (~mask) & ~np.isin(labels, edge_ids)


def _ring_test(obj: _Object, hole: np.ndarray) -> _ShapeTest:
    """A ring: round outline, one round hole centred on it, hole ratio like the world's rings."""
    _, ids, _ = _components(hole, diagonal=False)
    if len(ids) != 1:
        return _ShapeTest("ring", False, 0.0, f"ring: {len(ids)} holes")
    near_hole = _dilate(hole, 1)
    filled = np.where(near_hole, 1.0, obj.alpha)  # (H, W) the ring with its hole filled
    centre = _centroid(filled)
    outer = _radial_profile(filled, centre)  # (RAYS,)
    inner = _ray_samples(np.where(near_hole, 1.0 - obj.alpha, 0.0), centre).sum(axis=1) * RAY_STEP
    outer_dev, inner_dev = _max_deviation(outer), _max_deviation(inner)
    ratio = float(inner.mean() / outer.mean())
    detail = f"ring: outline dev {outer_dev:.3f}, hole dev {inner_dev:.3f}, hole ratio {ratio:.2f}"
    low, high = HOLE_RATIO_RANGE
    passed = (outer_dev <= CIRCLE_MAX_DEVIATION and inner_dev <= HOLE_MAX_DEVIATION
              and low <= ratio <= high)
    score = 1.0 - max(outer_dev / CIRCLE_MAX_DEVIATION, inner_dev / HOLE_MAX_DEVIATION)
    return _ShapeTest("ring", passed, score, detail)


def _circle_test(profile: np.ndarray) -> _ShapeTest:
    """A circle: the radius stays within CIRCLE_MAX_DEVIATION of its mean all the way round."""
    deviation = _max_deviation(profile)
    score = 1.0 - deviation / CIRCLE_MAX_DEVIATION
    return _ShapeTest("circle", score >= 0, score, f"circle: radius deviation {deviation:.3f}")


def _polygon_test(shape: str, profile: np.ndarray) -> _ShapeTest:
    """A world polygon: exactly its number of evenly spaced, prominent and pointed radial peaks,
    and an RMS fit to the world's own outline at the best rotation."""
    corners = POLYGON_CORNERS[shape]
    normal = profile / profile.mean()
    templates = _templates(shape)  # (rotations, RAYS)
    peaks = _peaks(_smooth(normal), PEAK_PROMINENCE_SHARE * float(np.ptp(templates[0])))
    tips = _tip_share(normal)
    residual = float(np.sqrt(((templates - normal) ** 2).mean(axis=1)).min())
    limit = POLYGON_MAX_RESIDUAL[shape]
    passed = (len(peaks) == corners and _evenly_spaced(peaks, corners)
              and tips <= MAX_TIP_SHARE and residual <= limit)
    detail = f"{shape}: {len(peaks)} radial peaks, tip share {tips:.2f}, residual {residual:.3f}"
    return _ShapeTest(shape, passed, 1.0 - residual / limit, detail)


def _tip_share(normal: np.ndarray) -> float:
    """Share of rays in the top (1 - TIP_LEVEL) of the profile's range: low for pointed corners."""
    low, high = normal.min(), normal.max()
    return float(np.mean(normal > low + TIP_LEVEL * (high - low)))


@lru_cache(maxsize=None)
def _templates(shape: str) -> np.ndarray:
    """Mean-normalised radial profiles (rotations, RAYS) of the world polygon at 1-degree steps."""
    rotations = np.arange(0.0, SYMMETRY_DEGREES[shape], 1.0)
    profiles = np.stack([_polygon_profile(shape_polygon(shape, r)) for r in rotations])
    normal = profiles / profiles.mean(axis=1, keepdims=True)
    normal.flags.writeable = False  # cached and shared between calls
    return normal


def _polygon_profile(vertices: np.ndarray) -> np.ndarray:
    """Distance (RAYS,) from the origin to the outline of a star-shaped polygon along each ray."""
    theta = _ray_angles()
    direction = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # (RAYS, 2)
    start, end = vertices, np.roll(vertices, -1, axis=0)  # (k, 2) each
    edge = end - start  # (k, 2)
    # Solve t * d = start + s * edge for each ray and edge (Cramer's rule); parallel edges miss.
    denom = direction[:, None, 0] * edge[None, :, 1] - direction[:, None, 1] * edge[None, :, 0]
    denom = np.where(denom == 0.0, np.inf, denom)
    sx, sy = start[None, :, 0], start[None, :, 1]  # (1, k)
    t = (sx * edge[None, :, 1] - sy * edge[None, :, 0]) / denom  # (RAYS, k) distance along the ray
    s = (sx * direction[:, None, 1] - sy * direction[:, None, 0]) / denom  # position on the edge
    hit = (s >= 0) & (s <= 1) & (t > 0)  # (RAYS, k)
    return np.where(hit, t, 0.0).max(axis=1)


def _peaks(profile: np.ndarray, min_prominence: float) -> list[int]:
    """Indices of circular local maxima whose topographic prominence reaches `min_prominence`."""
    candidates = np.flatnonzero((profile > np.roll(profile, 1)) & (profile >= np.roll(profile, -1)))
    return [int(i) for i in candidates if _prominence(profile, i) >= min_prominence]


def _prominence(profile: np.ndarray, index: int) -> float:
    """Height above the higher of the lowest points on each side before a higher value."""
    rolled = np.roll(profile, -index)  # the peak is at 0
    higher = np.flatnonzero(rolled > rolled[0])
    if len(higher) == 0:
        return float(rolled[0] - rolled.min())
    right_low = rolled[: higher[0]].min()
    left_low = np.concatenate([rolled[higher[-1] + 1:], rolled[:1]]).min()
    return float(rolled[0] - max(right_low, left_low))


def _evenly_spaced(peaks: list[int], count: int) -> bool:
    gaps = np.diff(np.append(peaks, peaks[0] + RAYS)) * 360.0 / RAYS
    return bool(np.all(np.abs(gaps - 360.0 / count) <= PEAK_SPACING_TOLERANCE * 360.0 / count))


def _smooth(profile: np.ndarray) -> np.ndarray:
    """Circular [1, 2, 1] / 4 filter: removes single-ray wiggles before peak counting."""
    return 0.25 * np.roll(profile, 1) + 0.5 * profile + 0.25 * np.roll(profile, -1)


def _max_deviation(profile: np.ndarray) -> float:
    return float(np.abs(profile / profile.mean() - 1.0).max())


def _centroid(alpha: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]]
    return np.array([(xs * alpha).sum(), (ys * alpha).sum()]) / alpha.sum()  # (x, y)


def _radial_profile(alpha: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """r(theta) (RAYS,) of a filled object; rejects objects that rays cross more than once
    (C shapes, fragments, deep dents), for which r(theta) is not the outline."""
    samples = _ray_samples(alpha, centre)  # (RAYS, steps)
    if samples[:, 0].min() <= 0.5:
        raise _Rejection("object is not solid at its centroid")
    crossings = np.abs(np.diff((samples > 0.5).astype(np.int8), axis=1)).sum(axis=1)  # (RAYS,)
    multi = float(np.mean(crossings > 1))
    if multi > MAX_MULTI_CROSSING:
        raise _Rejection(f"outline is not star-shaped: {multi:.0%} of rays cross it twice")
    return samples.sum(axis=1) * RAY_STEP


def _ray_angles() -> np.ndarray:
    return np.arange(RAYS) * 2.0 * np.pi / RAYS  # angle 0 points right, pi / 2 points down


def _ray_samples(alpha: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Bilinear samples (RAYS, steps) of `alpha` along rays from `centre`, zero outside."""
    theta = _ray_angles()
    steps = np.arange(0.0, max(alpha.shape), RAY_STEP)  # (steps,)
    x = centre[0] + np.cos(theta)[:, None] * steps[None, :]  # (RAYS, steps)
    y = centre[1] + np.sin(theta)[:, None] * steps[None, :]
    return _bilinear(np.pad(alpha, 1), x + 1.0, y + 1.0)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample `image` at float pixel coordinates; points outside read as zero."""
    h, w = image.shape
    x = np.clip(x, 0.0, w - 1.001)
    y = np.clip(y, 0.0, h - 1.001)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _components(mask: np.ndarray, diagonal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components by min-label propagation with pointer jumping (no scipy).

    Returns labels (H, W) (each pixel's smallest flat index in its component, H*W off the mask),
    the component ids and their pixel counts."""
    h, w = mask.shape
    off = h * w
    labels = np.where(mask, np.arange(off).reshape(h, w), off)
    while True:
        padded = np.pad(labels, 1, constant_values=off)
        neighbours = [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                      for dy, dx in (_RING_8 if diagonal else _RING_4)]
        merged = np.where(mask, np.minimum(labels, np.min(neighbours, axis=0)), off)
        merged = np.append(merged.ravel(), off)[merged]  # jump: take the label of one's label
        if np.array_equal(merged, labels):
            break
        labels = merged
    ids, sizes = np.unique(labels[mask], return_counts=True)
    return labels, ids, sizes


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """3x3 binary dilation repeated `iterations` times."""
    out = mask.copy()
    for _ in range(iterations):
        padded = np.pad(out, 1)
        out = np.max([padded[1 + dy : 1 + dy + out.shape[0], 1 + dx : 1 + dx + out.shape[1]]
                      for dy, dx in _RING_8 + ((0, 0),)], axis=0)
    return out
