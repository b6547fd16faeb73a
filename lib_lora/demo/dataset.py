"""The LoRA demo's training set: one held-out concept of the synthetic world, with a trigger word.

Written in kohya's folder layout (`<repeats>_<trigger>/img_000.png` + `img_000.txt`), the same
layout a user's own dataset has, so the demo exercises the ordinary data path.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .world import (CAPTION_STYLES, HELD_OUT_COLOURS, HELD_OUT_SHAPES, SEEN_COLOURS, SEEN_SHAPES,
                    describe, render, sample_scene)


class DemoDatasetError(FileExistsError):
    """The demo dataset would be written over existing files, or was asked for nonsense."""


@dataclass(frozen=True)
class Concept:
    """What the images of a held-out concept may contain and which caption word it names."""

    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    part: str  # the Description field the trigger word is put in front of: "shape" or "colour"


def concept_spec(concept: str) -> Concept:
    """A held-out shape in seen colours, or seen shapes in a held-out colour: the images show the
    new concept next to things the base model already knows."""
    if concept in HELD_OUT_SHAPES:
        return Concept((concept,), SEEN_COLOURS, "shape")
    if concept in HELD_OUT_COLOURS:
        return Concept(SEEN_SHAPES, (concept,), "colour")
    held_out = HELD_OUT_SHAPES + HELD_OUT_COLOURS
    raise ValueError(f"unknown demo concept {concept!r}; the held-out concepts are {held_out}")


def make_lora_dataset(out_dir, concept: str = "star", trigger: str = "zkz", n_images: int = 12,
                      repeats: int = 10, seed: int = 0, size: int = 64,
                      overwrite: bool = False, light_share: float = 0.0,
                      shown: tuple[str, ...] = ()) -> Path:
    """Write `n_images` seeded images of `concept` to `out_dir/<repeats>_<trigger>/` and return
    `out_dir` (the folder a trainer takes as its dataset).

    Captions put the trigger before the concept word: "a red zkz star on the left", "a zkz purple
    circle". The images take the concept's shapes (or colours) in turn, as a curated dataset shows
    its subject in every setting: 12 random draws can leave a shape with one example, which the
    LoRA then draws badly. A non-empty `out_dir` is refused unless `overwrite=True`, which
    replaces the image folder and leaves anything else in `out_dir` alone.
    `light_share` of the images get light backgrounds (world.sample_scene); `shown` narrows the
    shapes (or colours) the concept is shown with, e.g. a new colour on circles and triangles only.
    """
    spec = _narrowed(concept_spec(concept), shown)
    _check_arguments(trigger, n_images, repeats)
    out_dir = Path(out_dir)
    folder = out_dir / f"{repeats}_{trigger}"
    _prepare(out_dir, folder, overwrite)
    rng = np.random.default_rng(seed)
    for index in range(n_images):
        scene = sample_scene(rng, _in_turn(spec.shapes, index), _in_turn(spec.colours, index), light_share=light_share)
        description = describe(scene)
        marked = replace(description, **{spec.part: f"{trigger} {getattr(description, spec.part)}"})
        stem = folder / f"img_{index:03d}"
        render(scene, size).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(marked.text(str(rng.choice(CAPTION_STYLES))) + "\n")
    return out_dir


def _narrowed(spec: Concept, shown: tuple[str, ...]) -> Concept:
    """`spec` with the other part (shapes of a colour concept, colours of a shape one) limited to `shown`."""
    if not shown:
        return spec
    other = "shapes" if spec.part == "colour" else "colours"
    unknown = [name for name in shown if name not in getattr(spec, other)]
    if unknown:
        raise ValueError(f"cannot show the concept with {unknown}; its {other} are {getattr(spec, other)}")
    return replace(spec, **{other: tuple(shown)})


def _in_turn(options: tuple[str, ...], index: int) -> tuple[str]:
    """The one option image `index` shows, cycling through all of them."""
    return (options[index % len(options)],)


def _check_arguments(trigger: str, n_images: int, repeats: int) -> None:
    if not trigger or any(c.isspace() or c in "/\\" for c in trigger):
        raise ValueError(f"trigger {trigger!r} must be one non-empty word without slashes")
    if n_images < 1 or repeats < 1:
        raise ValueError(f"n_images ({n_images}) and repeats ({repeats}) must be at least 1")


def _prepare(out_dir: Path, folder: Path, overwrite: bool) -> None:
    """Create the image folder, refusing to mix with existing files unless told to replace them."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DemoDatasetError(f"{out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise DemoDatasetError(
                f"{out_dir} is not empty; pick an empty folder or pass overwrite=True "
                f"to replace {folder.name}/ in it")
        if folder.exists():
            shutil.rmtree(folder)
    folder.mkdir(parents=True)
