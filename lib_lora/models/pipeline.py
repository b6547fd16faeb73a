"""Text-to-image with a loaded checkpoint: prompt -> text conditioning -> sampler -> VAE -> PIL images."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .checkpoint import Checkpoint
from .conditioning import Conditioning, encode_chunks, sdxl_vector
from .samplers import SAMPLERS, CFGDenoiser, initial_latents, sample_euler, sigmas_for
from .schedule import NoiseSchedule, sd_alphas_cumprod
from .tokenizer import tokenize_batch


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    sampler: str = SAMPLERS[0]
    batch_size: int = 1
    clip_skip: int = 1


Embeddings = Mapping[str, Sequence[torch.Tensor]]  # textual-inversion token -> one [n, width] tensor per text encoder


def encode_prompts(ckpt: Checkpoint, prompts: list[str], clip_skip: int = 1, embeddings: Embeddings | None = None) -> Conditioning:
    """Prompts -> context [B, n_chunks * 77, width] (and SDXL's pooled vector), chunked and
    emphasis-weighted as the webui does; a token of `embeddings` in a prompt is replaced by its vectors.

    The webui rescales each chunk position over the whole batch of prompts it encodes together,
    so callers encode positive and negative prompts in separate calls, as it does.
    """
    counts = {name: vectors[0].shape[0] for name, vectors in (embeddings or {}).items()}
    chunks = tokenize_batch(prompts, embeddings=counts)
    return encode_chunks(ckpt, chunks.tokens, chunks.weights, clip_skip, chunks.fixes, embeddings)


def latent_shape(ckpt: Checkpoint, width: int, height: int) -> tuple[int, int, int]:
    """[C, h, w] of the latents for an image size, or a clear error if the size does not fit the model."""
    vae_factor = ckpt.vae.config.downsampling_factor
    multiple = vae_factor * ckpt.unet.downsampling_factor
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            raise ValueError(f"{name} {value} is not a positive multiple of {multiple} px, which this model needs")
    return ckpt.unet.config.in_channels, height // vae_factor, width // vae_factor


class SeededNoise:
    """One CPU generator per image (seed, seed+1, ...), as the webui's ImageRNG: the first draw is the
    starting noise, later ones an ancestral sampler's, so a batch reproduces the same seeds run singly."""

    def __init__(self, seed: int, count: int, shape: tuple[int, ...]):
        self.generators = [torch.Generator().manual_seed(seed + i) for i in range(count)]
        self.shape = shape

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


def latents_to_images(latents_decoded: torch.Tensor) -> list[Image.Image]:
    pixels = ((latents_decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).cpu().numpy())) for p in pixels]


def pad_with_empty(ckpt: Checkpoint, cond: Conditioning, length: int, clip_skip: int = 1) -> Conditioning:
    """Lengthen a context to `length` tokens with encoded empty chunks, as the webui's pad_cond_uncond does."""
    z = cond.context
    if z.shape[1] >= length:
        return cond
    empty = encode_prompts(ckpt, [""] * z.shape[0], clip_skip).context.to(z.dtype)
    return Conditioning(torch.cat([z] + [empty] * ((length - z.shape[1]) // empty.shape[1]), dim=1), cond.pooled)


def negative_conditioning(ckpt: Checkpoint, prompts: list[str], clip_skip: int = 1, embeddings: Embeddings | None = None) -> Conditioning:
    """The negative prompt's conditioning; SDXL's is all zeros when every negative prompt is empty (sgm, the webui)."""
    cond = encode_prompts(ckpt, prompts, clip_skip, embeddings)
    if ckpt.arch == "sdxl" and all(p == "" for p in prompts):
        return Conditioning(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))
    return cond


def image_vector(cond: Conditioning, width: int, height: int) -> torch.Tensor | None:
    """SDXL's `y` for a generated image: original and target size the image's, crop (0, 0), as the webui sends."""
    if cond.pooled is None:
        return None
    b = cond.pooled.shape[0]
    size = torch.tensor([[height, width]] * b)
    return sdxl_vector(cond.pooled, size, torch.zeros(b, 2), size)


def schedule_for(ckpt: Checkpoint) -> NoiseSchedule:
    return NoiseSchedule(sd_alphas_cumprod(), ckpt.parameterization)


@torch.no_grad()
def generate(ckpt: Checkpoint, params: GenerationParams, callback: Callable | None = None,
             embeddings: Embeddings | None = None) -> list[Image.Image]:
    """Sample `batch_size` images; the same params and seed give the same pixels on CPU. `embeddings`
    (textual inversion, e.g. a LoRA's bundled ones) apply to the prompt and the negative prompt, as in the webui."""
    shape = latent_shape(ckpt, params.width, params.height)
    unet_param = next(ckpt.unet.parameters())
    schedule = schedule_for(ckpt)
    cond = encode_prompts(ckpt, [params.prompt] * params.batch_size, params.clip_skip, embeddings).to(unet_param.dtype)
    uncond = negative_conditioning(ckpt, [params.negative_prompt] * params.batch_size, params.clip_skip, embeddings).to(unet_param.dtype)
    length = max(cond.context.shape[1], uncond.context.shape[1])
    cond, uncond = (pad_with_empty(ckpt, c, length, params.clip_skip) for c in (cond, uncond))
    sigmas = sigmas_for(params.sampler, schedule, params.steps)
    noise = SeededNoise(params.seed, params.batch_size, shape)
    x = initial_latents(noise().to(unet_param.device, unet_param.dtype), params.sampler, sigmas[0])
    vectors = [image_vector(c, params.width, params.height) for c in (cond, uncond)]
    vector = None if vectors[0] is None else torch.cat(vectors)
    denoiser = CFGDenoiser(ckpt.unet, schedule, cond.context, uncond.context, params.cfg_scale, vector)
    latents = sample_euler(denoiser, x, sigmas, callback, noise if params.sampler == "euler_a" else None)
    return latents_to_images(ckpt.vae.decode(latents.to(next(ckpt.vae.parameters()).dtype)))
