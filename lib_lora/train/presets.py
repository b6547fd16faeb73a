"""Named starting points: TrainConfig overrides, saved and loaded as TOML like any run config.

A preset holds only the options that differ from `TrainConfig`'s defaults, never the
dataset-specific ones (`PRESET_EXCLUDED`). Its file is a plain run-config TOML (so
`python -m lib_lora train --config preset.toml --train_data_dir ...` works) with two comment
lines naming it and saying why it is set so. Built-in presets follow values common in the kohya
community, each for one architecture at its native size (SD1.5 512 px, SD2 768-v 768, SDXL 1024):
`list_presets` offers those of the loaded model's. User presets live as `<slug>.toml` in a folder of
their own and are offered on every architecture.
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomically
from .config import ConfigError, TrainConfig, _toml_value, read_toml_text

# Options that belong to one dataset or run, not to a recipe: a preset never sets them.
PRESET_EXCLUDED = frozenset({"train_data_dir", "reg_data_dir", "trigger_words", "output_name", "output_dir", "training_comment", "sample_prompts"})
NAME_LINE, WHY_LINE = "# preset: ", "# why: "

# Tuned with bench/quality.py on the embedded tiny model (64 px, CPU), 600 steps, 128 images per
# fidelity figure; see bench/RESULTS.md. The text encoder's lr is the lever: a LoRA learnt mostly in the UNet
# changes the unconditional prediction as much as the conditional one, and classifier-free guidance then
# cancels it (te 5e-4 -> fidelity 0.00 on an earlier base). A lower UNet lr keeps the base's other
# prompts (preservation 0.79x at 1e-3, 0.94x at 5e-4, earlier base). Rank 16 (alpha 16, scale 1) draws
# the new concept's shapes better than rank 8: fidelity 0.87 / 0.85 / 0.87 at training seeds 42-44
# against 0.83 / 0.83 / 0.77 (batch 8).
# Rank 32 scored 0.90 and 0.92 but collapsed at seed 43 (every prompt a purple ring, preservation
# 0.03x), and so did rank 16 with a constant lr (0.02x): the cosine decay keeps this high te lr stable.
# 20% empty captions teach the LoRA the unconditional branch too (rank 8: 10% -> 0.84 / 0.91x,
# 30% -> 0.81 / 1.03x, one seed each). At rank 8, the base's own noise offset (0.15) gave 0.84.
# More images per step, at the same 600 steps, made the LoRA steadier and better. Over training seeds
# 42-53 (fidelity mean, range, lowest preservation): batch 8 x 20 epochs 0.87, 0.80-0.94, 0.90x; batch 16
# x 40 epochs 0.88, 0.86-0.91, 0.92x; batch 24 x 60 epochs 0.89, 0.84-0.93, 0.91x; batch 30 x 75 epochs
# 0.91, 0.88-0.93, 0.93x (squares 0.78, near the base's own 0.75). Batch 30 is 8 steps an epoch (240
# samples: 12 images x 10 repeats plus as many regularization samples) and takes about 2.5x batch 8's time.
# Without a regularization folder (a new user's dataset), 48 class images drawn by the base from the
# captions without the trigger stand in for one (held-out variants, bench/quality.py): no-reg fidelity
# 0.46 -> 0.82, preservation 0.33x -> 0.56x; two-shapes 0.44 -> 0.81, 0.28x -> 0.45x (means of seeds 42-43).
# They are drawn at CFG 3, not 7: closer to what the base draws unguided, a steadier prior for this tiny model
# (no-reg, seeds 42-45: preservation 0.67-0.75x against 0.54-0.57x at CFG 7 on seeds 42-43; CFG 2 the same as 3).
# The text encoder learns at 2.5e-3, half the first tuning's 5e-3: on the demo's own dataset the same or better
# (seeds 42-45: fidelity 0.91 / 0.92 / 0.91 / 0.95, preservation 0.93x-1.00x; 5e-3 gave 0.93 / 0.91 / 0.89 / 0.91),
# and without a regularization folder it takes over far fewer of the base's prompts (no-reg, seeds 42-45:
# fidelity 0.84-0.90, preservation 0.80x-0.87x, against 0.81-0.90 and 0.67x-0.75x at 5e-3).
DEMO = dict(
    resolution=(64, 64),
    network_type="locon",
    network_dim=16,
    network_alpha=16.0,
    conv_dim=16,
    conv_alpha=16.0,
    train_batch_size=30,
    max_train_epochs=75,
    learning_rate=5e-4,
    text_encoder_lr=2.5e-3,
    caption_dropout_rate=0.2,
    lr_scheduler="cosine",
    lr_warmup_steps=0.05,
    min_snr_gamma=5.0,
    prior_loss_weight=1.0,
    save_precision="fp16",
    num_class_images=48,  # only without a regularization folder; see the note above
    class_images_cfg_scale=3.0,
)

# Shared by the SD1.5 presets: 512 px with buckets, fp16 autocast, a file per epoch to compare.
_SD15 = dict(resolution=(512, 512), enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024, mixed_precision="fp16",
             train_batch_size=2, max_train_epochs=10, optimizer_type="AdamW", save_every_n_epochs=1, min_snr_gamma=5.0)
# SD2 768-v's size: its presets are SD1.5's recipes at 768 px (`_on_sd2_768v`).
_SD2_768V = dict(resolution=(768, 768), min_bucket_reso=384, max_bucket_reso=1536)
# Shared by the SDXL presets (kohya's SDXL docs and common recipes): 1024 px with the SDXL paper's own bucket
# range (512x2048 to 2048x512); bf16 autocast (RTX 30xx and newer; choose fp16 on older cards); gradient
# checkpointing (the UNet side at rank 32, batch 2: ~8.4 GiB against ~20 GiB without; bench/memory_estimate.py);
# the noise offset SDXL itself was trained with (0.0357); min-SNR 5; the UNet at 1e-4 with a cosine decay.
_SDXL = dict(resolution=(1024, 1024), enable_bucket=True, min_bucket_reso=512, max_bucket_reso=2048, mixed_precision="bf16",
             gradient_checkpointing=True, train_batch_size=2, max_train_epochs=10, optimizer_type="AdamW", save_every_n_epochs=1,
             min_snr_gamma=5.0, noise_offset=0.0357, learning_rate=1e-4, unet_lr=1e-4, lr_scheduler="cosine")


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict[str, Any]  # TrainConfig field -> value (only those that differ from the defaults)
    why: str = ""
    builtin: bool = False
    arch: str = ""  # the architecture it is for ("sd1", "sd2", "sdxl"); "" any (user presets)


def _on_sd2_768v(preset: Preset) -> Preset:
    """An SD1.5 recipe on SD2 768-v: the same network and rates at SD2's 768 px."""
    return Preset(f"SD2 768-v {preset.name}", {**preset.values, **_SD2_768V}, f"{preset.why}; at SD2 768-v's 768 px", True, "sd2")


