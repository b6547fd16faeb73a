"""The shipped tiny base: it loads like any SD1 file, draws what it was trained on, and its builder still runs."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lib_lora.demo import build_base
from lib_lora.demo.analyzer import analyze
from lib_lora.demo.build_base import (BuildConfig, BuildError, DiffusionPhase, DiffusionSettings, build, caption_tokens, file_sha256,
                                      load_widened, pool_scenes)
from lib_lora.demo.build_vae import VAEPhase, VAESettings, codec_scenes, standardize_latents, to_pixels
from lib_lora.demo.tiny import DEFAULT_CHECKPOINT, IMAGE_SIZE, TINY_TEXT, TINY_UNET, TINY_VAE
from lib_lora.demo.world import HELD_OUT_COLOURS, HELD_OUT_SHAPES, render
from lib_lora.models.checkpoint import load_checkpoint
from lib_lora.models.pipeline import GenerationParams, generate
from lib_lora.models.tokenizer import get_tokenizer
from lib_lora.models.unet import UNetModel
from lib_lora.models.vae import AutoencoderKL

SMALL = BuildConfig(
    photos=False,  # the photos need requirements-build.txt, which the tests do not install
    light_share=0.5,
    pool_size=12,
    check_images=4,
    vae=VAESettings(phases=(VAEPhase(steps=2, batch_size=2, crop=32, lr=1e-3), VAEPhase(steps=1, batch_size=1, crop=64, lr=1e-4))),
    diffusion=DiffusionSettings(phases=(DiffusionPhase(steps=3, lr=1e-3), DiffusionPhase(steps=2, lr=1e-4)), batch_size=2),
)


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(DEFAULT_CHECKPOINT)


def test_shipped_base_is_the_tiny_architecture_with_its_measured_latent_scale(shipped):
    assert DEFAULT_CHECKPOINT.stat().st_size < 25_000_000
    assert (shipped.unet.config, shipped.vae.config, shipped.text_encoder.config) == (TINY_UNET, TINY_VAE, TINY_TEXT)
    assert shipped.vae.scale_factor == float(shipped.metadata["lib_lora.scale_factor"]) != 1.0


def test_shipped_base_generates_at_the_default_settings(shipped):
    (image,) = generate(shipped, GenerationParams(prompt="a red square", width=IMAGE_SIZE, height=IMAGE_SIZE))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


def test_shipped_base_is_trained(shipped):
    """A random model draws noise, which the strict analyzer never reads as a red object."""
    images = generate(shipped, GenerationParams(prompt="a red square", seed=3, width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=3))
    assert any(analyze(image).colour == "red" for image in images)


def test_unet_and_text_encoder_never_see_held_out_concepts_but_the_vae_does():
    tokenizer = get_tokenizer()
    held_out_ids = {i for word in HELD_OUT_SHAPES + HELD_OUT_COLOURS for i in tokenizer.encode(word)}
    assert not held_out_ids & set(caption_tokens(pool_scenes(0, 500)).flatten().tolist())
    scenes = codec_scenes(np.random.default_rng(0), 200)
    assert {s.shape for s in scenes} >= set(HELD_OUT_SHAPES) and {s.colour_name for s in scenes} >= set(HELD_OUT_COLOURS)
    assert any(s.colour_name is None for s in scenes)  # arbitrary RGB too


def test_builder_runs_and_a_resumed_build_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    build(SMALL, tmp_path / "straight", tmp_path / "straight.safetensors")
    assert load_checkpoint(tmp_path / "straight.safetensors").unet.config == TINY_UNET

    real_batch = build_base.diffusion_batch

    def interrupted(pool, settings, seed, step, empty):
        if step == 4:  # in the second phase
            raise KeyboardInterrupt
        return real_batch(pool, settings, seed, step, empty)

    monkeypatch.setattr(build_base, "diffusion_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(SMALL, tmp_path / "work", tmp_path / "resumed.safetensors", save_every_s=0)
    monkeypatch.setattr(build_base, "diffusion_batch", real_batch)
    build(SMALL, tmp_path / "work", tmp_path / "resumed.safetensors", resume=True)
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_work_folder_is_never_mixed_up(tmp_path):
    (tmp_path / "stale.pt").write_bytes(b"")
    with pytest.raises(BuildError, match="--resume"):
        build(SMALL, tmp_path, tmp_path / "out.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    build_base.prepare_work(work, SMALL, resume=False)
    with pytest.raises(BuildError, match="another config"):
        build(BuildConfig(seed=1), work, tmp_path / "out.safetensors", resume=True)


def test_a_build_continues_from_an_earlier_model_with_its_latent_scale_and_checks_its_hash(tmp_path):
    """As the shipped model was built: the VAE and denoiser start from an earlier file, the VAE anchored to it."""
    earlier = tmp_path / "earlier.safetensors"
    build(SMALL, tmp_path / "first", earlier)
    anchored = replace(SMALL, init_from=file_sha256(earlier), vae=replace(SMALL.vae, anchor_weight=1.0))
    with pytest.raises(BuildError, match="--init-from"):
        build(anchored, tmp_path / "no-file", tmp_path / "next.safetensors")
    with pytest.raises(BuildError, match="sha256"):
        build(replace(anchored, init_from="0" * 64), tmp_path / "wrong-file", tmp_path / "next.safetensors", init_from=earlier)
    build(anchored, tmp_path / "second", tmp_path / "next.safetensors", init_from=earlier)
    first, second = load_checkpoint(earlier), load_checkpoint(tmp_path / "next.safetensors")
    assert second.vae.scale_factor == first.vae.scale_factor
    assert not torch.equal(first.unet.out[-1].weight, second.unet.out[-1].weight)  # fine-tuned, not copied


def test_a_model_widened_to_more_latent_channels_computes_what_it_did_until_trained():
    """The tiny base's VAE carries photos at 22.6 dB at most in 4 channels: a wider build starts from the old one's
    weights, each old channel in its place and the new ones unread, so nothing learnt is lost on the way."""
    torch.manual_seed(0)
    old_vae, old_unet = AutoencoderKL(TINY_VAE).eval(), UNetModel(TINY_UNET).eval()
    wide_vae = AutoencoderKL(replace(TINY_VAE, z_channels=8)).eval()
    wide_unet = UNetModel(replace(TINY_UNET, in_channels=8, out_channels=8)).eval()
    load_widened(wide_vae, old_vae.state_dict(), 4, 8)
    load_widened(wide_unet, old_unet.state_dict(), 4, 8)
    with pytest.raises(BuildError, match="keys differ"):  # another model's weights are refused, not half loaded
        load_widened(UNetModel(TINY_UNET), old_vae.state_dict(), 4, 4)
    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        (old_mean, old_logvar), (mean, logvar) = old_vae.encode_moments(pixels), wide_vae.encode_moments(pixels)
        assert torch.allclose(mean[:, :4], old_mean, atol=1e-5) and torch.allclose(logvar[:, :4], old_logvar, atol=1e-5)
        assert not torch.allclose(mean[:, 4:], torch.zeros_like(mean[:, 4:]))  # the new channels carry something to learn from
        decode = lambda vae, z: vae.decoder(vae.post_quant_conv(z))  # noqa: E731
        assert torch.allclose(decode(wide_vae, mean), decode(old_vae, old_mean), atol=1e-5)
        latents, t, context = torch.randn(2, 8, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, TINY_UNET.context_dim)
        assert torch.allclose(wide_unet(latents, t, context)[:, :4], old_unet(latents[:, :4], t, context), atol=1e-5)


def test_a_build_widens_an_earlier_model_to_more_latent_channels_and_loads(tmp_path):
    earlier = tmp_path / "earlier.safetensors"
    build(SMALL, tmp_path / "first", earlier)
    wider = replace(SMALL, init_from=file_sha256(earlier), latent_channels=8, vae=replace(SMALL.vae, anchor_weight=1.0))
    build(wider, tmp_path / "second", tmp_path / "wide.safetensors", init_from=earlier)
    wide = load_checkpoint(tmp_path / "wide.safetensors")
    assert (wide.vae.config.z_channels, wide.unet.config.in_channels, wide.unet.config.out_channels) == (8, 8, 8)
    (image,) = generate(wide, GenerationParams(prompt="a red square", width=IMAGE_SIZE, height=IMAGE_SIZE, steps=2))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(BuildError, match="--latent-channels 8"):
        build(replace(SMALL, init_from=file_sha256(tmp_path / "wide.safetensors")), tmp_path / "third",
              tmp_path / "narrow.safetensors", init_from=tmp_path / "wide.safetensors")


def test_a_fresh_denoiser_takes_only_the_vae_of_the_earlier_model(tmp_path):
    """A denoiser fine-tuned onto new latent channels does not learn to denoise them (RESULTS.md, build 3):
    `--fresh-denoiser` keeps the earlier VAE and trains the UNet and text encoder from scratch."""
    earlier = tmp_path / "earlier.safetensors"
    build(SMALL, tmp_path / "first", earlier)
    no_steps = replace(SMALL, init_from=file_sha256(earlier), fresh_denoiser=True,
                       vae=replace(SMALL.vae, phases=tuple(replace(p, steps=0) for p in SMALL.vae.phases)),
                       diffusion=replace(SMALL.diffusion, phases=tuple(replace(p, steps=0) for p in SMALL.diffusion.phases)))
    build(no_steps, tmp_path / "second", tmp_path / "fresh.safetensors", init_from=earlier)
    start, fresh = load_checkpoint(earlier), load_checkpoint(tmp_path / "fresh.safetensors")
    assert torch.equal(fresh.vae.decoder.conv_out.weight, start.vae.decoder.conv_out.weight)
    assert not fresh.unet.out[-1].weight.any() and start.unet.out[-1].weight.any()  # ldm's zero init, not the start's
    with pytest.raises(SystemExit):
        build_base.parse_args(["--work", str(tmp_path / "w"), "--fresh-denoiser"])


def test_a_fresh_unet_takes_the_widths_asked_for_and_a_continued_one_keeps_its_own(tmp_path):
    """16 latent channels want a wider first level than build 1's 32 (RESULTS.md, build 3): `unet_widths` sets a
    fresh UNet's channels per level; a build continued from that file keeps them without being told."""
    wide = replace(SMALL, unet_widths=(64, 64, 128))
    build(wide, tmp_path / "first", tmp_path / "wide.safetensors")
    unet = load_checkpoint(tmp_path / "wide.safetensors").unet
    assert (unet.config.model_channels, unet.config.channel_mult) == (64, (1, 1, 2))
    continued = build_base.new_denoiser(0, torch.arange(10), start=load_checkpoint(tmp_path / "wide.safetensors"), latent_channels=4)
    assert continued["unet"].config == unet.config
    for bad in (["--unet-widths", "64", "96", "128"], ["--unet-widths", "64", "128"],
                ["--unet-widths", "64", "64", "128", "--init-from", "x.safetensors"]):
        with pytest.raises(SystemExit):
            build_base.parse_args(["--work", "w", *bad])
    assert build_base.parse_args(["--work", "w", "--unet-widths", "64", "64", "128"]).unet_widths == [64, 64, 128]


