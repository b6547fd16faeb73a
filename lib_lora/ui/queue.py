"""The training queue and the run folders on disk (no Gradio here).

A queued job is a run config (`TrainConfig.to_toml`, the format of presets and run folders' config.toml)
in `<runs_dir>/queue/`, named `0001-<output_name>.toml`: the number orders the jobs, so the queue
survives a restart and can be read or edited by hand. Files are written atomically; moving a job
exchanges numbers by renames. The job being run is renamed `....toml.started` until it ends, so a
crash before its run folder exists does not lose it (`recover`); once its run folder exists, the
run is resumed from there like any other.
"""

import glob
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_bytes_atomically
from ..train.config import ConfigError, TrainConfig
from ..train.run_folder import CONFIG_FILE, LOSS_FILE, STATE_FILE
from .runner import JobState

logger = logging.getLogger(__name__)
QUEUE_FOLDER = "queue"
STARTED = ".started"
JOB_FILE = re.compile(r"(\d+)-(.+)\.toml")


class NotFoundError(ValueError):
    """A queued job or run folder that is not there; the message names it."""


@dataclass(frozen=True)
class QueuedJob:
    number: int  # orders the queue (the file name's prefix)
    path: Path
    config: TrainConfig

    @property
    def name(self) -> str:
        return self.config.output_name


class JobQueue:
    """The queue folder of one runs folder. Thread-safe within a process (the tab and the API share one)."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir)
        self.folder = self.runs_dir / QUEUE_FOLDER
        self.problems: list[str] = []  # files set aside because they no longer load
        self._lock = threading.RLock()
        self.recover()

    def jobs(self) -> list[QueuedJob]:
        """The waiting jobs, first to run first."""
        with self._lock:
            return [job for job in (self._load(path) for path in self._files("*.toml")) if job is not None]

    def _files(self, pattern: str) -> list[Path]:
        if not self.folder.is_dir():
            return []
        numbered = [(int(m[1]), p) for p in self.folder.glob(pattern) if (m := JOB_FILE.fullmatch(p.name.removesuffix(STARTED)))]
        return [path for _, path in sorted(numbered)]

    def _load(self, path: Path) -> QueuedJob | None:
        try:
            config = TrainConfig.from_toml(path)
        except ConfigError as e:  # edited by hand into something that cannot run: keep it, out of the way
            aside = path.with_name(path.name + ".invalid")
            os.replace(path, aside)
            self.problems.append(f"{aside.name}: set aside, it does not load ({e})")
            logger.warning("queue: %s", self.problems[-1])
            return None
        return QueuedJob(int(JOB_FILE.fullmatch(path.name.removesuffix(STARTED))[1]), path, config)

    def add(self, config: TrainConfig) -> QueuedJob:
        """Append a job (the caller has checked that its name is free)."""
        with self._lock:
            numbers = [int(JOB_FILE.fullmatch(p.name.removesuffix(STARTED))[1]) for p in self._files("*.toml*")]
            number = max(numbers, default=0) + 1
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{number:04d}-{config.output_name}.toml"
            write_bytes_atomically(path, config.to_toml().encode())
            return QueuedJob(number, path, config)

    def find(self, name: str) -> QueuedJob:
        with self._lock:
            for job in self.jobs():
                if job.name == name:
                    return job
        raise NotFoundError(f"no queued job named {name!r}")

    def remove(self, name: str) -> QueuedJob:
        with self._lock:
            job = self.find(name)
            job.path.unlink()
            return job

    def move(self, name: str, offset: int) -> list[QueuedJob]:
        """Move a job `offset` places (negative: earlier), clamped to the ends; the others keep their order."""
        with self._lock:
            jobs = self.jobs()
            job = self.find(name)
            index = jobs.index(job)
            order = jobs[:index] + jobs[index + 1:]
            order.insert(min(max(index + offset, 0), len(order)), job)
            for number, queued in zip([j.number for j in jobs], order):  # the same numbers, handed out in the new order
                if queued.number != number:
                    os.replace(queued.path, queued.path.with_name(f"{number:04d}-{queued.name}.toml"))
            return self.jobs()

    def take(self) -> QueuedJob | None:
        """The first job, marked as started (it leaves the waiting list)."""
        with self._lock:
            jobs = self.jobs()
            if not jobs:
                return None
            job = jobs[0]
            started = job.path.with_name(job.path.name + STARTED)
            os.replace(job.path, started)
            return QueuedJob(job.number, started, job.config)

    def done(self, job: QueuedJob) -> None:
        """A taken job ended (its run folder, if any, holds its config from now on)."""
        job.path.unlink(missing_ok=True)

    def put_back(self, job: QueuedJob) -> None:
        """A taken job that never started goes back to its place (the front: it had the lowest number).
        Already back if another controller over this folder (after a UI reload) recovered it."""
        with self._lock:
            if job.path.exists():
                os.replace(job.path, job.path.with_name(job.path.name.removesuffix(STARTED)))

    def recover(self) -> None:
        """After a crash: a started job whose run folder exists is that run's now; one without goes back."""
        with self._lock:
            for path in self._files("*.toml" + STARTED):
                job = self._load(path)
                if job is not None and (self.runs_dir / job.name / CONFIG_FILE).exists():
                    self.done(job)
                elif job is not None:
                    self.put_back(job)


