"""The one training configuration: every option, its kohya name and default, validated on construction.

The CLI flags, the TOML run files, the tab's fields, presets and the saved metadata are all derived
from this dataclass (`fields()` gives names, types, defaults and help). Where kohya's
`train_network.py` has the same option, the name and default are kohya's; deviations say why.
"""

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.samplers import SAMPLERS
from ..networks.prompt import BLOCK_IDS_26
from .names import ALLOWED, name_problem

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "SGD")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
PRIOR_TARGETS = ("noise", "base")
DYNAMO_BACKENDS = ("inductor", "aot_eager", "eager")  # torch.compile's own backends that run on any device (kohya's --dynamo_backend)
SAVE_PRECISIONS = ("fp16", "bf16", "float")
NETWORK_TYPES = ("lora", "locon", "loha", "lokr")
CONV_NETWORK_TYPES = frozenset({"locon", "loha", "lokr"})  # those with 3x3-conv targets (LyCORIS's `full` preset)


class ConfigError(ValueError):
    """A training option that cannot work; the message names the field and what to do."""


def _opt(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class TrainConfig:
    # --- data
    train_data_dir: str = _opt("", "folder of kohya-style N_name subfolders (N = repeats)")
    reg_data_dir: str = _opt("", "regularization images folder, same layout (optional)")
    trigger_words: str = _opt("", "comma-separated words put in front of every caption")
    caption_extension: str = _opt(".txt", "sidecar caption file extension (.caption is also read)")
    shuffle_caption: bool = _opt(False, "shuffle comma-separated tags each step")
    keep_tokens: int = _opt(0, "leading tags never shuffled or dropped (trigger words count)")
    caption_dropout_rate: float = _opt(0.0, "probability of training on an empty caption")
    caption_tag_dropout_rate: float = _opt(0.0, "probability of dropping each non-kept tag")
    resolution: tuple[int, int] = _opt((512, 512), "training size (width, height), multiples of 64")
    enable_bucket: bool = _opt(False, "aspect-ratio bucketing")
    min_bucket_reso: int = _opt(256, "smallest bucket side")
    max_bucket_reso: int = _opt(1024, "largest bucket side")
    bucket_no_upscale: bool = _opt(False, "never upscale small images into a bucket")
    random_crop: bool = _opt(False, "random instead of center crop")
    flip_aug: bool = _opt(False, "random horizontal flips")
    cache_latents: bool = _opt(True, "encode each image once (not with random crop), all before the first step when the run uses them all")
    cache_latents_to_disk: bool = _opt(False, "keep the latent cache in the run folder between runs")
    allow_unreadable_images: bool = _opt(False, "skip unreadable images (listed) instead of refusing to start")
    prior_loss_weight: float = _opt(1.0, "loss weight of regularization images")
    prior_loss_target: str = _opt("noise", "what regularization images are trained toward: noise (kohya: like any image) or base "
                                           "(the base model's own prediction on the same noisy latent, every adapter off, so the LoRA "
                                           "learns to leave those prompts as the base draws them; one more forward per such image)",
                                  choices=PRIOR_TARGETS)
    num_class_images: int = _opt(0, "with no reg_data_dir: draw this many regularization images with the base model first, "
                                    "from the training captions without the trigger words (DreamBooth's prior preservation)")
    class_images_cfg_scale: float = _opt(7.0, "CFG scale the class images are drawn at (7: the webui's txt2img default; a lower "
                                              "scale keeps them nearer the base's own training images)")
    validation_split: float = _opt(0.0, "fraction of images held out for validation loss")
    masked_loss: bool = _opt(False, "use the PNG alpha channel as the per-pixel loss weight")
    # --- network
    network_type: str = _opt("lora", "lora (attention, ff, proj), locon (also 3x3 convs), loha (LyCORIS Hadamard product) "
                                      "or lokr (LyCORIS Kronecker product); loha and lokr include 3x3 convs as locon",
                             choices=NETWORK_TYPES)
    network_dim: int = _opt(4, "rank of linear layers")
    network_alpha: float = _opt(1.0, "alpha of linear layers; scale = alpha / dim")
    conv_dim: int = _opt(4, "rank of 3x3 convs (locon, loha, lokr)")
    conv_alpha: float = _opt(1.0, "alpha of 3x3 convs (locon, loha, lokr)")
    lokr_factor: int = _opt(-1, "lokr: split each dimension as factor x rest when factor divides it (-1: the most balanced "
                                "split, LyCORIS's default; 4-16 gives smaller files)")
    dora_wd: bool = _opt(False, "DoRA (LyCORIS dora_wd): also learn each weight's magnitude apart from its direction; any network type")
    network_dropout: float = _opt(0.0, "dropout on the LoRA hidden activations")
    rank_dropout: float = _opt(0.0, "dropout of whole ranks")
    module_dropout: float = _opt(0.0, "probability of skipping a whole module for a step")
    network_train_unet_only: bool = _opt(False, "train the UNet only")
    network_train_text_encoder_only: bool = _opt(False, "train the text encoder only")
    train_blocks: str = _opt("", "train only these LoRA-Block-Weight blocks, comma-separated: BASE (the text encoders), "
                                 "IN00..IN11, M00, OUT00..OUT11 (SDXL: IN00..IN08, M00, OUT00..OUT08); empty = all")
    cross_attention_only: bool = _opt(False, "UNet adapters on cross-attention (attn2 q/k/v/out) only; the text encoder is trained "
                                             "unless network_train_unet_only")
    block_dims: str = _opt("", "kohya's per-block ranks of linear layers: 25 comma-separated values IN00..IN11, MID, OUT00..OUT11 "
                               "(SDXL 23: time/label emb, IN00..IN08, MID00..MID02, OUT00..OUT08, out); 0 = no adapter there")
    block_alphas: str = _opt("", "kohya's per-block alphas, as block_dims (needs it; default network_alpha)")
    conv_block_dims: str = _opt("", "kohya's per-block ranks of 3x3 convs, as block_dims (needs it and a conv network_type; "
                                    "default conv_dim)")
    conv_block_alphas: str = _opt("", "kohya's per-block alphas of 3x3 convs (needs conv_block_dims; default conv_alpha)")
    # --- pivotal tuning
    pivotal_tuning: bool = _opt(False, "also learn a new embedding for each trigger word, bundled in the LoRA file "
                                       "(the webui loads it with the LoRA)")
    embedding_lr: float = _opt(1e-3, "learning rate of the trigger words' embeddings (pivotal tuning)")
    init_word: str = _opt("*", "word whose token embeddings start each trigger's embedding (kohya's init_word; the class, "
                               "e.g. 'woman', usually works best)")
    num_vectors_per_token: int = _opt(1, "vectors per trigger word's embedding (each takes one of a chunk's 75 tokens)")
    # --- optimisation
    max_train_epochs: int = _opt(1, "epochs; steps = images x repeats x epochs / batch / accumulation")
    max_train_steps: int = _opt(0, "if > 0, stop after this many optimizer steps instead")
    train_batch_size: int = _opt(1, "images per step")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    learning_rate: float = _opt(1e-4, "base learning rate (kohya's 2e-6 is for full fine-tuning, far too low for LoRA)")
    unet_lr: float = _opt(0.0, "if > 0, the UNet's learning rate")
    text_encoder_lr: float = _opt(0.0, "if > 0, the text encoder's learning rate (SDXL: both encoders')")
    text_encoder_2_lr: float = _opt(0.0, "if > 0, SDXL's second text encoder's (OpenCLIP bigG) learning rate (kohya: the "
                                         "second value of --text_encoder_lr)")
    optimizer_type: str = _opt("AdamW", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = _opt(0.01, "decoupled weight decay (AdamW, Lion, Prodigy); L2 for SGD")
    adam_beta1: float = _opt(0.9, "beta1 (AdamW, Lion, Prodigy)")
    adam_beta2: float = _opt(0.999, "beta2 (AdamW, Lion 0.99 recommended, Prodigy)")
    adam_epsilon: float = _opt(1e-8, "epsilon (AdamW, Prodigy)")
    sgd_momentum: float = _opt(0.9, "momentum (SGD)")
    lr_scheduler: str = _opt("constant", "learning-rate schedule", choices=SCHEDULERS)
    lr_warmup_steps: float = _opt(0.0, "warmup steps, or a fraction of all steps if < 1")
    lr_scheduler_num_cycles: int = _opt(1, "restarts for cosine_with_restarts")
    lr_scheduler_power: float = _opt(1.0, "power for polynomial")
    mixed_precision: str = _opt("no", "autocast dtype on CUDA (fp16 uses loss scaling)", choices=PRECISIONS)
    gradient_checkpointing: bool = _opt(False, "recompute UNet blocks in backward to save memory")
    torch_compile: bool = _opt(False, "compile the UNet and the trained text encoder with their LoRA hooks (torch.compile): "
                                      "fewer, fused kernels per step after a compile of minutes at the first step and at "
                                      "each new image size")
    dynamo_backend: str = _opt("inductor", "torch.compile backend (inductor generates fused kernels; aot_eager only traces)",
                               choices=DYNAMO_BACKENDS)
    max_grad_norm: float = _opt(1.0, "clip gradients to this norm (0 = off)")
    seed: int = _opt(42, "seed for noise, timesteps, shuffles and init (same seed, same result on CPU)")
    # --- loss and noise
    noise_offset: float = _opt(0.0, "add offset * N(0,1) per channel to the noise (darker/brighter images)")
    multires_noise_iterations: int = _opt(0, "pyramid noise levels (0 = off)")
    multires_noise_discount: float = _opt(0.3, "pyramid noise discount per level")
    min_snr_gamma: float = _opt(0.0, "min-SNR-gamma loss weighting (0 = off; 5 is usual)")
    clip_skip: int = _opt(1, "use the text encoder's N-th layer from the end (SD1 only: SD2 and SDXL use their fixed layers, as the webui)")
    v_parameterization: bool = _opt(False, "the base model predicts v (SD2 768-v, v-pred SDXL) and its file does not say so")
    zero_terminal_snr: bool = _opt(False, "rescale the noise schedule to zero SNR at the last timestep (v-prediction models trained so)")
    min_timestep: int = _opt(0, "lowest timestep sampled")
    max_timestep: int = _opt(1000, "highest timestep sampled (exclusive)")
    # --- saving and samples
    output_dir: str = _opt("", "folder for the LoRA files (default: the host's Lora folder)")
    output_name: str = _opt("last", "file name stem of the LoRA")
    save_every_n_epochs: int = _opt(0, "save <name>-<epoch>.safetensors every N epochs (0 = off)")
    save_every_n_steps: int = _opt(0, "save <name>-step<step>.safetensors every N steps (0 = off)")
    save_last_n_epochs: int = _opt(0, "keep only the last K intermediate saves (0 = keep all)")
    save_precision: str = _opt("fp16", "dtype of the saved file", choices=SAVE_PRECISIONS)
    overwrite: bool = _opt(False, "replace an existing LoRA of the same name")
    sample_every_n_epochs: int = _opt(0, "render the sample prompts every N epochs (0 = off)")
    sample_every_n_steps: int = _opt(0, "render the sample prompts every N steps (0 = off)")
    sample_prompts: tuple[str, ...] = _opt((), "kohya prompt lines: 'prompt --n negative --s steps --l cfg --w W --h H --d seed'")
    sample_sampler: str = _opt(SAMPLERS[0], "sampler for samples", choices=SAMPLERS)
    training_comment: str = _opt("", "stored in the file's ss_training_comment")

    def __post_init__(self):
        for check in (_check_numbers, _check_choices, _check_ranges, _check_resolution, _check_exclusive, _check_blocks,
                      _check_pivotal, _check_caption_extension):
            check(self)

    @property
    def draws_images(self) -> bool:
        """Whether the run makes pictures with the model (samples, class images), so needs the VAE's decoder."""
        samples = bool(self.sample_prompts) and bool(self.sample_every_n_steps or self.sample_every_n_epochs)
        return samples or self.draws_class_images

    @property
    def draws_class_images(self) -> bool:
        """num_class_images applies: no regularization folder of the user's, and trigger words to leave out of the
        captions (without them a class image would be told to look like the concept's own caption)."""
        return bool(self.num_class_images and not self.reg_data_dir and self.trigger_words.strip())

    @property
    def effective_unet_lr(self) -> float:
        return self.unet_lr or self.learning_rate

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate

    @property
    def effective_text_encoder_2_lr(self) -> float:
        return self.text_encoder_2_lr or self.effective_text_encoder_lr

    @property
    def conv_targets(self) -> bool:
        """Whether 3x3 convs get adapters (at conv_dim/conv_alpha)."""
        return self.network_type in CONV_NETWORK_TYPES

    @property
    def chosen_blocks(self) -> tuple[str, ...] | None:
        """train_blocks as LoRA-Block-Weight names in their order, or None (all blocks)."""
        if not self.train_blocks.strip():
            return None
        named = {name.strip().upper() for name in self.train_blocks.replace(" ", ",").split(",") if name.strip()}
        return tuple(block for block in BLOCK_IDS_26 if block in named)

    @property
    def train_unet(self) -> bool:
        blocks = self.chosen_blocks
        return not self.network_train_text_encoder_only and (blocks is None or blocks != ("BASE",))

    @property
    def train_text_encoder(self) -> bool:
        blocks = self.chosen_blocks
        return not self.network_train_unet_only and (blocks is None or "BASE" in blocks)

    def block_values(self, name: str) -> tuple[int, ...] | tuple[float, ...] | None:
        """block_dims, block_alphas, conv_block_dims or conv_block_alphas parsed (ranks whole), or None when empty."""
        return _block_values(name, getattr(self, name))

    @property
    def trigger_tokens(self) -> list[str]:
        """The trigger words, each a token that pivotal tuning learns an embedding for."""
        return [word.strip() for word in self.trigger_words.split(",") if word.strip()]

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            named = ", ".join(name + _did_you_mean(name, known) for name in unknown)
            raise ConfigError(f"unknown option(s) {named}; see `python -m lib_lora train --help`")
        return cls(**{k: _coerce(known[k], v) for k, v in values.items()})

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        text = read_toml_text(path, "the TOML config")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: cannot read the TOML config: {e}") from e
        flat = {}
        for key, value in data.items():  # sections ([data], [network], ...) are only for reading comfort
            flat.update(value if isinstance(value, dict) else {key: value})
        return cls.from_dict(flat)

    def to_toml(self) -> str:
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.to_dict().items())


def read_toml_text(path: str | Path, what: str) -> str:
    """A TOML file's text; ConfigError naming the file when it cannot be read or is not UTF-8 (as TOML must be)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); TOML files are UTF-8: re-save it as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e}") from e


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _coerce(f: dataclasses.Field, value):
    """TOML/CLI values into the field's type: lists to tuples, ints to floats, with a named error.

    Nothing is guessed: 4.5 is not a rank, "maybe" not a switch, a list not a word (str() would make
    "['a']" of it). Strings are parsed, as the CLI gives every value as one.
    """
    default, given = f.default, value
    try:
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v for v in value.replace("x", ",").split(",") if v.strip()] if f.name == "resolution" else [value]
            items = tuple(value)
            if f.name == "resolution":
                sides = tuple(_whole(v) for v in items)
                return sides * 2 if len(sides) == 1 else sides  # kohya: "512" means 512x512
            return tuple(str(v) for v in items)
        if isinstance(default, bool):
            return _switch(value)
        if isinstance(default, (int, float)):
            return _whole(value) if isinstance(default, int) else _number(value)
        if f.name in LIST_TEXT_OPTIONS and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)  # a TOML array of ranks or block names
        if not isinstance(value, str):
            raise TypeError(f"not text: {value!r}")
        return value
    except (TypeError, ValueError, OverflowError) as e:
        kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text (quote it)"}.get(type(default), "a list")
        kind = "width and height in pixels (512, [512, 768] or \"512x768\")" if f.name == "resolution" else kind
        raise ConfigError(f"{f.name}: cannot use {given!r}, which needs {kind}") from e


LIST_TEXT_OPTIONS = frozenset({"train_blocks", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"})
SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _switch(value) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    word = str(value).strip().lower()
    if word not in SWITCH_WORDS:
        raise ValueError(f"{value!r} is not one of {', '.join(SWITCH_WORDS)}")
    return SWITCH_WORDS[word]


def _whole(value) -> int:
    number = _number(value) if not isinstance(value, int) or isinstance(value, bool) else value
    if isinstance(number, float) and not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)  # OverflowError for inf


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def _did_you_mean(word: str, options) -> str:
    """" (did you mean X?)" for the closest of `options` (case-insensitive), or ""."""
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_toml_character(ch) for ch in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _toml_character(ch: str) -> str:
    """One character of a TOML basic string: quote and backslash escaped, and the control characters TOML
    forbids raw (all but tab: a newline or DEL in a comment would make the file unreadable) as \\uXXXX."""
    if ch in '"\\':
        return "\\" + ch
    return f"\\u{ord(ch):04x}" if (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F else ch


def _check_choices(c: TrainConfig) -> None:
    for f in dataclasses.fields(c):
        choices = f.metadata.get("choices")
        value = getattr(c, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(choices)}{_did_you_mean(str(value), choices)}")


MAX_SIDE = 8192  # px: 8x SDXL's training size; beyond, no GPU holds the attention
MAX_RANK = 1280  # the full rank of the widest targeted layer in SD1/SD2/SDXL: a larger rank only costs memory
# Inclusive bounds of numeric options (None: unbounded), with why; any other must be finite and >= 0.
# The half-open ones (rates in [0, 1), learning_rate > 0, the timestep pair) are checked in _check_ranges.
NUMBER_LIMITS = {
    "network_dim": (1, None, ""), "train_batch_size": (1, None, ""), "gradient_accumulation_steps": (1, None, ""),
    "max_train_epochs": (1, None, ""), "lr_scheduler_num_cycles": (1, None, ""), "lokr_factor": (-1, None, ""),
    "clip_skip": (1, 12, "SD1's text encoder has 12 layers"),
    "seed": (0, 2**63 - 1, "every run is seeded: -1 does not mean random here"),
    "noise_offset": (0, 1, "an offset above 1 outweighs the noise itself; 0.05-0.1 is usual"),
    "multires_noise_discount": (0, 1, "each coarser level must weigh less; 0.3 is usual"),
    "num_class_images": (0, 100_000, "each is drawn by the base model before training starts; DreamBooth uses 100-200"),
    "class_images_cfg_scale": (1, 30, "1 is no guidance at all; the webui's CFG slider stops at 30"),
}


def _check_numbers(c: TrainConfig) -> None:
    """Every int/float option: of its type (no bool), finite, within NUMBER_LIMITS (default: >= 0)."""
    for f in dataclasses.fields(c):
        if isinstance(f.default, bool) or not isinstance(f.default, (int, float)):
            continue
        value, whole = getattr(c, f.name), isinstance(f.default, int)
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            raise ConfigError(f"{f.name}: must be {'a whole number' if whole else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{f.name}: must be a finite number, got {value}")
        low, high, why = NUMBER_LIMITS.get(f.name, (0, None, ""))
        if value < low or (high is not None and value > high):
            bound = "cannot be negative" if value < low == 0 else f"must be at least {low}" if value < low else f"must be at most {high}"
            raise ConfigError(f"{f.name}: {bound}, got {value}" + (f" ({why})" if why else ""))


def _check_ranges(c: TrainConfig) -> None:
    if c.conv_targets and c.conv_dim < 1:
        raise ConfigError(f"conv_dim: must be at least 1 for {c.network_type}, got {c.conv_dim}")
    for name in ("network_dim", "conv_dim"):  # lokr: a rank of half a factor's size or more means full matrices
        used = name == "network_dim" or c.network_type != "lora"
        if used and c.network_type != "lokr" and getattr(c, name) > MAX_RANK:
            raise ConfigError(f"{name}: must be at most {MAX_RANK} for {c.network_type}, got {getattr(c, name)} (no layer of "
                              f"SD1, SD2 or SDXL has a higher rank: more only costs memory)")
    if c.lokr_factor != -1 and c.lokr_factor < 2:
        raise ConfigError(f"lokr_factor: must be -1 (balanced split) or at least 2, got {c.lokr_factor}")
    rates = ("caption_dropout_rate", "caption_tag_dropout_rate", "network_dropout", "rank_dropout", "module_dropout", "validation_split",
             "adam_beta1", "adam_beta2", "sgd_momentum")
    for name in rates:
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ConfigError(f"{name}: must be in [0, 1), got {getattr(c, name)}")
    if c.learning_rate <= 0:
        raise ConfigError(f"learning_rate: must be positive, got {c.learning_rate}")
    if not 0 <= c.min_timestep < c.max_timestep <= 1000:
        raise ConfigError(f"min_timestep/max_timestep: need 0 <= min < max <= 1000, got {c.min_timestep}, {c.max_timestep}")


def _check_resolution(c: TrainConfig) -> None:
    if len(c.resolution) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) for side in c.resolution):
        raise ConfigError(f"resolution: give width and height in whole pixels, got {c.resolution}")
    sides = [("resolution", side) for side in c.resolution] + [("min_bucket_reso", c.min_bucket_reso), ("max_bucket_reso", c.max_bucket_reso)]
    for name, side in sides:
        if side <= 0 or side % 64:
            raise ConfigError(f"{name}: {side} is not a positive multiple of 64 (sizes must be multiples of 64 px)")
        if side > MAX_SIDE:
            raise ConfigError(f"{name}: {side} is above {MAX_SIDE} px (SDXL trains at 1024 px, SD1 at 512)")
    if c.enable_bucket and not c.min_bucket_reso <= min(c.resolution) <= max(c.resolution) <= c.max_bucket_reso:
        raise ConfigError(f"min_bucket_reso/max_bucket_reso: {c.min_bucket_reso}..{c.max_bucket_reso} must contain the resolution {c.resolution}")


BLOCK_OPTIONS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
BLOCK_COUNTS = {25: "SD1/SD2", 23: "SDXL"}  # kohya: IN00..IN11, MID, OUT00..OUT11; SDXL 1 + 9 + 3 + 9 + 1


def _block_values(name: str, text: str) -> tuple | None:
    if not text.strip():
        return None
    whole = name.endswith("dims")
    try:
        values = tuple((_whole if whole else _number)(v.strip()) for v in text.split(","))
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}: {text!r} is not a comma-separated list of {'whole numbers' if whole else 'numbers'}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(f"{name}: values must be finite and not negative, got {text!r}")
    if len(values) not in BLOCK_COUNTS:
        raise ConfigError(f"{name}: needs 25 values (SD1/SD2: IN00..IN11, MID, OUT00..OUT11) or 23 (SDXL: time/label emb, "
                          f"IN00..IN08, MID00..MID02, OUT00..OUT08, out), got {len(values)}")
    return values


def _check_blocks(c: TrainConfig) -> None:
    """kohya's block options (whose companions it silently ignores: refused here), train_blocks names, and a
    choice that leaves something to train."""
    values = {name: c.block_values(name) for name in BLOCK_OPTIONS}
    lengths = {len(v) for v in values.values() if v is not None}
    if len(lengths) > 1:
        raise ConfigError(f"{', '.join(n for n in BLOCK_OPTIONS if values[n])}: give the same number of values to each")
    for name, needs in (("block_alphas", "block_dims"), ("conv_block_dims", "block_dims"), ("conv_block_alphas", "conv_block_dims")):
        if values[name] is not None and values[needs] is None:
            raise ConfigError(f"{name}: works together with {needs} (kohya ignores it without); set {needs} too")
    if values["conv_block_dims"] is not None and not c.conv_targets:
        raise ConfigError(f"conv_block_dims: ranks of 3x3 convs, which network_type {c.network_type} does not train; choose locon")
    if c.train_blocks.strip():
        named = [n.strip().upper() for n in c.train_blocks.replace(" ", ",").split(",") if n.strip()]
        unknown = [n for n in named if n not in BLOCK_IDS_26]
        if unknown:
            raise ConfigError(f"train_blocks: {', '.join(unknown)} is no block name; use BASE, IN00..IN11, M00, OUT00..OUT11")
    if not (c.train_unet or c.train_text_encoder or c.pivotal_tuning):
        raise ConfigError(f"train_blocks: {c.train_blocks!r} with "
                          f"{'network_train_unet_only' if c.network_train_unet_only else 'network_train_text_encoder_only'} "
                          f"leaves nothing to train")
    if c.cross_attention_only and not c.train_unet:
        raise ConfigError("cross_attention_only: chooses UNet layers, and no UNet is trained (network_train_text_encoder_only "
                          "or train_blocks BASE)")


MAX_VECTORS_PER_TOKEN = 75  # one chunk's tokens: the webui puts a longer embedding nowhere


def _check_pivotal(c: TrainConfig) -> None:
    if not c.pivotal_tuning:
        return
    if not c.trigger_tokens:
        raise ConfigError("pivotal_tuning: learns an embedding per trigger word; set trigger_words")
    dotted = [t for t in c.trigger_tokens if "." in t]
    if dotted:
        raise ConfigError(f"trigger_words: {dotted[0]!r} has a dot, which a bundled embedding's name cannot have "
                          f"(the webui splits bundle_emb.<name>.<vector> at dots)")
    if c.embedding_lr <= 0:
        raise ConfigError(f"embedding_lr: must be positive for pivotal tuning, got {c.embedding_lr}")
    if not 1 <= c.num_vectors_per_token <= MAX_VECTORS_PER_TOKEN:
        raise ConfigError(f"num_vectors_per_token: must be 1 to {MAX_VECTORS_PER_TOKEN} (a prompt chunk's tokens), "
                          f"got {c.num_vectors_per_token}")


def _check_caption_extension(c: TrainConfig) -> None:
    """A caption file is `<image stem><caption_extension>` beside its image: a separator or control character
    would name a file elsewhere (or none)."""
    if not re.fullmatch(r"\.?[\w-]+", c.caption_extension):
        raise ConfigError(f"caption_extension: {c.caption_extension!r} is not a file extension; use letters, digits, _ or - "
                          f"after one leading dot, like .txt or .caption")


def check_for_arch(config: TrainConfig, arch: str) -> None:
    """What only the base model can tell: block_dims' count (25 SD1/SD2, 23 SDXL) and SDXL's fewer blocks."""
    sdxl = arch == "sdxl"
    for name in BLOCK_OPTIONS:
        values = config.block_values(name)
        if values is not None and (len(values) == 23) != sdxl:
            raise ConfigError(f"{name}: {len(values)} values are for {BLOCK_COUNTS[len(values)]}; this model is "
                              f"{'SDXL' if sdxl else arch.upper()} and needs {23 if sdxl else 25}")
    extra = [b for b in config.chosen_blocks or () if sdxl and b[-2:].isdigit() and int(b[-2:]) > 8]
    if extra:
        raise ConfigError(f"train_blocks: SDXL has no {', '.join(extra)} (its blocks: IN00..IN08, M00, OUT00..OUT08)")


def _check_exclusive(c: TrainConfig) -> None:
    weight_based = "dora_wd" if c.dora_wd else c.network_type if c.network_type in ("loha", "lokr") else None
    for name in ("network_dropout", "rank_dropout"):
        if weight_based and getattr(c, name):
            raise ConfigError(f"{name}: acts on LoRA's hidden ranks, which {weight_based} does not have in its forward "
                              f"(as in LyCORIS); set it to 0 and use module_dropout")
    if c.network_train_unet_only and c.network_train_text_encoder_only:
        raise ConfigError("network_train_unet_only and network_train_text_encoder_only: choose at most one")
    problem = name_problem(c.output_name) if isinstance(c.output_name, str) else "is not text"
    if problem:
        raise ConfigError(f"output_name: {c.output_name!r} {problem}; {ALLOWED}")
