"""Training quality of the demo LoRA on the embedded base model, by the strict analyzer.

    python bench/quality.py [--concept purple|star] [--variant NAME|held-out|all] [--train-seeds 1] [--concept-seeds 32]
                            [--seeds 4] [--set KEY=VALUE ...] [--pivotal [--init-word WORD] [--embedding-lr LR] [--vectors N]]
                            [--grids DIR]

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
`--variant` trains on a dataset other than the demo's (`VARIANTS`): the preset was tuned on the demo's own
dataset only, so the held-out variants (other backgrounds, the concept shown with fewer shapes, no
regularization folder as a new user has none) say whether it holds on data it was not tuned on; `held-out`
runs them all and `all` the demo's too, each reported on its own line and summarised per group.
The star, a new shape, is learnt by the UNet's convs and needs their lr raised (`--set learning_rate=4e-3`:
fidelity 0.59-0.68 over three training seeds, at a cost to the base's other polygons; RESULTS.md). `--pivotal`
adds pivotal tuning: the trigger "zkz" gets an embedding of its own, learnt with the LoRA and
bundled in its file, which the measurement's `<lora:NAME:1>` brings into the prompts (as in the webui).
Each run also prints what the analyzer read in the images (shapes, rejection reasons); `--grids DIR` saves
the concept images, a row per prompt, to look at what the figures count.
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lora.demo.main_job import concept_prompts, measure, run_demo  # noqa: E402
from lib_lora.grid import image_grid  # noqa: E402
from lib_lora.demo.world import SEEN_COLOURS, SEEN_SHAPES  # noqa: E402
from lib_lora.demo.tiny import DEFAULT_CHECKPOINT  # noqa: E402
from lib_lora.models.checkpoint import load_checkpoint  # noqa: E402
from lib_lora.train.config import TrainConfig  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """A demo dataset: `dataset` options of make_lora_dataset, with or without the regularization folder."""

    dataset: dict = field(default_factory=dict)
    regularization: bool = True
    tuned: bool = False  # the preset was tuned on it; the others are held out of the tuning


VARIANTS = {
    "demo": Variant(tuned=True),
    "no-reg": Variant(regularization=False),
    "light": Variant(dataset={"light_share": 1.0}, regularization=False),
    "mixed-light": Variant(dataset={"light_share": 0.5}),
    "two-shapes": Variant(dataset={"shown": ("circle", "triangle")}, regularization=False),
}


def chosen_variants(name: str) -> list[str]:
    if name == "all":
        return list(VARIANTS)
    if name == "held-out":
        return [key for key, variant in VARIANTS.items() if not variant.tuned]
    return [name]


def base_prompts() -> list[tuple[str, str, str]]:
    """Every seen colour with every seen shape: what the LoRA must not break."""
    return [(f"a {c} {s}", c, s) for c in SEEN_COLOURS for s in SEEN_SHAPES]


def by_shape(fidelity) -> dict[str, float]:
    """Share right per seen shape over all seen colours: a LoRA's shapes stay near the base's own (squares 0.78 vs 0.75)."""
    return {shape: statistics.mean(fidelity.per_prompt[f"a {c} {shape}"] for c in SEEN_COLOURS) for shape in SEEN_SHAPES}


def readings(fidelity) -> str:
    """What the analyzer read in the images, shapes and rejection reasons counted: why a figure is low."""
    results = fidelity.analyses
    shapes = Counter(r.shape or "rejected" for r in results)
    reasons = Counter(r.reason.split(":")[0] for r in results if r.shape is None)
    return (f"read as: {', '.join(f'{k} {n}' for k, n in shapes.most_common())}; rejected for: "
            f"{', '.join(f'{k} {n}' for k, n in reasons.most_common(4)) or 'none'}")


def save_grid(path: Path, fidelity, concept: str) -> None:
    """The concept prompts' images with the LoRA, a row per prompt (to look at what the figures count)."""
    prompts = concept_prompts(concept)
    per_row = len(fidelity.images) // len(prompts)
    rows = [fidelity.images[i * per_row : (i + 1) * per_row] for i in range(len(prompts))]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, [p for p, _, _ in prompts], [""] * per_row, scale=2).save(path)
    print(f"  images: {path}")


def parse_overrides(pairs: list[str], pivotal: dict | None = None) -> dict:
    """KEY=VALUE strings typed by TrainConfig's own coercion (so `lr_scheduler=cosine` and `network_dim=16` both work),
    plus the pivotal-tuning options of the flags (checked with the demo's trigger word)."""
    values = dict(pair.split("=", 1) for pair in pairs) | (pivotal or {})
    config = TrainConfig.from_dict(values | ({"trigger_words": "zkz"} if pivotal else {}))
    return {key: getattr(config, key) for key in values}


