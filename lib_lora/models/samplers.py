"""Samplers in k-diffusion's sigma space, and the denoiser wrapper that makes the UNet speak it.

`x = x_0 + sigma * eps`. A denoiser maps (x, sigma) to its estimate of x_0. Euler steps
`x <- x + (x - x0_hat) / sigma * (sigma_next - sigma)`; written out this is
`x0_hat + sigma_next * eps_hat`, which is also DDIM with eta = 0, so DDIM here is Euler on DDIM's
timestep selection (ldm's "uniform" discretisation, `arange(0, 1000, 1000 // steps) + 1`).
Euler ancestral (the webui's "Euler a", its long-time default) steps down further, to sigma_down, and
adds fresh noise of std sigma_up (sigma_down^2 + sigma_up^2 = sigma_next^2): the fresh noise lets
later steps correct what earlier ones got wrong, which a small model needs (bench/base_quality.py).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule

SAMPLERS = ("euler_a", "euler", "ddim")  # the first is the default


def model_input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """c_in: x / sqrt(sigma^2 + 1) is exactly the x_t the UNet was trained on."""
    return (sigma**2 + 1) ** -0.5


def denoised_from_output(x, sigma, output, parameterization: str):
    """x0 estimate from the UNet's eps or v output (k-diffusion `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser`)."""
    sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    if parameterization == "eps":
        return x - sigma * output
    c_skip = 1 / (sigma**2 + 1)
    c_out = -sigma * (sigma**2 + 1) ** -0.5
    return x * c_skip + output * c_out


@dataclass
class CFGDenoiser:
    """Classifier-free guidance: uncond + cfg_scale * (cond - uncond), both in one UNet batch."""

    unet: Callable
    schedule: NoiseSchedule
    cond: torch.Tensor  # [B, T, D]
    uncond: torch.Tensor  # [B, T, D]
    cfg_scale: float
    vector: torch.Tensor | None = None  # SDXL's y for cond then uncond [2B, adm]; None for SD1/SD2

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0])
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        t = self.schedule.sigma_to_t(sigma_in)
        x_in_scaled = x_in * model_input_scale(sigma_in).reshape(-1, 1, 1, 1).to(x.dtype)
        if self.vector is None:
            output = self.unet(x_in_scaled, t, torch.cat([self.cond, self.uncond]))
        else:
            output = self.unet(x_in_scaled, t, torch.cat([self.cond, self.uncond]), self.vector)
        denoised = denoised_from_output(x_in, sigma_in, output, self.schedule.parameterization)
        cond, uncond = denoised.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)


def euler_sigmas(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """k-diffusion's default discretisation: timesteps evenly spaced from 999 to 0, then sigma 0."""
    t = torch.linspace(len(schedule.alphas_cumprod) - 1, 0, steps)
    return torch.cat([schedule.t_to_sigma(t), torch.zeros(1)])


def ddim_sigmas(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """ldm DDIM's integer timesteps, ending at alphas_cumprod[0] (ldm's `alphas_prev` of the last step)."""
    num = len(schedule.alphas_cumprod)
    if not 1 <= steps <= num:
        raise ValueError(f"steps must be between 1 and {num}, got {steps}")
    timesteps = torch.arange(0, num, num // steps) + 1
    sigmas = schedule.sigmas
    return torch.cat([sigmas[timesteps.flip(0)], sigmas[:1]])


def sigmas_for(sampler: str, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    if sampler in ("euler", "euler_a"):
        return euler_sigmas(schedule, steps)
    if sampler == "ddim":
        return ddim_sigmas(schedule, steps)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def initial_latents(noise: torch.Tensor, sampler: str, sigma_max: torch.Tensor) -> torch.Tensor:
    """Pure noise at the first sigma: k-diffusion scales by sigma_max, ldm DDIM starts from x_T = noise."""
    scale = (sigma_max**2 + 1) ** 0.5 if sampler == "ddim" else sigma_max
    return noise * scale.to(noise.dtype)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of k-diffusion's `get_ancestral_step` with eta 1."""
    up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


@torch.no_grad()
def sample_euler(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, callback: Callable | None = None,
                 noise: Callable[[], torch.Tensor] | None = None):
    """Euler steps from sigmas[0] down to sigmas[-1]; callback(step, total) after each. Given `noise`
    (fresh unit noise shaped like x on each call), Euler ancestral steps instead."""
    sigmas = sigmas.to(x.device)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1]) if noise else (sigmas[i + 1], 0)
        x = denoised + (x - denoised) * (down / sigmas[i])
        if up > 0:
            x = x + noise().to(x.device, x.dtype) * up
        if callback is not None:
            callback(i + 1, len(sigmas) - 1)
    return x
