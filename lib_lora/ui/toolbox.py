"""The tab's Tools section as plain methods over widget values (no Gradio here): inspect, blend, resize,
extract and bake (`lib_lora.tools`) on files picked from the host's folders.

Files are picked by their path inside a listed folder (the webui's Lora folder, its Stable-diffusion
folder), never typed as a path, so the section reads nothing outside those folders. Outputs are named
by a plain file stem and go to the Lora output folder (bake: the first checkpoint folder); an existing
file is refused by name, never replaced. Extract and bake load whole checkpoints, the memory a run
needs, so they take the model's turn (`TabController.use_model`) and are refused while training.
A bad field raises ToolError naming the field by its label in the tab.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from pathlib import Path

import torch

from ..networks.files import LORA_SUFFIXES, SAVE_DTYPES
from ..tools import RankRule, ToolError, ToolResult, bake_loras, blend_loras, extract_lora, format_report, inspect_lora, resize_lora
from ..tools.common import Progress, no_progress
from ..train.names import ALLOWED, name_problem
from .controller import TabController

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
SUFFIX = ".safetensors"
AS_INPUT = "as the input"
PRECISIONS = (AS_INPUT, "fp16", "bf16", "fp32")
# Resize rules as the tab offers them -> RankRule's field (None: a fixed rank).
RESIZE_RULES = {"fixed rank": None, "Frobenius norm kept (sv_fro)": "fro", "singular-value sum kept (sv_cumulative)": "energy",
                "ratio to the largest value (sv_ratio)": "ratio"}
MODULES_SHOWN = 400  # report rows; an SDXL LoCon has about 1,100 modules


def listed_files(folders: Iterable[Path], suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Label (path inside its folder, with /) -> file, over the folders that exist; the first folder wins a label."""
    found: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            label = path.relative_to(folder).as_posix()
            if path.suffix in suffixes and path.is_file() and not path.name.startswith(".") and label not in found:
                found[label] = path
    return found


def parse_weights(text: str, count: int, field: str) -> list[float]:
    """One weight per chosen file, comma-separated; empty means 1 for each."""
    if not (text or "").strip():
        return [1.0] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ToolError(f"{field}: {text!r} is not a list of numbers such as 1, 0.5") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise ToolError(f"{field}: give {count} finite number(s), one per chosen file in their order; got {text!r}")
    return weights


def whole_number(value, field: str, *, optional: bool = False) -> int | None:
    """A positive integer from a Number widget; an `optional` one is None when 0 or empty (Gradio 3 sends 0 for empty)."""
    if value is None or value == "" or (optional and value == 0):
        if optional:
            return None
        raise ToolError(f"{field}: give a positive whole number")
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value == int(value) and value >= 1):
        raise ToolError(f"{field}: {value!r} is not a positive whole number")
    return int(value)


def save_dtype(precision: str) -> torch.dtype | None:
    return None if precision in (None, "", AS_INPUT) else SAVE_DTYPES[precision]


@dataclass(frozen=True)
class ToolOutput:
    """What a tool wrote and the HTML the tab shows: a note naming the file, and the per-module report."""

    path: Path
    note: str
    report: str


