"""SD1.5's architecture, and random-initialised full-size checkpoints for loader tests and benchmarks."""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from .clip_text import TextConfig, TextEncoder
from .schedule import sd_alphas_cumprod
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

SD15_UNET, SD15_VAE, SD15_TEXT = UNetConfig(), VAEConfig(), TextConfig()


def _random_like(name: str, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Norm scales 1, biases 0, weights N(0, 1/fan_in): finite activations at any depth."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    fan_in = shape[1:].numel()
    return (torch.randn(shape, generator=generator) * fan_in**-0.5).to(dtype)


def random_sd15_state_dict(dtype: torch.dtype = torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full SD1.5 ldm state dict with random weights, plus the extra keys real files carry."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        parts = ((UNET_PREFIX, UNetModel(SD15_UNET)), (VAE_PREFIX, AutoencoderKL(SD15_VAE)), (TEXT_PREFIX, TextEncoder(SD15_TEXT)))
    state = {
        prefix + name: _random_like(name, p.shape, generator, dtype)
        for prefix, model in parts
        for name, p in model.state_dict().items()
    }
    state[TEXT_PREFIX + "transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = sd_alphas_cumprod()
    return state


def write_random_sd15(path: str | os.PathLike, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write the random SD1.5 checkpoint atomically (~2.1 GB in fp16)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(random_sd15_state_dict(dtype, seed), str(tmp))
    os.replace(tmp, path)
    return path
