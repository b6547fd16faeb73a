"""Training step time against its floor, on a full-size random SD1.5 checkpoint.

    python bench/train_step.py [--steps 8] [--rounds 4] [--size 256] [--rank 16] [--with-text-encoder] [--count-ops]
                               [--compile [BACKEND]] [--paired] [--dtype fp32|fp16|bf16]
    python bench/train_step.py --table [--steps 8] [--models sd15 sdxl] [--sizes 256 512] [--batches 1 4]
                               [--networks lora16 locon16/8] [--text-encoder off on] [--checkpointing off on]

Our trainer (`lib_lora.train.train`, batch 1, rank 16 LoRA on the UNet, cached latents and cached
text-encoder outputs) is timed step by step from its own events; the floor is the frozen UNet's
forward + backward with respect to its input only, the least any LoRA step can cost. Both run in
this process on the same model, in alternating rounds (floor, trainer, floor, trainer, ..., floor)
and each trainer run is divided by the floor runs on either side of it, so that a machine whose
speed drifts between minutes affects both sides of each ratio alike; the median ratio is printed.
`--paired` pairs them closer: one trainer run of steps x rounds steps, and after each step's event one floor
pass of the same UNet with the adapters' hooks set aside; each step is divided by the floor pass that follows
it, seconds apart, and the median of those ratios is printed.
`--count-ops` also counts the ATen operations one trainer step and one floor pass dispatch (a
TorchDispatchMode between two step events): unlike time, the count does not depend on the
machine's load, and on a GPU at batch 1 each operation is a kernel launch the step waits for.
`--compile` trains with `torch_compile` (the hooked UNet compiled, inductor unless named); its step is
counted as the ATen operations that still reach the dispatcher (the compiled code's matmuls and
convolutions, the eager text encoder and optimizer) plus the fused C++ kernels inductor generated (a
profiler event each, `cpp.enable_kernel_profile`); the floor stays the eager UNet's.
`--table` prints one row per combination of its options, each measured by a fresh process (`measure_row`):
step and floor times and their ratio, ATen ops and FLOPs against the floor's, the optimizer step's share of
a step, the process's peak memory and the seconds from its start to the first finished step.
Writes bench/out/sd15-random.safetensors (2 GB; sdxl-random 7 GB for `--models sdxl`) on first use; never commit them.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lib_lora.hosts.standalone import StandaloneHost  # noqa: E402
from lib_lora.models.architectures import write_random_checkpoint  # noqa: E402
from lib_lora.train.config import TrainConfig  # noqa: E402
from lib_lora.train.cpu_memory import keep_freed_memory  # noqa: E402
from lib_lora.train import trainer  # noqa: E402
from lib_lora.train.trainer import train  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

CHECKPOINT = Path(__file__).parent / "out" / "sd15-random.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "permute", "unsqueeze", "squeeze", "slice", "select", "detach",
         "as_strided", "alias", "split", "split_with_sizes", "unbind"}


def views(ops: Counter) -> int:
    """Ops that launch no kernel on a GPU (views, transposes, detach): dispatched, counted, but metadata only."""
    return sum(n for name, n in ops.items() if name.split(".")[-1] in VIEWS)


def floor_times(host, size: int, runs: int, batch: int = 1) -> list[float]:
    """Forward + backward of the frozen UNet with respect to its input only (SDXL's with its vector y)."""
    latent, config = size // 8, host.unet.config
    x = torch.randn(batch, 4, latent, latent, device=host.device, dtype=host.dtype, requires_grad=True)
    t = torch.full((batch,), 500, device=host.device)
    context = torch.randn(batch, 77, config.context_dim, device=host.device, dtype=host.dtype)
    y = torch.randn(batch, config.adm_in_channels, device=host.device, dtype=host.dtype) if config.adm_in_channels else None
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        host.unet(x, t, context, y).float().square().mean().backward()
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
               backend: str | None = None, batch: int = 1, checkpointing: bool = False) -> None:
    """A real training run of `steps` steps of `batch` red squares (one epoch: no state saves between steps); LoCon
    if `conv_dim`; the UNet compiled with `backend` if given; with gradient checkpointing if `checkpointing`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data" / f"{steps}_bench"  # one epoch: no per-epoch state saves in the timing
        folder.mkdir(parents=True)
        for index in range(batch):
            Image.new("RGB", (size, size), (200, 40 + index, 40)).save(folder / f"{index}.png")
            (folder / f"{index}.txt").write_text("a red square")
        config = TrainConfig(
            train_data_dir=str(folder.parent), resolution=(size, size), max_train_epochs=1, train_batch_size=batch,
            gradient_checkpointing=checkpointing,
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


@contextlib.contextmanager
def without_hooks(module: torch.nn.Module):
    """`module` run as the frozen model alone: every forward hook and pre-hook in it (the adapters', a bench's) set
    aside, then put back."""
    hooked = [(hooks, dict(hooks)) for m in module.modules() for hooks in (m._forward_pre_hooks, m._forward_hooks) if hooks]
    for hooks, _ in hooked:
        hooks.clear()
    try:
        yield
    finally:
        for hooks, saved in hooked:
            hooks.update(saved)


def paired_times(host, size: int, steps: int, rank: int, with_text_encoder: bool) -> tuple[list[float], list[float]]:
    """Trainer steps 2..steps+1 and a floor pass after each, in one run: after each step's event the UNet runs once
    more without its adapters' hooks (the floor), so each step is compared with a floor measured seconds later."""
    step_times, floors, resumed = [], [], []

    def on_event(event):
        if event.kind != "step":
            return
        if resumed:  # the time since the last floor pass ended: one whole trainer step
            step_times.append(time.perf_counter() - resumed[-1])
        with without_hooks(host.unet):
            floors.extend(floor_times(host, size, 1))
        resumed.append(time.perf_counter())

    run_config(host, size, steps + 1, rank, with_text_encoder, on_event)
    return step_times, floors[1:]


