"""The SD1/SD2 noise schedule and the sigma view of it that the samplers work in.

Training noises `x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps` with `a_t = alphas_cumprod[t]`.
Samplers use the equivalent variable `x = x_t / sqrt(a_t) = x_0 + sigma_t eps`, with
`sigma_t = sqrt((1 - a_t) / a_t)` (Karras et al. 2022; k-diffusion's `DiscreteSchedule`).
"""

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000


def sd_alphas_cumprod(
    num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """ldm's "scaled_linear" schedule: betas linear in sqrt space, computed in float64 as ldm does."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


ZERO_TERMINAL_ALPHA = 4.8973451890853435e-08  # kohya's stand-in for 0 at the last step, so sigma stays finite


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero signal (Lin et al. 2024, Algorithm 1),
    keeping the first step's; the last value is then kohya's tiny positive stand-in for 0."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = ZERO_TERMINAL_ALPHA
    return rescaled.float()


@dataclass(frozen=True)
class NoiseSchedule:
    """alphas_cumprod [1000] (fp32) and whether the model predicts noise ("eps") or velocity ("v")."""

    alphas_cumprod: torch.Tensor
    parameterization: str = "eps"

    def __post_init__(self):
        if self.parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {self.parameterization!r}")

    @property
    def sigmas(self) -> torch.Tensor:
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for a sigma, by linear interpolation in log-sigma (k-diffusion)."""
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.float().log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, len(log_sigmas) - 1).reshape(sigma.shape)
        low = high - 1
        weight = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return low.float() + weight

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at fractional timesteps, interpolating log-sigma between neighbouring integers."""
        log_sigmas = self.sigmas.log().to(t.device)
        low = t.floor().long().clamp(0, len(log_sigmas) - 1)
        high = (low + 1).clamp(max=len(log_sigmas) - 1)
        weight = t - low.float()
        return ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()
