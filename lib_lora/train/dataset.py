"""From a config to what the loop consumes: scanned folders, buckets, per-epoch batches, tensors.

This is the factory layer between `TrainConfig` and `lib_lora.data` (which takes plain arguments).
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.batches import Sample, StepMath, bucket_counts, epoch_samples, make_batches, reg_repeats, step_math
from ..data.buckets import BucketChoice, cover_size, make_buckets, select_bucket
from ..data.cache import LatentCache
from ..data.captions import build_caption
from ..data.folders import DatasetScan, ImageItem, check_batch_size, scan_dataset
from ..data.images import FitPlan, apply_fit, image_to_tensor, load_image, plan_fit, should_flip
from ..data.split import split_validation
from .base_model import BaseModel, model_warnings
from .config import TrainConfig
from .cpu_memory import one_off_allocations

LATENT_CHANNELS, LATENT_FILE_HEADER = 4, 128  # SD1/SD2/SDXL latents; a one-tensor safetensors header


@dataclass
class TrainingData:
    """The scanned dataset and the plan for every epoch."""

    train: DatasetScan
    reg: DatasetScan | None
    validation: DatasetScan | None
    samples: list[Sample]  # one epoch: train items x repeats (+ balanced reg)
    steps: StepMath
    buckets: list[tuple[int, int]] = field(default_factory=list)
    validation_samples: list[Sample] = field(default_factory=list)
    choices: dict[ImageItem, BucketChoice] = field(default_factory=dict)


def _bucket_chooser(config: TrainConfig) -> tuple[Callable[[ImageItem], BucketChoice], list[tuple[int, int]]]:
    """Each image's bucket and pre-crop size; without bucketing every image goes to the resolution."""
    resolution = tuple(config.resolution)
    if not config.enable_bucket:
        return (lambda item: BucketChoice(resolution, cover_size(item.size, resolution), 0.0)), [resolution]
    buckets = make_buckets(resolution, config.min_bucket_reso, config.max_bucket_reso, 64)
    return (lambda item: select_bucket(item.size, buckets, no_upscale=config.bucket_no_upscale, resolution=resolution, step=64)), buckets


def plan_training(config: TrainConfig, reg_dir: Path | None = None) -> TrainingData:
    """Scan folders, hold out validation images, assign buckets, and do the step math (shown to the user).
    `reg_dir` stands in for an empty `reg_data_dir` (the run's class images)."""
    scan = partial(scan_dataset, caption_extension=config.caption_extension, allow_unreadable=config.allow_unreadable_images)
    train = scan(Path(config.train_data_dir))
    reg_dir = Path(config.reg_data_dir) if config.reg_data_dir else reg_dir
    reg = scan(reg_dir, is_reg=True) if reg_dir else None
    validation = None
    if config.validation_split > 0:
        train, validation = split_validation(train, config.validation_split, config.seed)
    choose, buckets = _bucket_chooser(config)
    choices = {item: choose(item) for s in (train, reg, validation) if s for item in s.items()}
    samples = epoch_samples(train, reg, lambda item: choices[item].bucket)
    pending = _pending_class_samples(config, len(samples)) if reg is None else 0
    check_batch_size(len(samples) + pending, config.train_batch_size)
    buckets_in_use = bucket_counts(samples)
    if pending:
        buckets_in_use[tuple(config.resolution)] = buckets_in_use.get(tuple(config.resolution), 0) + pending
    steps = step_math(
        len(samples) + pending, config.max_train_epochs, config.train_batch_size, config.gradient_accumulation_steps,
        config.max_train_steps or None, bucket_sizes=list(buckets_in_use.values()), num_images=train.num_images(),
        num_reg_samples=sum(sample.is_reg for sample in samples) + pending,
    )
    held_out = [Sample(item, choices[item].bucket) for item in validation.items()] if validation else []
    return TrainingData(train, reg, validation, samples, steps, buckets, held_out, choices)


