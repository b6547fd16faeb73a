"""Builds the embedded tiny base model on a CPU: `python -m lib_lora.demo.build_base --work build/tiny-base`.

Three stages, each resumable from its file in the work folder (saved every few minutes; `--resume`):
1. vae (build_vae.py): a general codec for 64 px pictures: the world (held-out concepts, any RGB and
   light backgrounds included), broad procedural pictures and natural photos;
2. pool: latents of a fixed set of seeded world images of the *seen* concepts only (`--light-share`
   of them on light backgrounds), each with its caption in both styles, tokenized with the real CLIP
   vocabulary;
3. diffusion: UNet and CLIP text encoder trained together from scratch on the pool, in phases of
   falling lr (each resumable as `diffusion-<i>`), with ldm's objective (eps-prediction on the SD1
   schedule), min-SNR weighted (Hang et al. 2023), with 10% empty captions so that classifier-free
   guidance works, sampled from EMA weights, with a noise
   offset (kohya's `noise_offset`): the SD1 schedule never quite reaches pure noise (Lin et al.
   2023), and on 16x16 latents the per-channel mean of the starting noise is 4x stronger than on
   SD's 64x64, so a model trained on white noise takes each image's colour cast from the seed
   rather than the prompt (measured with bench/base_quality.py: colour 0.55). Multi-resolution
   noise also fixed the colour (0.86) but made the UNet ignore the shape words (0.00).
The UNet and text encoder never see a star or anything purple: those are what LoRA demos teach.
`--init-from FILE` continues from an earlier build instead of starting from scratch (its sha256 is
recorded in the config): the VAE starts from its VAE, anchored to its latents, and the UNet and text
encoder from its own, so the diffusion phases fine-tune (`--steps 0 N M` skips the first); with
`--fresh-denoiser` only the VAE comes from it (e.g. one widened to more latent channels, whose new
channels a fine-tuned denoiser does not learn to denoise) and the diffusion stages run from scratch.
The result is written in ldm layout in fp16 and loads through `load_checkpoint` like any SD1 file.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.cache import file_sha256
from ..models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..models.clip_text import TextEncoder
from ..models.schedule import sd_alphas_cumprod
from ..models.tokenizer import tokenize_batch
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from ..train.noise import add_noise, min_snr_weight, offset_noise, pyramid_noise
from .build_vae import (VAE_PHASES, VAESettings, check_images, codec_report, latent_scale, narrow_posterior, standardize_latents, to_pixels,
                        train_vae)
from .photos import load_photos, photo_paths
from .tiny import DEFAULT_CHECKPOINT, TINY_TEXT, TINY_UNET, TINY_VAE
from .world import CAPTION_STYLES, caption, render, sample_scene

POOL_STREAM = 3  # seeds of the pool's scenes: [POOL_STREAM, seed]
DIFFUSION_STREAM = 4  # seeds of the diffusion batches: [DIFFUSION_STREAM, seed, step]
STANDARDIZE_SCENES = 1024  # the pool's first scenes, whose latents set each channel's mean and std
PYRAMID_LEVELS = 10  # as many as fit: 16x16 latents stop after two or three


@dataclass(frozen=True)
class DiffusionPhase:
    steps: int
    lr: float  # peak of the phase's one-cycle schedule


# Later phases restart at a lower lr from the previous one's averaged weights: circles and rings are
# right after the first phase, the polygons' straight sides and corners come late (colour + shape by
# bench/base_quality.py, euler: 0.45 after the first phase, 0.75 after the second; euler_a: 0.87, 0.92
# after the third).
DIFFUSION_PHASES = (DiffusionPhase(steps=4000, lr=1e-3), DiffusionPhase(steps=8000, lr=3e-4), DiffusionPhase(steps=5000, lr=2e-4))


@dataclass(frozen=True)
class DiffusionSettings:
    phases: tuple[DiffusionPhase, ...] = DIFFUSION_PHASES
    batch_size: int = 32
    caption_dropout: float = 0.1  # share of empty captions, which classifier-free guidance needs
    min_snr_gamma: float = 5.0
    # Noise offset (kohya's noise_offset): a per-channel constant in the noise. 16x16 latents leave the
    # mean colour of the starting noise so strong that the sampler's seed, not the prompt, sets the
    # colour; the offset teaches the UNet that the mean is noise. Pyramid noise (kohya's
    # multires_noise_discount) fixed the colour too but taught the UNet to ignore the shape words.
    noise_offset: float = 0.15
    noise_discount: float = 0.0  # multi-resolution noise; 0 for none
    ema_decay: float = 0.999


@dataclass(frozen=True)
class BuildConfig:
    """Everything the built weights depend on; a resumed build must be given the same."""

    seed: int = 0
    init_from: str = ""  # sha256 of the checkpoint the VAE and denoiser start from; "" trains from scratch
    fresh_denoiser: bool = False  # with init_from: only the VAE starts from it; the UNet and text encoder from scratch
    standardize_latents: bool = False  # each latent channel at zero mean and unit std over the pool (build_vae.standardize_latents)
    photos: bool = True  # natural photos in the VAE's batches (needs requirements-build.txt)
    light_share: float = 0.0  # of the pool's scenes on light backgrounds
    vae_norm_groups: int = TINY_VAE.norm_groups
    latent_channels: int = TINY_VAE.z_channels  # the VAE's z, the UNet's in and out: 4 carries photos at 22.6 dB at best
    pool_size: int = 16_000
    check_images: int = 128  # full-size images that measure the latent scale and the codec
    latent_std: float = 1.0  # of the UNet's latents; below SD's 1 shifts every step toward noise
    # a fresh UNet's channels per level (a start's are its own); 16 latent channels want a wider first level
    unet_widths: tuple[int, ...] = tuple(TINY_UNET.model_channels * m for m in TINY_UNET.channel_mult)
    vae: VAESettings = field(default_factory=VAESettings)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)


class BuildError(ValueError):
    """The work folder does not fit the requested build; the message says what to do."""


class StageFile:
    """One stage's state in the work folder: restored on resume, written atomically every `every_s`
    seconds and at the end of the stage, so a killed build loses at most that much work."""

    def __init__(self, path: Path, every_s: float):
        self.path, self.every_s, self.last = path, every_s, time.monotonic()

    def restore(self, parts: dict[str, Any]) -> int:
        """Load each part's `state_dict` from the file if there is one; the step to continue from."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(state[name])
        return state["step"]

    def save_if_due(self, step: int, parts: dict[str, Any], final: bool = False) -> None:
        if final or time.monotonic() - self.last >= self.every_s:
            tmp = self.path.with_name(self.path.name + ".tmp")
            torch.save({"step": step, **{name: part.state_dict() for name, part in parts.items()}}, tmp)
            os.replace(tmp, self.path)
            self.last = time.monotonic()


