"""Scan a kohya-style dataset folder: `root/N_name/img.png` + `img.txt`.

Conventions from kohya-ss/sd-scripts (`config_util.generate_dreambooth_subsets_config_by_subdirs`,
`train_util.DreamBoothDataset`): each subfolder `N_name` is a subset repeated N times per epoch;
`name` (everything after the first `_`) is the class token, used as the caption of an image that has
no caption file. Where kohya silently skips (a folder with images but no repeat count, zero or
negative repeats, an unreadable image) we stop with a `DatasetError` naming it instead, so the user
learns about it before training; a folder without images (`logs`, `notes`) is ignored, as kohya
does. N may be any positive count (`999999_x` too: the step math shows what it means). Only the
folders directly under the root are read, never deeper, so a symlink loop cannot recurse.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError
from .image_files import IMAGE_ERRORS, inspect_image
from .text_files import read_text

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})  # kohya's, and GIF's first frame
CAPTION_EXTENSIONS = (".txt", ".caption")
DEFAULT_CAPTION_SOURCE = "default"
SUBSET_NAME = re.compile(r"^(-?\d+)_(.*)$")
SHOWN_NAMES = 5  # file names listed in a warning before "... and N more"


__all__ = ["DatasetError", "ImageItem", "Subset", "DatasetScan", "scan_dataset", "check_batch_size", "is_image_file", "IMAGE_ERRORS"]


@dataclass(frozen=True)
class ImageItem:
    """One image of the dataset; `size` is (width, height) after EXIF orientation, read from the header."""

    path: Path
    caption: str
    caption_source: str  # the caption file's extension (".txt", ".caption", ...) or "default"
    subset: str  # the folder name, e.g. "10_mychar"
    is_reg: bool = False
    size: tuple[int, int] = (0, 0)


@dataclass
class Subset:
    """One `N_name` folder: its images are seen `repeats` times per epoch."""

    directory: Path
    name: str  # the class token: the part after `N_`
    repeats: int
    items: list[ImageItem]
    is_reg: bool


@dataclass
class DatasetScan:
    """The result of `scan_dataset`: subsets, skipped files (`problems`) and caption warnings."""

    subsets: list[Subset]
    problems: list[str]
    default_captions: int
    warnings: list[str] = field(default_factory=list)

    def num_images(self) -> int:
        return sum(len(s.items) for s in self.subsets)

    def num_with_repeats(self) -> int:
        return sum(len(s.items) * s.repeats for s in self.subsets)

    def items(self) -> list[ImageItem]:
        return [item for s in self.subsets for item in s.items]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: folder name -> lower-cased comma tag -> images with it."""
        frequency: dict[str, dict[str, int]] = {}
        for subset in self.subsets:
            counts = frequency.setdefault(subset.directory.name, {})
            for item in subset.items:
                for tag in item.caption.split(","):
                    tag = tag.strip().lower()
                    if tag:
                        counts[tag] = counts.get(tag, 0) + 1
        return frequency


def check_batch_size(num_samples: int, batch_size: int) -> None:
    """A `DatasetError` unless 1 <= batch_size <= samples per epoch."""
    if batch_size < 1:
        raise DatasetError(f"batch size must be 1 or more, got {batch_size}")
    if batch_size > num_samples:
        raise DatasetError(
            f"batch size {batch_size} is larger than the dataset ({num_samples} samples per epoch, repeats included): "
            f"lower the batch size or add images or repeats"
        )


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def scan_dataset(
    root: Path | str,
    *,
    caption_extension: str = ".txt",
    allow_unreadable: bool = False,
    is_reg: bool = False,
) -> DatasetScan:
    """Find the `N_name` subsets of `root`, their images, sizes and captions.

    An unreadable image or caption is listed in `problems`; unless `allow_unreadable`, any problem
    raises a `DatasetError` listing them all. Captions come from `<stem><caption_extension>`, else
    the other of `.txt` / `.caption`, else the folder's class token (counted in `default_captions`).
    """
    root = Path(root)
    directories = _subset_directories(root)
    extensions = _caption_extensions(caption_extension)
    subsets, problems, warnings = [], [], []
    for directory in directories:
        subset = _scan_subset(directory, extensions, is_reg, problems, warnings)
        if subset.items:
            subsets.append(subset)
        else:
            warnings.append(f"{directory}: no usable images, folder ignored")
    _check_problems(root, problems, allow_unreadable)
    if not subsets:
        raise DatasetError(f"no usable images in {root}: add png/jpg/jpeg/webp/bmp/gif images to its N_name folders")
    scan = DatasetScan(subsets, problems, _count_default(subsets), warnings)
    _warn_default_captions(scan)
    for message in scan.warnings:
        logger.warning(message)
    return scan


