"""Training step time against its floor, on a full-size random SD1.5 checkpoint.

    python bench/train_step.py [--steps 8] [--rounds 4] [--size 256] [--rank 16] [--with-text-encoder] [--count-ops]
                               [--compile [BACKEND]]

Our trainer (`lib_lora.train.train`, batch 1, rank 16 LoRA on the UNet, cached latents and cached
text-encoder outputs) is timed step by step from its own events; the floor is the frozen UNet's
forward + backward with respect to its input only, the least any LoRA step can cost. Both run in
this process on the same model, in alternating rounds (floor, trainer, floor, trainer, ..., floor)
and each trainer run is divided by the floor runs on either side of it, so that a machine whose
speed drifts between minutes affects both sides of each ratio alike; the median ratio is printed.
`--count-ops` also counts the ATen operations one trainer step and one floor pass dispatch (a
TorchDispatchMode between two step events): unlike time, the count does not depend on the
machine's load, and on a GPU at batch 1 each operation is a kernel launch the step waits for.
`--compile` trains with `torch_compile` (the hooked UNet compiled, inductor unless named); its step is
counted as the ATen operations that still reach the dispatcher (the compiled code's matmuls and
convolutions, the eager text encoder and optimizer) plus the fused C++ kernels inductor generated (a
profiler event each, `cpp.enable_kernel_profile`); the floor stays the eager UNet's.
Writes bench/out/sd15-random.safetensors (2 GB) on first use; never commit it.
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lib_lora.hosts.standalone import StandaloneHost  # noqa: E402
from lib_lora.models.architectures import write_random_checkpoint  # noqa: E402
from lib_lora.train.config import TrainConfig  # noqa: E402
from lib_lora.train.cpu_memory import keep_freed_memory  # noqa: E402
from lib_lora.train.trainer import train  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CHECKPOINT = Path(__file__).parent / "out" / "sd15-random.safetensors"
VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "permute", "unsqueeze", "squeeze", "slice", "select", "detach",
         "as_strided", "alias", "split", "split_with_sizes", "unbind"}


def views(ops: Counter) -> int:
    """Ops that launch no kernel on a GPU (views, transposes, detach): dispatched, counted, but metadata only."""
    return sum(n for name, n in ops.items() if name.split(".")[-1] in VIEWS)


def floor_times(host, size: int, runs: int) -> list[float]:
    """Forward + backward of the frozen UNet with respect to its input only."""
    latent = size // 8
    x = torch.randn(1, 4, latent, latent, device=host.device, dtype=host.dtype, requires_grad=True)
    t = torch.tensor([500], device=host.device)
    context = torch.randn(1, 77, 768, device=host.device, dtype=host.dtype)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        host.unet(x, t, context).float().square().mean().backward()
        if host.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        x.grad = None
    return times


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched while it is on, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # compiled code runs (dynamo would fall back to eager under a mode that sees its insides)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def floor_ops(host, size: int) -> Counter:
    counter = OpCounter()
    with counter:
        floor_times(host, size, 1)
    return counter.counts


def step_ops(host, size: int, rank: int, with_text_encoder: bool, backend: str | None = None) -> Counter:
    """The operations of training step 3 (from step 2's event to step 3's: its data, loss, backward, optimizer, log);
    compiled (`backend`), also the kernels inductor generated that it ran, as "generated kernels"."""
    counter, profile = OpCounter(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    spans, open_spans = (counter, profile) if backend else (counter,), contextlib.ExitStack()

    def on_event(event):
        if event.kind == "step" and event.step == 2:
            for span in spans:
                open_spans.enter_context(span)
        elif event.kind == "step" and event.step == 3:
            open_spans.close()  # in reverse order

    if backend:
        torch._inductor.config.cpp.enable_kernel_profile = True  # each generated C++ kernel a profiler event
    run_config(host, size, 4, rank, with_text_encoder, on_event, backend=backend)
    if backend:
        counter.counts["generated kernels"] = sum("cpp_fused" in e.name or e.name.startswith("triton_") for e in profile.events())
    return counter.counts


def run_config(host, size: int, steps: int, rank: int, with_text_encoder: bool, on_event, conv_dim: int = 0,
               backend: str | None = None) -> None:
    """A real training run of `steps` steps on one red square (one epoch: no state saves between steps); LoCon if
    `conv_dim`; the UNet compiled with `backend` if given."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data" / f"{steps}_bench"  # one epoch: no per-epoch state saves in the timing
        folder.mkdir(parents=True)
        Image.new("RGB", (size, size), (200, 40, 40)).save(folder / "a.png")
        (folder / "a.txt").write_text("a red square")
        config = TrainConfig(
            train_data_dir=str(folder.parent), resolution=(size, size), max_train_epochs=1,
            network_dim=rank, network_alpha=rank, network_train_unet_only=not with_text_encoder, output_dir=tmp,
            output_name="bench", save_precision="fp16", torch_compile=bool(backend), dynamo_backend=backend or "inductor",
            **({"network_type": "locon", "conv_dim": conv_dim, "conv_alpha": conv_dim} if conv_dim else {}),
        )
        train(config, host, on_event=on_event, run_dir=Path(tmp) / "run")