def pivotal_options(args) -> dict:
    """TrainConfig values of --pivotal, --init-word, --embedding-lr and --vectors (none without --pivotal)."""
    if not args.pivotal:
        return {}
    options = {"pivotal_tuning": True, "num_vectors_per_token": args.vectors}
    options |= {"init_word": args.init_word} if args.init_word is not None else {}
    return options | ({"embedding_lr": args.embedding_lr} if args.embedding_lr is not None else {})


def train_and_measure(args, ckpt, variant: Variant, changes: dict, concept_seeds, base_seeds):
    """Train one demo LoRA with `changes`; (fidelity with the trigger, base prompts with the LoRA, steps, seconds)."""
    with tempfile.TemporaryDirectory() as out:
        start, steps = time.perf_counter(), []
        result = run_demo(Path(out), concept=args.concept, checkpoint=args.checkpoint, config_changes=changes,
                          on_event=lambda e: e.kind == "step" and steps.append(e.step), say=lambda *_: None,
                          dataset_options=variant.dataset, regularization=variant.regularization)
        seconds = time.perf_counter() - start
        name, folder = result.lora_path.stem, [result.lora_path.parent]
        after = measure(ckpt, concept_prompts(args.concept), concept_seeds, lora=name, lora_dirs=folder)
        with_lora = measure(ckpt, base_prompts(), base_seeds, lora=name, lora_dirs=folder)
    return after, with_lora, max(steps), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", choices=("purple", "star"), default="purple")
    parser.add_argument("--checkpoint", type=Path, help="base model (default: the embedded one)")
    parser.add_argument("--variant", choices=(*VARIANTS, "held-out", "all"), default="demo", help="the dataset to train on (see VARIANTS)")
    parser.add_argument("--concept-seeds", type=int, default=32, help="seeds per concept prompt for fidelity")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per base prompt for prior preservation")
    parser.add_argument("--train-seeds", type=int, default=1, help="LoRAs trained with seeds seed, seed+1, ...: one run is one draw")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override demo preset options (repeatable)")
    parser.add_argument("--pivotal", action="store_true", help="also learn the trigger's embedding (pivotal tuning), bundled in the LoRA")
    parser.add_argument("--init-word", help="word the trigger's embedding starts from (default: TrainConfig's, '*')")
    parser.add_argument("--embedding-lr", type=float, help="the embedding's learning rate (default: TrainConfig's embedding_lr)")
    parser.add_argument("--vectors", type=int, default=1, help="vectors of the trigger's embedding (num_vectors_per_token)")
    parser.add_argument("--grids", type=Path, help="folder to save each run's concept images in, a row per prompt")
    args = parser.parse_args()
    changes = parse_overrides(args.set, pivotal_options(args))
    concept_seeds, base_seeds = [200 + i for i in range(args.concept_seeds)], [100 + i for i in range(args.seeds)]
    ckpt = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)
    before, base = measure(ckpt, concept_prompts(args.concept), concept_seeds), measure(ckpt, base_prompts(), base_seeds)
    print(f"preset overrides: {changes or 'none'}; base model: concept fidelity {before.concept:.2f}, base prompts {base.concept:.2f} ({len(base.images)} images)")
    print("  base prompts by shape (how well the base itself draws each shape): " + ", ".join(f"{shape} {share:.2f}" for shape, share in by_shape(base).items()))
    first_seed, summaries = changes.get("seed", TrainConfig().seed), []
    for name in chosen_variants(args.variant):
        fidelities, ratios = [], []
        for seed in range(first_seed, first_seed + args.train_seeds):
            after, with_lora, steps, seconds = train_and_measure(args, ckpt, VARIANTS[name], {**changes, "seed": seed}, concept_seeds, base_seeds)
            ratio = with_lora.concept / base.concept if base.concept else float("nan")
            fidelities.append(after.concept)
            ratios.append(ratio)
            print(f"variant {name}, training seed {seed}: {steps} steps, training and the demo's grid {seconds:.0f} s")
            print(f"  concept fidelity with trigger: {after.concept:.2f} ({len(after.images)} images; right colour {after.colour:.2f})")
            print("  by prompt: " + ", ".join(f"{prompt!r} {share:.2f}" for prompt, share in after.per_prompt.items()))
            print("  " + readings(after))
            if args.grids:
                save_grid(args.grids / f"{args.concept}-{name}-seed{seed}.png", after, args.concept)
            print(f"  prior preservation: base prompts {with_lora.concept:.2f} with the LoRA -> {ratio:.2f}x; by shape: "
                  + ", ".join(f"{shape} {share:.2f}" for shape, share in by_shape(with_lora).items()), flush=True)
            print("  base prompts with the LoRA " + readings(with_lora), flush=True)
        group = "tuned on" if VARIANTS[name].tuned else "held out"
        summaries.append(f"{name:<12} ({group}) over {len(fidelities)} training seeds: fidelity mean {statistics.mean(fidelities):.2f} "
                         f"(min {min(fidelities):.2f}), preservation mean {statistics.mean(ratios):.2f}x (min {min(ratios):.2f}x)")
    print("\n".join(["summary:", *summaries]))

if __name__ == "__main__":
    main()
