"""A run folder: config.toml, loss.csv, samples/, and state.pt to resume from.

Everything is written atomically (temp file + rename) so an interrupted or crashed run always
leaves a state that loads.
"""

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_atomically
from ..models.checkpoint import ARCH_NAMES
from ..models.tensor_files import load_weights_only
from .config import ConfigError, TrainConfig

STATE_FILE, CONFIG_FILE, LOSS_FILE, BASE_FILE = "state.pt", "config.toml", "loss.csv", "base_model.json"
LOSS_COLUMNS = ("step", "epoch", "loss", "avg_loss", "lr", "it_per_s", "val_loss")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, epoch, and micro-batches done within that epoch."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


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
        atomic_write_bytes(run.path / CONFIG_FILE, config.to_toml().encode())
        atomic_write_bytes(run.path / BASE_FILE, json.dumps({"arch": arch}).encode())
        with open(run.path / LOSS_FILE, "w", newline="") as f:
            csv.writer(f).writerow(LOSS_COLUMNS)
        return run

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
        """Drop log rows past the saved state so a resumed run does not repeat them."""
        rows = list(csv.reader(open(self.path / LOSS_FILE, newline="")))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= global_step]
        with open(self.path / LOSS_FILE, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def save_state(self, progress: Progress, network, optimizer, data_rng: random.Random, noise_rng: torch.Generator) -> None:
        state = {
            "progress": progress.__dict__,
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data_rng": data_rng.getstate(),
            "noise_rng": noise_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        write_atomically(self.path / STATE_FILE, lambda tmp: torch.save(state, tmp))

    def has_state(self) -> bool:
        return (self.path / STATE_FILE).exists()

    def load_state(self, network, optimizer, data_rng: random.Random, noise_rng: torch.Generator) -> Progress:
        state = load_weights_only(self.path / STATE_FILE)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        data_rng.setstate(state["data_rng"])
        noise_rng.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        return Progress(**state["progress"])


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
