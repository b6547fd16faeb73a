"""Start-up time and peak memory of a whole CLI training run on a full-size random SD1.5 checkpoint.

    python bench/cli_run.py [--runs 3] [--steps 1] [--size 256] [--images 8] [--rank 16] [--baseline DIR]

Runs `python -m lib_lora train` on 8 random pictures (UNet and text encoder, rank 16, fp32 on the
CPU) as a user would, in a fresh process each time, and reports for each run: seconds from start
to the first finished step (the first row of the run's loss.csv), to the saved LoRA file (it
appears whole, by rename), to the process's exit, and its peak resident memory (the kernel's
count for that child). `--baseline DIR` runs the same command from another checkout of the
project (e.g. `git worktree add /tmp/before <commit>`) in alternation with this one, so both
sides see the same machine minute by minute; medians and ratios are printed.
Writes bench/out/sd15-random.safetensors (2 GB) on first use; never commit it.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lib_lora.models.architectures import write_random_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
CHECKPOINT = Path(__file__).parent / "out" / "sd15-random.safetensors"
POLL_SECONDS = 0.02


def make_dataset(folder: Path, images: int, size: int) -> Path:
    """`images` random pictures with a caption each, in kohya's `1_name` folder layout."""
    concept = folder / "1_zkz"
    concept.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(images):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(concept / f"{index}.png")
        (concept / f"{index}.txt").write_text("a photo of zkz")
    return folder


def one_run(project: Path, dataset: Path, args) -> dict[str, float]:
    """Seconds to the first step, to the saved file and to exit, and peak RSS in GiB, of one CLI run."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "lib_lora", "train", "--checkpoint", str(args.checkpoint), "--out-dir", out,
                   "--train_data_dir", str(dataset), "--resolution", str(args.size), "--network_dim", str(args.rank),
                   "--network_alpha", str(args.rank), "--max_train_steps", str(args.steps), "--output_name", "bench"]
        loss_csv, saved = Path(out) / "runs" / "bench" / "loss.csv", Path(out) / "lora" / "bench.safetensors"
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env={**os.environ, "PYTHONPATH": str(project)})
        first_step = saved_at = None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            now = time.perf_counter() - start
            if first_step is None and loss_csv.exists() and len(loss_csv.read_bytes().splitlines()) > 1:
                first_step = now
            if saved_at is None and saved.exists():
                saved_at = now
            if pid:
                break
            time.sleep(POLL_SECONDS)
        if status != 0:
            raise SystemExit(f"{project}: the run failed:\n{child.stderr.read().decode()[-3000:]}")
        child.stderr.close()
        return {"first step s": first_step, "saved s": saved_at, "exit s": now, "peak RSS GiB": usage.ru_maxrss / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--baseline", type=Path, help="another checkout of the project, run in alternation with this one")
    args = parser.parse_args()
    if not args.checkpoint.exists():
        write_random_checkpoint(args.checkpoint, "sd1")
    args.checkpoint = args.checkpoint.resolve()
    sides = {"this": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as folder:
        dataset = make_dataset(Path(folder), args.images, args.size)
        for index in range(args.runs):
            for side, project in sides.items():
                results[side].append(one_run(project, dataset, args))
                print(f"run {index + 1} {side:8s} " + "  ".join(f"{k} {v:.2f}" for k, v in results[side][-1].items()), flush=True)
    print(f"\n{args.images} images at {args.size} px, {args.steps} step(s), rank {args.rank}, UNet + text encoder, "
          f"median of {args.runs} runs")
    medians = {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in results.items()}
    for side, values in medians.items():
        print(f"{side:8s} " + "  ".join(f"{k} {v:.2f}" for k, v in values.items()))
    if args.baseline:
        print("ratio    " + "  ".join(f"{k} {medians['this'][k] / medians['baseline'][k]:.2f}x" for k in medians["this"]))


if __name__ == "__main__":
    main()