_SD15_PRESETS = (
    Preset("anime character", {**_SD15, "network_dim": 16, "network_alpha": 8.0, "learning_rate": 5e-4, "unet_lr": 5e-4, "text_encoder_lr": 1e-4,
                               "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3, "clip_skip": 2, "shuffle_caption": True, "keep_tokens": 1},
           "16/8 holds one character from ~20-40 booru-tagged images (10 repeats x 10 epochs); clip skip 2 as NAI-family anime models; tags shuffled, trigger kept first", True, "sd1"),
    Preset("realistic character", {**_SD15, "network_dim": 32, "network_alpha": 16.0, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 5e-5,
                                   "lr_scheduler": "cosine", "lr_warmup_steps": 0.05, "noise_offset": 0.0357},
           "a real face needs more rank (32/16) and a gentler lr (1e-4, TE 5e-5) than a drawing; no flips (faces are asymmetric); small noise offset for a fuller light range", True, "sd1"),
    Preset("style", {**_SD15, "network_type": "locon", "network_dim": 32, "network_alpha": 16.0, "conv_dim": 16, "conv_alpha": 8.0, "learning_rate": 1e-4,
                     "unet_lr": 1e-4, "text_encoder_lr": 2.5e-5, "lr_scheduler": "cosine", "flip_aug": True, "shuffle_caption": True, "keep_tokens": 1,
                     "caption_tag_dropout_rate": 0.1, "noise_offset": 0.05},
           "LoCon's 3x3 convs carry texture and brushwork; a low TE lr and tag dropout spread the style over the whole prompt instead of single tags; flips double the data", True, "sd1"),
    Preset("concept", {**_SD15, "network_dim": 16, "network_alpha": 8.0, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 5e-5,
                       "lr_scheduler": "cosine", "flip_aug": True, "shuffle_caption": True, "keep_tokens": 1},
           "an object, outfit or pose is less to learn than a face: 16/8 at 1e-4 learns it without baking in the dataset's backgrounds; flips for variety", True, "sd1"),
)
_SDXL_PRESETS = (
    Preset("SDXL character", {**_SDXL, "network_dim": 32, "network_alpha": 16.0, "text_encoder_lr": 1e-5},
           "32/16 holds a face; both text encoders learn at a tenth of the UNet's lr (1e-5): enough to bind the trigger word, low enough "
           "to avoid the erratic results kohya warns of when SDXL's two encoders train; no flips (faces are asymmetric)", True, "sdxl"),
    Preset("SDXL style", {**_SDXL, "network_type": "locon", "network_dim": 32, "network_alpha": 16.0, "conv_dim": 16, "conv_alpha": 8.0,
                          "network_train_unet_only": True, "flip_aug": True},
           "UNet only, as kohya advises for SDXL: a style lives in the UNet, LoCon's 3x3 convs carry its texture and brushwork; flips double the data",
           True, "sdxl"),
    Preset("SDXL concept", {**_SDXL, "network_dim": 16, "network_alpha": 8.0, "network_train_unet_only": True, "flip_aug": True},
           "an object, outfit or pose: a UNet-only 16/8 LoRA learns it at 1e-4 without baking in the dataset's backgrounds; flips for variety",
           True, "sdxl"),
)
BUILTIN_PRESETS = {p.name: p for p in (
    *_SD15_PRESETS,
    Preset("demo (embedded tiny model)", dict(DEMO), "the embedded 64 px model on CPU: tuned with bench/quality.py (see the README)", True, "sd1"),
    *(_on_sd2_768v(p) for p in _SD15_PRESETS if p.values.get("clip_skip", 1) == 1),  # SD2 ignores clip skip: no anime recipe
    *_SDXL_PRESETS,
)}


def demo_config(data_dir: Path, reg_dir: Path | None, output_name: str, trigger: str) -> TrainConfig:
    """The demo preset on a dataset folder (and optional regularization folder)."""
    return TrainConfig(train_data_dir=str(data_dir), reg_data_dir=str(reg_dir or ""), output_name=output_name, trigger_words=trigger, **DEMO)


def preset_values(config: TrainConfig) -> dict[str, Any]:
    """The options of `config` a preset keeps: those that differ from the defaults, data paths left out."""
    defaults = TrainConfig().to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in PRESET_EXCLUDED and v != defaults[k]}


