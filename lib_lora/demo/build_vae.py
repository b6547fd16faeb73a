"""Stage 1 of building the tiny base model: a KL autoencoder that is a general codec for 64 px pictures.

Like SD's VAE it must encode and decode whatever a LoRA may later teach, so each batch mixes
(`CODEC_MIX`) the world's scenes (every shape and colour, held-out ones and arbitrary RGB included,
on dark and light backgrounds), the broad procedural pictures of codec_images.py, and crops of
natural photos (photos.py; whole photos are held out for bench/vae_quality.py). The loss
is ldm's `LPIPSWithDiscriminator` reduced to its pixel term, as MSE (ldm's L1 first collapses to the
background of these mostly empty images), on a reparameterised posterior sample, plus a small KL to
N(0, 1) that keeps the latent space smooth. It trains on crops first (the codec is convolutional and
full 64 px images cost four times as much), then on whole images (`VAE_PHASES`). Colour is what it
learns last: GroupNorm(32) over 32 channels normalises each channel on its own, so a flat colour
survives only as a pattern.

A build may start from an earlier model's VAE (`--init-from`): an anchor term then keeps the world
scenes' latents where that VAE put them, so the earlier UNet still reads them and only has to learn
what is new (light backgrounds) instead of being trained again from scratch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from ..models.pipeline import latents_to_images
from ..models.vae import AutoencoderKL
from .analyzer import analyze
from .codec_images import broad_image
from .photos import photo_crops
from .world import COLOURS, SHAPES, render, sample_scene

if TYPE_CHECKING:
    from .build_base import StageFile

VAE_STREAM = 1  # seeds of the VAE's training batches: [VAE_STREAM, seed, phase, step]
CHECK_STREAM = 2  # seeds of the images that measure the codec and its latent scale: [CHECK_STREAM, seed]


@dataclass(frozen=True)
class VAEPhase:
    steps: int
    batch_size: int
    crop: int  # px, a multiple of the VAE's downsampling factor; 64 trains on whole images
    lr: float


# Crops learn the codec at a quarter of the cost per image; whole images then remove the shift that
# crop-sized attention and GroupNorm statistics leave (full-size MSE 8x the crops' before, 1.1x after).
# The first build, on world scenes only, trained 2,500 + 800 steps at lr 3e-3 and 5e-4 from scratch;
# the broad codec continues from it (--init-from) at these.
VAE_PHASES = (VAEPhase(steps=5000, batch_size=8, crop=32, lr=1e-3), VAEPhase(steps=1000, batch_size=4, crop=64, lr=3e-4))
# Shares of each batch: the world's dark scenes first (the anchor term reads them: they are what an earlier
# model's UNet knows), then its scenes on light backgrounds, broad pictures and photos.
CODEC_MIX = (0.25, 0.25, 0.3, 0.2)


@dataclass(frozen=True)
class VAESettings:
    phases: tuple[VAEPhase, ...] = VAE_PHASES
    kl_weight: float = 1e-4  # per latent element, against the per-pixel reconstruction loss
    anchor_weight: float = 0.0  # dark world scenes' latent means to the initial VAE's (builds that start from one)
    codec_mix: tuple[float, ...] = CODEC_MIX  # shares of dark and light world scenes, broad pictures and photos


def codec_scenes(rng: np.random.Generator, count: int, light_share: float = 0.0) -> list:
    """Every shape; named colours (held-out ones too) and arbitrary RGB colours, alternating."""
    return [sample_scene(rng, SHAPES, tuple(COLOURS), random_rgb=bool(i % 2), light_share=light_share) for i in range(count)]


def codec_pictures(rng: np.random.Generator, count: int, photos: list, mix: tuple[float, ...] = CODEC_MIX) -> tuple[list, int]:
    """(pictures, how many dark world scenes lead them): `mix` of dark and light world scenes,
    broad pictures and photo crops (broad pictures instead of photos when there are none)."""
    dark, light, broad = (max(1, round(count * share)) for share in mix[:3])
    broad = broad if photos else max(0, count - dark - light)
    pictures = [render(scene) for scene in codec_scenes(rng, dark) + codec_scenes(rng, light, light_share=1.0)]
    pictures += [broad_image(rng) for _ in range(broad)]
    return (pictures + photo_crops(photos, count - len(pictures), rng))[:count], dark


def to_pixels(images) -> torch.Tensor:
    """PIL RGB images -> [B, 3, H, W] float in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])  # [B, H, W, 3]
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def random_crops(pixels: torch.Tensor, crop: int, grid: int, rng: np.random.Generator) -> torch.Tensor:
    """One `crop`-sized window per image [B, 3, crop, crop], at offsets on the latent grid."""
    offsets = rng.integers(0, (pixels.shape[-1] - crop) // grid + 1, size=(len(pixels), 2)) * grid
    return torch.stack([p[:, y : y + crop, x : x + crop] for p, (y, x) in zip(pixels, offsets)])


def vae_batch(phase: VAEPhase, key: list[int], grid: int, photos: list, mix: tuple[float, ...] = CODEC_MIX
              ) -> tuple[torch.Tensor, int, torch.Generator]:
    """(crops, how many dark world scenes lead them, generator of the posterior noise) of `key` ([seed, phase,
    step]), drawn from the key alone, so a resumed build draws exactly what an uninterrupted one would."""
    rng = np.random.default_rng([VAE_STREAM, *key])
    pictures, world = codec_pictures(rng, phase.batch_size, photos, mix)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return random_crops(to_pixels(pictures), phase.crop, grid, rng), world, generator


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator, settings: VAESettings,
             anchor: AutoencoderKL | None = None, world: int = 0):
    """(loss, reconstruction part): MSE of a posterior sample's decoding, + kl_weight * KL, + anchor_weight
    * MSE of the first `world` pictures' latent means against the `anchor` VAE's."""
    mean, logvar = vae.encode_moments(pixels)  # [B, z, h, w] each
    noise = torch.randn(mean.shape, generator=generator)
    decoded = vae.decoder(vae.post_quant_conv(mean + (0.5 * logvar).exp() * noise))  # [B, 3, H, W]
    error = decoded - pixels
    reconstruction = error.pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = reconstruction + settings.kl_weight * kl
    if anchor is not None and settings.anchor_weight:
        with torch.no_grad():
            target = anchor.encode_moments(pixels[:world])[0]
        loss = loss + settings.anchor_weight * (mean[:world, : target.shape[1]] - target).pow(2).mean()  # its channels of a wider latent
    return loss, reconstruction


