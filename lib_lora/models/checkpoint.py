"""Reading and writing ldm single-file checkpoints, with the architecture read from the tensors.

A full-size SD1.5 file and the embedded tiny model load through the same code: channel counts,
depths, context width, vocabulary and layer counts come from tensor shapes. What shapes cannot
tell (attention head counts, latent scale, eps/v) comes from safetensors metadata keys
`lib_lora.*` when present, else from the SD1 values.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .clip_text import TextConfig, TextEncoder
from .tensor_files import read_tensor_file
from .unet import UNetConfig, UNetModel
from .vae import SD_LATENT_SCALE, AutoencoderKL, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."

# Keys that real SD1 files carry beside the weights and that inference does not use:
# EMA copies, ldm's precomputed DDPM buffers, and Hugging Face's position-id buffer.
IGNORED_KEY = re.compile(
    r"^(model_ema\.|(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)$|"
    r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$)"
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as an SD1-style ldm checkpoint; the message names the file."""


@dataclass
class Checkpoint:
    """The three models of a checkpoint plus what shapes cannot tell."""

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    parameterization: str = "eps"
    metadata: dict[str, str] = field(default_factory=dict)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors or .ckpt file (.ckpt read with weights_only=True)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise CheckpointError(f"{path}: unsupported file type {path.suffix!r}; use .safetensors or .ckpt")
    return read_tensor_file(path, CheckpointError, "checkpoint")


def _component(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _count_indices(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_unet_config(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> UNetConfig:
    """Levels, channels and attention placement from the input blocks (ldm numbering)."""
    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    widths, attention, res_blocks, levels_res = [], [], 0, []
    for n in range(1, _count_indices(sd, r"input_blocks\.(\d+)\.")):
        if f"input_blocks.{n}.0.op.weight" in sd:  # a downsampler closes a level
            levels_res.append(res_blocks)
            res_blocks = 0
            continue
        if res_blocks == 0:
            widths.append(sd[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0])
            attention.append(f"input_blocks.{n}.1.proj_in.weight" in sd)
        res_blocks += 1
    levels_res.append(res_blocks)
    if len(set(levels_res)) != 1:
        raise CheckpointError(f"unsupported UNet: levels have different numbers of res blocks {levels_res}")
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    is_sd2 = context_dim == 1024
    return UNetConfig(
        in_channels=in_channels,
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        num_res_blocks=levels_res[0],
        attention_levels=tuple(attention),
        context_dim=context_dim,
        num_heads=int(meta.get("lib_lora.unet_num_heads", 8)),
        head_dim=64 if is_sd2 and "lib_lora.unet_num_heads" not in meta else None,
        transformer_depth=_count_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].ndim == 2,
    )


def infer_vae_config(sd: dict[str, torch.Tensor]) -> VAEConfig:
    channels = sd["encoder.conv_in.weight"].shape[0]
    levels = _count_indices(sd, r"encoder\.down\.(\d+)\.")
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        z_channels=sd["post_quant_conv.weight"].shape[0],
        channels=channels,
        channel_mult=tuple(w // channels for w in widths),
        num_res_blocks=_count_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."),
    )


def infer_text_config(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> TextConfig:
    prefix = "transformer.text_model."
    vocab, width = sd[prefix + "embeddings.token_embedding.weight"].shape
    return TextConfig(
        vocab_size=vocab,
        max_positions=sd[prefix + "embeddings.position_embedding.weight"].shape[0],
        width=width,
        layers=_count_indices(sd, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
        heads=int(meta.get("lib_lora.text_num_heads", max(1, width // 64))),
        mlp_width=sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
    )


def _check_format(path, state: dict[str, torch.Tensor]) -> None:
    if any(k.startswith("cond_stage_model.model.") for k in state):
        raise CheckpointError(f"{path}: an SD2 (OpenCLIP text encoder) checkpoint; only SD1.x is supported so far")
    if any(k.startswith("conditioner.") for k in state):
        raise CheckpointError(f"{path}: an SDXL checkpoint; only SD1.x is supported so far")
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (TEXT_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{path}: no {what} weights (no keys starting with {prefix!r}); not an SD1 ldm checkpoint")


def _build(path, module_cls, config, sd: dict[str, torch.Tensor], prefix: str, dtype, **kwargs):
    """Construct on the meta device (no wasted init) and take the file's tensors, all keys accounted for."""
    with torch.device("meta"):
        model = module_cls(config, **kwargs)
    expected = set(model.state_dict())
    missing, unknown = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unknown:
        lines = [f"{path}: the {prefix[:-1]} weights do not match the architecture read from the file ({config})."]
        lines += [f"  missing: {prefix}{k}" for k in missing[:20]] + (["  ..."] if len(missing) > 20 else [])
        lines += [f"  unknown: {prefix}{k}" for k in unknown[:20]] + (["  ..."] if len(unknown) > 20 else [])
        raise CheckpointError("\n".join(lines))
    wrong = [k for k, p in model.state_dict().items() if p.shape != sd[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: {prefix}{k} has shape {tuple(sd[k].shape)}, expected {tuple(model.state_dict()[k].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return model.eval().requires_grad_(False)


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> Checkpoint:
    """Load an SD1 ldm checkpoint (.safetensors or .ckpt) into frozen, eval-mode models."""
    state, meta = read_state_dict(path)
    _check_format(path, state)
    leftovers = sorted(k for k in state if not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)) and not IGNORED_KEY.match(k))
    if leftovers:
        raise CheckpointError(f"{path}: unknown keys outside the UNet, VAE and text encoder: {', '.join(leftovers[:20])}")
    state = {k: v for k, v in state.items() if not IGNORED_KEY.match(k)}
    unet_sd, vae_sd, text_sd = (_component(state, p) for p in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX))
    try:
        configs = infer_unet_config(unet_sd, meta), infer_vae_config(vae_sd), infer_text_config(text_sd, meta)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r} needed to read the architecture") from e
    scale = float(meta.get("lib_lora.scale_factor", SD_LATENT_SCALE))
    return Checkpoint(
        unet=_build(path, UNetModel, configs[0], unet_sd, UNET_PREFIX, dtype).to(device),
        vae=_build(path, AutoencoderKL, configs[1], vae_sd, VAE_PREFIX, dtype, scale_factor=scale).to(device),
        text_encoder=_build(path, TextEncoder, configs[2], text_sd, TEXT_PREFIX, dtype).to(device),
        parameterization=meta.get("lib_lora.parameterization", "eps"),
        metadata=meta,
    )


def checkpoint_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """The `lib_lora.*` keys needed to rebuild what shapes cannot tell."""
    return {
        "lib_lora.unet_num_heads": str(ckpt.unet.config.num_heads),
        "lib_lora.text_num_heads": str(ckpt.text_encoder.config.heads),
        "lib_lora.scale_factor": str(ckpt.vae.scale_factor),
        "lib_lora.parameterization": ckpt.parameterization,
    }


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike, dtype: torch.dtype | None = None, extra_metadata=None) -> None:
    """Write an ldm-layout .safetensors atomically (temp file + rename)."""
    state = {}
    for prefix, model in ((UNET_PREFIX, ckpt.unet), (VAE_PREFIX, ckpt.vae), (TEXT_PREFIX, ckpt.text_encoder)):
        for k, v in model.state_dict().items():
            state[prefix + k] = (v.to(dtype) if dtype else v).contiguous()
    meta = {**checkpoint_metadata(ckpt), **(extra_metadata or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
