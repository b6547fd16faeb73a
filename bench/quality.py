"""Training quality of the demo LoRA on the embedded base model, by the strict analyzer.

    python bench/quality.py [--concept purple|star] [--train-seeds 1] [--concept-seeds 32] [--seeds 4] [--set KEY=VALUE ...]

Trains the demo LoRA (12 images of a concept the base never saw, trigger "zkz") with the demo
preset (`lib_lora.train.presets.DEMO`, overridable with --set). First it prints how well the base
draws each seen shape in its seen colours: a LoRA's new colour is drawn with the base's shapes, so
its squares stay near the base's own. Then, for each training seed:
- concept fidelity: share of images of "a zkz purple <shape>" (or "a <colour> zkz star") that
  show that concept, over 4 prompts x `--concept-seeds` seeds (the demo's own grid has only 4
  seeds, too few for a figure: one image moves it by 0.06);
- prior preservation: colour-and-shape accuracy on prompts the base model knows, with the LoRA at
  weight 1, as a ratio of the same without it (1.0 = the LoRA leaves the rest of the model alone).
Targets: fidelity >= 0.9 and preservation >= 0.9 in <= 600 steps on CPU. One training run is one
draw: between training seeds fidelity moves by up to +-0.03 (+-0.1 at batch 8), so compare settings with
`--train-seeds 3`, which trains seed, seed+1, seed+2 and prints the mean and the minimum too.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lora.demo.main_job import concept_prompts, measure, run_demo  # noqa: E402
from lib_lora.demo.world import SEEN_COLOURS, SEEN_SHAPES  # noqa: E402
from lib_lora.demo.tiny import DEFAULT_CHECKPOINT  # noqa: E402
from lib_lora.models.checkpoint import load_checkpoint  # noqa: E402
from lib_lora.train.config import TrainConfig  # noqa: E402


def base_prompts() -> list[tuple[str, str, str]]:
    """Every seen colour with every seen shape: what the LoRA must not break."""
    return [(f"a {c} {s}", c, s) for c in SEEN_COLOURS for s in SEEN_SHAPES]


def by_shape(fidelity) -> dict[str, float]:
    """Share right per seen shape over all seen colours: a LoRA's shapes stay near the base's own (squares 0.78 vs 0.75)."""
    return {shape: statistics.mean(fidelity.per_prompt[f"a {c} {shape}"] for c in SEEN_COLOURS) for shape in SEEN_SHAPES}


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE strings typed by TrainConfig's own coercion (so `lr_scheduler=cosine` and `network_dim=16` both work)."""
    values = dict(pair.split("=", 1) for pair in pairs)
    config = TrainConfig.from_dict(values)
    return {key: getattr(config, key) for key in values}


def train_and_measure(args, ckpt, changes: dict, concept_seeds, base_seeds):
    """Train one demo LoRA with `changes`; (fidelity with the trigger, base prompts with the LoRA, steps, seconds)."""
    with tempfile.TemporaryDirectory() as out:
        start, steps = time.perf_counter(), []
        result = run_demo(Path(out), concept=args.concept, checkpoint=args.checkpoint, config_changes=changes, on_event=lambda e: e.kind == "step" and steps.append(e.step), say=lambda *_: None)
        seconds = time.perf_counter() - start
        name, folder = result.lora_path.stem, [result.lora_path.parent]
        after = measure(ckpt, concept_prompts(args.concept), concept_seeds, lora=name, lora_dirs=folder)
        with_lora = measure(ckpt, base_prompts(), base_seeds, lora=name, lora_dirs=folder)
    return after, with_lora, max(steps), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", choices=("purple", "star"), default="purple")
    parser.add_argument("--checkpoint", type=Path, help="base model (default: the embedded one)")
    parser.add_argument("--concept-seeds", type=int, default=32, help="seeds per concept prompt for fidelity")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per base prompt for prior preservation")
    parser.add_argument("--train-seeds", type=int, default=1, help="LoRAs trained with seeds seed, seed+1, ...: one run is one draw")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override demo preset options")
    args = parser.parse_args()
    changes = parse_overrides(args.set)
    concept_seeds, base_seeds = [200 + i for i in range(args.concept_seeds)], [100 + i for i in range(args.seeds)]
    ckpt = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)
    before, base = measure(ckpt, concept_prompts(args.concept), concept_seeds), measure(ckpt, base_prompts(), base_seeds)
    print(f"preset overrides: {changes or 'none'}; base model: concept fidelity {before.concept:.2f}, base prompts {base.concept:.2f} ({len(base.images)} images)")
    print("  base prompts by shape (how well the base itself draws each shape): " + ", ".join(f"{shape} {share:.2f}" for shape, share in by_shape(base).items()))
    first_seed, fidelities, ratios = changes.get("seed", TrainConfig().seed), [], []
    for seed in range(first_seed, first_seed + args.train_seeds):
        after, with_lora, steps, seconds = train_and_measure(args, ckpt, {**changes, "seed": seed}, concept_seeds, base_seeds)
        ratio = with_lora.concept / base.concept if base.concept else float("nan")
        fidelities.append(after.concept)
        ratios.append(ratio)
        print(f"training seed {seed}: {steps} steps, training and the demo's grid {seconds:.0f} s")
        print(f"  concept fidelity with trigger: {after.concept:.2f} ({len(after.images)} images; right colour {after.colour:.2f})")
        print("  by prompt: " + ", ".join(f"{prompt!r} {share:.2f}" for prompt, share in after.per_prompt.items()))
        print(f"  prior preservation: base prompts {with_lora.concept:.2f} with the LoRA -> {ratio:.2f}x")
    if len(fidelities) > 1:
        print(f"mean over {len(fidelities)} training seeds: fidelity {statistics.mean(fidelities):.2f} (min {min(fidelities):.2f}), preservation {statistics.mean(ratios):.2f}x (min {min(ratios):.2f}x)")


if __name__ == "__main__":
    main()