def narrow_posterior(vae: AutoencoderKL, logvar: float = -8.0) -> AutoencoderKL:
    """Start the posterior's log-variance at `logvar` instead of 0: at unit variance the decoder's
    input is mostly noise, and Adam needs thousands of steps to move a bias that far by itself."""
    z = vae.config.z_channels
    with torch.no_grad():
        vae.quant_conv.bias[z:] = logvar
    return vae


def train_vae(vae: AutoencoderKL, settings: VAESettings, seed: int, stage_file: Callable[[str], StageFile],
              photos: list, anchor: AutoencoderKL | None = None) -> None:
    """The phases in turn, each resumable from its own stage file (see build_base)."""
    for index, phase in enumerate(settings.phases):
        if phase.steps:
            train_phase(vae, phase, settings, [seed, index], stage_file(f"vae-{index}"), photos, anchor)
    vae.eval()


def train_phase(vae: AutoencoderKL, phase: VAEPhase, settings: VAESettings, key: list[int], stage: StageFile,
                photos: list, anchor: AutoencoderKL | None) -> None:
    """AdamW with a one-cycle cosine lr."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=phase.lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, phase.lr, total_steps=phase.steps, pct_start=0.05, cycle_momentum=False
    )
    parts = {"model": vae, "optimizer": optimizer, "schedule": schedule}
    step = stage.restore(parts)
    vae.train()
    with tqdm(total=phase.steps, initial=step, desc=f"vae {phase.crop}px", unit="step") as bar:
        while step < phase.steps:
            pixels, world, generator = vae_batch(phase, key + [step], vae.config.downsampling_factor, photos, settings.codec_mix)
            loss, reconstruction = vae_loss(vae, pixels, generator, settings, anchor, world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update()
            bar.set_postfix(recon=f"{reconstruction.item():.4f}", loss=f"{loss.item():.4f}")
            stage.save_if_due(step, parts, final=step == phase.steps)


def check_images(seed: int, count: int) -> list:
    """Full-size images of every shape and colour for measuring the codec (not training batches)."""
    return [render(scene) for scene in codec_scenes(np.random.default_rng([CHECK_STREAM, seed]), count)]


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images, latent_std: float = 1.0) -> float:
    """SD's `scale_factor` recipe: latent_std / std of the posterior means (SD: unit variance)."""
    mean, _ = vae.encode_moments(to_pixels(images))
    return float(f"{latent_std / mean.std().item():.4g}")


@torch.no_grad()
def standardize_latents(vae: AutoencoderKL, images) -> AutoencoderKL:
    """Fold each latent channel's mean and std over `images` into the 1x1 convs on either side of the latent, so
    posterior means come out at zero mean and unit std in every channel and decode to the same pixels.

    A single scale_factor (SD's) leaves channels a VAE trained with a small KL weight spreads unevenly (here
    0.33 to 3.9) at those spreads, and the UNet's uniform eps loss then leaves the narrow channels noisy: a
    16-channel base drew every background a muted mid-tone (RESULTS.md, build 3). The file stays plain ldm.
    """
    z = vae.config.z_channels
    mean, _ = vae.encode_moments(to_pixels(images))  # [N, z, h, w]
    mu, sd = mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3))
    encode, decode = vae.quant_conv, vae.post_quant_conv
    encode.weight[:z] /= sd[:, None, None, None]
    encode.bias[:z] = (encode.bias[:z] - mu) / sd
    encode.bias[z:] -= 2 * sd.log()  # the log-variance of (m - mu) / sd
    decode.bias += decode.weight[:, :, 0, 0] @ mu
    decode.weight *= sd[None, :, None, None]
    return vae


@torch.no_grad()
def codec_report(vae: AutoencoderKL, images) -> str:
    """Reconstruction PSNR over `images`, and how often the strict analyzer reads the named-colour ones
    (every other image) the same before and after the round trip."""
    pixels = to_pixels(images)
    decoded = vae.decoder(vae.post_quant_conv(vae.encode_moments(pixels)[0])).clamp(-1, 1)
    psnr = 10 * torch.log10(4.0 / (decoded - pixels).pow(2).mean()).item()
    named, round_trips = images[::2], latents_to_images(decoded[::2])
    same = sum(_reading(a) == _reading(b) for a, b in zip(named, round_trips))
    return f"VAE round trip: PSNR {psnr:.1f} dB, analyzer agrees on {same}/{len(round_trips)} named-colour images"


def _reading(image) -> tuple[str | None, str | None]:
    analysis = analyze(image)
    return analysis.colour, analysis.shape
