"""Where a training step's ATen operations come from, by source and by op name.

    python bench/op_breakdown.py [--size 256] [--rank 16] [--conv-dim 0] [--with-text-encoder] [--steps 4]

Counts the steps `train_step.py --count-ops` counts (steps 2..steps+1 of a real run on the random SD1.5
checkpoint, the same ops each) with every dispatched ATen op counted, views, reshapes, `t`, `detach` and casts included,
and attributes each to a source:
- forward: the adapters (per component and host kind: Linear, 1x1 conv, kxk LoCon, through a
  patched `AdapterModule._forward_hook`), the frozen UNet and text encoder (module hooks), and the
  rest by the innermost trainer/optimizer function on the Python stack;
- backward: the forward source of the autograd node being run (a pre-hook on every node the forward
  made), the parameters' gradient accumulation, and the engine's own gradient sums (no node running).
Each op's own time is summed too (the clock read around the op inside the mode, so the mode's Python is
not counted; on a CPU an op is done when it returns), and a floor pass runs after each step (the UNet with the
adapters' hooks set aside, as `train_step.py --paired`): the table gives each source's ms per step against the
floor's, to show where a step's time beyond the floor goes. Run it on an otherwise idle machine.
Prints a table by source, then the op names of each of the largest sources.
"""

import argparse
import contextlib
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from train_step import CHECKPOINT, floor_times, run_config, views, without_hooks  # noqa: E402
from lib_lora.hosts.standalone import StandaloneHost  # noqa: E402
from lib_lora.networks.base import AdapterModule, layer_kind  # noqa: E402
from lib_lora.train.cpu_memory import keep_freed_memory  # noqa: E402

STACK_SOURCES = (("torch/optim/", "optimizer step"), ("clip_grad", "grad clipping"), ("zero_grad", "grad zeroing"),
                 ("_engine_run_backward", "backward: engine gradient sums (between nodes)"))


def adapter_source(module: AdapterModule, layer) -> str:
    component = "text encoder" if module.lora_name.startswith("lora_te") else "UNet"
    kind = layer_kind(layer)
    if kind == "conv":
        return f"adapter {component} {'x'.join(map(str, layer.kernel_size))} LoCon"
    return f"adapter {component} {'Linear' if kind == 'linear' else '1x1 conv'}"


def stack_source() -> str:
    """The op's source from the Python stack: optimizer, clipping, zeroing, the autograd engine, or the innermost trainer function."""
    frame, trainer_function = sys._getframe(2), None
    while frame is not None:
        name = frame.f_code.co_filename
        for marker, source in STACK_SOURCES:
            if marker in name or marker == frame.f_code.co_name:
                return source
        if trainer_function is None and name.endswith("lib_lora/train/trainer.py"):
            trainer_function = frame.f_code.co_name
        frame = frame.f_back
    return f"trainer {trainer_function}" if trainer_function else "other"


class AttributedCounter(TorchDispatchMode):
    """Counts ops by (source, name); the source is the innermost region on `self.regions`, else the backward node's, else the stack's."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.seconds: Counter = Counter()  # by source
        self.regions: list[str] = []
        self.backward_source: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).split(".")[-1]
        if torch._C._current_autograd_node() is not None:
            source = f"backward: {self.backward_source}"
        elif self.regions:
            source = f"forward: {self.regions[-1]}"
        else:
            source = stack_source()
        self.counts[source][name] += 1
        start = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        self.seconds[source] += time.perf_counter() - start
        return result


class NodeTagger(TorchFunctionMode):
    """Puts a pre-hook on each autograd node the forward makes, so its backward ops are counted under the forward's source."""

    def __init__(self, counter: AttributedCounter):
        super().__init__()
        self.counter, self.seen = counter, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        source = self.counter.regions[-1] if self.counter.regions else stack_source()
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            node = getattr(tensor, "grad_fn", None) if isinstance(tensor, torch.Tensor) else None
            if node is not None:
                self.tag_tree(node, source)
        return result

    def tag_tree(self, node, source: str) -> None:
        """`node` and the gradient accumulators of the parameters it feeds (a custom autograd Function's output)."""
        self.tag(node, source)
        for parent, _ in node.next_functions:
            if parent is not None and type(parent).__name__ == "AccumulateGrad":
                self.tag(parent, "parameter grad accumulation")

    def tag(self, node, source: str) -> None:
        if node in self.seen:
            return
        self.seen.add(node)

        def pre_hook(grad_outputs):
            self.counter.backward_source = source

        node.register_prehook(pre_hook)


