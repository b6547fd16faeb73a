"""What a host application tells the tab: where presets live, defaults, captioners, the lock."""

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class TabSettings:
    # Folder of the user's presets (`*.toml`); None hides saving.
    presets_dir: Path | None = None
    # TrainConfig overrides for the widgets' first values (e.g. presets.DEMO for the embedded 64 px model).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Where finished LoRAs are looked up for the comparison grid when no run has happened in this
    # session; None asks the host (which builds it: avoid where that is slow).
    lora_dir: Path | None = None
    # Where run folders and the training queue (`<runs_dir>/queue/`) live; None asks the host (as lora_dir).
    runs_dir: Path | None = None
    # Folders the Tools' LoRA pickers list besides the Lora output folder (the webui: its Lora folder).
    tool_lora_dirs: tuple[Path, ...] = ()
    # Folders the Tools' checkpoint pickers list (extract, bake); bake writes into the first. Empty: no checkpoint tools.
    checkpoint_dirs: tuple[Path, ...] = ()
    # The folders datasets may be read from and written beside (roots.py); empty = any folder. The webui's
    # --train-lora-dataset-root, the standalone app's --dataset-root.
    dataset_roots: tuple[Path, ...] = ()
    # Image captioners the host offers, by name (the webui: BLIP, deepbooru); empty = captioning disabled.
    captioners: Mapping[str, Callable[[Image.Image], str]] = field(default_factory=dict)
    # Held around everything that uses the model: training, the comparison grid, captioning.
    # The webui passes its `modules.call_queue.queue_lock` (a factory returning it).
    job_lock: Callable[[], AbstractContextManager] = nullcontext
    # How often the running tab refreshes progress, seconds.
    poll_seconds: float = 1.0
    # Prefix of every elem_id (the webui's CSS and JS find the tab's parts by it).
    elem_prefix: str = "train_lora"
