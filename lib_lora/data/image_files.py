"""Check an image file before training uses it: readable to the last byte, not a decompression bomb.

Every image is decoded once when the dataset is scanned (JPEG at 1/8 scale through libjpeg's DCT
scaling, which still reads every byte), so a truncated or damaged file is named before training
rather than mid-run; the result is remembered by path, size and modification time. An image above
`MAX_IMAGE_PIXELS` is refused from its header alone, never decoded.
"""
from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

# What PIL raises on a broken image file (SyntaxError: some malformed PNG chunks).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# PIL's default decompression-bomb limit (about 9459 x 9459), fixed here so that a host which lifts
# PIL's global limit (`Image.MAX_IMAGE_PIXELS = None`) does not lift ours: training uses ~1 megapixel.
MAX_IMAGE_PIXELS = 89_478_485
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
DRAFT_SCALE = 8  # JPEG decoded at 1/8 size to check it: libjpeg's smallest DCT scale
INSPECTED_FILES = 1 << 16  # file versions remembered


@dataclass(frozen=True)
class ImageInfo:
    size: tuple[int, int]  # (width, height) after EXIF orientation
    frames: int  # > 1 for an animated GIF / WebP / PNG, of which training uses the first frame


def inspect_image(path: Path) -> ImageInfo:
    """Size and frame count of a readable image; a `DatasetError` naming the file and the fix otherwise."""
    stat = Path(path).stat()
    return _inspect(Path(path), stat.st_size, stat.st_mtime_ns)  # a changed file has another size or time


@functools.lru_cache(maxsize=INSPECTED_FILES)
def _inspect(path: Path, file_size: int, mtime_ns: int) -> ImageInfo:
    try:
        with open_checked(path) as image:
            image.verify()  # PNG chunk CRCs; must come first: it leaves the image unusable
        with open_checked(path) as image:
            width, height = image.size
            # Only EXIF already in the header: PIL's getexif() on a PNG otherwise decodes the whole image.
            orientation = image.getexif().get(EXIF_ORIENTATION) if "exif" in image.info else None
            frames = getattr(image, "n_frames", 1)
            if image.format == "JPEG":
                image.draft(None, (max(1, width // DRAFT_SCALE), max(1, height // DRAFT_SCALE)))
            image.load()
    except DatasetError:
        raise  # already names the file (a decompression bomb)
    except IMAGE_ERRORS as error:
        raise DatasetError(unreadable_message(path, error)) from error
    if width < 1 or height < 1:
        raise DatasetError(f"image {path} has an empty size {width}x{height}: remove it")
    return ImageInfo((height, width) if orientation in ROTATED_ORIENTATIONS else (width, height), frames)


@contextlib.contextmanager
def open_checked(path: Path) -> Iterator[Image.Image]:
    """`Image.open`, refusing by name an image above `MAX_IMAGE_PIXELS` before any pixel is decoded."""
    try:
        image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # a warning under -W error
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise DatasetError(_too_large(path, f"{int(pixels.group(1)):,} pixels" if pixels else str(error))) from error
    with image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise DatasetError(_too_large(path, f"{image.width}x{image.height}"))
        yield image


def _too_large(path: Path, size: str) -> str:
    return (f"image {path} is {size}, above the {MAX_IMAGE_PIXELS:,}-pixel limit that guards against decompression "
            f"bombs, so it was not loaded: downscale it (training uses about 1 megapixel) or remove it")


def unreadable_message(path: Path, error: BaseException) -> str:
    """What went wrong with an image file, in words a user can act on."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return f"image {path} is an empty file (0 bytes): copy it again or remove it"
    if isinstance(error, UnidentifiedImageError):
        return (f"image {path} is not in an image format we read (png, jpg, webp, bmp, gif), whatever its name says: "
                f"convert it or remove it")
    if "truncated" in str(error).lower():
        return f"image {path} is cut short ({error}), as by an interrupted download or copy: copy it again or remove it"
    return f"image {path} is damaged ({error}): re-export it or remove it"
