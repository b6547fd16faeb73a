"""The diffusion targets and loss weights of eps- and v-prediction, against their formulas."""

import torch

from lib_lora.models.schedule import ZERO_TERMINAL_ALPHA, rescale_zero_terminal_snr, sd_alphas_cumprod
from lib_lora.train.noise import add_noise, min_snr_weight, snr, training_target


def test_v_target_is_sqrt_alpha_eps_minus_sqrt_one_minus_alpha_x0():
    """v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho), worked at t = 500 for one number."""
    alphas = sd_alphas_cumprod()
    x0, eps, t = torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), -1.0), torch.tensor([500])
    a = alphas[500].item()
    v = training_target(x0, eps, alphas, t, "v")
    assert torch.allclose(v, torch.full_like(v, a**0.5 * -1.0 - (1 - a) ** 0.5 * 0.5))
    assert torch.equal(training_target(x0, eps, alphas, t, "eps"), eps)
    # the noisy latent and the target determine x0 again: x0 = sqrt(a) x_t - sqrt(1-a) v
    x_t = add_noise(x0, eps, alphas, t)
    assert torch.allclose(a**0.5 * x_t - (1 - a) ** 0.5 * v, x0, atol=1e-6)


def test_min_snr_weight_takes_its_v_form_for_v_prediction():
    """min(SNR, gamma) / SNR for eps, / (SNR + 1) for v (kohya apply_snr_weight with v_parameterization)."""
    alphas, t = sd_alphas_cumprod(), torch.tensor([10, 500, 990])
    s = snr(alphas, t)
    assert torch.allclose(min_snr_weight(alphas, t, 5.0, "eps"), torch.minimum(s, torch.tensor(5.0)) / s)
    assert torch.allclose(min_snr_weight(alphas, t, 5.0, "v"), torch.minimum(s, torch.tensor(5.0)) / (s + 1))


def test_zero_terminal_snr_keeps_the_first_step_and_ends_without_signal():
    alphas = sd_alphas_cumprod()
    rescaled = rescale_zero_terminal_snr(alphas)
    assert torch.isclose(rescaled[0], alphas[0], rtol=1e-6)
    assert rescaled[-1].item() == torch.tensor(ZERO_TERMINAL_ALPHA).item()  # kohya's stand-in for exactly 0
    assert (rescaled[1:] <= rescaled[:-1]).all() and (rescaled[:-1] > rescaled[-1]).all()
    root = alphas.double().sqrt()  # Lin et al.: sqrt(a) shifted and scaled linearly
    expected_mid = ((root[500] - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    assert torch.isclose(rescaled[500].double(), expected_mid, rtol=1e-5)
