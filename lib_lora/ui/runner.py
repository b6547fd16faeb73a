"""A training run in a background thread, and the state the tab polls (no Gradio here).

The trainer reports through `TrainEvent`s; `TrainingJob.on_event` folds them into a `JobState`
under a lock, and the tab reads copies of it (`snapshot()`) once a second. Interrupt goes to the
host, whose trainer saves and stops at the next step.
"""

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..atomic import DiskFullError
from ..data.errors import DatasetError
from ..locking import FolderLockedError
from ..train.config import ConfigError
from ..train.trainer import TrainEvent, TrainingError, TrainResult

logger = logging.getLogger(__name__)
LOG_LINES = 200
ACTIVE = frozenset({"starting", "running", "stopping"})


@dataclass
class JobState:
    status: str = "idle"  # idle | starting | running | stopping | finished | interrupted | failed
    name: str = ""  # the output name (a resumed run: its folder's name)
    plan: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    avg_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    samples: list[Path] = field(default_factory=list)
    saves: list[Path] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    error: str = ""
    result: TrainResult | None = None
    version: int = 0  # bumped on every change, so pollers skip unchanged states

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def elapsed(self, now: float | None = None) -> float:
        if not self.started_at:
            return 0.0
        return (self.finished_at or now or time.time()) - self.started_at

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the average pace so far (steady after the first steps' warm-up)."""
        if not self.active or self.step < 1 or self.total_steps <= self.step:
            return None
        return self.elapsed(now) / self.step * (self.total_steps - self.step)


class Cancelled(Exception):
    """Raised by `work` when the job was interrupted before training began (e.g. waiting for the model)."""


class TrainingJob:
    """Runs `work(job)` in a daemon thread; `work` builds the host, attaches it, and calls `train`.
    `on_end(job)` runs on that thread once the final state is set (the queue starts its next job there)."""

    def __init__(self, work: Callable[["TrainingJob"], TrainResult], *, name: str = "", on_end: Callable[["TrainingJob"], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self._work, self._on_end, self._clock = work, on_end, clock
        self._lock = threading.Lock()
        self._state = JobState(name=name)
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._host = None
        self._stop_requested = False
        self._thread: threading.Thread | None = None

    @classmethod
    def failed(cls, message: str) -> "TrainingJob":
        """A job that never started (bad options): shows the message like any failure."""
        job = cls(lambda job: None)
        job._update(status="failed", error=message)
        job._append(f"error: {message}")
        return job

    def start(self) -> "TrainingJob":
        self._update(status="starting", started_at=self._clock())
        self._append("starting: loading the model and scanning the dataset")
        self._thread = threading.Thread(target=self._run, name="train-lora", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            result = self._work(self)
        except Cancelled:
            self._append("interrupted before training began")
            self._finish("interrupted")
        except (ConfigError, DatasetError, TrainingError, FolderLockedError, DiskFullError) as e:
            self._finish("failed", error=str(e))
        except Exception as e:  # the thread's edge: report to the tab instead of dying silently
            logger.exception("training failed")
            self._append(traceback.format_exc().rstrip())
            self._finish("failed", error=f"{type(e).__name__}: {e}")
        else:
            self._finish("interrupted" if result.interrupted else "finished", result=result)
        if self._on_end is not None:
            self._on_end(self)

    def _finish(self, status: str, **changes) -> None:
        if changes.get("error"):
            self._append(f"error: {changes['error']}")
        if changes.get("result"):
            self._append(f"{status}: {changes['result'].final_path}")
        self._update(status=status, finished_at=self._clock(), **changes)

    def set_name(self, name: str) -> None:
        """The run's name once `work` knows it (resuming the last run)."""
        self._update(name=name)

    def attach_host(self, host) -> None:
        """Called by `work` once the host exists, so Interrupt can reach it."""
        with self._lock:
            self._host = host
            stop = self._stop_requested
        if stop:
            host.interrupt()

    @property
    def stop_requested(self) -> bool:
        with self._lock:
            return self._stop_requested

    def interrupt(self) -> bool:
        """Ask the run to save and stop at the next step; False if nothing runs."""
        with self._lock:
            if self._state.status not in ACTIVE:
                return False
            self._stop_requested, host = True, self._host
        if host is not None:
            host.interrupt()
        self._update(status="stopping")
        self._append("interrupt requested: saving at the next step")
        return True

    def on_event(self, event: TrainEvent) -> None:
        """The trainer's callback (runs on the training thread)."""
        if self._stop_requested and event.kind in ("start", "step") and self._host is not None:
            self._host.interrupt()  # the trainer clears the flag when it starts; ask again
        with self._lock:
            _fold(self._state, event, self._clock())
            self._state.version += 1
        line = _event_line(event)
        if line:
            self._append(line)

    def snapshot(self) -> JobState:
        with self._lock:
            return replace(self._state, losses=list(self._state.losses), validation=list(self._state.validation),
                           samples=list(self._state.samples), saves=list(self._state.saves), log=list(self._log))

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.snapshot().active

    def _update(self, **changes) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._state, name, value)
            self._state.version += 1

    def _append(self, line: str) -> None:
        with self._lock:
            self._log.append(line)
            self._state.version += 1


def _fold(state: JobState, event: TrainEvent, now: float) -> None:
    if event.kind == "start":
        state.total_steps, state.plan = event.total_steps, event.message
        if state.status == "starting":
            state.status = "running"
    elif event.kind == "step":
        state.step, state.total_steps, state.epoch = event.step, event.total_steps or state.total_steps, event.epoch
        state.avg_loss, state.lr, state.it_per_s = event.avg_loss, event.lr, event.it_per_s
        if event.loss is not None:
            state.losses.append((event.step, event.loss))
    elif event.kind == "epoch":
        state.epoch = event.epoch
    elif event.kind == "validation" and event.loss is not None:
        state.validation.append((event.step, event.loss))
    elif event.kind == "sample":
        state.samples.extend(event.paths)
    elif event.kind == "save":
        state.saves.extend(p for p in event.paths if p not in state.saves)


def _event_line(event: TrainEvent) -> str:
    if event.kind == "prepare":
        return event.message if event.step in (1, event.total_steps) else ""  # the first and the last, not one per image
    if event.kind == "start":
        return f"plan: {event.message}"
    if event.kind in ("step", "done"):
        return ""  # the bar and chart show steps, and the job logs how it ended
    if event.kind == "epoch":
        return f"epoch {event.epoch} done at step {event.step}"
    if event.kind == "validation":
        return f"validation loss {event.loss:.5f} (epoch {event.epoch})"
    if event.kind in ("save", "sample"):
        return f"{event.kind}: " + ", ".join(Path(p).name for p in event.paths)
    return f"{event.kind}: {event.message}"
