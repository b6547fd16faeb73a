"""Write a random-initialised full-size checkpoint (ldm/sgm layout) for loader tests and benchmarks.

    python bench/make_sd15_random.py bench/out/sd15-random.safetensors [--dtype fp32] [--seed 0]
    python bench/make_sd2_random.py bench/out/sd2-random.safetensors     # SD2.x (768-v layout)
    python bench/make_sdxl_random.py bench/out/sdxl-random.safetensors   # SDXL base layout

The output (fp16: SD1.5 ~2.1 GB, SD2 ~2.6 GB, SDXL ~6.9 GB) is a build artefact: never commit it.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lib_lora.models.architectures import FULL_SIZE, write_random_checkpoint  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(default_arch: str = "sd1"):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", choices=FULL_SIZE, default=default_arch)
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_random_checkpoint(args.out, args.arch, DTYPES[args.dtype], args.seed)
    print(f"wrote {args.arch} {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
