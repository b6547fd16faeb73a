"""Hold out a seeded fraction of each subset for validation, the way kohya's `split_train_val` does.

kohya-ss/sd-scripts (library/train_util.py): each subset's images are shuffled by a generator
seeded with the validation seed (the same seed for every subset) and the last `round(n * f)`
validate (kohya's validation count). The rest train: kohya takes `ceil(n * (1 - f))` for training,
which can overlap the validation images by one; we keep the two disjoint; regularization subsets are never split, and validation runs each image
once (repeats 1). A separate validation folder is `as_validation(scan_dataset(folder))`.
"""
from __future__ import annotations

import random
from dataclasses import replace

from .errors import DatasetError
from .folders import DEFAULT_CAPTION_SOURCE, DatasetScan, Subset


def split_validation(scan: DatasetScan, fraction: float, seed: int) -> tuple[DatasetScan, DatasetScan]:
    """(train, validation) scans; the same scan, fraction and seed always give the same split."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"validation fraction must be at least 0 and below 1, got {fraction}")
    train_subsets, validation_subsets = [], []
    for subset in scan.subsets:
        train, held_out = _split_subset(subset, fraction, seed)
        train_subsets.append(train)
        if held_out.items:
            validation_subsets.append(held_out)
    train_scan = _with_subsets(scan, [s for s in train_subsets if s.items])
    if not train_scan.subsets:
        raise DatasetError(f"a validation fraction of {fraction} leaves no training images: lower it")
    return train_scan, as_validation(_with_subsets(scan, validation_subsets))


def _split_subset(subset: Subset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    if subset.is_reg:
        return subset, replace(subset, items=[])
    items = sorted(subset.items, key=lambda item: str(item.path))
    random.Random(seed).shuffle(items)
    num_train = len(items) - round(len(items) * fraction)
    return replace(subset, items=items[:num_train]), replace(subset, items=items[num_train:])


def as_validation(scan: DatasetScan) -> DatasetScan:
    """The scan with every subset at one repeat, as kohya uses validation images."""
    return _with_subsets(scan, [replace(s, repeats=1) for s in scan.subsets])


def _with_subsets(scan: DatasetScan, subsets: list[Subset]) -> DatasetScan:
    default = sum(item.caption_source == DEFAULT_CAPTION_SOURCE for s in subsets for item in s.items)
    return DatasetScan(subsets, list(scan.problems), default, list(scan.warnings))
