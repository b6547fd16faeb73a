"""Sampling: the schedule, the samplers' math, reproducible seeds, sizes, clip skip and the CLI."""

import numpy as np
import pytest
import torch

from lib_lora.__main__ import main
from lib_lora.models.checkpoint import load_checkpoint
from lib_lora.models.pipeline import GenerationParams, generate
from lib_lora.models.samplers import SAMPLERS, ddim_sigmas, euler_sigmas, sample_euler
from lib_lora.models.schedule import NoiseSchedule, sd_alphas_cumprod


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_path):
    return load_checkpoint(tiny_checkpoint_path)


def test_sd1_schedule_endpoints():
    ac = sd_alphas_cumprod()
    assert ac.shape == (1000,)
    assert ac[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert NoiseSchedule(ac).sigmas[-1].item() == pytest.approx(14.6146, rel=1e-4)  # k-diffusion's SD1 sigma_max


def test_sigma_and_timestep_conversions_invert():
    schedule = NoiseSchedule(sd_alphas_cumprod())
    t = torch.tensor([0.0, 10.5, 500.0, 998.25, 999.0])
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-3)


def test_euler_with_an_exact_denoiser_lands_on_the_clean_image():
    schedule = NoiseSchedule(sd_alphas_cumprod())
    x0 = torch.randn(1, 4, 8, 8)
    sigmas = euler_sigmas(schedule, 10)
    x = x0 + torch.randn_like(x0) * sigmas[0]
    out = sample_euler(lambda x, sigma: x0, x, sigmas)
    assert torch.allclose(out, x0, atol=1e-6)


def test_euler_ancestral_keeps_the_noise_level_of_each_sigma_and_ends_clean():
    """With a denoiser that always says "zero", each step's state must be pure noise of std sigma_next
    (sigma_down^2 + sigma_up^2 = sigma_next^2); with an exact one it lands on the clean image."""
    schedule = NoiseSchedule(sd_alphas_cumprod())
    sigmas = euler_sigmas(schedule, 10)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 4, 4, 4, generator=generator) * sigmas[0]
    stds = []
    for i in range(len(sigmas) - 2):
        x = sample_euler(lambda x, sigma: torch.zeros_like(x), x, sigmas[i : i + 2], noise=lambda: torch.randn(x.shape, generator=generator))
        stds.append(x.std().item() / sigmas[i + 1].item())
    assert all(abs(r - 1) < 0.02 for r in stds), stds
    x0 = torch.randn(1, 4, 8, 8)
    out = sample_euler(lambda x, sigma: x0, x0 + sigmas[0] * torch.randn_like(x0), sigmas, noise=lambda: torch.randn(1, 4, 8, 8))
    assert torch.allclose(out, x0, atol=1e-6)


def test_ddim_timesteps_follow_ldm_uniform_spacing():
    schedule = NoiseSchedule(sd_alphas_cumprod())
    sigmas = ddim_sigmas(schedule, 20)
    expected_t = torch.arange(0, 1000, 50).flip(0) + 1  # 951, 901, ..., 1
    assert torch.allclose(sigmas[:-1], schedule.sigmas[expected_t])
    assert sigmas[-1] == schedule.sigmas[0]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_image_and_other_seed_differs(tiny, sampler):
    params = GenerationParams(prompt="a red circle", steps=4, width=64, height=64, sampler=sampler, seed=3)
    a, b = generate(tiny, params), generate(tiny, params)
    c = generate(tiny, GenerationParams(**{**params.__dict__, "seed": 4}))
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


@pytest.mark.parametrize("sampler", ["euler_a", "euler"])
def test_batch_reproduces_single_images_seed_by_seed(tiny, sampler):
    """Ancestral samplers too: each image's fresh noise comes from its own seed's generator."""
    batch = generate(tiny, GenerationParams(prompt="a blue square", steps=3, width=64, height=64, seed=10, batch_size=2, sampler=sampler))
    second = generate(tiny, GenerationParams(prompt="a blue square", steps=3, width=64, height=64, seed=11, sampler=sampler))
    assert np.abs(np.asarray(batch[1], dtype=int) - np.asarray(second[0], dtype=int)).max() <= 1


def test_non_square_sizes_and_long_prompts_work(tiny):
    prompt = ", ".join(["a red circle"] * 40)  # > 150 tokens: three chunks
    (image,) = generate(tiny, GenerationParams(prompt=prompt, negative_prompt="blurry", steps=2, width=128, height=64))
    assert image.size == (128, 64)


@pytest.mark.parametrize("width,height", [(65, 64), (64, 40), (0, 64)])
def test_bad_sizes_are_clear_errors(tiny, width, height):
    with pytest.raises(ValueError, match=r"(width|height) \d+ is not a positive multiple of 16 px"):
        generate(tiny, GenerationParams(prompt="x", steps=1, width=width, height=height))


def test_clip_skip_uses_the_penultimate_layer_then_final_norm(tiny):
    text = tiny.text_encoder.transformer.text_model
    tokens = torch.randint(0, 49407, (1, 77))
    x = text.embeddings(tokens)
    for layer in text.encoder.layers[:-1]:
        x = layer(x)
    expected = text.final_layer_norm(x)
    assert torch.allclose(text(tokens, clip_skip=2), expected)
    assert not torch.allclose(text(tokens, clip_skip=1), expected)


def test_cli_writes_a_png(tiny_checkpoint_path, tmp_path):
    out = tmp_path / "img.png"
    code = main(["generate", "--prompt", "a green triangle", "--checkpoint", str(tiny_checkpoint_path), "--steps", "2", "--out", str(out)])
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_bad_size_without_traceback(tiny_checkpoint_path, tmp_path, capsys):
    code = main(["generate", "--prompt", "x", "--checkpoint", str(tiny_checkpoint_path), "--width", "70", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "width 70" in capsys.readouterr().err