CHECKPOINTS = {"sd15": CHECKPOINT, "sdxl": CHECKPOINT.parent / "sdxl-random.safetensors"}
NETWORKS = {"lora16": {"rank": 16}, "locon16/8": {"rank": 16, "conv_dim": 8}}


@dataclass(frozen=True)
class Row:
    """One configuration of the table."""

    model: str = "sd15"
    size: int = 256
    batch: int = 1
    network: str = "lora16"
    text_encoder: bool = False
    checkpointing: bool = False


@contextlib.contextmanager
def timed_optimizer_steps(seconds: list[float], device: torch.device):
    """Time each of the trainer's optimizer steps (unscale, clip, step, zero_grad) into `seconds`."""
    original = trainer._optimizer_step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(*args, **kwargs):
        sync()
        start = time.perf_counter()
        original(*args, **kwargs)
        sync()
        seconds.append(time.perf_counter() - start)

    trainer._optimizer_step = timed
    try:
        yield
    finally:
        trainer._optimizer_step = original


def counted(function) -> tuple[Counter, int]:
    """The ATen operations and the FLOPs of `function()`, run twice: the FLOP counter's module tracking adds ops of its own."""
    ops, flops = OpCounter(), FlopCounterMode(display=False)
    for counter in (ops, flops):
        with counter:
            function()
    return ops.counts, flops.get_total_flops()


def measure_row(row: Row, steps: int, launched: float) -> dict:
    """Everything the table prints for one configuration, measured in this fresh process (`launched`: the wall-clock
    time its command started). Trainer steps 2..steps+1 are timed (step 1 encodes the latents and allocates for the
    first time), steps+2 and +3 are counted (ops, FLOPs); then the floor at the same size and batch, timed and counted."""
    host = load_host(CHECKPOINTS[row.model])
    stamps, optimizer_seconds, first_step, step_count = [], [], [], {}
    spans = contextlib.ExitStack()

    def on_event(event):
        if event.kind != "step":
            return
        stamps.append(time.perf_counter())
        if event.step == 1:
            first_step.append(time.time() - launched)
        if event.step in (steps + 2, steps + 3):
            spans.close()
        if event.step == steps + 1:
            step_count["ops"] = spans.enter_context(OpCounter()).counts
        elif event.step == steps + 2:  # apart from the ops: see counted()
            step_count["flops"] = spans.enter_context(FlopCounterMode(display=False))

    with timed_optimizer_steps(optimizer_seconds, host.device):
        run_config(host, row.size, steps + 3, batch=row.batch, with_text_encoder=row.text_encoder, checkpointing=row.checkpointing,
                   on_event=on_event, **NETWORKS[row.network])
    step_times = [b - a for a, b in zip(stamps, stamps[1:])][:steps]
    peak = (torch.cuda.max_memory_allocated() if host.device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    floor_times(host, row.size, 1, row.batch)  # warm-up
    floor = floor_times(host, row.size, steps, row.batch)
    floor_count, floor_flops = counted(lambda: floor_times(host, row.size, 1, row.batch))
    step = statistics.median(step_times)
    return {"step ms": step * 1000, "floor ms": statistics.median(floor) * 1000, "ratio": step / statistics.median(floor),
            "ops": sum(step_count["ops"].values()), "floor ops": sum(floor_count.values()),
            "flops ratio": step_count["flops"].get_total_flops() / floor_flops,
            "optimizer share": statistics.median(optimizer_seconds[1 : steps + 1]) / step,
            "peak GiB": peak / 2**30, "first step s": first_step[0], "device": str(host.device)}


def table(rows: list[Row], steps: int) -> None:
    """Each row measured by a fresh process of this script (its own load, peak memory and first step), printed as
    a Markdown table as the rows finish."""
    print("| model | px | batch | network | text encoder | checkpointing | step ms | floor ms | ratio | ops (floor) | ops ratio "
          "| FLOPs ratio | optimizer share | peak GiB | first step s |")
    print("|" + "---|" * 15, flush=True)
    for row in rows:
        command = [sys.executable, __file__, "--row", json.dumps(dataclasses.asdict(row)), "--steps", str(steps), "--launched", str(time.time())]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"| {row.model} | {row.size} | {row.batch} | {row.network} | {'yes' if row.text_encoder else 'no'} | "
              f"{'yes' if row.checkpointing else 'no'} | {result['step ms']:,.0f} | {result['floor ms']:,.0f} | {result['ratio']:.2f}x | "
              f"{result['ops']:,} ({result['floor ops']:,}) | {result['ops'] / result['floor ops']:.2f}x | {result['flops ratio']:.3f}x | "
              f"{result['optimizer share']:.1%} | {result['peak GiB']:.2f} | {result['first step s']:.1f} |", flush=True)


