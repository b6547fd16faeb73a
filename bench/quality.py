"""Training quality of the demo LoRA on the embedded base model, by the strict analyzer.

    python bench/quality.py [--concept purple|star] [--concept-seeds 16] [--seeds 4] [--set KEY=VALUE ...]

Trains the demo LoRA (12 images of a concept the base never saw, trigger "zkz") with the demo
preset (`lib_lora.train.presets.DEMO`, overridable with --set), then prints:
- concept fidelity: share of images of "a zkz purple <shape>" (or "a <colour> zkz star") that
  show that concept, over 4 prompts x `--concept-seeds` seeds (the demo's own grid has only 4
  seeds, too few for a figure: one image moves it by 0.06);
- prior preservation: colour-and-shape accuracy on prompts the base model knows, with the LoRA at
  weight 1, as a ratio of the same without it (1.0 = the LoRA leaves the rest of the model alone).
Targets: fidelity >= 0.9 and preservation >= 0.9 in <= 600 steps on CPU.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lora.demo.main_job import concept_prompts, measure, run_demo  # noqa: E402
from lib_lora.demo.world import SEEN_COLOURS, SEEN_SHAPES  # noqa: E402
from lib_lora.train.config import TrainConfig  # noqa: E402


def base_prompts() -> list[tuple[str, str, str]]:
    """Every seen colour with every seen shape: what the LoRA must not break."""
    return [(f"a {c} {s}", c, s) for c in SEEN_COLOURS for s in SEEN_SHAPES]


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE strings typed by TrainConfig's own coercion (so `lr_scheduler=cosine` and `network_dim=16` both work)."""
    values = dict(pair.split("=", 1) for pair in pairs)
    config = TrainConfig.from_dict(values)
    return {key: getattr(config, key) for key in values}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", choices=("purple", "star"), default="purple")
    parser.add_argument("--checkpoint", type=Path, help="base model (default: the embedded one)")
    parser.add_argument("--concept-seeds", type=int, default=16, help="seeds per concept prompt for fidelity")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per base prompt for prior preservation")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override demo preset options")
    args = parser.parse_args()
    changes = parse_overrides(args.set)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        steps = []
        result = run_demo(Path(out), concept=args.concept, checkpoint=args.checkpoint, config_changes=changes, on_event=lambda e: e.kind == "step" and steps.append(e.step), say=lambda *_: None)
        train_s = time.perf_counter() - start
        from lib_lora.hosts.standalone import StandaloneHost

        host = StandaloneHost.from_file(args.checkpoint, out_dir=Path(out))
        seeds = [100 + i for i in range(args.seeds)]
        name = result.lora_path.stem
        concept_seeds = [200 + i for i in range(args.concept_seeds)]
        before = measure(host.ckpt, concept_prompts(args.concept), concept_seeds)
        after = measure(host.ckpt, concept_prompts(args.concept), concept_seeds, lora=name, lora_dirs=[result.lora_path.parent])
        base = measure(host.ckpt, base_prompts(), seeds)
        with_lora = measure(host.ckpt, base_prompts(), seeds, lora=name, lora_dirs=[result.lora_path.parent])
    print(f"preset overrides: {changes or 'none'}; {max(steps)} steps; train + evaluation {train_s:.0f} s")
    print(f"concept fidelity with trigger: before {before.concept:.2f}, after {after.concept:.2f} ({len(after.images)} images)")
    print("  by prompt: " + ", ".join(f"{prompt!r} {share:.2f}" for prompt, share in after.per_prompt.items()))
    ratio = with_lora.concept / base.concept if base.concept else float("nan")
    print(f"prior preservation: base prompts {base.concept:.2f} without LoRA, {with_lora.concept:.2f} with it -> {ratio:.2f}x ({len(base.images)} images each)")


if __name__ == "__main__":
    main()
