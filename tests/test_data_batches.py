"""Epoch samples (repeats, kohya's reg balancing), bucket batches and the step arithmetic."""
import math
import random
from pathlib import Path

import pytest

from lib_lora.data import DatasetError, DatasetScan, ImageItem, Subset
from lib_lora.data import bucket_counts, bucket_info, check_batch_size, epoch_samples, make_batches, step_math
from lib_lora.data.batches import reg_repeats

SQUARE, WIDE = (512, 512), (640, 384)


def make_scan(counts_and_repeats, is_reg=False, size=(512, 512)):
    subsets = []
    for index, (count, repeats) in enumerate(counts_and_repeats):
        name = f"{repeats}_s{index}"
        items = [ImageItem(Path(f"/d/{name}/{i}.png"), "c", ".txt", name, is_reg, size) for i in range(count)]
        subsets.append(Subset(Path(f"/d/{name}"), f"s{index}", repeats, items, is_reg))
    return DatasetScan(subsets, [], 0)


def by_size(item):
    return WIDE if int(item.path.stem) % 2 else SQUARE


def test_train_samples_are_items_times_repeats():
    samples = epoch_samples(make_scan([(3, 10), (2, 1)]), None, by_size)
    assert len(samples) == 32 and not any(s.is_reg for s in samples)
    assert bucket_counts(samples) == {SQUARE: 21, WIDE: 11}


def test_reg_balanced_to_train_count_like_kohya():
    train = make_scan([(3, 10)])  # 30 train samples
    reg = make_scan([(4, 2)], is_reg=True)  # 8 reg samples: cycled up to 30
    samples = epoch_samples(train, reg, by_size)
    reg_samples = [s for s in samples if s.is_reg]
    assert len(reg_samples) == 30
    per_image = [sum(s.item.path.stem == str(i) for s in reg_samples) for i in range(4)]
    assert per_image == [8, 8, 7, 7]  # first pass 2 each (8), then +1 in turn: 22 more


def test_more_reg_than_train_uses_the_first_ones():
    entries = [(object(), 3)] * 5
    assert [n for _, n in reg_repeats(7, entries)] == [3, 3, 3]  # kohya stops once 7 is passed
    assert reg_repeats(0, entries) == []
    assert reg_repeats(5, []) == []


def test_batches_are_single_bucket_and_seeded():
    samples = epoch_samples(make_scan([(5, 3)]), None, by_size)  # 9 square + 6 wide
    batches = make_batches(samples, 4, random.Random(1))
    assert all(len({s.bucket for s in batch}) == 1 for batch in batches)
    assert len(batches) == math.ceil(9 / 4) + math.ceil(6 / 4) == 5
    assert sorted(len(b) for b in batches) == [1, 2, 4, 4, 4]
    assert make_batches(samples, 4, random.Random(1)) == batches
    assert make_batches(samples, 4, random.Random(2)) != batches


def test_step_math_describe_and_bucket_rounding():
    math_ = step_math(120, 4, 2, num_images=12)
    assert (math_.batches_per_epoch, math_.optimizer_steps_per_epoch, math_.total_steps) == (60, 60, 240)
    assert math_.describe() == (
        "12 images x 10 repeats = 120 samples / batch 2 = 60 steps per epoch x 4 epochs = 240 optimizer steps"
    )
    with_reg = step_math(240, 75, 30, num_images=12, num_reg_samples=120)
    assert with_reg.total_steps == 600 and with_reg.describe().startswith(
        "12 images x 10 repeats = 120 samples + 120 regularization = 240 samples / batch 30 = 8 steps per epoch"
    )
    bucketed = step_math(15, 2, 4, bucket_sizes=[9, 6])
    assert bucketed.batches_per_epoch == 5 and bucketed.total_steps == 10
    assert "(rounded up per bucket)" in bucketed.describe()


def test_step_math_grad_accum_and_max_steps():
    math_ = step_math(120, 4, 2, grad_accum=7, max_train_steps=20)
    assert (math_.batches_per_epoch, math_.optimizer_steps_per_epoch) == (60, 9)
    assert (math_.total_steps, math_.epochs_started) == (20, 3)
    assert math_.describe() == (
        "120 samples / batch 2 = 60 batches per epoch / grad accum 7 = 9 steps per epoch x 4 epochs = 36 "
        "optimizer steps, stopped at max_train_steps 20 (in epoch 3)"
    )


def test_step_math_matches_the_batches_made():
    samples = epoch_samples(make_scan([(7, 3)]), make_scan([(2, 1)], is_reg=True), by_size)
    counts = bucket_counts(samples)
    math_ = step_math(len(samples), 1, 3, bucket_sizes=list(counts.values()))
    assert math_.batches_per_epoch == len(make_batches(samples, 3, random.Random(0)))
    info = bucket_info(samples, [0.1, -0.3])
    assert info["mean_img_ar_error"] == pytest.approx(0.2)
    assert [b["count"] for b in info["buckets"].values()] == list(counts.values())


def test_batch_larger_than_dataset():
    check_batch_size(5, 5)
    with pytest.raises(DatasetError, match="batch size 6 is larger than the dataset"):
        check_batch_size(5, 6)
    with pytest.raises(DatasetError):
        make_batches(epoch_samples(make_scan([(1, 2)]), None, by_size), 3, random.Random(0))
