"""Resize and crop a dataset into a new folder: center crop, or a crop around the image's focus.

The source is never touched. Images are scaled to cover the target size (as the trainer's
`cover_size`), cut to it, and written as PNG under the same relative paths; caption files are
copied beside them. The result is built in a hidden temporary folder and renamed into place at
the end, so an interrupted run leaves no half-prepared dataset. No Gradio here.
"""

import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..data.buckets import cover_size
from ..data.errors import DatasetError
from ..data.folders import CAPTION_EXTENSIONS, IMAGE_ERRORS, is_image_file
from ..data.images import load_image

CROP_MODES = ("center", "focus")


@dataclass
class PrepareResult:
    folder: Path
    written: int = 0
    captions: int = 0
    skipped: list[str] = field(default_factory=list)


def parse_size(text: str) -> tuple[int, int]:
    """"512" -> (512, 512); "512x768" or "512,768" -> (512, 768); sides of at least 8 px."""
    parts = [p.strip() for p in str(text).lower().replace("x", ",").split(",") if p.strip()]
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) < 8:
        raise ValueError(f"size {text!r}: write 512 or 512x768")
    return sides[0], sides[1]


def focus_point(image: Image.Image) -> tuple[float, float]:
    """Where the detail is, as fractions (x, y) of the size: the centroid of edge strength.

    A cheap stand-in for the webui's focal-point crop (which also weighs faces): flat backgrounds
    have weak edges, subjects strong ones.
    """
    small = image.convert("L")
    small.thumbnail((128, 128))
    edges = np.asarray(small.filter(ImageFilter.FIND_EDGES), dtype=np.float64)  # [h, w]
    edges[[0, -1], :] = 0  # FIND_EDGES marks the border itself
    edges[:, [0, -1]] = 0
    total = edges.sum()
    if total <= 0:
        return 0.5, 0.5
    ys, xs = np.mgrid[0:edges.shape[0], 0:edges.shape[1]]
    return float((xs * edges).sum() / total / max(1, edges.shape[1] - 1)), float((ys * edges).sum() / total / max(1, edges.shape[0] - 1))


def crop_box(resized: tuple[int, int], target: tuple[int, int], focus: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int, int, int]:
    """The target-sized window of a resized image, centred on `focus` as far as the edges allow."""
    (rw, rh), (tw, th) = resized, target
    left = min(max(0, round(focus[0] * rw - tw / 2)), rw - tw)
    top = min(max(0, round(focus[1] * rh - th / 2)), rh - th)
    return left, top, left + tw, top + th


def prepare_image(image: Image.Image, target: tuple[int, int], mode: str = "center") -> Image.Image:
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    resized_size = cover_size(image.size, target)
    resized = image.resize(resized_size, Image.Resampling.LANCZOS) if resized_size != image.size else image
    focus = focus_point(image) if mode == "focus" else (0.5, 0.5)
    return resized.crop(crop_box(resized_size, target, focus))


def _check_destination(source: Path, destination: Path) -> None:
    if not source.is_dir():
        raise DatasetError(f"source folder {source} does not exist")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise DatasetError(f"{destination} already exists and is not empty: choose a new folder (the source is never overwritten)")
    if destination.resolve().is_relative_to(source.resolve()):
        raise DatasetError(f"{destination} is inside the source folder {source}: choose a folder outside it")


def prepare_folder(source: Path, destination: Path, target: tuple[int, int], mode: str = "center",
                   progress: Callable[[int, int], None] | None = None) -> PrepareResult:
    """Resize + crop every image under `source` into `destination` (new or empty), captions copied."""
    if not str(source).strip() or not str(destination).strip():
        raise DatasetError("give both a source folder (or a dataset folder) and a new folder to write to")
    source, destination = Path(source), Path(destination)
    _check_destination(source, destination)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    images = [p for p in files if is_image_file(p)]
    tmp = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp")
    result = PrepareResult(destination)
    try:
        for index, path in enumerate(images):
            _prepare_one(path, source, tmp, target, mode, result)
            if progress:
                progress(index + 1, len(images))
        for path in (p for p in files if p.suffix.lower() in CAPTION_EXTENSIONS):
            out = tmp / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)
            result.captions += 1
        tmp.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            destination.rmdir()  # empty (checked above): the rename needs the name free
        tmp.rename(destination)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return result


def _prepare_one(path: Path, source: Path, tmp: Path, target: tuple[int, int], mode: str, result: PrepareResult) -> None:
    try:
        image, _ = load_image(path)
    except (DatasetError, *IMAGE_ERRORS) as e:
        result.skipped.append(f"{path}: {e}")
        return
    out = (tmp / path.relative_to(source)).with_suffix(".png")
    if out.exists():
        result.skipped.append(f"{path}: another image of the same name was written as {out.name}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    prepare_image(image, target, mode).save(out)
    result.written += 1
