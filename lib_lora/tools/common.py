"""What every tool shares: its error type, per-module reports, `FILE:weight` arguments, output checks, progress."""

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

Progress = Callable[[Iterable, str], Iterable]  # (items, description) -> the same items, e.g. tqdm


def no_progress(items: Iterable, description: str) -> Iterable:
    return items


class ToolError(ValueError):
    """Arguments a tool cannot honour (an output over an input, a rank it cannot reach); the message says which."""


@dataclass(frozen=True)
class ModuleReport:
    """One module of a tool's output: its rank before and after, and ‖ΔW_out − ΔW_wanted‖_F / ‖ΔW_wanted‖_F."""

    name: str
    source_rank: int | None
    rank: int
    error: float


@dataclass
class ToolResult:
    """The file a tool wrote (None for a dry run), what it did per module, and modules it left out with why."""

    path: Path | None
    modules: list[ModuleReport]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)

    def summary(self) -> str:
        """"12 modules, ranks 2..4, relative error max 0.1, mean 0.05": the CLI's and the tab's first line."""
        errors = [m.error for m in self.modules]
        ranks = sorted({m.rank for m in self.modules})
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return (f"{len(self.modules)} modules, ranks {ranks[0]}..{ranks[-1]}, relative error max {max(errors):.3g}, "
                f"mean {sum(errors) / len(errors):.3g}{skipped}")


def parse_weighted(spec: str, default: float = 1.0) -> tuple[Path, float]:
    """`FILE[:WEIGHT]` -> (path, weight); a suffix that is no number stays part of the path (`C:\\x.safetensors`)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), default


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(out: Path, inputs: Iterable[Path], overwrite: bool, suffix: str = ".safetensors") -> Path:
    """Refuse an output that is one of the inputs (ever) or an existing file (unless `overwrite`)."""
    out = Path(out)
    if out.suffix != suffix:
        raise ToolError(f"{out}: the output must be a {suffix} file")
    for path in inputs:
        if _same_file(out, Path(path)):
            raise ToolError(f"{out}: is also an input; write the result to a new file")
    if out.exists() and not overwrite:
        raise ToolError(f"{out}: already exists; choose another name or pass --overwrite")
    return out
