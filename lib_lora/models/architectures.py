"""The full-size SD1.5, SD2.x and SDXL architectures, and random-initialised checkpoints of each for
loader tests and benchmarks (the bench/make_*_random.py scripts write them; never commit one)."""

import os
from pathlib import Path

import torch

from .checkpoint import TEXT_ENCODERS, UNET_PREFIX, VAE_PREFIX
from .clip_text import TextConfig, TextEncoder
from .open_clip_text import OpenClipConfig, OpenClipTextEncoder
from .schedule import sd_alphas_cumprod
from .tensor_files import write_safetensors
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

SD15_UNET, SD15_VAE, SD15_TEXT = UNetConfig(), VAEConfig(), TextConfig()
SD2_UNET = UNetConfig(context_dim=1024, head_dim=64, use_linear_in_transformer=True)
SD2_TEXT = OpenClipConfig()  # ViT-H/14's text tower
SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4),
    attention_levels=(False, True, True),
    context_dim=2048,
    head_dim=64,
    transformer_depth=(0, 2, 10),
    use_linear_in_transformer=True,
    adm_in_channels=2816,  # pooled bigG 1280 + 6 size numbers x 256
)
SDXL_TEXT_2 = OpenClipConfig(width=1280, layers=32, heads=20, mlp_width=5120, projection_dim=1280)  # ViT-bigG/14

# Per architecture: the UNet config and the text encoders' configs, in the order of checkpoint.TEXT_ENCODERS.
FULL_SIZE = {
    "sd1": (SD15_UNET, [SD15_TEXT]),
    "sd2": (SD2_UNET, [SD2_TEXT]),
    "sdxl": (SDXL_UNET, [SD15_TEXT, SDXL_TEXT_2]),  # SDXL's first encoder is SD1's CLIP-L
}


def _random_like(name: str, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Norm scales 1, biases 0, weights N(0, 1/fan_in): finite activations at any depth."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    fan_in = shape[1:].numel()
    return (torch.randn(shape, generator=generator) * fan_in**-0.5).to(dtype)


def random_state_dict(arch: str = "sd1", dtype: torch.dtype = torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full-size ldm/sgm state dict of `arch` with random weights, plus the extra keys real files carry."""
    generator = torch.Generator().manual_seed(seed)
    unet_config, text_configs = FULL_SIZE[arch]
    classes = {TextConfig: TextEncoder, OpenClipConfig: OpenClipTextEncoder}
    with torch.device("meta"):
        parts = [(UNET_PREFIX, UNetModel(unet_config)), (VAE_PREFIX, AutoencoderKL(VAEConfig()))]
        parts += [(prefix, classes[type(config)](config)) for (prefix, *_), config in zip(TEXT_ENCODERS[arch], text_configs)]
    state = {
        prefix + name: _random_like(name, p.shape, generator, dtype)
        for prefix, model in parts
        for name, p in model.state_dict().items()
    }
    for prefix, model in parts:
        if isinstance(model, TextEncoder):
            state[prefix + "transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        if isinstance(model, OpenClipTextEncoder):
            state[prefix + "model.logit_scale"] = torch.tensor(4.6052, dtype=dtype)
    if arch != "sdxl":
        state["alphas_cumprod"] = sd_alphas_cumprod()
    return state


def write_random_checkpoint(path: str | os.PathLike, arch: str = "sd1", dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write a random full-size checkpoint atomically (fp16: SD1.5 ~2.1 GB, SD2 ~2.6 GB, SDXL ~6.9 GB)."""
    return write_safetensors(path, random_state_dict(arch, dtype, seed))