@dataclass(frozen=True)
class LatentPool:
    latents: torch.Tensor  # [N, z, h, w] fp16, already times the VAE's scale_factor
    tokens: torch.Tensor  # [N, 2, 77] int32: the caption in each of CAPTION_STYLES


def pool_scenes(seed: int, count: int, light_share: float = 0.0) -> list:
    """`count` scenes of the seen shapes and colours only (sample_scene's defaults)."""
    rng = np.random.default_rng([POOL_STREAM, seed])
    return [sample_scene(rng, light_share=light_share) for _ in range(count)]


def caption_tokens(scenes) -> torch.Tensor:
    """[N, 2, 77] CLIP token ids of each scene's short and full caption (one chunk: captions are short)."""
    captions = [caption(scene, style) for scene in scenes for style in CAPTION_STYLES]
    unique = sorted(set(captions))
    rows = dict(zip(unique, tokenize_batch(unique).tokens[:, 0]))  # caption -> [77]
    return torch.stack([rows[c] for c in captions]).reshape(len(scenes), len(CAPTION_STYLES), -1).int()


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, scenes, batch_size: int = 256) -> torch.Tensor:
    """Scaled posterior means [N, z, h, w] in fp16 (kohya's latent cache keeps the mean too)."""
    chunks = [scenes[i : i + batch_size] for i in range(0, len(scenes), batch_size)]
    return torch.cat([vae.encode(to_pixels([render(s) for s in chunk])).half() for chunk in tqdm(chunks, desc="pool")])


def make_pool(vae: AutoencoderKL, seed: int, size: int, path: Path, light_share: float = 0.0) -> LatentPool:
    """The pool from `path`, or encoded and saved there."""
    if not path.exists():
        scenes = pool_scenes(seed, size, light_share)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"latents": encode_scenes(vae, scenes), "tokens": caption_tokens(scenes)}, tmp)
        os.replace(tmp, path)
    return LatentPool(**torch.load(path, weights_only=True))


