"""After training: an epoch x weight comparison grid, and keeping the chosen epoch's file.

Cells are rendered by `host.generate`, whose contract is to resolve `<lora:name:w>` tags (the
webui's own generation parses them; the standalone host goes through `generate_with_loras` with
its Lora folder). No Gradio here.
"""

import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from ..atomic import require_free_space, write_bytes_atomically
from ..grid import image_grid
from ..models.pipeline import GenerationParams
from ..networks.files import card_paths

DEFAULT_WEIGHTS = (0.4, 0.7, 1.0)


@dataclass(frozen=True)
class EpochFile:
    label: str  # "epoch 2", "step 500", "final"
    path: Path
    order: tuple[int, int]  # sorts epochs by number, step saves by step, the final file last


def epoch_files(folder: Path, name: str) -> list[EpochFile]:
    """The run's saved files in `folder`: `<name>-000002`, `<name>-step00000500`, then `<name>` itself."""
    pattern = re.compile(rf"^{re.escape(name)}-(?:(\d{{6}})|step(\d{{8}}))$")
    found = []
    for path in Path(folder).glob(f"{name}*.safetensors") if Path(folder).is_dir() else ():
        match = pattern.match(path.stem)
        if path.stem == name:
            found.append(EpochFile("final", path, (2, 0)))
        elif match and match.group(1):
            found.append(EpochFile(f"epoch {int(match.group(1))}", path, (0, int(match.group(1)))))
        elif match:
            found.append(EpochFile(f"step {int(match.group(2))}", path, (1, int(match.group(2)))))
    return sorted(found, key=lambda f: f.order)


def parse_weights(text: str) -> tuple[float, ...]:
    """"0.4, 0.7, 1" -> (0.4, 0.7, 1.0); an error names the bad entry."""
    weights = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        try:
            weights.append(float(part))
        except ValueError:
            raise ValueError(f"weights: {part!r} is not a number; write e.g. 0.4, 0.7, 1.0") from None
    if not weights:
        raise ValueError("weights: give at least one, e.g. 0.4, 0.7, 1.0")
    return tuple(weights)


def lora_prompt(prompt: str, stem: str, weight: float) -> str:
    return f"{prompt} <lora:{stem}:{weight:g}>".strip()


def comparison_grid(generate: Callable[[GenerationParams], list[Image.Image]], files: Sequence[EpochFile], weights: Sequence[float],
                    params: GenerationParams, progress: Callable[[int, int], None] | None = None) -> Image.Image:
    """Rows = saved files, columns = weights; every cell the same prompt and seed."""
    if not files:
        raise ValueError("no saved LoRA files to compare: train first (save_every_n_epochs gives one file per epoch)")
    rows, total = [], len(files) * len(weights)
    for r, file in enumerate(files):
        row = []
        for c, weight in enumerate(weights):
            row.append(generate(replace(params, prompt=lora_prompt(params.prompt, file.path.stem, weight), batch_size=1))[0])
            if progress:
                progress(r * len(weights) + c + 1, total)
        rows.append(row)
    scale = max(1, 192 // max(params.width, params.height))
    return image_grid(rows, [f.label for f in files], [f"weight {w:g}" for w in weights], scale=scale)


@dataclass
class KeepResult:
    path: Path
    deleted: list[Path]
    message: str


def _copy_no_overwrite(source: Path, target: Path, replace_existing: bool) -> None:
    """Copy via a temporary file in the target folder, then an atomic rename (or link, which never overwrites)."""
    require_free_space(target.parent, source.stat().st_size, f"a copy of {source.name} as {target.name}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(source, tmp)
        if replace_existing:
            os.replace(tmp, target)
        else:
            _link_or_rename(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _link_or_rename(tmp: Path, target: Path) -> None:
    """A hard link never replaces an existing name, even one taken a moment ago; rename where links don't exist."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise ValueError(f"{target.name} appeared meanwhile; nothing was overwritten") from None
    except OSError:  # no hard links on this filesystem (FAT, some network shares)
        if target.exists():
            raise ValueError(f"{target.name} already exists; nothing was overwritten") from None
        os.replace(tmp, target)


def keep_epoch(chosen: Path, final: Path, *, replace_existing: bool = False, delete: Sequence[Path] = ()) -> KeepResult:
    """Make `chosen` the LoRA at `final` (atomic; an existing file only with `replace_existing`).

    The card (`.json`) and preview of the run's final file are copied along when `final` has none.
    `delete` lists the epoch files to remove afterwards (the tab passes them only when asked).
    """
    chosen, final = Path(chosen), Path(final)
    if chosen.resolve() == final.resolve():
        raise ValueError(f"{chosen.name} already is the final file")
    if not chosen.is_file():
        raise ValueError(f"{chosen} does not exist")
    if final.exists() and not replace_existing:
        raise ValueError(f"{final.name} already exists: tick 'replace the existing file' or choose another name")
    _copy_no_overwrite(chosen, final, replace_existing)
    _copy_card(chosen, final)
    deleted = []
    for path in delete:
        path = Path(path)
        if path.resolve() != final.resolve() and path.is_file():
            path.unlink()
            deleted.append(path)
    note = f"; deleted {len(deleted)} epoch file(s)" if deleted else ""
    return KeepResult(final, deleted, f"kept {chosen.name} as {final.name}{note}")


def _copy_card(chosen: Path, final: Path) -> None:
    """The run's card is written beside `<output_name>.safetensors`; reuse it for a new final name."""
    run_name = re.sub(r"-(\d{6}|step\d{8})$", "", chosen.stem)
    for source, target in zip(card_paths(chosen.with_name(run_name + chosen.suffix)), card_paths(final)):
        if source.is_file() and not target.exists():
            write_bytes_atomically(target, source.read_bytes())
