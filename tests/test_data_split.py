"""Validation split: seeded, disjoint, per subset, reg untouched, validation at one repeat."""
from pathlib import Path

import pytest

from lib_lora.data import DatasetError, DatasetScan, ImageItem, Subset, as_validation, split_validation


def make_scan(count=10, repeats=5, is_reg=False):
    items = [ImageItem(Path(f"/d/{i:02d}.png"), "c", ".txt", "5_x", is_reg) for i in range(count)]
    return DatasetScan([Subset(Path("/d/5_x"), "x", repeats, items, is_reg)], [], 0)


def paths(scan):
    return [item.path for item in scan.items()]


def test_split_is_seeded_disjoint_and_complete():
    train, validation = split_validation(make_scan(), 0.3, seed=42)
    again_train, again_validation = split_validation(make_scan(), 0.3, seed=42)
    assert paths(train) == paths(again_train) and paths(validation) == paths(again_validation)
    assert len(paths(validation)) == 3 and len(paths(train)) == 7
    assert set(paths(train)) | set(paths(validation)) == set(paths(make_scan()))
    assert not set(paths(train)) & set(paths(validation))
    assert train.subsets[0].repeats == 5 and validation.subsets[0].repeats == 1
    assert paths(split_validation(make_scan(), 0.3, seed=7)[1]) != paths(validation)


def test_split_edges():
    train, validation = split_validation(make_scan(), 0.0, seed=1)
    assert len(paths(train)) == 10 and validation.subsets == []
    train, validation = split_validation(make_scan(is_reg=True), 0.5, seed=1)
    assert len(paths(train)) == 10 and validation.subsets == []
    with pytest.raises(DatasetError, match="leaves no training images"):
        split_validation(make_scan(count=1), 0.9, seed=1)
    with pytest.raises(DatasetError):
        split_validation(make_scan(), 1.0, seed=1)


def test_separate_validation_folder_runs_once():
    assert as_validation(make_scan()).num_with_repeats() == 10