class UsedRowsEmbedding(nn.Module):
    """The token embedding during training: only the rows of ids the captions use are parameters.

    A dense gradient and AdamW update of all 49408 rows would cost more than the UNet's step; the
    other rows keep their initial values and are what a LoRA's new words start from. The buffers
    follow from the seed and the pool, so only `weight` is saved with the builder's state.
    """

    def __init__(self, full: nn.Embedding, used_ids: torch.Tensor):
        super().__init__()
        lookup = torch.full((full.num_embeddings,), -1, dtype=torch.long)
        lookup[used_ids] = torch.arange(len(used_ids))
        self.register_buffer("table", full.weight.detach().clone(), persistent=False)  # [vocab, width]
        self.register_buffer("used_ids", used_ids, persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)
        self.weight = nn.Parameter(full.weight.detach()[used_ids].clone())  # [n_used, width]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.lookup[tokens], self.weight)

    def full(self) -> nn.Embedding:
        """An ordinary nn.Embedding with the trained rows written into the full table."""
        table = self.table.clone()
        table[self.used_ids] = self.weight.detach()
        return nn.Embedding.from_pretrained(table, freeze=True)


def zero_init_outputs(unet: UNetModel) -> UNetModel:
    """Zero the last layer of every residual branch and of the UNet, as ldm's `zero_module` does, so
    training starts from identity blocks."""
    for module in unet.modules():
        if hasattr(module, "out_layers"):  # ResBlock
            nn.init.zeros_(module.out_layers[-1].weight)
            nn.init.zeros_(module.out_layers[-1].bias)
        if hasattr(module, "proj_out"):  # SpatialTransformer
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
    nn.init.zeros_(unet.out[-1].weight)
    nn.init.zeros_(unet.out[-1].bias)
    return unet


def new_denoiser(seed: int, used_ids: torch.Tensor, start: Checkpoint | None = None, latent_channels: int = TINY_UNET.in_channels,
                 widths: tuple[int, ...] = BuildConfig.unet_widths) -> nn.ModuleDict:
    """The UNet and text encoder to train (the latter training only the `used_ids` rows): freshly
    initialised with `widths` channels per level, or `start`'s (its UNet widened to `latent_channels` if it had
    fewer, see `load_widened`)."""
    torch.manual_seed(seed)
    if start is None:
        config = replace(TINY_UNET, model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                         in_channels=latent_channels, out_channels=latent_channels)
        unet, text_encoder = zero_init_outputs(UNetModel(config)), TextEncoder(TINY_TEXT)
    else:
        config = replace(start.unet.config, in_channels=latent_channels, out_channels=latent_channels)
        unet, text_encoder = UNetModel(config), start.text_encoder.requires_grad_(True)
        load_widened(unet, start.unet.state_dict(), start.unet.config.in_channels, latent_channels)
    embeddings = text_encoder.transformer.text_model.embeddings
    embeddings.token_embedding = UsedRowsEmbedding(embeddings.token_embedding, used_ids)
    return nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})


@torch.no_grad()
def load_widened(module: nn.Module, state: dict[str, torch.Tensor], old_channels: int, new_channels: int) -> None:
    """`state`, from the same model with `old_channels` latent channels, into `module` built with `new_channels`.

    Each old latent channel keeps its place (a posterior's [mean; logvar] rows each at the start of their
    half), so the wider model starts out computing exactly what the old one did: the new channels'
    weights in layers that read latents start at zero, and layers that write them keep their fresh init.
    """
    target = module.state_dict()
    if state.keys() != target.keys():
        raise BuildError(f"cannot widen: the starting model's keys differ from the build's ({sorted(state.keys() ^ target.keys())[:3]})")
    for key, old in state.items():
        wide = target[key]
        if old.shape == wide.shape:
            wide.copy_(old)
            continue
        rows = _latent_positions(old.shape[0], wide.shape[0], old_channels, new_channels)
        if old.dim() == 1:
            wide[rows] = old
            continue
        columns = _latent_positions(old.shape[1], wide.shape[1], old_channels, new_channels)
        wide[rows] = 0
        wide[rows[:, None], columns[None, :]] = old


def _latent_positions(old: int, new: int, old_channels: int, new_channels: int) -> torch.Tensor:
    """Where an axis's `old` entries sit among its `new` ones: in place, or in each half of a posterior's 2z."""
    if old == new or old == old_channels:
        return torch.arange(old)
    if (old, new) != (2 * old_channels, 2 * new_channels):
        raise BuildError(f"cannot widen an axis of {old} to {new} for {old_channels} -> {new_channels} latent channels")
    return torch.cat([torch.arange(old_channels), new_channels + torch.arange(old_channels)])