def apply_preset(preset: Preset, current: TrainConfig) -> TrainConfig:
    """Defaults plus the preset's values; the dataset-specific options of `current` are kept."""
    kept = {k: v for k, v in current.to_dict().items() if k in PRESET_EXCLUDED}
    return TrainConfig.from_dict({**kept, **preset.values})


def preset_to_toml(preset: Preset) -> str:
    why = _one_line(preset.why)
    head = NAME_LINE + _one_line(preset.name) + "\n" + (WHY_LINE + why + "\n" if why else "")
    return head + "".join(f"{k} = {_toml_value(list(v) if isinstance(v, tuple) else v)}\n" for k, v in preset.values.items())


def _one_line(text: str) -> str:
    """`text` fit for a TOML comment line: runs of white space and line breaks (any Unicode one) as one space,
    control characters (which TOML forbids in comments) left out."""
    return " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())


def preset_from_toml(text: str, source: str = "preset") -> Preset:
    """Parse and validate a preset file; a `ConfigError` names the file and the bad option."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    bad = sorted(set(values) & PRESET_EXCLUDED)
    if bad:
        raise ConfigError(f"{source}: a preset cannot set {', '.join(bad)} (they belong to one dataset)")
    try:
        config = TrainConfig.from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    comments = dict(_comment(line) for line in text.splitlines() if line.startswith((NAME_LINE, WHY_LINE)))
    name = comments.get(NAME_LINE) or Path(source).stem
    return Preset(name, {k: getattr(config, k) for k in values}, comments.get(WHY_LINE, ""))


def _comment(line: str) -> tuple[str, str]:
    prefix = NAME_LINE if line.startswith(NAME_LINE) else WHY_LINE
    return prefix, line[len(prefix):].strip()


def preset_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    if not slug:
        raise ConfigError(f"preset name {name!r}: use letters or digits")
    return slug


def save_preset(folder: Path, preset: Preset, *, overwrite: bool = False) -> Path:
    """Write `<folder>/<slug>.toml` atomically; refuses built-in names and, unless told, existing files."""
    if preset.name.strip().lower() in {name.lower() for name in BUILTIN_PRESETS}:
        raise ConfigError(f"preset name {preset.name!r} is a built-in preset; choose another name")
    folder = Path(folder)
    path = folder / f"{preset_slug(preset.name)}.toml"
    if path.exists() and not overwrite:
        raise ConfigError(f"preset {preset.name!r} already exists ({path}); tick 'replace' to overwrite it")
    TrainConfig.from_dict(dict(preset.values))  # validate before writing
    folder.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomically(path, preset_to_toml(preset).encode("utf-8"))


def load_preset(path: Path) -> Preset:
    return preset_from_toml(read_toml_text(path, "the preset"), str(path))


def list_presets(folder: Path | None, arch: str | None = None) -> tuple[dict[str, Preset], list[str]]:
    """Built-in presets for `arch` (all when None: the model is not known), then the user's (`*.toml` in
    `folder`), and the errors of files that do not load."""
    presets = {name: p for name, p in BUILTIN_PRESETS.items() if arch is None or p.arch in ("", arch)}
    problems = []
    if folder is None or not Path(folder).is_dir():
        return presets, problems
    for path in sorted(Path(folder).glob("*.toml")):
        try:
            preset = load_preset(path)
        except ConfigError as e:
            problems.append(str(e))
            continue
        presets.setdefault(preset.name, preset)
    return presets, problems