def trainer_times(host, size: int, steps: int, rank: int, with_text_encoder: bool, backend: str | None = None) -> tuple[list[float], float]:
    """Per-step wall time of real training steps, from the trainer's own step events, and the time from the run's
    start to its first step (which also encodes the latent, and compiles)."""
    stamps = [time.perf_counter()]
    run_config(host, size, steps, rank, with_text_encoder, lambda e: e.kind == "step" and stamps.append(time.perf_counter()),
               backend=backend)
    return [b - a for a, b in zip(stamps[1:], stamps[2:])], stamps[1] - stamps[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="trainer steps timed per round")
    parser.add_argument("--rounds", type=int, default=4, help="trainer runs, each compared with the floor runs just before and after it")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--with-text-encoder", action="store_true")
    parser.add_argument("--count-ops", action="store_true", help="count the ATen operations of one step and of the floor, then exit")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND", help="train with torch_compile (default backend inductor)")
    args = parser.parse_args()
    if not CHECKPOINT.exists():
        CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(CHECKPOINT)
    host = StandaloneHost.from_file(CHECKPOINT, out_dir=Path(tempfile.mkdtemp()))
    if host.device.type == "cpu":
        keep_freed_memory()  # as train() does on a CPU, so that the floor runs under the same malloc settings
    print(f"device {host.device}, dtype {host.dtype}, torch threads {torch.get_num_threads()}")
    if args.count_ops:
        floor, step = floor_ops(host, args.size), step_ops(host, args.size, args.rank, args.with_text_encoder, args.compile)
        print(f"ATen operations: floor {sum(floor.values())} ({views(floor)} views), trainer step {sum(step.values())} "
              f"({views(step)} views), ratio {sum(step.values()) / sum(floor.values()):.2f}x")
        extra = step - floor
        print("most added by the step: " + ", ".join(f"{name} +{n}" for name, n in extra.most_common(12)))
        return
    floor_times(host, args.size, 1)  # warm-up
    before, floor, ours, ratios, firsts = floor_times(host, args.size, args.steps // 2), [], [], [], []
    for _ in range(args.rounds):
        steps, first = trainer_times(host, args.size, args.steps + 1, args.rank, args.with_text_encoder, args.compile)
        firsts.append(first)
        after = floor_times(host, args.size, args.steps // 2)
        ratios.append(statistics.median(steps) / statistics.median(before + after))  # against the floor around it
        floor, ours, before = floor + after, ours + steps, after
    print(f"floor (UNet fwd+bwd wrt input), median of {len(floor)}: {statistics.median(floor) * 1000:.0f} ms")
    print(f"trainer step, rank {args.rank}{' + text encoder' if args.with_text_encoder else ''}, median of {len(ours)}: {statistics.median(ours) * 1000:.0f} ms")
    print(f"from train() to the first step (latent encode{', compile' if args.compile else ''}), median: {statistics.median(firsts):.1f} s")
    print(f"ratio trainer / floor per round: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio trainer / floor, median of rounds: {statistics.median(ratios):.3f}x")

if __name__ == "__main__":
    main()
