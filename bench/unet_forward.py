"""UNet forward time at 512x512 on a full-size random SD1.5 checkpoint, and generate time on the embedded model.

    python bench/unet_forward.py [--runs 3] [--size 512]

Prints the median of --runs timed calls (after one warm-up) of each. Writes
bench/out/sd15-random.safetensors (2 GB) on first use; never commit it.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lib_lora.demo.tiny import DEFAULT_CHECKPOINT  # noqa: E402
from lib_lora.models.checkpoint import load_checkpoint  # noqa: E402
from lib_lora.models.pipeline import GenerationParams, generate  # noqa: E402
from lib_lora.models.architectures import write_random_checkpoint  # noqa: E402

CHECKPOINT = Path(__file__).parent / "out" / "sd15-random.safetensors"


def timed(fn, runs: int) -> float:
    fn()  # warm-up: allocator, oneDNN kernel choice
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tiny = load_checkpoint(DEFAULT_CHECKPOINT)
    params = GenerationParams(prompt="a red circle", steps=20, width=64, height=64)
    print(f"generate on the embedded model (64x64, {params.sampler}, 20 steps, cfg 7), median of {args.runs}: {timed(lambda: generate(tiny, params), args.runs):.2f} s")
    if not CHECKPOINT.exists():
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(CHECKPOINT)
    unet = load_checkpoint(CHECKPOINT).unet
    latent = args.size // 8
    x, t, context = torch.randn(1, 4, latent, latent), torch.tensor([500.0]), torch.randn(1, 77, 768)
    with torch.no_grad():
        seconds = timed(lambda: unet(x, t, context), args.runs)
    print(f"SD1.5 UNet forward, {args.size}x{args.size}, batch 1, fp32, median of {args.runs}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
