"""Aspect-ratio buckets, as kohya-ss/sd-scripts makes and assigns them.

Sources: `make_bucket_resolutions` (library/model_util.py) and `BucketManager.select_bucket`
(library/train_util.py). Sizes are (width, height) everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .errors import DatasetError

Size = tuple[int, int]
LATENT_FACTOR = 8  # the VAE downsamples by 8: every bucket side must divide by it


@dataclass(frozen=True)
class BucketChoice:
    """Where an image goes: its bucket, the size to resize it to before cropping, and the aspect error."""

    bucket: Size
    resized_size: Size
    ar_error: float  # bucket aspect minus image aspect, kohya's `ar_error` (for `mean_img_ar_error`)


def as_size(resolution: int | Sequence[int]) -> Size:
    """(width, height) from an int (square) or a pair."""
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def check_resolution(resolution: int | Sequence[int], multiple: int = 64) -> Size:
    """The resolution as (width, height); a `DatasetError` unless both sides are positive multiples."""
    width, height = as_size(resolution)
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise DatasetError(
            f"resolution {width}x{height} is not a multiple of {multiple}: use e.g. "
            f"{_round_up(width, multiple)}x{_round_up(height, multiple)}"
        )
    return width, height


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _check_step(step: int) -> None:
    if step <= 0 or step % LATENT_FACTOR:
        raise DatasetError(f"bucket step {step} must be a positive multiple of {LATENT_FACTOR} (kohya's default is 64)")


def make_buckets(resolution: int | Sequence[int], min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> list[Size]:
    """kohya's bucket list: every (w, h) on the step grid with area <= the resolution's, sides in [min, max].

    For each width from `min_reso` to `max_reso` the height is the largest step multiple keeping the
    area, capped at `max_reso`; both orientations are added, plus the largest square. Sorted.
    """
    _check_step(step)
    width, height = check_resolution(resolution, step)
    _check_bucket_range(width, height, min_reso, max_reso, step)
    max_area = width * height
    side = int(math.sqrt(max_area) // step) * step
    buckets = {(side, side)}
    for bucket_width in range(min_reso, max_reso + 1, step):
        bucket_height = min(max_reso, int(max_area // bucket_width // step) * step)
        if bucket_height >= min_reso:
            buckets.update({(bucket_width, bucket_height), (bucket_height, bucket_width)})
    return sorted(buckets)


def _check_bucket_range(width: int, height: int, min_reso: int, max_reso: int, step: int) -> None:
    if min_reso <= 0 or min_reso % step or max_reso % step:
        raise DatasetError(f"min/max bucket resolution {min_reso}/{max_reso} must be positive multiples of the step {step}")
    if max_reso < min_reso:
        raise DatasetError(f"max bucket resolution {max_reso} is smaller than the min bucket resolution {min_reso}")
    if max_reso < max(width, height):
        raise DatasetError(f"max bucket resolution {max_reso} is smaller than the resolution {width}x{height}: raise it")


def select_bucket(
    size: Size,
    buckets: Sequence[Size],
    *,
    no_upscale: bool = False,
    resolution: int | Sequence[int] | None = None,
    step: int = 64,
) -> BucketChoice:
    """The bucket for an image of `size`, kohya's `select_bucket`.

    Default: the image's own size if it is a bucket, else the bucket with the nearest aspect ratio
    (the first of equals, in list order). With `no_upscale` the list is ignored: an image larger than
    the resolution's area is first scaled down to that area; the bucket is its size rounded down to
    the step, so it is never enlarged.
    """
    width, height = size
    if width < 1 or height < 1:
        raise DatasetError(f"image size {width}x{height} is empty")
    if no_upscale:
        return _select_no_upscale(size, resolution, step)
    if not buckets:
        raise DatasetError("no buckets to choose from: make them with make_buckets(resolution)")
    aspect = width / height
    bucket = tuple(size) if tuple(size) in set(buckets) else min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
    return BucketChoice(bucket, cover_size(size, bucket), bucket[0] / bucket[1] - aspect)


def assign_bucket(
    size: Size,
    buckets: Sequence[Size],
    *,
    no_upscale: bool = False,
    resolution: int | Sequence[int] | None = None,
    step: int = 64,
) -> Size:
    """Just the bucket of `select_bucket`."""
    return select_bucket(size, buckets, no_upscale=no_upscale, resolution=resolution, step=step).bucket


def cover_size(size: Size, bucket: Size) -> Size:
    """The smallest size with the image's aspect that covers the bucket, sides rounded to the nearest pixel.

    kohya's scale for predefined buckets: a wider image than the bucket matches heights, else widths.
    """
    width, height = size
    scale = bucket[1] / height if width / height > bucket[0] / bucket[1] else bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def _select_no_upscale(size: Size, resolution: int | Sequence[int] | None, step: int) -> BucketChoice:
    if resolution is None:
        raise DatasetError("no_upscale bucketing needs the training resolution (its area caps each bucket)")
    _check_step(step)
    max_width, max_height = as_size(resolution)
    width, height = size
    resized = _shrink_to_area(size, max_width * max_height, step) if width * height > max_width * max_height else size
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if bucket[0] == 0 or bucket[1] == 0:
        raise DatasetError(f"image of {width}x{height} is smaller than the bucket step {step} on one side: enlarge or remove it")
    return BucketChoice(bucket, resized, bucket[0] / bucket[1] - width / height)


def _shrink_to_area(size: Size, max_area: int, step: int) -> Size:
    """kohya: scale to `max_area`, then round the width or the height to the step, whichever keeps the aspect better."""
    aspect = size[0] / size[1]
    exact_width = math.sqrt(max_area * aspect)
    exact_height = max_area / exact_width
    width_rounded = _round_to_step(exact_width, step)
    aspect_by_width = _ratio(width_rounded, _round_to_step(width_rounded / aspect, step))
    height_rounded = _round_to_step(exact_height, step)
    aspect_by_height = _ratio(_round_to_step(height_rounded * aspect, step), height_rounded)
    if abs(aspect_by_width - aspect) < abs(aspect_by_height - aspect):
        return width_rounded, int(width_rounded / aspect + 0.5)
    return int(height_rounded * aspect + 0.5), height_rounded


def _ratio(width: int, height: int) -> float:
    """width / height; infinite for a zero height (an extreme aspect that rounds to nothing)."""
    return width / height if height else math.inf


def _round_to_step(value: float, step: int) -> int:
    """kohya's `round_to_steps`: round to the nearest pixel, then down to the step."""
    rounded = int(value + 0.5)
    return rounded - rounded % step
