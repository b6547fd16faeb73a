"""Regularization images drawn by the base model itself, for a dataset that comes without any.

DreamBooth's prior preservation (diffusers' `--with_prior_preservation --num_class_images`): next to
the concept's images, the LoRA trains on what the base already draws for the same captions with the
trigger words left out, so that it learns what the trigger adds and leaves the rest of each prompt
to the base. Without them, a new user's LoRA takes over every prompt (bench/quality.py's `no-reg`
variant). The images go to the run folder in kohya's layout (`<run>/class_images/1_class/`), each with
its caption, and are reused when the run is resumed.
"""

from collections.abc import Callable
from pathlib import Path

from ..atomic import write_atomically, write_bytes_atomically
from ..data.captions import without_words
from ..models.pipeline import GenerationParams
from .config import TrainConfig

FOLDER, SUBSET = "class_images", "1_class"
STEPS = 20  # the webui's txt2img default


def class_prompts(captions: list[str], trigger_words: str, count: int) -> list[str]:
    """`count` prompts: the training captions in turn, trigger words left out."""
    stripped = [without_words(caption, trigger_words) for caption in captions]
    return [stripped[index % len(stripped)] for index in range(count)]


def make_class_images(host, config: TrainConfig, captions: list[str], reg_dir: Path,
                      on_progress: Callable[[int, int], None] = lambda done, total: None) -> None:
    """Draw the run's class images with the host's model as it is (no LoRA yet) into `reg_dir`, a
    regularization folder to train on. Image i has seed `config.seed + i`; one already there is kept."""
    folder = reg_dir / SUBSET
    folder.mkdir(parents=True, exist_ok=True)
    width, height = config.resolution
    prompts = class_prompts(captions, config.trigger_words, config.num_class_images)
    for index, prompt in enumerate(prompts):
        image_path = folder / f"class_{index:05d}.png"
        if not image_path.exists():
            params = GenerationParams(prompt=prompt, steps=STEPS, cfg_scale=config.class_images_cfg_scale, seed=config.seed + index, width=width,
                                      height=height, clip_skip=config.clip_skip)
            (image,) = host.generate(params)
            write_bytes_atomically(image_path.with_suffix(config.caption_extension), prompt.encode())
            write_atomically(image_path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        on_progress(index + 1, len(prompts))