def _subset_directories(root: Path) -> list[Path]:
    """The `N_name` subfolders of `root`, sorted; errors for anything a user would expect to be used."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    entries = sorted(root.iterdir())
    if not entries:
        raise DatasetError(f"dataset folder {root} is empty: add subfolders named like 10_name holding the images")
    directories = [d for d in entries if d.is_dir() and _has_images(d)]
    for directory in directories:
        _parse_repeats(directory)
    loose = [p for p in entries if is_image_file(p)]
    if loose and not directories:
        raise DatasetError(
            f"{root} holds images directly; move them into a subfolder named like 10_name "
            f"(10 = repeats per epoch, name = class token), or point at that folder's parent"
        )
    if loose:
        logger.warning("%s: %d images directly in the dataset folder are not used (only N_name subfolders are)", root, len(loose))
    return directories


def _has_images(directory: Path) -> bool:
    return any(is_image_file(p) for p in directory.iterdir())


def _parse_repeats(directory: Path) -> tuple[int, str]:
    """(repeats, class token) from a folder named `N_name`; kohya skips the folders refused here."""
    match = SUBSET_NAME.match(directory.name)
    if match is None:
        raise DatasetError(
            f"folder {directory} has images but its name does not start with a repeat count: "
            f"rename it like 10_{directory.name} (10 = repeats per epoch); kohya's scripts would skip it"
        )
    repeats, name = int(match.group(1)), match.group(2)
    if not name:
        raise DatasetError(f"folder {directory} has no name after its repeat count: rename it like {directory.name}name "
                           f"(the name is the caption of images without a caption file)")
    if repeats < 1:
        raise DatasetError(f"folder {directory} has {'zero' if repeats == 0 else 'negative'} repeats ({repeats}), so its "
                           f"images would never be used (kohya skips it): rename it with 1 or more, e.g. 1_{name}")
    return repeats, name


def _caption_extensions(caption_extension: str) -> list[str]:
    """The extensions tried in order: the chosen one, then the other standard ones."""
    if not caption_extension.strip("."):
        raise DatasetError(f"caption_extension {caption_extension!r} is empty: use e.g. '.txt'")
    chosen = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    return [chosen] + [e for e in CAPTION_EXTENSIONS if e != chosen]


def _scan_subset(directory: Path, extensions: list[str], is_reg: bool, problems: list[str], warnings: list[str]) -> Subset:
    repeats, name = _parse_repeats(directory)
    items = []
    for path in sorted(p for p in directory.iterdir() if is_image_file(p)):
        item = _scan_image(path, name, directory.name, extensions, is_reg, problems, warnings)
        if item is not None:
            items.append(item)
    return Subset(directory, name, repeats, items, is_reg)


def _scan_image(
    path: Path, class_token: str, subset: str, extensions: list[str], is_reg: bool, problems: list[str], warnings: list[str]
) -> ImageItem | None:
    """The item for one image, or None after recording why it cannot be used."""
    try:
        info = inspect_image(path)
        caption, source = read_caption(path, extensions, warnings)
    except (DatasetError, *IMAGE_ERRORS) as error:
        problems.append(str(error) if isinstance(error, DatasetError) else f"{path}: {error}")
        return None
    if info.frames > 1:
        warnings.append(f"image {path} is animated ({info.frames} frames): only its first frame is used")
    if caption is None:
        caption, source = class_token, DEFAULT_CAPTION_SOURCE
    return ImageItem(path, caption, source, subset, is_reg, info.size)


def read_caption(image_path: Path, extensions: list[str], warnings: list[str] | None = None) -> tuple[str | None, str]:
    """The first line of the first caption file found, and its extension; (None, "") when there is none.

    kohya reads only the first line unless wildcards are on. An empty file counts as no caption. A file
    that is not UTF-8 is read in the encoding `text_files.read_text` finds, with a warning naming it.
    """
    for extension in extensions:
        path = image_path.with_suffix(extension)
        if not path.is_file():
            continue
        text, encoding = read_text(path)
        if encoding is not None and warnings is not None:
            warnings.append(f"caption {path} is not UTF-8: read as {encoding}; check it, or re-save it as UTF-8")
        lines = text.splitlines()
        first = lines[0].strip() if lines else ""
        return (first, extension) if first else (None, "")
    return None, ""


def _check_problems(root: Path, problems: list[str], allow_unreadable: bool) -> None:
    if problems and not allow_unreadable:
        listed = "\n  ".join(problems)
        raise DatasetError(
            f"{len(problems)} unreadable file(s) in {root}; fix or remove them, "
            f"or allow skipping unreadable files (allow_unreadable_images):\n  {listed}"
        )
    for problem in problems:
        logger.warning("skipped unreadable file %s", problem)


def _count_default(subsets: list[Subset]) -> int:
    return sum(item.caption_source == DEFAULT_CAPTION_SOURCE for s in subsets for item in s.items)


def _warn_default_captions(scan: DatasetScan) -> None:
    missing = [item for item in scan.items() if item.caption_source == DEFAULT_CAPTION_SOURCE]
    if not missing:
        return
    names = ", ".join(item.path.name for item in missing[:SHOWN_NAMES])
    more = f" ... and {len(missing) - SHOWN_NAMES} more" if len(missing) > SHOWN_NAMES else ""
    scan.warnings.append(
        f"{len(missing)} image(s) have no caption file; their folder's class token is used as caption: {names}{more}"
    )