def test_a_work_folder_from_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    work = tmp_path / "work"
    build_base.prepare_work(work, SMALL, resume=False)
    saved = json.loads((work / "config.json").read_text())
    del saved["unet_widths"]  # as a build started before the field existed wrote it
    (work / "config.json").write_text(json.dumps(saved))
    build_base.prepare_work(work, SMALL, resume=True)
    with pytest.raises(BuildError, match="another config"):
        build_base.prepare_work(work, replace(SMALL, unet_widths=(64, 64, 128)), resume=True)


def test_standardized_latents_have_unit_channels_and_decode_to_the_same_pixels():
    """A VAE with a small KL weight spreads its latent channels unevenly; one scale_factor leaves the narrow ones
    to the UNet's noise (build 3's muted backgrounds). Folded into the 1x1 convs around the latent, each channel
    comes out at zero mean and unit std, and the ldm file decodes exactly what it did."""
    torch.manual_seed(0)
    vae = AutoencoderKL(replace(TINY_VAE, z_channels=8)).eval()
    images = [render(scene) for scene in pool_scenes(0, 16, light_share=0.5)]
    pixels = to_pixels(images)
    with torch.no_grad():
        vae.quant_conv.weight[:8] *= torch.linspace(0.2, 5.0, 8)[:, None, None, None]  # uneven channels, as trained ones are
        before, before_logvar = vae.encode_moments(pixels)
        decoded = vae.decoder(vae.post_quant_conv(before))
        standardize_latents(vae, images)
        after, logvar = vae.encode_moments(pixels)
        assert torch.allclose(after.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-4)
        assert torch.allclose(after.std(dim=(0, 2, 3)), torch.ones(8), atol=1e-4)
        assert torch.allclose(vae.decoder(vae.post_quant_conv(after)), decoded, atol=1e-4)
        relative_noise = lambda m, lv: (0.5 * lv).exp() / m.std(dim=(0, 2, 3))[None, :, None, None]  # noqa: E731
        assert torch.allclose(relative_noise(after, logvar), relative_noise(before, before_logvar), rtol=1e-3)
    with pytest.raises(SystemExit):
        build_base.parse_args(["--work", "w", "--init-from", "x.safetensors", "--standardize-latents"])
