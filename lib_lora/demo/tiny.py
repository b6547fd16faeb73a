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
from ..models.conditioning import SIZE_EMBEDDING_DIM
from ..models.open_clip_text import OpenClipConfig, OpenClipTextEncoder
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

# SD2 and SDXL at the same scale, for tests: their layouts (OpenCLIP, linear proj_in/out, per-level
# transformer depth, label_emb) with small widths. No shipped weights: tests use random ones.
TINY_SD2_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(False, True, True),
                           context_dim=64, num_heads=4, use_linear_in_transformer=True)
TINY_SD2_TEXT = OpenClipConfig(width=64, layers=3, heads=2, mlp_width=256, projection_dim=64)
TINY_SDXL_TEXT_2 = OpenClipConfig(width=64, layers=2, heads=2, mlp_width=256, projection_dim=48)
TINY_SDXL_UNET = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(False, True, True),
    context_dim=TINY_TEXT.width + TINY_SDXL_TEXT_2.width, num_heads=4, transformer_depth=(0, 1, 2),
    use_linear_in_transformer=True, adm_in_channels=TINY_SDXL_TEXT_2.projection_dim + 6 * SIZE_EMBEDDING_DIM,
)


def random_tiny_checkpoint(seed: int = 0, arch: str = "sd1") -> Checkpoint:
    """Freshly initialised tiny models of an architecture (PyTorch default init), in eval mode."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(TINY_VAE, scale_factor=TINY_LATENT_SCALE).eval()
    if arch == "sd1":
        return Checkpoint(unet=UNetModel(TINY_UNET).eval(), vae=vae, text_encoder=TextEncoder(TINY_TEXT).eval())
    if arch == "sd2":
        return Checkpoint(unet=UNetModel(TINY_SD2_UNET).eval(), vae=vae, text_encoder=OpenClipTextEncoder(TINY_SD2_TEXT).eval(),
                          parameterization="v", arch="sd2")
    return Checkpoint(unet=UNetModel(TINY_SDXL_UNET).eval(), vae=vae, text_encoder=TextEncoder(TINY_TEXT).eval(),
                      text_encoder_2=OpenClipTextEncoder(TINY_SDXL_TEXT_2).eval(), arch="sdxl")
