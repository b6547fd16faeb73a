"""Live step math and warnings for the options as they stand in the tab (no Gradio here).

The step count is the trainer's own `plan_training` (kohya's per-bucket batch count via
`step_math`), so the number shown is the number trained. The warnings are the trainer's
`plan_warnings` plus the checks below, which only the tab makes: they are advice before a run,
not errors (those stay in `TrainConfig` and the dataset scan).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data.errors import DatasetError
from ..data.folders import DatasetScan
from ..train.base_model import BaseModel
from ..train.config import ConfigError, TrainConfig
from ..train.dataset import TrainingData, plan_training, plan_warnings
from .fields import config_from_widgets

MIN_IMAGES = 5
# Learning rates known to work for LoRA per optimizer (kohya community ranges); Prodigy is adaptive.
# The options `plan_training` reads: a change to any other one needs no new scan.
PLAN_FIELDS = ("train_data_dir", "reg_data_dir", "caption_extension", "allow_unreadable_images", "validation_split", "seed", "resolution",
               "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "train_batch_size", "max_train_epochs",
               "gradient_accumulation_steps", "max_train_steps")
LR_RANGES = {"AdamW": (1e-5, 1e-3), "AdamW8bit": (1e-5, 1e-3), "Lion": (1e-6, 3e-4), "Prodigy": (0.1, 2.0), "SGD": (1e-4, 1.0)}


@dataclass
class PlanSummary:
    steps_text: str = ""  # "12 images x 10 repeats = 120 samples / batch 4 = 30 steps per epoch x ..."
    total_steps: int = 0
    repeats: list[str] = field(default_factory=list)  # "10_zkz: 12 images x 10 repeats"
    warnings: list[str] = field(default_factory=list)
    error: str = ""  # what stops training from starting (bad option, unusable dataset)


def config_warnings(config: TrainConfig) -> list[str]:
    """Advice on options alone: ranks, learning rates for the chosen optimizer."""
    notes = []
    if config.conv_targets and config.conv_alpha > config.conv_dim:
        notes.append(f"conv_alpha {config.conv_alpha} > conv_dim {config.conv_dim}: scale > 1 amplifies the update")
    low, high = LR_RANGES.get(config.optimizer_type, (0.0, float("inf")))
    rates = {"learning_rate": config.learning_rate, "unet_lr": config.unet_lr, "text_encoder_lr": config.text_encoder_lr}
    for name, lr in rates.items():
        prodigy_low = config.optimizer_type == "Prodigy" and name == "learning_rate" and lr < 0.1  # plan_warnings says it
        if lr and not low <= lr <= high and not prodigy_low:
            notes.append(f"{name} {lr:g} is outside {low:g}..{high:g}, the usual range for {config.optimizer_type}")
    return notes


def dataset_warnings(config: TrainConfig, data: TrainingData) -> list[str]:
    notes = []
    images = data.train.num_images()
    if images < MIN_IMAGES:
        notes.append(f"only {images} training image(s): {MIN_IMAGES} or more (15-50 is usual) generalise far better")
    if not config.trigger_words:
        notes.append("no trigger words: the LoRA will be tied to the captions' own words")
    return notes


def _no_data() -> TrainingData:
    """An empty plan, so `plan_warnings` can give its option-only notes before a dataset is chosen."""
    return TrainingData(DatasetScan([], [], 0), None, None, [], None)


class PlanCache:
    """`plan_training` scans every image header; keep the last plan while the folders are unchanged."""

    def __init__(self, planner: Callable[[TrainConfig], TrainingData] = plan_training):
        self.planner = planner
        self._key, self._plan = None, None

    def plan(self, config: TrainConfig) -> TrainingData:
        key = (tuple(getattr(config, name) for name in PLAN_FIELDS), _folder_signature(config.train_data_dir), _folder_signature(config.reg_data_dir))
        if key != self._key:
            self._plan, self._key = self.planner(config), key
        return self._plan

    def clear(self) -> None:
        self._key, self._plan = None, None


def _folder_signature(folder: str) -> tuple:
    """Modification times of the folder and its subfolders: they change when images are added or removed."""
    if not folder or not os.path.isdir(folder):
        return (folder,)
    root = Path(folder)
    return (folder, root.stat().st_mtime_ns, *((p.name, p.stat().st_mtime_ns) for p in sorted(root.iterdir()) if p.is_dir()))


def summarize(values: dict, cache: PlanCache | None = None, model: BaseModel | None = None) -> PlanSummary:
    """Step math, repeats and warnings for widget values (field name -> value), on `model` when known."""
    summary = PlanSummary()
    try:
        config = config_from_widgets(values)
    except ConfigError as e:
        summary.error = str(e)
        return summary
    summary.warnings = config_warnings(config)
    if not config.train_data_dir:
        summary.warnings = plan_warnings(config, _no_data(), model) + summary.warnings
        summary.error = "choose a dataset folder (kohya layout: N_name subfolders, N = repeats)"
        return summary
    try:
        data = (cache or PlanCache()).plan(config)
    except (DatasetError, ConfigError) as e:
        summary.warnings = plan_warnings(config, _no_data(), model) + summary.warnings
        summary.error = str(e)
        return summary
    summary.steps_text, summary.total_steps = data.steps.describe(), data.steps.total_steps
    summary.repeats = repeats_lines(data.train) + (repeats_lines(data.reg, "reg ") if data.reg else [])
    summary.warnings = plan_warnings(config, data, model) + summary.warnings + dataset_warnings(config, data)
    return summary


def repeats_lines(scan: DatasetScan, prefix: str = "") -> list[str]:
    return [f"{prefix}{s.directory.name}: {len(s.items)} images x {s.repeats} repeats = {len(s.items) * s.repeats}" for s in scan.subsets]
