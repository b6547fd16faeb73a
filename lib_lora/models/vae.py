"""The Stable Diffusion KL autoencoder with the ldm names (`first_stage_model.encoder.down.0.block.0...`).

Pixels in [-1, 1] are encoded to a diagonal Gaussian over latents; the diffusion model works on
`mean * scale_factor` (0.18215 for SD1/SD2, 0.13025 for SDXL's VAE), which keeps latents near
unit variance.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Upsample  # the same nearest x2 + 3x3 conv, with the same `conv` name

SD_LATENT_SCALE = 0.18215  # the one place the SD1/SD2 latent scale factor is written
SDXL_LATENT_SCALE = 0.13025  # SDXL's VAE (same architecture, retrained)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    z_channels: int = 4
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # GroupNorm's groups (ldm: 32). Not in the state dict: a checkpoint stores it in its metadata. At
    # 32 channels, 32 groups normalise each channel alone, and a flat colour then survives only as a pattern.
    norm_groups: int = 32

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = normalize(channels, groups)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 conv projections."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hidden = self.norm(x)
        q, k, v = (proj(hidden).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # [B,1,HW,C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv with ldm's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(level, name, resample)
    return level


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mults = config.channels, config.channel_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(mults):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, config.norm_groups))
                block_in = ch * mult
            resample = Downsample(block_in) if i != len(mults) - 1 else None
            self.down.append(_level(blocks, resample, "downsample"))
        self.mid = MidBlock(block_in, config.norm_groups)
        self.norm_out = normalize(block_in, config.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mults = config.channels, config.channel_mult
        block_in = ch * mults[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, config.norm_groups)
        levels = []
        for i in reversed(range(len(mults))):  # built from the deepest level; stored in ldm's order
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mults[i], config.norm_groups))
                block_in = ch * mults[i]
            levels.insert(0, _level(blocks, Upsample(block_in) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in, config.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


DECODER_PREFIXES = ("decoder.", "post_quant_conv.")  # the state-dict keys of what `decoder=False` leaves out


class AutoencoderKL(nn.Module):
    """ldm `AutoencoderKL`: `encode` returns the posterior mean and log-variance."""

    def __init__(self, config: VAEConfig, scale_factor: float = SD_LATENT_SCALE, decoder: bool = True):
        super().__init__()
        self.config = config
        self.scale_factor = scale_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config) if decoder else None  # None: an encoder for caching latents only
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1) if decoder else None

    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, z, H/f, W/f]."""
        mean, logvar = self.quant_conv(self.encoder(pixels)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents for the diffusion model: the posterior mean, or a sample with `generator`."""
        mean, logvar = self.encode_moments(pixels)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
            mean = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return mean * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in about [-1, 1]."""
        if self.decoder is None:
            raise RuntimeError("this VAE was loaded without its decoder, for a training run that draws no images")
        return self.decoder(self.post_quant_conv(latents / self.scale_factor))
