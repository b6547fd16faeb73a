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
Several checkpoints print side by side (e.g. a new build against the shipped one).
"""

import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lora.demo.build_vae import to_pixels  # noqa: E402
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
        images.append(render(scene.__class__(**{**scene.__dict__, "rgb": rgb, "colour_name": None,
                                                 "background": light_background(rng)})))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, nargs="*", default=[DEFAULT_CHECKPOINT])
    parser.add_argument("--count", type=int, default=128, help="pictures per held-out set")
    args = parser.parse_args()
    torch.manual_seed(0)
    sets = held_out_sets(args.count)
    print(f"VAE round trip (posterior mean), {args.count} held-out 64 px pictures per set; MAE in 0-255 levels")
    print(f"{'checkpoint':<32}" + "".join(f"{name:>24}" for name in sets))
    for path in args.checkpoint:
        vae = load_checkpoint(path).vae.float()
        cells = [round_trip_errors(vae, images) for images in sets.values()]
        print(f"{path.name:<32}" + "".join(f"{f'MAE {mae:5.2f}  PSNR {psnr:5.2f}':>24}" for mae, psnr in cells))


if __name__ == "__main__":
    main()