class Toolbox:
    """The Tools section's actions; folders come from the controller's settings (else its Lora folder)."""

    def __init__(self, controller: TabController):
        self.c = controller

    # --- folders and pickers
    def lora_folders(self, *, ask: bool = True) -> list[Path]:
        """The listed Lora folders and the output folder; without `ask`, not the host's (the tab's build makes no host)."""
        given = list(self.c.settings.tool_lora_dirs)
        output = self.c.lora_dir(ask=ask)
        return given + ([output] if output is not None and output not in given else [])

    def checkpoint_folders(self) -> list[Path]:
        return list(self.c.settings.checkpoint_dirs)

    def loras(self, *, ask: bool = True) -> dict[str, Path]:
        return listed_files(self.lora_folders(ask=ask), LORA_SUFFIXES)

    def checkpoints(self) -> dict[str, Path]:
        return listed_files(self.checkpoint_folders(), CHECKPOINT_SUFFIXES)

    def _pick(self, label: str, files: dict[str, Path], field: str, folders: list[Path]) -> Path:
        if not label:
            raise ToolError(f"{field}: choose a file")
        if label not in files:
            where = ", ".join(str(f) for f in folders) or "no folder"
            raise ToolError(f"{field}: {label!r} is not a file in {where}; open the list again (it refreshes) and pick one")
        return files[label]

    def _lora(self, label: str, field: str) -> Path:
        return self._pick(label, self.loras(), field, self.lora_folders())

    def _checkpoint(self, label: str, field: str) -> Path:
        return self._pick(label, self.checkpoints(), field, self.checkpoint_folders())

    def _weighted(self, labels: list[str], weights: str, field: str) -> list[tuple[Path, float]]:
        if not labels:
            raise ToolError(f"{field}: choose at least one LoRA")
        paths = [self._lora(label, field) for label in labels]
        return list(zip(paths, parse_weights(weights, len(paths), "Weights")))

    def _output(self, name: str, folder: Path) -> Path:
        """`folder/<name>.safetensors`; a name that is no plain file name, or an existing file, is refused."""
        stem = (name or "").strip().removesuffix(SUFFIX)
        if problem := name_problem(stem):
            raise ToolError(f"Output name: {stem!r} {problem}; {ALLOWED}")
        out = folder / (stem + SUFFIX)
        if out.exists():
            raise ToolError(f"Output name: {out} already exists; choose another name (the tools never replace a file)")
        folder.mkdir(parents=True, exist_ok=True)
        return out

    # --- the tools
    def inspect(self, label: str) -> str:
        return format_report(inspect_lora(self._lora(label, "LoRA file")))

    def blend(self, labels: list[str], weights: str, name: str, rank=None, conv_rank=None, precision: str = AS_INPUT,
              progress: Progress = no_progress) -> ToolOutput:
        inputs = self._weighted(labels, weights, "LoRA files")
        rank, conv_rank = whole_number(rank, "Rank", optional=True), whole_number(conv_rank, "Conv rank", optional=True)
        if conv_rank is not None and rank is None:
            raise ToolError("Conv rank: give a Rank too (without one the blend is exact and keeps every rank)")
        rule = RankRule(rank=rank, conv_rank=conv_rank) if rank else None
        out = self._output(name, self.c.lora_dir())
        return done(blend_loras(inputs, out, rule, dtype=save_dtype(precision), progress=progress))

    def resize(self, label: str, name: str, method: str, rank=None, kept=None, conv_rank=None, precision: str = AS_INPUT,
               progress: Progress = no_progress) -> ToolOutput:
        source = self._lora(label, "LoRA file")
        if method not in RESIZE_RULES:
            raise ToolError(f"Keep: choose one of {', '.join(RESIZE_RULES)}")
        rule = resize_rule(RESIZE_RULES[method], rank, kept, conv_rank)
        out = self._output(name, self.c.lora_dir())
        return done(resize_lora(source, out, rule, dtype=save_dtype(precision), progress=progress))

    def extract(self, base: str, tuned: str, name: str, rank, conv_rank=None, min_diff=0.01, precision: str = "fp16",
                device: str = "cpu", progress: Progress = no_progress) -> ToolOutput:
        base_path, tuned_path = self._checkpoint(base, "Base checkpoint"), self._checkpoint(tuned, "Tuned checkpoint")
        if base_path == tuned_path:
            raise ToolError("Tuned checkpoint: choose another checkpoint than the base")
        rank, conv_rank = whole_number(rank, "Rank"), whole_number(conv_rank, "Conv rank", optional=True)
        if min_diff is None or not math.isfinite(min_diff) or min_diff < 0:
            raise ToolError(f"Minimum difference: {min_diff!r} must be a number >= 0")
        out = self._output(name, self.c.lora_dir())
        with self.c.use_model("extracting a LoRA"):
            result = extract_lora(base_path, tuned_path, out, rank, conv_rank, float(min_diff), dtype=save_dtype(precision) or torch.float16,
                                  device=device, progress=progress)
        return done(result)

    def bake(self, base: str, labels: list[str], weights: str, name: str, fp16: bool = False) -> ToolOutput:
        base_path = self._checkpoint(base, "Base checkpoint")
        loras = self._weighted(labels, weights, "LoRA files")
        folders = self.checkpoint_folders()
        if not folders:
            raise ToolError("Base checkpoint: this host has no checkpoint folder to write into")
        out = self._output(name, folders[0])
        with self.c.use_model("baking"):
            path = bake_loras(base_path, loras, out, fp16=fp16)
        listed = ", ".join(f"{p.name} at {w:g}" for p, w in loras)
        return ToolOutput(path, written_note(path, f"{base_path.name} with {listed}" + (", in fp16" if fp16 else "")), "")


def resize_rule(field: str | None, rank, kept, conv_rank) -> RankRule:
    """The RankRule of the tab's resize fields: a fixed rank, or a kept fraction / ratio capped by the rank."""
    rank = whole_number(rank, "Rank", optional=field is not None)
    conv_rank = whole_number(conv_rank, "Conv rank", optional=True)
    if field is None:
        return RankRule(rank=rank, conv_rank=conv_rank)
    if kept is None or not math.isfinite(kept):
        raise ToolError("Kept: give the fraction to keep (0 to 1), or the ratio (>= 1) for sv_ratio")
    try:
        return RankRule(rank=rank, conv_rank=conv_rank, **{field: float(kept)})
    except ValueError as e:
        raise ToolError(f"Kept: {e}") from None


def written_note(path: Path, what: str) -> str:
    """The note after a tool wrote `path` (its `train-lora-final` line makes the webui refresh its Lora cards)."""
    return f'<div class="train-lora-note">wrote {escape(path.name)}: {escape(what)}</div><div class="train-lora-final">{escape(str(path))}</div>'


def done(result: ToolResult) -> ToolOutput:
    return ToolOutput(result.path, written_note(result.path, result.summary()), modules_html(result))


def modules_html(result: ToolResult, shown: int = MODULES_SHOWN) -> str:
    """The modules, largest relative error first (rank before -> after), then the ones left out and why."""
    rows = sorted(result.modules, key=lambda m: -m.error)
    body = "".join(f"<tr><td>{escape(m.name)}</td><td>{'-' if m.source_rank is None else m.source_rank}</td><td>{m.rank}</td>"
                   f"<td>{m.error:.3g}</td></tr>" for m in rows[:shown])
    more = f"<p>and {len(rows) - shown} more with smaller errors</p>" if len(rows) > shown else ""
    skipped = "".join(f"<li>{escape(name)}: {escape(why)}</li>" for name, why in result.skipped.items())
    return ('<div class="train-lora-tool-report"><table class="train-lora-table"><thead><tr><th>module</th><th>rank before</th>'
            f"<th>rank</th><th>relative error</th></tr></thead><tbody>{body}</tbody></table>{more}"
            + (f"<details><summary>{len(result.skipped)} layer(s) left out</summary><ul>{skipped}</ul></details>" if skipped else "")
            + "</div>")