def existing_outputs(config: TrainConfig, lora_dir: Path) -> list[Path]:
    """LoRA files a new run of `config` would write over: `<name>.safetensors` and its epoch/step files."""
    folder = Path(config.output_dir) if config.output_dir else Path(lora_dir)
    name = glob.escape(config.output_name)
    return sorted(p for pattern in (f"{name}.safetensors", f"{name}-*.safetensors") for p in folder.glob(pattern))


def name_taken(config: TrainConfig, *, lora_dir: Path, runs_dir: Path, running: str | None, queued: list[str]) -> str | None:
    """Why a new job may not use `config.output_name`, as a ConfigError message naming the field; None if free."""
    name = config.output_name
    if name == running:
        return f"output_name: {name!r} is the name of the run in progress; choose another output_name"
    if name in queued:
        return f"output_name: {name!r} is already queued; choose another output_name or remove that job"
    run = Path(runs_dir) / name
    if (run / CONFIG_FILE).exists():
        return f"output_name: {name!r} has a run folder, {run}; resume it, or choose another output_name"
    files = existing_outputs(config, lora_dir)
    if files and not config.overwrite:
        return f"output_name: {files[0]} already exists; choose another output_name or set overwrite"
    return None


@dataclass(frozen=True)
class QueueView:
    """What the queue panel and the API show."""

    jobs: list[QueuedJob]  # waiting, first to run first
    held: bool  # after an interrupt or a restart: the jobs wait for Resume / Run queue
    done: list[JobState]  # how this session's runs ended, oldest first
    problems: list[str]  # queue files set aside


# ---- run folders


@dataclass(frozen=True)
class RunInfo:
    name: str  # the folder's name (the output name it was started with)
    path: Path
    status: str  # running | finished | interrupted (resumable) | incomplete (stopped before its first save)
    step: int  # the last step logged
    final_path: Path | None  # the finished LoRA


def list_runs(runs_dir: Path, lora_dir: Path, running: str | None = None) -> list[RunInfo]:
    """Every run folder under `runs_dir` (newest first), with what its files say about it."""
    runs_dir = Path(runs_dir)
    folders = [p for p in runs_dir.iterdir() if (p / CONFIG_FILE).is_file()] if runs_dir.is_dir() else []
    runs = [_run_info(path, lora_dir, running) for path in folders]
    return sorted(runs, key=lambda r: (r.path / CONFIG_FILE).stat().st_mtime, reverse=True)


def _run_info(path: Path, lora_dir: Path, running: str | None) -> RunInfo:
    try:
        config = TrainConfig.from_toml(path / CONFIG_FILE)
    except ConfigError:
        return RunInfo(path.name, path, "incomplete", _last_step(path), None)
    final = (Path(config.output_dir) if config.output_dir else Path(lora_dir)) / f"{config.output_name}.safetensors"
    state = path / STATE_FILE
    # the final file is written after the last state; an older one (overwrite) belongs to an earlier run
    finished = final.is_file() and (not state.exists() or final.stat().st_mtime >= state.stat().st_mtime)
    status = "running" if path.name == running else "finished" if finished else "interrupted" if state.exists() else "incomplete"
    return RunInfo(path.name, path, status, _last_step(path), final if finished else None)


def _last_step(path: Path) -> int:
    log = path / LOSS_FILE
    if not log.is_file():
        return 0
    lines = log.read_text(encoding="utf-8").strip().splitlines()
    return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0
