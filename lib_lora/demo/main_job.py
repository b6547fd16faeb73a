"""The main job: teach the embedded base model a concept it has never seen, then show before/after.

    python -m lib_lora demo

Builds a 12-image kohya-style dataset of a held-out concept ("zkz purple", or `--concept star`),
trains a LoRA on the embedded tiny model with the demo preset, and writes a grid of the same seeds
without and with `<lora:NAME:1>`, printing the strict analyzer's concept fidelity before and after.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..grid import image_grid
from ..models.checkpoint import Checkpoint
from ..models.pipeline import GenerationParams
from ..networks.apply import generate_with_loras
from .analyzer import analyze
from .dataset import concept_spec, make_lora_dataset
from .world import SEEN_COLOURS, SEEN_SHAPES, caption, sample_scene, render

TRIGGER = "zkz"
EVAL_SEEDS = (11, 22, 33, 44)


@dataclass(frozen=True)
class Fidelity:
    concept: float  # share of images that show the concept (strict analyzer)
    colour: float  # share whose colour is the prompted one
    images: list  # PIL images, prompt-major
    per_prompt: dict[str, float]  # prompt -> share of its images that show the concept
    analyses: list  # the analyzer's reading of each image (shape, colour, or why it was rejected)


def make_reg_dataset(out_dir: Path, n_images: int = 48, seed: int = 1000) -> Path:
    """Regularization images: the world's seen shapes and colours with their captions (`1_shapes/`)."""
    folder = Path(out_dir) / "1_shapes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        scene = sample_scene(rng, shapes=SEEN_SHAPES, colours=SEEN_COLOURS)
        render(scene).save(folder / f"reg_{i:03d}.png")
        (folder / f"reg_{i:03d}.txt").write_text(caption(scene, "short" if i % 2 else "full"))
    return Path(out_dir)


def concept_prompts(concept: str, trigger: str = TRIGGER) -> list[tuple[str, str, str]]:
    """(prompt, expected colour, expected shape) for the concept in several seen colours or shapes."""
    if concept == "star":
        return [(f"a {c} {trigger} star", c, "star") for c in ("red", "blue", "yellow", "green")]
    return [(f"a {trigger} purple {s}", "purple", s) for s in ("circle", "square", "triangle", "ring")]


def measure(ckpt: Checkpoint, prompts: list[tuple[str, str, str]], seeds, *, lora: str = "", lora_dirs=(), steps: int = 20) -> Fidelity:
    """Generate every prompt at every seed (optionally with `<lora:NAME:1>`) and score with the analyzer."""
    images, analyses, per_prompt, colour_hits = [], [], {}, 0
    for prompt, colour, shape in prompts:
        hits = 0
        for seed in seeds:
            text = f"{prompt} <lora:{lora}:1>" if lora else prompt
            (image,) = generate_with_loras(ckpt, GenerationParams(prompt=text, seed=seed, steps=steps, width=64, height=64), lora_dirs)
            result = analyze(image)
            hits += result.shape == shape and result.colour == colour
            colour_hits += result.colour == colour
            images.append(image)
            analyses.append(result)
        per_prompt[prompt] = hits / len(seeds)
    n = len(prompts) * len(seeds)
    return Fidelity(sum(per_prompt.values()) / len(prompts), colour_hits / n, images, per_prompt, analyses)


def fresh_name(folder: Path, stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`... so a rerun never overwrites an earlier LoRA."""
    name, n = stem, 1
    while (folder / f"{name}.safetensors").exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def before_after_grid(prompts, seeds, before: Fidelity, after: Fidelity, lora: str):
    per_prompt = len(seeds)
    rows, labels = [], []
    for i, (prompt, _, _) in enumerate(prompts):
        rows += [before.images[i * per_prompt : (i + 1) * per_prompt], after.images[i * per_prompt : (i + 1) * per_prompt]]
        labels += [prompt, f"+ <lora:{lora}:1>"]
    return image_grid(rows, labels, [f"seed {s}" for s in seeds], scale=2)


@dataclass
class DemoResult:
    lora_path: Path
    grid_path: Path
    before: Fidelity
    after: Fidelity


def run_demo(out_dir: Path, *, concept: str = "purple", checkpoint: Path | None = None, config_changes: dict | None = None,
             on_event: Callable | None = None, say=print, dataset_options: dict | None = None,
             regularization: bool = True) -> DemoResult:
    """Train the demo LoRA and measure it. `dataset_options` go to `make_lora_dataset` (light_share,
    shown) and `regularization=False` trains without the regularization folder, as a new user would:
    bench/quality.py's held-out variants."""
    from ..hosts.standalone import StandaloneHost
    from ..train.presets import demo_config
    from ..train.trainer import train

    concept_spec(concept)  # a clear error for an unknown concept before any work
    out_dir = Path(out_dir)
    host = StandaloneHost.from_file(checkpoint, out_dir=out_dir)
    name = fresh_name(host.lora_dir, f"demo-{concept}")
    data = make_lora_dataset(out_dir / "demo" / name / "data", concept=concept, trigger=TRIGGER, n_images=12, repeats=10, seed=0,
                             **(dataset_options or {}))
    reg = make_reg_dataset(out_dir / "demo" / name / "reg") if regularization else None
    config = replace(demo_config(data, reg, name, TRIGGER), **(config_changes or {}))
    prompts = concept_prompts(concept)
    say(f"Training LoRA {name!r} on {data} (concept {concept!r}, trigger {TRIGGER!r}) with the embedded base model")
    result = train(config, host, on_event=on_event)
    before = measure(host.ckpt, prompts, EVAL_SEEDS)
    after = measure(host.ckpt, prompts, EVAL_SEEDS, lora=name, lora_dirs=[host.lora_dir])
    grid_path = out_dir / "demo" / f"{name}-before-after.png"
    before_after_grid(prompts, EVAL_SEEDS, before, after, name).save(grid_path)
    say(f"concept fidelity (strict analyzer, {len(prompts) * len(EVAL_SEEDS)} images): before {before.concept:.2f}, after {after.concept:.2f}")
    say(f"LoRA: {result.final_path}\nbefore/after grid: {grid_path}")
    return DemoResult(result.final_path, grid_path, before, after)
