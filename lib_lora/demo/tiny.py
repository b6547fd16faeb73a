"""The embedded tiny model's architecture: SD1's layout at a size that trains and samples on a CPU.

64x64 images, a VAE with 4x downsampling (16x16x4 latents), a 32/64/128-channel UNet with one
res block per level and cross-attention at 8x8 and 4x4, and a 3-layer, 128-wide CLIP text encoder
on the real CLIP vocabulary. Every key name is SD1's, so everything that works here works on SD1.5.
The shipped weights (`DEFAULT_CHECKPOINT`) are trained by `build_base.py`; see assets/MODEL_CARD.md.
"""

from pathlib import Path

import torch

from ..models.checkpoint import Checkpoint
from ..models.clip_text import TextConfig, TextEncoder
from ..models.unet import UNetConfig, UNetModel
from ..models.vae import AutoencoderKL, VAEConfig

ASSETS = Path(__file__).parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "tiny-sd.safetensors"
IMAGE_SIZE = 64

TINY_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 4),
    num_res_blocks=1,
    attention_levels=(False, True, True),
    context_dim=128,
    num_heads=4,
)
TINY_VAE = VAEConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)
TINY_TEXT = TextConfig(width=128, layers=3, heads=2, mlp_width=512)
TINY_LATENT_SCALE = 1.0  # random models only; the built VAE's own is measured and stored in the file's metadata


def random_tiny_checkpoint(seed: int = 0) -> Checkpoint:
    """Freshly initialised tiny models (PyTorch default init), in eval mode."""
    torch.manual_seed(seed)
    return Checkpoint(
        unet=UNetModel(TINY_UNET).eval(),
        vae=AutoencoderKL(TINY_VAE, scale_factor=TINY_LATENT_SCALE).eval(),
        text_encoder=TextEncoder(TINY_TEXT).eval(),
    )
