"""The tab's option widgets, described from `TrainConfig`'s fields (no Gradio here).

Each field gives a `FieldSpec`: label from the name, info from `metadata["help"]`, a dropdown
from `metadata["choices"]`, the widget kind from the default's type. Only the grouping into
sections (`LAYOUT`) is written by hand; a field missing from it lands in "Other", so a new
TrainConfig option shows up in the tab without touching this file.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..train.config import TrainConfig

# Section -> group title -> field names. Everything here must be a TrainConfig field (tested).
LAYOUT: dict[str, dict[str, tuple[str, ...]]] = {
    "Dataset": {
        "Folders": ("train_data_dir", "trigger_words", "reg_data_dir", "num_class_images", "class_images_cfg_scale",
                    "caption_extension"),
        "Captions": ("shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate"),
        "Images": ("allow_unreadable_images", "prior_loss_weight", "prior_loss_target", "validation_split", "masked_loss"),
    },
    "Network": {
        "Network": ("network_type", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "lokr_factor", "dora_wd"),
        "Dropout": ("network_dropout", "rank_dropout", "module_dropout"),
        "Parts": ("network_train_unet_only", "network_train_text_encoder_only"),
        "Blocks": ("train_blocks", "cross_attention_only", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"),
        "Pivotal tuning": ("pivotal_tuning", "embedding_lr", "init_word", "num_vectors_per_token"),
    },
    "Training": {
        "Schedule": ("max_train_epochs", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution", "seed"),
        "Learning rate": ("optimizer_type", "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
                          "lr_scheduler_num_cycles", "lr_scheduler_power"),
        "Optimizer details": ("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "sgd_momentum", "max_grad_norm"),
        "Buckets and augmentation": ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "random_crop", "flip_aug"),
        "Precision and memory": ("mixed_precision", "gradient_checkpointing", "cache_latents", "cache_latents_to_disk", "torch_compile",
                                 "dynamo_backend"),
        "Noise and loss": ("noise_offset", "multires_noise_iterations", "multires_noise_discount", "min_snr_gamma", "clip_skip",
                           "min_timestep", "max_timestep"),
        "Saving": ("output_name", "output_dir", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_precision",
                   "overwrite", "training_comment"),
        "Samples": ("sample_every_n_epochs", "sample_every_n_steps", "sample_prompts", "sample_sampler"),
    },
}
OPEN_GROUPS = frozenset({"Folders", "Network", "Schedule", "Learning rate", "Saving"})
MULTILINE = frozenset({"sample_prompts"})
# Widget labels keep kohya's words but read as text; these few read better spelled out.
LABELS = {"max_train_epochs": "Epochs", "train_batch_size": "Batch size", "network_dim": "Network dim (rank)",
          "network_alpha": "Network alpha", "unet_lr": "UNet lr", "text_encoder_lr": "Text encoder lr", "lr_scheduler": "LR scheduler",
          "min_snr_gamma": "Min-SNR gamma", "reg_data_dir": "Regularization folder", "train_data_dir": "Dataset folder",
          "num_class_images": "Class images from the base (no regularization folder)", "class_images_cfg_scale": "Class images' CFG scale"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    label: str
    info: str
    kind: str  # checkbox | dropdown | int | float | text | lines
    default: Any
    choices: tuple[str, ...] = ()


def _kind(f: dataclasses.Field) -> str:
    if f.metadata.get("choices"):
        return "dropdown"
    if isinstance(f.default, bool):
        return "checkbox"
    if f.type is int:
        return "int"
    if f.type is float:
        return "float"
    return "lines" if f.name in MULTILINE else "text"


def field_specs() -> dict[str, FieldSpec]:
    """One spec per TrainConfig field, in declaration order."""
    specs = {}
    for f in dataclasses.fields(TrainConfig):
        label = LABELS.get(f.name, f.name.replace("_", " ").capitalize())
        specs[f.name] = FieldSpec(f.name, label, f.metadata.get("help", ""), _kind(f), to_widget(f.name, f.default), tuple(f.metadata.get("choices", ())))
    return specs


def layout() -> dict[str, dict[str, tuple[str, ...]]]:
    """LAYOUT plus an "Other" group in Training for fields it does not place."""
    placed = {name for groups in LAYOUT.values() for names in groups.values() for name in names}
    other = tuple(name for name in field_specs() if name not in placed)
    result = {section: dict(groups) for section, groups in LAYOUT.items()}
    if other:
        result["Training"]["Other"] = other
    return result


def to_widget(name: str, value: Any) -> Any:
    """A config value as its widget shows it: resolution "512x768", prompts one per line."""
    if name == "resolution":
        width, height = value
        return str(width) if width == height else f"{width}x{height}"
    if isinstance(value, (tuple, list)):
        return "\n".join(str(v) for v in value)
    return value


def config_widget_values(config: TrainConfig) -> dict[str, Any]:
    return {f.name: to_widget(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)}


def _from_widget(spec: FieldSpec, value: Any) -> Any:
    if value is None or (spec.kind in ("int", "float") and value == ""):
        return None  # an emptied number box means "default"
    if spec.kind == "lines":
        return [line.strip() for line in str(value).splitlines() if line.strip()]
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_from_widgets(values: dict[str, Any]) -> TrainConfig:
    """Widget values (by field name) -> a validated TrainConfig; a `ConfigError` names the field."""
    specs = field_specs()
    plain = {}
    for name, value in values.items():
        converted = _from_widget(specs[name], value)
        if converted is not None:
            plain[name] = converted
    return TrainConfig.from_dict(plain)
