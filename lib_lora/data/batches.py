"""One epoch's samples (repeats, regularization balance), bucket batches, and the step count.

Sources in kohya-ss/sd-scripts library/train_util.py: `DreamBoothDataset.__init__` (reg repeats),
`BaseDataset.make_buckets` (one batch list per bucket, `ceil(count / batch_size)` batches each) and
train_network.py (`ceil(len(dataloader) / gradient_accumulation_steps)` optimizer steps per epoch).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .folders import DatasetScan, ImageItem, check_batch_size
from .rng import Rng, shuffled

Size = tuple[int, int]


@dataclass(frozen=True)
class Sample:
    """One use of one image in an epoch: the item and the bucket it is trained at."""

    item: ImageItem
    bucket: Size

    @property
    def is_reg(self) -> bool:
        """A regularization sample: the trainer weights its loss by `prior_loss_weight`."""
        return self.item.is_reg


def reg_repeats(num_train_samples: int, reg_entries: Sequence[tuple[ImageItem, int]]) -> list[tuple[ImageItem, int]]:
    """Repeats per reg image so reg samples per epoch reach the train samples, as kohya balances them.

    Reg images are taken in order with their folder's repeats until the count reaches
    `num_train_samples` (later ones are then unused); if all are taken and it is still short, one
    more repeat is added to each in turn until it is reached. The total may pass the train count by
    less than one folder's repeats, exactly as in kohya.
    """
    counts: list[int] = []
    total = 0
    while total < num_train_samples and reg_entries:
        for index, (_, repeats) in enumerate(reg_entries):
            if len(counts) < len(reg_entries):
                counts.append(repeats)
                total += repeats
            else:
                counts[index] += 1
                total += 1
            if total >= num_train_samples:
                break
    return [(item, count) for (item, _), count in zip(reg_entries, counts)]


def epoch_samples(
    scan: DatasetScan, reg: DatasetScan | None, buckets_for_item: Callable[[ImageItem], Size]
) -> list[Sample]:
    """Each train image `repeats` times, then reg images balanced by `reg_repeats` (none if `reg` is None)."""
    samples = [
        Sample(item, buckets_for_item(item)) for subset in scan.subsets for item in subset.items for _ in range(subset.repeats)
    ]
    if reg is None:
        return samples
    entries = [(item, subset.repeats) for subset in reg.subsets for item in subset.items]
    for item, count in reg_repeats(len(samples), entries):
        bucket = buckets_for_item(item)
        samples.extend(Sample(item, bucket) for _ in range(count))
    return samples


def bucket_counts(samples: Iterable[Sample]) -> dict[Size, int]:
    """Samples per bucket, buckets sorted (kohya's `BucketManager.sort`)."""
    counts = Counter(sample.bucket for sample in samples)
    return {bucket: counts[bucket] for bucket in sorted(counts)}


def bucket_info(samples: Sequence[Sample], ar_errors: Sequence[float] = ()) -> dict:
    """kohya's `ss_bucket_info` metadata: {"buckets": {i: {"resolution", "count"}}, "mean_img_ar_error"}."""
    buckets = {i: {"resolution": list(reso), "count": n} for i, (reso, n) in enumerate(bucket_counts(samples).items())}
    mean_error = sum(abs(e) for e in ar_errors) / len(ar_errors) if ar_errors else 0.0
    return {"buckets": buckets, "mean_img_ar_error": mean_error}


def make_batches(samples: Sequence[Sample], batch_size: int, rng: Rng) -> list[list[Sample]]:
    """Shuffled batches, each from one bucket (kohya groups by bucket; a bucket's last batch may be short).

    Samples are shuffled within each bucket, cut into batches, and the batch order shuffled.
    The number of batches is `sum(ceil(count / batch_size))` over buckets, which `step_math` uses.
    """
    check_batch_size(len(samples), batch_size)
    by_bucket: dict[Size, list[Sample]] = {}
    for sample in samples:
        by_bucket.setdefault(sample.bucket, []).append(sample)
    batches = []
    for bucket in sorted(by_bucket):
        members = shuffled(rng, by_bucket[bucket])
        batches.extend(members[start : start + batch_size] for start in range(0, len(members), batch_size))
    return shuffled(rng, batches)


@dataclass(frozen=True)
class StepMath:
    """How many batches and optimizer steps training takes; `describe()` spells the arithmetic out."""

    num_samples: int  # per epoch, repeats and reg included
    batch_size: int
    batches_per_epoch: int
    grad_accum: int
    optimizer_steps_per_epoch: int
    epochs: int  # as asked
    total_steps: int  # optimizer steps actually taken: epochs x steps per epoch, capped by max_train_steps
    num_images: int | None = None
    max_train_steps: int | None = None
    num_reg_samples: int = 0  # of num_samples; kohya balances them against the train samples

    def describe(self) -> str:
        """E.g. "12 images x 10 repeats = 120 samples / batch 2 = 60 steps per epoch x 4 epochs = 240 optimizer steps"."""
        rounding = " (rounded up per bucket)" if self.batches_per_epoch != math.ceil(self.num_samples / self.batch_size) else ""
        text = f"{self._samples_text()} / batch {self.batch_size} = {self.batches_per_epoch}"
        if self.grad_accum > 1:
            text += f" batches per epoch{rounding} / grad accum {self.grad_accum} = {self.optimizer_steps_per_epoch}"
            rounding = ""
        uncapped = self.epochs * self.optimizer_steps_per_epoch
        text += f" steps per epoch{rounding} x {self.epochs} epochs = {uncapped} optimizer steps"
        if self.total_steps < uncapped:
            text += f", stopped at max_train_steps {self.total_steps} (in epoch {self.epochs_started})"
        return text

    @property
    def epochs_started(self) -> int:
        """Epochs the loop begins: fewer than `epochs` when max_train_steps stops it early."""
        return math.ceil(self.total_steps / self.optimizer_steps_per_epoch)

    def _samples_text(self) -> str:
        train = self.num_samples - self.num_reg_samples
        if not self.num_images:
            text = f"{train} samples"
        elif train % self.num_images == 0:
            text = f"{self.num_images} images x {train // self.num_images} repeats = {train} samples"
        else:
            text = f"{self.num_images} images with repeats = {train} samples"
        if self.num_reg_samples:
            text += f" + {self.num_reg_samples} regularization = {self.num_samples} samples"
        return text


def step_math(
    num_samples_per_epoch: int,
    epochs: int,
    batch_size: int,
    grad_accum: int = 1,
    max_train_steps: int | None = None,
    *,
    bucket_sizes: Sequence[int] | None = None,
    num_images: int | None = None,
    num_reg_samples: int = 0,
) -> StepMath:
    """Batches per epoch, optimizer steps per epoch and in total, counted the way kohya's loop runs.

    kohya counts batches per bucket, `ceil(count / batch_size)` each, so give `bucket_sizes`
    (`bucket_counts(samples).values()`) when bucketing: without it one bucket is assumed. Optimizer
    steps per epoch are `ceil(batches / grad_accum)`; `max_train_steps`, if given, caps the total.
    `num_images` (train images) and `num_reg_samples` only shape `describe()`'s text.
    """
    sizes = list(bucket_sizes) if bucket_sizes is not None else [num_samples_per_epoch]
    if sum(sizes) != num_samples_per_epoch:
        raise ValueError(f"bucket_sizes add up to {sum(sizes)}, not the {num_samples_per_epoch} samples per epoch")
    check_batch_size(num_samples_per_epoch, batch_size)
    if epochs < 1 or grad_accum < 1 or (max_train_steps is not None and max_train_steps < 1):
        raise ValueError(f"epochs ({epochs}), grad_accum ({grad_accum}) and max_train_steps ({max_train_steps}) must be 1 or more")
    batches = sum(math.ceil(size / batch_size) for size in sizes)
    per_epoch = math.ceil(batches / grad_accum)
    total = epochs * per_epoch if max_train_steps is None else min(epochs * per_epoch, max_train_steps)
    return StepMath(
        num_samples_per_epoch, batch_size, batches, grad_accum, per_epoch,
        epochs, total, num_images, max_train_steps, num_reg_samples,
    )
