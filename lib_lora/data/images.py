"""Load an image as RGB (+ optional alpha mask) and fit it to a bucket by resize, crop and flip.

Resize and crop follow kohya-ss/sd-scripts (`BucketManager.select_bucket`,
`trim_and_resize_if_required`): scale so the image covers the bucket, rounding each side to the
nearest pixel, then cut the excess (centre, or a seeded random offset). Downscaling uses an area
filter and upscaling Lanczos, as kohya's default `resize_image` does with cv2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import cover_size
from .errors import DatasetError
from .image_files import IMAGE_ERRORS, open_checked, unreadable_message
from .rng import Rng, rand_float, rand_int

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # 16-bit greyscale PNG / TIFF
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
FLIP_PROBABILITY = 0.5

CropBox = tuple[int, int, int, int]  # left, top, right, bottom, in pixels of the resized image


@dataclass(frozen=True)
class FitPlan:
    """How one image reaches its bucket: resize to `resized_size`, then cut out `crop_box`."""

    resized_size: tuple[int, int]
    crop_box: CropBox


def load_image(path: Path | str, with_alpha: bool = False) -> tuple[Image.Image, np.ndarray | None]:
    """The image in RGB (EXIF orientation applied, transparency composited on white) and its alpha.

    The alpha is a float32 mask [H, W] in 0..1 when `with_alpha` and the image has transparency,
    else None. Palette, 1-bit, greyscale, 16-bit greyscale, CMYK and YCbCr images become RGB; of an
    animated GIF or WebP, the first frame. An image above `MAX_IMAGE_PIXELS` is refused undecoded.
    """
    try:
        with open_checked(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except DatasetError:
        raise  # already names the file (a decompression bomb)
    except IMAGE_ERRORS as error:
        raise DatasetError(unreadable_message(path, error)) from error
    image = _eight_bit(image)
    if not _has_alpha(image):
        return image.convert("RGB"), None
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0  # [H, W]
    background = Image.new("RGBA", rgba.size, WHITE)
    rgb = Image.alpha_composite(background, rgba).convert("RGB")
    return rgb, (alpha if with_alpha else None)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled into 8 bits (PIL's own convert clips them to white instead)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
    else:
        return image
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info


def should_flip(flip_aug: bool, rng: Rng) -> bool:
    """kohya's `flip_aug`: each time an image is used, mirror it with probability 1/2."""
    return flip_aug and rand_float(rng) < FLIP_PROBABILITY


def plan_fit(
    size: tuple[int, int],
    bucket: tuple[int, int],
    *,
    random_crop: bool,
    rng: Rng,
    resized_size: tuple[int, int] | None = None,
) -> FitPlan:
    """Resize target and crop box for an image of `size`; `resized_size` overrides `cover_size`.

    Pass `buckets.select_bucket(...).resized_size` with `no_upscale`: kohya then crops a small image
    to its step-rounded size without resizing it.
    """
    resized = resized_size or cover_size(size, bucket)
    if resized[0] < bucket[0] or resized[1] < bucket[1]:
        raise DatasetError(f"resized size {resized} does not cover bucket {bucket}; choose a resized_size at least the bucket")
    left = _crop_offset(resized[0] - bucket[0], random_crop, rng)
    top = _crop_offset(resized[1] - bucket[1], random_crop, rng)
    return FitPlan(resized, (left, top, left + bucket[0], top + bucket[1]))


def _crop_offset(excess: int, random_crop: bool, rng: Rng) -> int:
    if excess == 0:
        return 0
    return rand_int(rng, 0, excess) if random_crop else excess // 2


def apply_fit(image: Image.Image, plan: FitPlan, flip: bool) -> Image.Image:
    """Resize, crop, then mirror left-right when `flip`; works for RGB images and "F" masks alike."""
    if image.size != plan.resized_size:
        downscale = plan.resized_size[0] < image.size[0]
        method = Image.Resampling.BOX if downscale else Image.Resampling.LANCZOS
        image = image.resize(plan.resized_size, method)
    image = image.crop(plan.crop_box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def fit_to_bucket(
    image: Image.Image,
    bucket: tuple[int, int],
    *,
    random_crop: bool,
    flip: bool,
    rng: Rng,
    resized_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, CropBox]:
    """The image resized to cover `bucket`, cropped to it and mirrored if `flip`; plus the crop box.

    Without bucketing, pass the training resolution as the bucket: the short side is scaled to cover
    it and the rest cropped. The crop box is in pixels of the resized image.
    """
    plan = plan_fit(image.size, bucket, random_crop=random_crop, rng=rng, resized_size=resized_size)
    return apply_fit(image, plan, flip), plan.crop_box


def fit_with_mask(
    image: Image.Image,
    mask: np.ndarray | None,
    bucket: tuple[int, int],
    *,
    random_crop: bool,
    flip: bool,
    rng: Rng,
    resized_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, np.ndarray | None, CropBox]:
    """`fit_to_bucket` applied identically to the image and its alpha mask [H, W] (None passes through)."""
    if mask is not None and mask.shape != (image.height, image.width):
        raise ValueError(f"mask shape {mask.shape} does not match the image's {image.height}x{image.width}")
    plan = plan_fit(image.size, bucket, random_crop=random_crop, rng=rng, resized_size=resized_size)
    fitted = apply_fit(image, plan, flip)
    if mask is None:
        return fitted, None, plan.crop_box
    mask_image = apply_fit(Image.fromarray(mask.astype(np.float32)), plan, flip)
    return fitted, np.clip(np.asarray(mask_image, dtype=np.float32), 0.0, 1.0), plan.crop_box


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1], the VAE's input range."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3] in 0..255
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()