@contextlib.contextmanager
def regions(counter: AttributedCounter, tagger: NodeTagger, host):
    """Forward regions: the frozen UNet and text encoders (module hooks) and each adapter (its hook, patched;
    its output's node tagged too, as autograd Functions are not torch functions the tagger sees)."""
    handles = []

    def enter(source):
        return lambda *_: counter.regions.append(source)

    def leave(*_):
        counter.regions.pop()

    for module, source in [(host.unet, "UNet (frozen)")] + [(m.module, "text encoder (frozen)") for m in host.text_encoders]:
        handles += [module.register_forward_pre_hook(enter(source)), module.register_forward_hook(leave)]
    original = AdapterModule._forward_hook

    def hooked(self, layer, inputs, output):
        source = adapter_source(self, layer)
        counter.regions.append(source)
        try:
            result = original(self, layer, inputs, output)
        finally:
            counter.regions.pop()
        if result.grad_fn is not None and torch._C._is_torch_function_mode_enabled():
            tagger.tag_tree(result.grad_fn, source)
        return result

    AdapterModule._forward_hook = hooked
    try:
        yield
    finally:
        AdapterModule._forward_hook = original
        for handle in handles:
            handle.remove()


def paired_breakdown(host, size: int, rank: int, conv_dim: int, with_text_encoder: bool, steps: int
                     ) -> tuple[AttributedCounter, AttributedCounter]:
    """Trainer steps 2..steps+1 of a real run counted and timed by source, each followed by a floor pass (the UNet
    with the adapters' hooks set aside) counted on its own, so that each source's time is set against a floor
    measured seconds apart (`train_step.py --paired`); both summed over the steps."""
    step, floor = AttributedCounter(), AttributedCounter()
    floor.regions.append("frozen UNet")  # the floor's sources: its forward and its backward
    floor.backward_source = "frozen UNet"
    tagger = NodeTagger(step)

    def on_event(event):
        if event.kind != "step":
            return
        if event.step > 1:
            step.__exit__(None, None, None)
            tagger.__exit__(None, None, None)
        with without_hooks(host.unet), (floor if event.step > 1 else contextlib.nullcontext()):
            floor_times(host, size, 1)  # after step 1: a warm-up
        if event.step <= steps:
            tagger.__enter__()
            step.__enter__()

    with regions(step, tagger, host):
        run_config(host, size, steps + 1, rank, with_text_encoder, on_event, conv_dim=conv_dim)
    return step, floor


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--conv-dim", type=int, default=0, help="LoCon: also adapt the 3x3 convs at this rank")
    parser.add_argument("--with-text-encoder", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="trainer steps counted, each followed by a floor pass")
    args = parser.parse_args()
    host = StandaloneHost.from_file(CHECKPOINT, out_dir=Path("/tmp"))
    keep_freed_memory()  # as train() does on a CPU, before the first floor pass
    step, floor = paired_breakdown(host, args.size, args.rank, args.conv_dim, args.with_text_encoder, args.steps)
    counts = {source: Counter({name: n // args.steps for name, n in ops.items()}) for source, ops in step.counts.items()}
    floor_ops = Counter({name: n // args.steps for name, n in sum(floor.counts.values(), Counter()).items()})
    step_ms, floor_ms = (1000 * sum(c.seconds.values()) / args.steps for c in (step, floor))
    total = sum(sum(c.values()) for c in counts.values())
    print(f"per step, mean of {args.steps}: floor {sum(floor_ops.values())} ops ({views(floor_ops)} of them views), their own time "
          f"{floor_ms:.0f} ms; step {total} ({sum(map(views, counts.values()))} views), {step_ms:.0f} ms; ops ratio "
          f"{total / sum(floor_ops.values()):.2f}x, time ratio {step_ms / floor_ms:.3f}x")
    print("floor by source: " + ", ".join(f"{source} {1000 * seconds / args.steps:.0f} ms" for source, seconds in floor.seconds.most_common()))
    print("| source | ops | of which views (no kernel) | ms | share of the floor's ms |\n|---|---|---|---|---|")
    for source, ops in sorted(counts.items(), key=lambda kv: -step.seconds[kv[0]]):
        ms = 1000 * step.seconds[source] / args.steps
        print(f"| {source} | {sum(ops.values())} | {views(ops)} | {ms:.1f} | {ms / floor_ms:.1%} |")
    for source, ops in sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))[:12]:
        print(f"{source}: " + ", ".join(f"{name} {n}" for name, n in ops.most_common(14)))


if __name__ == "__main__":
    main()
