"""Round-trip error of a checkpoint's VAE on pictures it never trained on.

    python bench/vae_quality.py [--checkpoint FILE ...] [--count 128]

Encodes each picture to its posterior mean and decodes it (what caching latents and sampling do),
then prints the mean absolute error per pixel (0-255 levels) and the PSNR over each held-out set:
- world: the synthetic world's scenes, every shape and named colour (dark and light backgrounds);
- light hues: one shape on a light, slightly tinted background, object hues evenly around the
  colour wheel (what a new user's first dataset looks like);
- photos: crops of natural photos held out of the VAE's training (photos.HELD_OUT_PHOTOS), from
  full detail to the whole photo, downscaled to 64 px.
Seeds differ from every stream the build trains on. Target (issue #17): PSNR >= 28 dB on each set.
Several checkpoints print side by side (e.g. a new build against the shipped one). The last line is a
reference for what the latent's size allows: the best linear codec with the same numbers per picture
(PCA of 4x4 pixel patches keeping z components, as 16x16xz latents keep of 64x64x3 pixels), fitted on
the VAE's own training mix (build_vae.codec_pictures) and tried on the same held-out sets.
"""

import argparse
import colorsys
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lora.demo.build_vae import codec_pictures, to_pixels  # noqa: E402
from lib_lora.demo.photos import HELD_OUT_PHOTOS, load_photos, photo_crops, photo_paths  # noqa: E402
from lib_lora.demo.tiny import DEFAULT_CHECKPOINT  # noqa: E402
from lib_lora.demo.world import COLOURS, SHAPES, light_background, render, sample_scene  # noqa: E402
from lib_lora.models.checkpoint import load_checkpoint  # noqa: E402

BENCH_STREAM = 90  # seeds of the bench's pictures: no build stream uses it


def world_set(count: int, rng) -> list:
    return [render(sample_scene(rng, SHAPES, tuple(COLOURS), light_share=0.5)) for _ in range(count)]


def light_hue_set(count: int, rng) -> list:
    """Saturated objects of hue i / count on light backgrounds."""
    images = []
    for index in range(count):
        scene = sample_scene(rng, SHAPES, tuple(COLOURS))
        rgb = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(index / count, rng.uniform(0.5, 1.0), rng.uniform(0.45, 0.9)))
        images.append(render(replace(scene, rgb=rgb, colour_name=None, background=light_background(rng))))
    return images


def held_out_sets(count: int) -> dict[str, list]:
    rng = np.random.default_rng(BENCH_STREAM)
    return {"world": world_set(count, rng), "light hues": light_hue_set(count, rng),
            "photos": photo_crops(load_photos(photo_paths(HELD_OUT_PHOTOS)), count, rng)}


@torch.no_grad()
def round_trip_errors(vae, images, batch_size: int = 64) -> tuple[float, float]:
    """(mean absolute error in 0-255 levels, PSNR in dB) of decode(mean(encode(x))), clamped and quantised as saved."""
    errors = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start : start + batch_size])
        mean, _ = vae.encode_moments(pixels)
        decoded = vae.decoder(vae.post_quant_conv(mean)).clamp(-1, 1)
        errors.append(((decoded + 1) * 127.5).round() - (pixels + 1) * 127.5)
    error = torch.cat(errors)
    return error.abs().mean().item(), 10 * torch.log10(255.0**2 / error.pow(2).mean()).item()


def patches(images, side: int = 4) -> np.ndarray:
    """[N * (64 / side)^2, side * side * 3] non-overlapping patches, in 0-255 levels."""
    array = np.stack([np.asarray(image, dtype=np.float64) for image in images])  # [N, H, W, 3]
    n, h, w, _ = array.shape
    return array.reshape(n, h // side, side, w // side, side, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, side * side * 3)


def linear_codec_errors(sets: dict[str, list], components: int = 4, fit_count: int = 512) -> list[tuple[float, float]]:
    """(MAE, PSNR) per set of the PCA codec fitted on `fit_count` pictures of the VAE's training mix."""
    rng = np.random.default_rng(BENCH_STREAM + 1)
    photos = load_photos(photo_paths())
    training = [picture for _ in range(fit_count // 8) for picture in codec_pictures(rng, 8, photos)[0]]
    fit = patches(training)
    mean = fit.mean(0)
    basis = np.linalg.svd(fit - mean, full_matrices=False)[2][:components]  # [components, 48]
    cells = []
    for images in sets.values():
        x = patches(images)
        error = np.clip(np.rint((x - mean) @ basis.T @ basis + mean), 0, 255) - x
        cells.append((float(np.abs(error).mean()), float(10 * np.log10(255.0**2 / (error**2).mean()))))
    return cells


def row(name: str, cells) -> str:
    return f"{name:<32}" + "".join(f"{f'MAE {mae:5.2f}  PSNR {psnr:5.2f}':>24}" for mae, psnr in cells)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, nargs="*", default=[DEFAULT_CHECKPOINT])
    parser.add_argument("--count", type=int, default=128, help="pictures per held-out set")
    args = parser.parse_args()
    torch.manual_seed(0)
    sets = held_out_sets(args.count)
    print(f"VAE round trip (posterior mean), {args.count} held-out 64 px pictures per set; MAE in 0-255 levels")
    print(f"{'checkpoint':<32}" + "".join(f"{name:>24}" for name in sets))
    latent_channels = []
    for path in args.checkpoint:
        vae = load_checkpoint(path).vae.float()
        print(row(path.name, [round_trip_errors(vae, images) for images in sets.values()]))
        latent_channels.append(vae.config.z_channels)
    for channels in sorted(set(latent_channels)):  # a 16x16 latent pixel holds a 4x4 patch's 48 values in `channels`
        print(row(f"linear codec, 16x16x{channels} latent", linear_codec_errors(sets, components=channels)))


if __name__ == "__main__":
    main()
