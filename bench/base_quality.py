"""python bench/base_quality.py [--checkpoint lib_lora/demo/assets/tiny-sd.safetensors] [--seeds 8] [--cfg 7] [--sampler euler_a] [--sheet /tmp/base_quality.png]

How well the embedded tiny base draws what it was trained on, and that it does not draw what LoRA
demos will teach. Every seen colour x seen shape prompt ("a red circle") and a set of held-out
prompts ("a star", "a purple circle", ...) are generated with `--seeds` seeds each at the generate
CLI's defaults (euler_a, 20 steps, 64x64; cfg and sampler as given) and read by the strict analyzer. Prints:
- colour accuracy: seen-prompt images whose colour is read as the prompt's;
- colour+shape accuracy: ... whose colour and shape are both read as the prompt's;
- held-out rate: held-out-prompt images read as a star or as purple (should be near zero);
- light backgrounds: seen-prompt images whose border is light (the world has both since the base's
  second build; the prompts do not say which, so the seed chooses);
and writes a contact sheet (one row per prompt) to look at.
"""
import argparse
import sys

import numpy as np
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lora.demo.analyzer import Analysis, analyze  # noqa: E402
from lib_lora.demo.tiny import DEFAULT_CHECKPOINT, IMAGE_SIZE  # noqa: E402
from lib_lora.demo.world import HELD_OUT_COLOURS, HELD_OUT_SHAPES, SEEN_COLOURS, SEEN_SHAPES  # noqa: E402
from lib_lora.models.checkpoint import load_checkpoint  # noqa: E402
from lib_lora.models.pipeline import GenerationParams, generate  # noqa: E402
from lib_lora.models.samplers import SAMPLERS  # noqa: E402

SEEN = [(colour, shape) for colour in SEEN_COLOURS for shape in SEEN_SHAPES]
HELD_OUT_PROMPTS = [f"a {s}" for s in HELD_OUT_SHAPES] + [f"a {c} {s}" for c in ("red", "blue", "yellow") for s in HELD_OUT_SHAPES]
HELD_OUT_PROMPTS += [f"a {c} {s}" for c in HELD_OUT_COLOURS for s in SEEN_SHAPES]
LABEL_WIDTH = 150
ROWS_PER_PANEL = 20
LIGHT_BORDER = 140  # mean grey level of a 3 px border above which a background counts as light


def has_light_background(image: Image.Image) -> bool:
    pixels = np.asarray(image, dtype=np.float32)
    border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3), pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)])
    return float(border.mean()) > LIGHT_BORDER


def read_prompt(ckpt, prompt: str, args) -> tuple[list[Image.Image], list[Analysis]]:
    """`args.seeds` images of one prompt (seeds first_seed, first_seed + 1, ... in one batch) and their readings."""
    params = GenerationParams(
        prompt=prompt, cfg_scale=args.cfg, seed=args.first_seed, width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=args.seeds,
        sampler=args.sampler,
    )
    images = generate(ckpt, params)
    readings = [analyze(image) for image in images]
    print(f"{prompt:24} " + " ".join(f"{a.colour or '-'}/{a.shape or '-'}" for a in readings), flush=True)
    return images, readings


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], path: Path) -> None:
    """One labelled row of images per prompt, in panels of ROWS_PER_PANEL rows side by side."""
    columns = max(len(images) for _, images in rows)
    panel_width = LABEL_WIDTH + columns * IMAGE_SIZE
    panels = -(-len(rows) // ROWS_PER_PANEL)
    sheet = Image.new("RGB", (panels * panel_width, min(len(rows), ROWS_PER_PANEL) * IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, images) in enumerate(rows):
        x, y = (r // ROWS_PER_PANEL) * panel_width, (r % ROWS_PER_PANEL) * IMAGE_SIZE
        draw.text((x + 4, y + IMAGE_SIZE // 2 - 6), prompt, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image, (x + LABEL_WIDTH + c * IMAGE_SIZE, y))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt (32 seen prompts: 256 images)")
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--cfg", type=float, default=GenerationParams.cfg_scale)
    parser.add_argument("--sampler", choices=SAMPLERS, default=GenerationParams.sampler)
    parser.add_argument("--sheet", type=Path, default=Path("/tmp/base_quality.png"))
    args = parser.parse_args()
    start = time.monotonic()
    ckpt = load_checkpoint(args.checkpoint)
    seen = {(colour, shape): read_prompt(ckpt, f"a {colour} {shape}", args) for colour, shape in SEEN}
    held_out = {prompt: read_prompt(ckpt, prompt, args) for prompt in HELD_OUT_PROMPTS}
    seen_readings = [(colour, shape, a) for (colour, shape), (_, readings) in seen.items() for a in readings]
    colour_right = sum(a.colour == colour for colour, _, a in seen_readings)
    both_right = sum(a.colour == colour and a.shape == shape for colour, shape, a in seen_readings)
    held_out_readings = [a for _, readings in held_out.values() for a in readings]
    drawn = sum(a.shape in HELD_OUT_SHAPES or a.colour in HELD_OUT_COLOURS for a in held_out_readings)
    light = sum(has_light_background(image) for images, _ in seen.values() for image in images)
    rows = [(f"a {c} {s}", images) for (c, s), (images, _) in seen.items()] + [(p, im) for p, (im, _) in held_out.items()]
    contact_sheet(rows, args.sheet)
    n_seen, n_held = len(seen_readings), len(held_out_readings)
    print(f"\n{args.checkpoint.name}: {args.sampler}, {GenerationParams.steps} steps, cfg {args.cfg}, {IMAGE_SIZE}x{IMAGE_SIZE}")
    print(f"colour accuracy        {colour_right / n_seen:.3f}  ({colour_right}/{n_seen} seen-prompt images)")
    print(f"colour+shape accuracy  {both_right / n_seen:.3f}  ({both_right}/{n_seen})")
    print(f"held-out rate          {drawn / n_held:.3f}  ({drawn}/{n_held} held-out-prompt images read as star or purple)")
    print(f"light backgrounds      {light / n_seen:.3f}  ({light}/{n_seen} seen-prompt images)")
    print(f"contact sheet: {args.sheet}; {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