def diffusion_batch(pool: LatentPool, settings: DiffusionSettings, seed: int, step: int, empty: torch.Tensor):
    """(latents, tokens, noise, timesteps) of `step`, drawn from [seed, stream, step] alone."""
    rng = np.random.default_rng([DIFFUSION_STREAM, seed, step])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    b = settings.batch_size
    index = torch.randint(len(pool.latents), (b,), generator=generator)
    tokens = pool.tokens[index, torch.randint(len(CAPTION_STYLES), (b,), generator=generator)].long()  # [B, 77]
    tokens[torch.rand(b, generator=generator) < settings.caption_dropout] = empty
    latents = pool.latents[index].float()  # [B, z, h, w]
    noise = torch.randn(latents.shape, generator=generator)
    if settings.noise_offset:
        noise = offset_noise(noise, settings.noise_offset, generator)
    if settings.noise_discount:
        noise = pyramid_noise(noise, PYRAMID_LEVELS, settings.noise_discount, generator)
    timesteps = torch.randint(0, 1000, (b,), generator=generator)
    return latents, tokens, noise, timesteps


def diffusion_loss(model: nn.ModuleDict, batch, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR weighted MSE between the UNet's eps prediction and the noise."""
    latents, tokens, noise, timesteps = batch
    context = model["text_encoder"](tokens[:, None])  # [B, 77, width]
    noisy = add_noise(latents, noise, alphas_cumprod, timesteps)
    error = (model["unet"](noisy, timesteps, context) - noise).pow(2).mean(dim=(1, 2, 3))  # [B]
    return (error * min_snr_weight(alphas_cumprod, timesteps, gamma, "eps")).mean()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for averaged, current in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(current, 1.0 - decay)


def train_diffusion(
    model: nn.ModuleDict, pool: LatentPool, settings: DiffusionSettings, seed: int, stage_file: Callable[[str], StageFile]
) -> nn.ModuleDict:
    """The phases in turn, each starting from the previous one's EMA weights; returns the last EMA."""
    first_step, ema = 0, copy.deepcopy(model)
    for index, phase in enumerate(p for p in settings.phases if p.steps):
        ema = train_diffusion_phase(model, pool, settings, phase, seed, first_step, stage_file(f"diffusion-{index}"))
        model.load_state_dict(ema.state_dict())
        first_step += phase.steps
    return ema.eval()


def train_diffusion_phase(model, pool, settings, phase: DiffusionPhase, seed: int, first_step: int, stage: StageFile):
    """AdamW with one-cycle cosine lr and clipped gradients; returns the EMA copy of `model`.

    Batches are numbered across phases (`first_step` + step), so every phase sees fresh ones.
    """
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, phase.lr, total_steps=phase.steps, pct_start=0.05, cycle_momentum=False
    )
    parts = {"model": model, "ema": ema, "optimizer": optimizer, "schedule": schedule}
    step = stage.restore(parts)
    alphas_cumprod, empty = sd_alphas_cumprod(), tokenize_batch([""]).tokens[0, 0]
    model.train()
    with tqdm(total=phase.steps, initial=step, desc=f"unet+text lr {phase.lr:g}", unit="step") as bar:
        while step < phase.steps:
            batch = diffusion_batch(pool, settings, seed, first_step + step, empty)
            loss = diffusion_loss(model, batch, alphas_cumprod, settings.min_snr_gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            update_ema(ema, model, min(settings.ema_decay, (1 + step) / (10 + step)))  # short warm-up
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            stage.save_if_due(step, parts, final=step == phase.steps)
    return ema


def export(vae: AutoencoderKL, denoiser: nn.ModuleDict, out: Path, config: BuildConfig) -> None:
    """The ldm-layout fp16 checkpoint, with the build config in its metadata."""
    text_encoder = copy.deepcopy(denoiser["text_encoder"])
    embeddings = text_encoder.transformer.text_model.embeddings
    embeddings.token_embedding = embeddings.token_embedding.full()
    ckpt = Checkpoint(unet=denoiser["unet"], vae=vae, text_encoder=text_encoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, out, dtype=torch.float16, extra_metadata={"lib_lora.build_config": json.dumps(asdict(config))})


def prepare_work(work: Path, config: BuildConfig, resume: bool) -> None:
    """Create the work folder with the config in it, or check that the one to resume has the same."""
    saved = work / "config.json"
    if resume and saved.exists():
        older = {**asdict(BuildConfig()), **json.loads(saved.read_text())}  # a field added since reads as its default
        if json.loads(json.dumps(older)) != json.loads(json.dumps(asdict(config))):
            raise BuildError(f"{work} holds a build with another config ({saved}); pass the same options or a new --work")
        return
    if work.exists() and any(work.iterdir()):
        raise BuildError(f"{work} is not empty; pass --resume to continue its build, or choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(asdict(config), indent=1))


def build(config: BuildConfig, work: Path, out: Path, resume: bool = False, save_every_s: float = 180.0,
          init_from: Path | None = None) -> None:
    """Run (or continue) every stage and write the checkpoint to `out`. With `init_from` (whose
    sha256 must be `config.init_from`) the VAE and the denoiser start from that checkpoint's, the VAE
    anchored to it (build_vae) and keeping its latent scale, so the denoiser's phases fine-tune; with
    `config.fresh_denoiser` the denoiser is new and the latent scale measured as in a build from scratch."""
    prepare_work(work, config, resume)
    torch.manual_seed(config.seed)
    start = starting_checkpoint(init_from, config.init_from)
    if start is not None and start.vae.config.z_channels > config.latent_channels:
        raise BuildError(f"{init_from} has {start.vae.config.z_channels} latent channels; a build from it needs at least as many "
                         f"(--latent-channels {start.vae.config.z_channels})")
    vae = narrow_posterior(AutoencoderKL(replace(TINY_VAE, norm_groups=config.vae_norm_groups, z_channels=config.latent_channels)))
    if start is not None:
        load_widened(vae, start.vae.state_dict(), start.vae.config.z_channels, config.latent_channels)
        vae.scale_factor = start.vae.scale_factor
    anchor = None if start is None else start.vae.requires_grad_(False)
    def stage_file(name: str) -> StageFile:
        return StageFile(work / f"{name}.pt", save_every_s)

    photos = load_photos(photo_paths()) if config.photos else []
    train_vae(vae, config.vae, config.seed, stage_file, photos, anchor)
    check = check_images(config.seed, config.check_images)
    denoiser_start = None if config.fresh_denoiser else start
    if denoiser_start is None and config.standardize_latents:
        standardize_latents(vae, [render(scene) for scene in pool_scenes(config.seed, STANDARDIZE_SCENES, config.light_share)])
        vae.scale_factor = config.latent_std
    elif denoiser_start is None:
        vae.scale_factor = latent_scale(vae, check, config.latent_std)
    print(f"{codec_report(vae, check)}; scale_factor {vae.scale_factor}")
    pool = make_pool(vae, config.seed, config.pool_size, work / "pool.pt", config.light_share)
    used_ids = torch.unique(torch.cat([pool.tokens.flatten(), tokenize_batch([""]).tokens.flatten().int()])).long()
    denoiser = new_denoiser(config.seed, used_ids, denoiser_start, config.latent_channels, config.unet_widths)
    ema = train_diffusion(denoiser, pool, config.diffusion, config.seed, stage_file)
    export(vae, ema, out, config)


def starting_checkpoint(path: Path | None, sha256: str) -> Checkpoint | None:
    """The checkpoint a build continues from, in fp32, checked against the config's hash of it."""
    if path is None:
        if sha256:
            raise BuildError(f"this build starts from a checkpoint with sha256 {sha256}; pass it with --init-from")
        return None
    found = file_sha256(path)
    if found != sha256:
        raise BuildError(f"{path} has sha256 {found}, not the {sha256 or 'none'} this build's config names")
    return load_checkpoint(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lib_lora.demo.build_base", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the resumable state of each stage")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="the .safetensors to write")
    parser.add_argument("--resume", action="store_true", help="continue the build in --work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, nargs=len(DIFFUSION_PHASES), default=[p.steps for p in DIFFUSION_PHASES],
        help=f"UNet + text encoder steps of each phase (lr {', '.join(f'{p.lr:g}' for p in DIFFUSION_PHASES)})",
    )
    parser.add_argument(
        "--vae-steps", type=int, nargs=len(VAE_PHASES), default=[p.steps for p in VAE_PHASES],
        help=f"VAE steps of each phase ({', '.join(f'{p.crop} px crops' for p in VAE_PHASES)})",
    )
    parser.add_argument("--init-from", type=Path, help="start the VAE and the denoiser from this checkpoint (e.g. the shipped one)")
    parser.add_argument("--fresh-denoiser", action="store_true",
                        help="with --init-from: take only its VAE; train the UNet and text encoder from scratch")
    parser.add_argument("--standardize-latents", action="store_true",
                        help="each latent channel at zero mean and unit std (folded into the VAE), not one scale for all")
    parser.add_argument("--anchor-weight", type=float, default=1.0, help="with --init-from: how strongly world latents stay put")
    parser.add_argument("--vae-norm-groups", type=int, default=BuildConfig.vae_norm_groups, help="the VAE's GroupNorm groups (ldm: 32)")
    parser.add_argument("--latent-channels", type=int, default=BuildConfig.latent_channels,
                        help="latent channels of the VAE and UNet (SD1: 4); a wider start is refused, a narrower one widened")
    parser.add_argument("--light-share", type=float, default=BuildConfig.light_share, help="share of light backgrounds in the pool")
    parser.add_argument("--vae-kl-weight", type=float, default=VAESettings.kl_weight,
                        help="the VAE's KL term per latent element (a larger one leaves more posterior noise in each channel)")
    parser.add_argument("--codec-mix", type=float, nargs=4, default=list(VAESettings.codec_mix), metavar=("DARK", "LIGHT", "BROAD", "PHOTOS"),
                        help="shares of each VAE batch: dark and light world scenes, broad pictures, photo crops")
    parser.add_argument("--no-photos", action="store_true", help="train the VAE without natural photos (no scikit-image)")
    parser.add_argument("--pool-size", type=int, default=BuildConfig.pool_size)
    parser.add_argument("--latent-std", type=float, default=BuildConfig.latent_std)
    parser.add_argument("--unet-widths", type=int, nargs="+", metavar="W",
                        help=f"a fresh UNet's channels per level, each a multiple of the first (default {' '.join(map(str, BuildConfig.unet_widths))})")
    parser.add_argument("--noise-offset", type=float, default=DiffusionSettings.noise_offset)
    parser.add_argument("--noise-discount", type=float, default=DiffusionSettings.noise_discount)
    parser.add_argument("--save-every", type=float, default=180.0, help="seconds between state saves")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.standardize_latents and args.init_from and not args.fresh_denoiser:
        parser.error("--standardize-latents changes the latents a denoiser from --init-from was trained on; add --fresh-denoiser")
    if args.unet_widths and args.init_from and not args.fresh_denoiser:
        parser.error("--unet-widths sets a fresh UNet's; one from --init-from keeps its own (add --fresh-denoiser)")
    if args.unet_widths and (len(args.unet_widths) != len(BuildConfig.unet_widths) or any(w % args.unet_widths[0] for w in args.unet_widths)):
        parser.error(f"--unet-widths takes {len(BuildConfig.unet_widths)} widths, each a multiple of the first (e.g. 64 64 128)")
    if args.fresh_denoiser and not args.init_from:
        parser.error("--fresh-denoiser takes the VAE from --init-from; without it the whole build is from scratch already")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = BuildConfig(
        seed=args.seed,
        init_from=file_sha256(args.init_from) if args.init_from else "",
        fresh_denoiser=args.fresh_denoiser,
        standardize_latents=args.standardize_latents,
        photos=not args.no_photos,
        light_share=args.light_share,
        vae_norm_groups=args.vae_norm_groups,
        latent_channels=args.latent_channels,
        vae=VAESettings(phases=tuple(replace(phase, steps=steps) for phase, steps in zip(VAE_PHASES, args.vae_steps)),
                        anchor_weight=args.anchor_weight if args.init_from else 0.0, codec_mix=tuple(args.codec_mix),
                        kl_weight=args.vae_kl_weight),
        pool_size=args.pool_size,
        latent_std=args.latent_std,
        unet_widths=tuple(args.unet_widths or BuildConfig.unet_widths),
        diffusion=DiffusionSettings(
            phases=tuple(replace(phase, steps=steps) for phase, steps in zip(DIFFUSION_PHASES, args.steps)),
            noise_offset=args.noise_offset,
            noise_discount=args.noise_discount,
        ),
    )
    start = time.monotonic()
    build(config, args.work, args.out, args.resume, args.save_every, args.init_from)
    print(f"wrote {args.out} in {(time.monotonic() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