def load_host(checkpoint: Path, dtype: torch.dtype | None = None) -> StandaloneHost:
    """The checkpoint (written on first use, random) in a standalone host, under the trainer's malloc settings; its
    weights in `dtype` (default: the host's, fp32 on a CPU)."""
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(checkpoint, "sdxl" if checkpoint == CHECKPOINTS["sdxl"] else "sd1")
    host = StandaloneHost.from_file(checkpoint, out_dir=Path(tempfile.mkdtemp()), dtype=dtype)
    if host.device.type == "cpu":
        keep_freed_memory()  # as train() does on a CPU, so that the floor runs under the same malloc settings
    return host


def on_off(value: str) -> bool:
    return {"on": True, "off": False}[value]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="trainer steps timed per round")
    parser.add_argument("--rounds", type=int, default=4, help="trainer runs, each compared with the floor runs just before and after it")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--with-text-encoder", action="store_true")
    parser.add_argument("--paired", action="store_true", help="one trainer run of steps x rounds steps, a floor pass after each step")
    parser.add_argument("--count-ops", action="store_true", help="count the ATen operations of one step and of the floor, then exit")
    parser.add_argument("--dtype", choices=DTYPES, help="the model's weights (default: fp32 on a CPU, fp16 on a GPU); "
                        "bf16 counts on a CPU what a webui's half-precision model runs on a GPU")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND", help="train with torch_compile (default backend inductor)")
    table_options = parser.add_argument_group("the table (--table): every combination of these, a fresh process each")
    table_options.add_argument("--table", action="store_true")
    table_options.add_argument("--models", nargs="+", choices=CHECKPOINTS, default=["sd15"])
    table_options.add_argument("--sizes", nargs="+", type=int, default=[256])
    table_options.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    table_options.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    table_options.add_argument("--text-encoder", nargs="+", type=on_off, default=[False, True], metavar="off|on")
    table_options.add_argument("--checkpointing", nargs="+", type=on_off, default=[False, True], metavar="off|on")
    parser.add_argument("--row", type=json.loads, help=argparse.SUPPRESS)  # one row, run by --table in a fresh process
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure_row(Row(**args.row), args.steps, args.launched)))
        return
    if args.table:
        if args.dtype:
            parser.error("--dtype is not a column of --table (its rows run at the device's default dtype)")
        table([Row(*values) for values in itertools.product(args.models, args.sizes, args.batches, args.networks, args.text_encoder,
                                                            args.checkpointing)], args.steps)
        return
    host = load_host(CHECKPOINT, DTYPES.get(args.dtype))
    print(f"device {host.device}, dtype {host.dtype}, torch threads {torch.get_num_threads()}")
    if args.count_ops:
        floor, step = floor_ops(host, args.size), step_ops(host, args.size, args.rank, args.with_text_encoder, args.compile)
        print(f"ATen operations: floor {sum(floor.values())} ({views(floor)} views), trainer step {sum(step.values())} "
              f"({views(step)} views), ratio {sum(step.values()) / sum(floor.values()):.2f}x")
        extra = step - floor
        print("most added by the step: " + ", ".join(f"{name} +{n}" for name, n in extra.most_common(12)))
        return
    if args.paired:
        steps, floors = paired_times(host, args.size, args.steps * args.rounds, args.rank, args.with_text_encoder)
        ratios = [step / floor for step, floor in zip(steps, floors)]
        print(f"{len(ratios)} pairs (a trainer step, then a floor pass): step {statistics.median(steps) * 1000:.0f} ms, "
              f"floor {statistics.median(floors) * 1000:.0f} ms (medians)")
        print(f"ratio per pair: {', '.join(f'{r:.3f}' for r in ratios)}")
        print(f"ratio trainer / floor, median of pairs: {statistics.median(ratios):.3f}x, of the medians: "
              f"{statistics.median(steps) / statistics.median(floors):.3f}x")
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
