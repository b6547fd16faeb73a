"""A run folder: config.toml, loss.csv, samples/, and state.pt to resume from.

Everything is written atomically (temp file + rename) so an interrupted or crashed run always
leaves a state that loads, and one process at a time works in a run folder (`run.lock`, see
lib_lora/locking.py).
"""

import csv
import io
import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import write_atomically, write_bytes_atomically
from ..locking import folder_lock
from ..models.checkpoint import ARCH_NAMES
from ..models.tensor_files import load_weights_only
from .config import ConfigError, TrainConfig

STATE_FILE, CONFIG_FILE, LOSS_FILE, BASE_FILE, LOCK_FILE = "state.pt", "config.toml", "loss.csv", "base_model.json", "run.lock"
LOSS_COLUMNS = ("step", "epoch", "loss", "avg_loss", "lr", "it_per_s", "val_loss")
LOSS_WINDOW = 50  # steps in avg_loss
STATE_OVERHEAD = 1 << 20  # state.pt beyond its tensors: pickled rng states, progress, optimizer settings


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, epoch, and micro-batches done within that epoch."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    recent_losses: list[float] = field(default_factory=list)  # avg_loss's window, saved so a resumed run's goes on

    def average_loss(self, loss: float) -> float:
        """The mean of the last LOSS_WINDOW step losses, this one included."""
        self.recent_losses = [*self.recent_losses[-(LOSS_WINDOW - 1):], loss]
        return sum(self.recent_losses) / len(self.recent_losses)


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.samples = self.path / "samples"

    @classmethod
    def create(cls, path: Path, config: TrainConfig, arch: str = "sd1") -> "RunFolder":
        """A new run on a base model of `arch`; refuses a folder that already holds a run (resume it instead)."""
        run = cls(path)
        if (run.path / STATE_FILE).exists() or (run.path / LOSS_FILE).exists():
            raise ConfigError(f"{run.path} already holds a run: resume it with --resume {run.path}, or choose another output_name")
        run.samples.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(run.path / CONFIG_FILE, config.to_toml().encode())
        write_bytes_atomically(run.path / BASE_FILE, json.dumps({"arch": arch}).encode())
        write_bytes_atomically(run.path / LOSS_FILE, (",".join(LOSS_COLUMNS) + "\r\n").encode())  # csv's own line end
        return run

    @staticmethod
    @contextmanager
    def claimed(path: Path, notice: Callable[[str], None], output_folder: Path | None = None) -> Iterator[None]:
        """Hold the folder's lock for a run (FolderLockedError while a live process holds it). A lock left by a
        process that died (kill -9, a crash, a power cut) is taken over: `notice` says so, and that process's
        half-written temporary files are removed, here and (those named with its PID) in `output_folder`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with folder_lock(path, LOCK_FILE) as dead_pid:
            if dead_pid is not None:
                leftovers = _remove_temporary_files(path, (".*.tmp", ".tmp*", "*/.*.tmp", "*/.tmp*"))
                leftovers += _remove_temporary_files(Path(output_folder), (f".*.{dead_pid}.tmp",)) if output_folder else []
                notice(f"{path}: took over the lock of process {dead_pid}, which ended without releasing it (killed or crashed); "
                       f"removed {len(leftovers)} half-written temporary file(s)")
            yield

    @classmethod
    def open(cls, path: Path) -> "RunFolder":
        run = cls(path)
        if not (run.path / CONFIG_FILE).exists():
            raise ConfigError(f"{run.path}: not a run folder (no {CONFIG_FILE})")
        return run

    def config(self) -> TrainConfig:
        return TrainConfig.from_toml(self.path / CONFIG_FILE)

    def check_architecture(self, arch: str) -> None:
        """Refuse to resume on a model of another architecture (its adapters would not fit); older runs are SD1."""
        path = self.path / BASE_FILE
        trained = json.loads(path.read_text())["arch"] if path.exists() else "sd1"
        if trained != arch:
            raise ConfigError(f"{self.path} was trained on an {ARCH_NAMES[trained]} model and the loaded model is "
                              f"{ARCH_NAMES[arch]}; load an {ARCH_NAMES[trained]} model (the run's base) to resume it")

    def log(self, row: dict) -> None:
        with open(self.path / LOSS_FILE, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in LOSS_COLUMNS])

    def truncate_log(self, global_step: int) -> None:
        """Drop log rows past the saved state so a resumed run does not repeat them, and a row a kill cut short."""
        path = self.path / LOSS_FILE
        rows = list(csv.reader(open(path, newline=""))) if path.exists() else []
        kept = [list(LOSS_COLUMNS)] + [r for r in rows[1:] if len(r) == len(LOSS_COLUMNS) and r[0].isdigit() and int(r[0]) <= global_step]
        text = io.StringIO(newline="")
        csv.writer(text).writerows(kept)
        write_atomically(path, lambda tmp: tmp.write_text(text.getvalue(), newline=""))

    def save_state(self, progress: Progress, network, optimizer, data_rng: random.Random, noise_rng: torch.Generator) -> None:
        state = {
            "progress": progress.__dict__,
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data_rng": data_rng.getstate(),
            "noise_rng": noise_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,  # dropout on a GPU draws from it
        }
        write_atomically(self.path / STATE_FILE, lambda tmp: torch.save(state, tmp), size=STATE_OVERHEAD + _tensor_bytes(state))

    def has_state(self) -> bool:
        return (self.path / STATE_FILE).exists()

    def load_state(self, network, optimizer, data_rng: random.Random, noise_rng: torch.Generator) -> Progress:
        state = load_weights_only(self.path / STATE_FILE)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        data_rng.setstate(state["data_rng"])
        noise_rng.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return Progress(**state["progress"])


def _tensor_bytes(value) -> int:
    """Bytes of all tensors in nested dicts, lists and tuples (a state dict, an optimizer's state)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _remove_temporary_files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Temporary files of writes a dead process never finished: lib_lora/atomic.py's `.<name>.<pid>.tmp` and, in the
    run folder and its latents/ and samples/, safetensors' own `.tmpXXXXXX`."""
    leftovers = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