def _pending_class_samples(config: TrainConfig, num_train_samples: int) -> int:
    """Samples an epoch will take from class images not drawn yet (`num_class_images`, each at the training
    resolution, balanced against the training samples as a regularization folder is), for the step math."""
    if not config.draws_class_images:
        return 0
    return sum(count for _, count in reg_repeats(num_train_samples, [(index, 1) for index in range(config.num_class_images)]))


def latent_cache_bytes(data: TrainingData, flip_aug: bool) -> int:
    """About the disk a full latent cache takes: one fp32 [4, h/8, w/8] file per image and bucket, two with flip_aug."""
    entries = {(sample.item, tuple(sample.bucket)) for sample in data.samples}
    one = sum(LATENT_CHANNELS * (w // 8) * (h // 8) * 4 + LATENT_FILE_HEADER for _, (w, h) in entries)
    return one * (2 if flip_aug else 1)


def epoch_batches(data: TrainingData, config: TrainConfig, epoch: int) -> list[list[Sample]]:
    """The batches of one epoch; the order depends only on (seed, epoch), so a resumed run sees the same."""
    return make_batches(data.samples, config.train_batch_size, random.Random(config.seed * 100_003 + epoch))


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 4, h, w] fp32
    captions: list[str]
    is_reg: torch.Tensor  # [B] bool
    masks: torch.Tensor | None  # [B, 1, h, w] or None
    size_info: torch.Tensor  # [B, 6]: original (h, w), crop (top, left), target (h, w); SDXL's size conditioning
    batch_size: int = 0  # samples in the whole batch (B, or more when this process trains a share of it)


def size_info(original: tuple[int, int], plan: FitPlan, flip: bool) -> list[int]:
    """SDXL's size conditioning of one sample, as kohya's sdxl_train_network computes it: the source image's
    (h, w), the crop's (top, left) in the resized image (mirrored when flipped), and the bucket's (h, w)."""
    left, top, right, bottom = plan.crop_box
    if flip:
        left = plan.resized_size[0] - right
    return [original[1], original[0], top, left, bottom - top, right - plan.crop_box[0]]


class BatchEncoder:
    """Samples -> latents (cached when the pixels are fixed) and captions (rebuilt every step, seeded)."""

    def __init__(self, host, config: TrainConfig, choices: dict[ImageItem, BucketChoice], cache_dir: Path | None):
        self.host, self.config, self.choices = host, config, choices
        cacheable = config.cache_latents and not config.random_crop
        self.cache = LatentCache(cache_dir, namespace=host.model_name) if cacheable else None

    def caption(self, sample: Sample, rng: random.Random) -> str:
        c = self.config
        return build_caption(
            sample.item.caption,
            trigger_words="" if sample.item.is_reg else c.trigger_words,
            shuffle=c.shuffle_caption,
            keep_tokens=c.keep_tokens,
            caption_dropout_rate=c.caption_dropout_rate,
            tag_dropout_rate=c.caption_tag_dropout_rate,
            rng=rng,
        )

    def fit(self, sample: Sample, rng: random.Random) -> tuple[FitPlan, bool]:
        """The random choices of how a sample is fitted to its bucket: resize + crop, and flip."""
        flip = should_flip(self.config.flip_aug, rng)
        resized = self.choices[sample.item].resized_size
        return plan_fit(sample.item.size, sample.bucket, random_crop=self.config.random_crop, rng=rng, resized_size=resized), flip

    def latents(self, sample: Sample, plan: FitPlan, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """Latent [4, h, w], with masked loss the alpha mask [1, H, W] fitted the same way, and the size info."""
        sizes = size_info(sample.item.size, plan, flip)
        resized = plan.resized_size
        key = self.cache.key_for(sample.item, sample.bucket, plan.crop_box, flip, resized) if self.cache is not None else None
        latent = self.cache.get(key) if key else None
        if latent is not None and not self.config.masked_loss:
            return latent, None, sizes  # a cache hit never opens the image
        image, alpha = load_image(sample.item.path, with_alpha=self.config.masked_loss)
        if latent is None:
            with torch.no_grad(), one_off_allocations():
                latent = self.host.encode_pixels(image_to_tensor(apply_fit(image, plan, flip))[None])[0].float().cpu()
            if key:
                self.cache.put(key, latent)
        if not self.config.masked_loss:
            return latent, None, sizes
        alpha = np.ones((image.height, image.width), np.float32) if alpha is None else alpha
        mask = np.asarray(apply_fit(Image.fromarray(alpha), plan, flip), dtype=np.float32)
        return latent, torch.from_numpy(mask.clip(0, 1))[None], sizes

    def full_cache(self, samples: list[Sample]) -> list[tuple[Sample, FitPlan, bool]]:
        """What a full latent cache of `samples` holds: each distinct image and bucket, with each flip the run can
        draw, fitted as `fit` fits it (a cacheable run never crops at random). Empty when latents are not cached."""
        if self.cache is None:
            return []
        flips = (False, True) if self.config.flip_aug else (False,)
        unique = dict.fromkeys(Sample(s.item, tuple(s.bucket)) for s in samples)
        plans = {s: plan_fit(s.item.size, s.bucket, random_crop=False, rng=None, resized_size=self.choices[s.item].resized_size)
                 for s in unique}
        return [(s, plans[s], flip) for s in unique for flip in flips]

    def encode(self, samples: list[Sample], rng: random.Random, keep: slice = slice(None)) -> Batch:
        """The batch's tensors, of the `keep` rows only (a process's shard); every sample's random choices
        are drawn all the same, so the kept rows are what encoding the whole batch would give."""
        batch_size = len(samples)
        fits = [self.fit(s, rng) for s in samples]
        captions = [self.caption(s, rng) for s in samples][keep]
        samples, fits = samples[keep], fits[keep]
        if not samples:  # a process whose share of a small last batch is empty
            return Batch(torch.empty(0), [], torch.zeros(0, dtype=torch.bool), None, torch.zeros(0, 6), batch_size)
        latents, masks, sizes = zip(*(self.latents(s, plan, flip) for s, (plan, flip) in zip(samples, fits)))
        latents = torch.stack(latents)
        mask = None
        if self.config.masked_loss:
            mask = torch.nn.functional.interpolate(torch.stack(masks), size=latents.shape[-2:], mode="area")
        return Batch(latents, captions, torch.tensor([s.item.is_reg for s in samples]), mask, torch.tensor(sizes, dtype=torch.float32), batch_size)


def plan_warnings(config: TrainConfig, data: TrainingData, model: BaseModel | None = None) -> list[str]:
    """What the user should know before the run starts: skipped files, default captions, cache limits, and
    (given the base model) options that do not fit it."""
    notes = [*data.train.warnings, *(data.reg.warnings if data.reg else [])]
    notes += [f"skipped unreadable file: {p}" for p in data.train.problems]
    if config.num_class_images and not config.reg_data_dir and not config.draws_class_images:
        notes.append("num_class_images: no class images are drawn, as there are no trigger_words to leave out of the captions; "
                     "set trigger_words to the words that name your concept (or num_class_images to 0)")
    if config.cache_latents and config.random_crop:
        notes.append("random_crop changes the pixels every step, so latents are encoded per step, not cached")
    if not config.train_text_encoder and (config.shuffle_caption or config.caption_dropout_rate or config.caption_tag_dropout_rate):
        notes.append("captions change every step (shuffle/dropout), so text-encoder outputs are encoded per step, not cached")
    if config.optimizer_type == "Prodigy" and config.learning_rate < 0.1:
        notes.append(f"Prodigy adapts the step size itself and expects learning_rate ~1.0; {config.learning_rate} will barely train")
    if config.torch_compile and config.module_dropout:
        notes.append("module_dropout skips modules at random, which breaks torch_compile's graph at every module: the step "
                     "then runs slower than without torch_compile; set one of them to 0")
    if config.network_alpha > config.network_dim:
        notes.append(f"network_alpha {config.network_alpha} > network_dim {config.network_dim}: scale > 1 amplifies the update")
    return notes + model_warnings(config, model)
