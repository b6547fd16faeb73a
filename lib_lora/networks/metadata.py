"""Safetensors header metadata of a trained LoRA: kohya `ss_*`, ModelSpec `modelspec.*`, `sshs_*` hashes.

Spellings and value formats follow lora-format.md §8 (kohya `train_network.py`,
`library/sai_model_spec.py`, `library/train_util.py`): every value a string, numbers and booleans
`str()`-ed, None as "None", dicts as JSON (the webui JSON-decodes any value starting with `{`).
"""

import hashlib
import json
import struct
import time
from datetime import datetime

import torch
from safetensors.torch import save as safetensors_bytes

MODELSPEC_VERSION = "1.0.1"
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for every SDXL-family model
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya's modelspec.implementation for SDXL


def base_model_version(arch: str, v_parameterization: bool) -> str:
    """kohya's `ss_base_model_version`: sd_v1, sd_v1_v, sd_v2, sd_v2_v or sdxl_base_v1-0."""
    if arch == "sdxl":
        return SDXL_BASE_MODEL_VERSION
    return ("sd_v2" if arch == "sd2" else "sd_v1") + ("_v" if v_parameterization else "")


def card_sd_version(base_model_version: str) -> str:
    """The webui card's "sd version" (SD1 / SD2 / SDXL), which decides for which loaded models the LoRA is listed."""
    if base_model_version.startswith("sdxl_"):
        return "SDXL"
    return "SD2" if base_model_version.startswith("sd_v2") else "SD1"


def _str(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def modelspec_architecture(base_model_version: str, v_parameterization: bool) -> str:
    """`stable-diffusion-v1/lora`, `stable-diffusion-v2-512/lora`, `stable-diffusion-v2-768-v/lora` or
    `stable-diffusion-xl-v1-base/lora`."""
    if base_model_version.startswith("sdxl_"):
        return "stable-diffusion-xl-v1-base/lora"
    if base_model_version.startswith("sd_v2"):
        return "stable-diffusion-v2-768-v/lora" if v_parameterization else "stable-diffusion-v2-512/lora"
    return "stable-diffusion-v1/lora"


def modelspec_metadata(*, title: str, base_model_version: str, v_parameterization: bool, resolution, clip_skip=None,
                       timestamp: float | None = None, **fields) -> dict[str, str]:
    """The `modelspec.*` keys kohya writes for an SD1/SD2/SDXL LoRA; extra `fields` become `modelspec.<name>`."""
    w, h = _resolution(resolution)
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(base_model_version, v_parameterization),
        # kohya's values (lora-format.md §8.2): diffusers for SD1/SD2 LoRAs, Stability's repository for SDXL
        "modelspec.implementation": SDXL_IMPLEMENTATION if base_model_version.startswith("sdxl_") else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": datetime.fromtimestamp(time.time() if timestamp is None else timestamp).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    meta |= {f"modelspec.{k}": _str(v) for k, v in fields.items() if v is not None}
    return meta


def training_metadata(
    *,
    output_name: str,
    network_dim: int,
    network_alpha: float,
    network_module: str = "networks.lora",
    network_args: dict[str, str] | None = None,
    base_model_version: str = "sd_v1",
    v_parameterization: bool = False,
    sd_model_name: str | None = None,
    resolution: int | tuple[int, int] = 512,
    num_train_images: int | None = None,
    num_epochs: int | None = None,
    learning_rate: float | None = None,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
    tag_frequency: dict[str, dict[str, int]] | None = None,
    training_comment: str | None = None,
    clip_skip: int | None = None,
    steps: int | None = None,
    epoch: int | None = None,
    seed: int | None = None,
    training_started_at: float | None = None,
    training_finished_at: float | None = None,
    modelspec: dict[str, str] | None = None,
    **ss_fields,
) -> dict[str, str]:
    """kohya `ss_*` and `modelspec.*` metadata from plain values; `ss_fields` become `ss_<name>` as given.

    Pass any other kohya field by its name without `ss_` (`optimizer="AdamW"`, `max_train_steps=800`,
    `lr_scheduler="cosine"`, `num_batches_per_epoch=...`, `sd_model_hash=...`, `dataset_dirs={...}`).
    `modelspec` adds `modelspec.<key>` entries (author, description, trigger_phrase, ...).
    """
    finished = time.time() if training_finished_at is None else training_finished_at
    w, h = _resolution(resolution)
    ss = {
        "output_name": output_name,
        "network_module": network_module,
        "network_dim": network_dim,
        "network_alpha": float(network_alpha),
        "network_args": network_args or {},
        "base_model_version": base_model_version,
        "v2": base_model_version.startswith("sd_v2"),
        "v_parameterization": v_parameterization,
        "sd_model_name": sd_model_name,
        "resolution": (w, h),
        "num_train_images": num_train_images,
        "num_epochs": num_epochs,
        "learning_rate": learning_rate,
        "unet_lr": unet_lr,
        "text_encoder_lr": text_encoder_lr,
        "tag_frequency": tag_frequency or {},
        "training_comment": training_comment,
        "clip_skip": clip_skip,
        "steps": steps,
        "epoch": epoch,
        "seed": seed,
        "training_started_at": training_started_at,
        "training_finished_at": finished,
        **ss_fields,
    }
    meta = {f"ss_{k}": _str(v) for k, v in ss.items()}
    spec = modelspec_metadata(title=output_name, base_model_version=base_model_version, v_parameterization=v_parameterization,
                              resolution=(w, h), clip_skip=clip_skip, timestamp=finished, **(modelspec or {}))
    return meta | spec


def data_region(blob: bytes) -> bytes:
    """The tensor bytes of a serialised safetensors file: everything after `8 + header length`."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return blob[8 + header_len :]


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya computes them (lora-format.md §8.1).

    Serialise with only the `ss_*` metadata; model hash = sha256 of the data region (equal to the
    final file's, since tensor offsets are relative to it, and to the webui's addnet hash); legacy =
    first 8 hex of sha256 of the 64 KiB at byte 0x100000 of that serialisation.
    """
    blob = safetensors_bytes(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    legacy = blob[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]
    return {
        "sshs_model_hash": hashlib.sha256(data_region(blob)).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(legacy).hexdigest()[:8],
    }
