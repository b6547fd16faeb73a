"""Noise, targets and loss weights of diffusion training, as pure tensor functions.

Forward process: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, a_t = alphas_cumprod[t] (DDPM).
"""

import torch
import torch.nn.functional as F


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps].to(latents.dtype).reshape(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def training_target(latents, noise, alphas_cumprod, timesteps, parameterization: str) -> torch.Tensor:
    """eps for eps-models; v = sqrt(a) eps - sqrt(1 - a) x_0 for v-models (Salimans & Ho 2022)."""
    if parameterization == "eps":
        return noise
    a = alphas_cumprod[timesteps].to(latents.dtype).reshape(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """noise + offset * N(0, 1) per image and channel (crosslabs' noise offset, kohya `apply_noise_offset`)."""
    shift = torch.randn(noise.shape[0], noise.shape[1], 1, 1, generator=generator, device=generator.device)
    return noise + offset * shift.to(noise.device, noise.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise (kohya `pyramid_noise_like`): upsampled coarse noise added per level, renormalised."""
    b, c, h, w = noise.shape
    for i in range(1, iterations + 1):
        ratio = torch.rand(1, generator=generator, device=generator.device).item() * 2 + 2  # in [2, 4)
        hi, wi = max(1, int(h / ratio**i)), max(1, int(w / ratio**i))
        coarse = torch.randn(b, c, hi, wi, generator=generator, device=generator.device).to(noise.device, noise.dtype)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hi == 1 or wi == 1:
            break
    return noise / noise.std()


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps]
    return a / (1 - a)


def min_snr_weight(alphas_cumprod, timesteps, gamma: float, parameterization: str) -> torch.Tensor:
    """Per-sample loss weight min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v) (Hang et al. 2023, kohya)."""
    s = snr(alphas_cumprod, timesteps)
    return torch.minimum(s, torch.full_like(s, gamma)) / (s if parameterization == "eps" else s + 1)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample MSE [B]; with a mask [B, 1, h, w] (alpha at latent size) pixels are weighted by it."""
    err = (prediction.float() - target.float()) ** 2
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    weight = mask.expand_as(err)
    return (err * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp(min=1e-8)
