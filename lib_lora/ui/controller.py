"""What the tab's buttons do, as plain methods over widget values (no Gradio here).

One `TabController` per tab: it owns the running job, the training queue, the plan cache and the
model lock, so two tabs (or two apps in one process) never share state; the HTTP API (`api.py`) is
given the tab's controller, so both see the same job and queue. The host is obtained from the factory
only when work needs the model (Train, Resume, compare, caption, and the preset list tailored to its
architecture when it is opened), since the webui's model can change.

The queue: jobs run one after another, in order, after the current run. When a run finishes or
fails, the next job starts; when it is interrupted, the queue is held until the user resumes it
(Resume on a run, or Run queue). After a restart the saved jobs wait, held, so nothing trains unasked.
"""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.errors import DatasetError
from ..data.folders import is_image_file
from ..data.images import load_image
from ..hosts.base import Host
from ..hosts.webui import WebuiHostError
from ..models.pipeline import GenerationParams
from ..networks.apply import find_lora_files
from ..train import presets
from ..train.base_model import BaseModel
from ..train.config import ConfigError, TrainConfig
from ..train.names import ALLOWED, name_problem
from ..train.run_folder import CONFIG_FILE, STATE_FILE, RunFolder
from ..train.trainer import train
from . import compare, fields
from .planning import PlanCache, PlanSummary, summarize
from .queue import JobQueue, NotFoundError, QueuedJob, QueueView, RunInfo, list_runs, name_taken
from .report import build_report
from .roots import DATASET_FIELDS, check_config_paths, check_dataset_folder, check_inside
from .runner import Cancelled, JobState, TrainingJob
from .settings import TabSettings

THUMBNAILS = 8
HISTORY = 20  # finished runs remembered for the queue panel and the API
LOCK_POLL_S = 0.25  # a queued job waiting for the model checks this often whether it was interrupted


class BusyError(RuntimeError):
    """The model is in use (training or generating); the message says by what."""


@dataclass(frozen=True)
class CompareRequest:
    prompt: str
    weights: str = "0.4, 0.7, 1.0"
    seed: int = 1
    steps: int = 20
    cfg_scale: float = 7.0


def latest_run(runs_dir: Path) -> Path:
    """The most recently saved run folder under `runs_dir` (one with a resumable state)."""
    runs = [p.parent for p in Path(runs_dir).glob(f"*/{STATE_FILE}")]
    if not runs:
        raise ConfigError(f"no run to resume in {runs_dir}: start one with Train first")
    return max(runs, key=lambda p: (p / STATE_FILE).stat().st_mtime)


class TabController:
    def __init__(self, host: Host | Callable[[], Host], settings: TabSettings | None = None):
        self.host = host if isinstance(host, Host) else None  # given, not made: its model is known from the start
        self.host_factory = (lambda: host) if isinstance(host, Host) else host
        self._asked: BaseModel | None = None  # a factory's model when last asked (`base_model(ask=True)`)
        self.settings = settings or TabSettings()
        self.plans = PlanCache()
        self.model_lock = threading.Lock()  # training, grids and (standalone) txt2img take turns
        self._start_lock = threading.RLock()  # starting a run, and the queue's hand-over from one job to the next
        self.job: TrainingJob | None = None
        self.last_config: TrainConfig | None = None
        self._queue: JobQueue | None = None  # made on first use: it needs the runs folder
        self.queue_held = False
        self.history: deque[JobState] = deque(maxlen=HISTORY)

    # --- options
    def initial_values(self) -> dict:
        return fields.config_widget_values(TrainConfig.from_dict(dict(self.settings.defaults)))

    def base_model(self, *, ask: bool = False) -> BaseModel | None:
        """What the presets and the advice are tailored to: the given host's model. With a factory (the
        webui, whose model can change) the one it gave when last asked: `ask` calls it (opening the preset
        list), never the tab's build or the live summary. None while it has no model it can train (still
        loading, or refused)."""
        if self.host is not None:
            return BaseModel.of(self.host)
        if ask:
            try:
                self._asked = BaseModel.of(self.host_factory())
            except WebuiHostError:
                self._asked = None
        return self._asked

    def summary(self, values: dict):
        try:
            for field in DATASET_FIELDS:
                self.check_dataset_folder(field, values.get(field) or "")
        except ConfigError as e:
            return PlanSummary(error=str(e))  # nothing outside the allowed roots is scanned
        return summarize(values, self.plans, self.base_model())

    def preset_names(self, *, ask: bool = False) -> list[str]:
        """The presets for the model's architecture (all built-in ones while it is not known) and the user's."""
        model = self.base_model(ask=ask)
        return list(presets.list_presets(self.settings.presets_dir, model.arch if model else None)[0])

    def apply_preset(self, name: str, values: dict) -> tuple[dict, str]:
        """New widget values (dataset options kept) and a one-line note."""
        found, problems = presets.list_presets(self.settings.presets_dir)  # all: the list shown may be an older model's
        if name not in found:
            raise ConfigError(f"no preset named {name!r}" + (f" ({'; '.join(problems)})" if problems else ""))
        preset = found[name]
        config = presets.apply_preset(preset, fields.config_from_widgets(values))
        return fields.config_widget_values(config), f"loaded preset {name}" + (f": {preset.why}" if preset.why else "")

    def save_preset(self, name: str, values: dict, overwrite: bool) -> str:
        if self.settings.presets_dir is None:
            raise ConfigError("this host has no presets folder")
        config = fields.config_from_widgets(values)
        preset = presets.Preset(name.strip(), presets.preset_values(config))
        path = presets.save_preset(self.settings.presets_dir, preset, overwrite=overwrite)
        return f"saved preset {preset.name} to {path}"

    # --- dataset
    def report(self, values: dict):
        for field in DATASET_FIELDS:
            self.check_dataset_folder(field, values.get(field) or "")
        self.plans.clear()  # the user asked for a fresh look
        config = fields.config_from_widgets({**values, "train_data_dir": ""})  # options only; the folder may be wrong
        return build_report(values.get("train_data_dir", ""), caption_extension=config.caption_extension, resolution=config.resolution,
                            enable_bucket=config.enable_bucket, min_bucket_reso=config.min_bucket_reso, max_bucket_reso=config.max_bucket_reso,
                            bucket_no_upscale=config.bucket_no_upscale, reg_folder=values.get("reg_data_dir", ""))

    def thumbnails(self, folder: str, count: int = THUMBNAILS) -> list[Image.Image]:
        self.check_dataset_folder("train_data_dir", folder)
        root = Path(folder)
        if not folder or not root.is_dir():
            return []
        paths = sorted(p for p in root.rglob("*") if is_image_file(p))[:count]
        images = []
        for path in paths:
            try:
                image, _ = load_image(path)
            except DatasetError:
                continue  # the report lists unreadable files
            image.thumbnail((256, 256))
            images.append(image)
        return images

    # --- folders
    def check_dataset_folder(self, field: str, folder: str | Path) -> None:
        """ConfigError naming `field` unless `folder` resolves inside the dataset roots (roots.py)."""
        check_dataset_folder(field, folder, self.settings.dataset_roots)

    def check_paths(self, config: TrainConfig, *, ask: bool = True, host: Host | None = None) -> None:
        """Datasets inside the dataset roots, output_dir inside the Lora folder (`host`'s when given; where `ask`
        is off, only when known without making the host: the run checks again with it)."""
        lora_dir = Path(self.settings.lora_dir or host.lora_dir) if host is not None else self._folder("lora_dir", ask=ask)
        check_config_paths(config, dataset_roots=self.settings.dataset_roots, lora_dir=lora_dir)

    def _folder(self, name: str, *, ask: bool = True) -> Path | None:
        """`settings.<name>` (lora_dir, runs_dir), else the host's; None where that would make the host and `ask` is off."""
        given = getattr(self.settings, name)
        if given is not None:
            return Path(given)
        if self.host is None and not ask:
            return None
        return Path(getattr(self.host or self.host_factory(), name))

    def lora_dir(self, *, ask: bool = True) -> Path | None:
        return self._folder("lora_dir", ask=ask)

    def runs_dir(self) -> Path:
        return self._folder("runs_dir")

    # --- run
    def start(self, values: dict, *, resume: bool = False, run_dir: str = "") -> TrainingJob:
        """Start training (or resume a run folder) in the background; a failed start is a failed job.
        BusyError while a run is active: a second Train is refused (the tab keeps following the run)."""
        with self._start_lock:
            self._refuse_while_active()
            try:
                config = None if resume else fields.config_from_widgets(values)
                return self._launch(config, run_dir, resume=resume)
            except ConfigError as e:
                self.job = TrainingJob.failed(str(e))
                return self.job

    def start_run(self, config: TrainConfig | None, *, run_dir: str = "") -> TrainingJob:
        """Start `config`, or resume `run_dir` when it is None (the HTTP API's start and resume).
        Raises BusyError while a run is active and ConfigError when the output name is taken."""
        with self._start_lock:
            self._refuse_while_active()
            return self._launch(config, run_dir, resume=config is None)

    def _refuse_while_active(self) -> None:
        if self._active():
            raise BusyError(f"{self.snapshot().name or 'a run'} is training, so no second run was started; "
                            f"add this one to the queue, or interrupt that one first")

    def resume_run(self, name: str) -> TrainingJob:
        """Resume the run folder `<runs_dir>/<name>` (the HTTP API); NotFoundError if there is none."""
        path = self.runs_dir() / name
        if name in ("", ".", "..") or Path(name).name != name or not (path / CONFIG_FILE).is_file():
            raise NotFoundError(f"no run folder named {name!r} in {self.runs_dir()}")
        return self.start_run(None, run_dir=str(path))

    def _active(self) -> bool:
        return self.job is not None and self.job.snapshot().active

    def _launch(self, config: TrainConfig | None, run_dir: str, *, resume: bool, queued: QueuedJob | None = None) -> TrainingJob:
        if resume:
            if run_dir.strip():
                check_inside("run_dir", run_dir.strip(), [self.runs_dir()], "the runs folder")
            self.queue_held = False  # resuming continues the queue as well
            run_dir = run_dir.strip() or str(self._last_run_dir() or "")
            name = Path(run_dir).name if run_dir else ""
        else:
            if queued is None:
                self.check_paths(config, ask=False)
                self._check_name(config, ask=False)
            name = config.output_name
        self.job = TrainingJob(lambda job: self._train(job, config, run_dir, resume, waits=queued is not None),
                               name=name, on_end=lambda job: self._ended(job, queued)).start()
        return self.job

    def _train(self, job: TrainingJob, config: TrainConfig | None, run_dir: str, resume: bool, *, waits: bool = False):
        with self._model("training", wait=job if waits else None), self.settings.job_lock():
            host = self.host_factory()
            job.attach_host(host)
            folder = None
            if resume:
                folder = Path(run_dir) if run_dir else latest_run(host.runs_dir)
                config = RunFolder.open(folder).config()
                job.set_name(folder.name)
            self.check_paths(config, host=host)  # a resumed run's or a queued job's file may have been edited since
            self.last_config = config
            return train(config, host, on_event=job.on_event, run_dir=folder, resume=resume)

    def _check_name(self, config: TrainConfig, *, ask: bool = True) -> None:
        """ConfigError if the output name is in use: a LoRA file, a run folder, the running or a queued job.
        Without `ask`, only where the folders are known without making the host (the trainer checks files again)."""
        lora_dir, runs_dir = self._folder("lora_dir", ask=ask), self._folder("runs_dir", ask=ask)
        if lora_dir is None or runs_dir is None:
            return
        state = self.snapshot()
        reason = name_taken(config, lora_dir=lora_dir, runs_dir=runs_dir, running=state.name if state.active else None,
                            queued=[job.name for job in self.queue.jobs()])
        if reason:
            raise ConfigError(reason)

    def _ended(self, job: TrainingJob, queued: QueuedJob | None) -> None:
        """On the ended job's thread: remember how it ended, then start the next queued job unless held."""
        state = job.snapshot()
        with self._start_lock:
            self.history.append(state)
            if queued is not None and state.status == "interrupted" and state.result is None:
                self.queue.put_back(queued)  # interrupted while waiting for the model: it never ran
            elif queued is not None:
                self.queue.done(queued)
            if state.status == "interrupted":
                self.queue_held = True
            self._advance()

    def _advance(self) -> None:
        """Start the next queued job when nothing trains and the queue is not held (under _start_lock)."""
        if self._queue is None or self.queue_held or self._active():
            return
        queued = self._queue.take()
        if queued is not None:
            self._launch(queued.config, "", resume=False, queued=queued)

    # --- queue
    @property
    def queue(self) -> JobQueue:
        with self._start_lock:
            if self._queue is None:
                self._queue = JobQueue(self.runs_dir())
                self.queue_held = self.queue_held or bool(self._queue.jobs())  # after a restart, nothing trains unasked
            return self._queue

    def enqueue(self, config: TrainConfig) -> QueuedJob:
        """Queue a run after the others; it starts at once if nothing trains and the queue is not held.
        ConfigError (naming output_name) if its output name is taken."""
        with self._start_lock:
            self.check_paths(config)
            self._check_name(config)
            if not self.queue.jobs():
                self.queue_held = False  # a hold means something only while jobs wait
            job = self.queue.add(config)
            self._advance()
            return job

    def add_to_queue(self, values: dict) -> str:
        """The tab's Add to queue; a message saying where the job stands."""
        job = self.enqueue(fields.config_from_widgets(values))
        state, names = self.snapshot(), [j.name for j in self.queue.jobs()]
        if job.name not in names:
            return f"{job.name} started: nothing else was training"
        held = "; the queue is held: press Run queue (or Resume) to go on" if self.queue_held else ""
        return f"queued {job.name}: job {names.index(job.name) + 1} of {len(names)}, after {state.name or 'the current run'}{held}"

    def queued(self) -> list[QueuedJob]:
        return self.queue.jobs()

    def remove_queued(self, name: str) -> str:
        return f"removed {self.queue.remove(name).name} from the queue"

    def move_queued(self, name: str, offset: int) -> str:
        names = [job.name for job in self.queue.move(name, offset)]
        return f"{name} is now job {names.index(name) + 1} of {len(names)}"

    def resume_queue(self) -> str:
        """Release the hold; the next job starts now if nothing trains."""
        with self._start_lock:
            self.queue_held = False
            self._advance()
            waiting = len(self.queue.jobs())
        if self._active():
            return f"the queue goes on: {self.snapshot().name} is training, {waiting} job(s) wait"
        return "the queue is empty"

    def queue_view(self, *, ask: bool = True) -> QueueView:
        """What the queue panel and the API show; empty when the runs folder is not known without the host and `ask` is off."""
        if self._queue is None and self._folder("runs_dir", ask=ask) is None:
            return QueueView([], False, list(self.history), [])
        jobs = self.queue.jobs()
        return QueueView(jobs, self.queue_held and bool(jobs), list(self.history), list(self.queue.problems))

    def busy(self) -> bool:
        """A run is active, or queued jobs are about to start: what the tab's progress poller follows."""
        with self._start_lock:
            return self._active() or (self._queue is not None and not self.queue_held and bool(self._queue.jobs()))

    # --- runs and files on disk (the HTTP API)
    def runs(self) -> list[RunInfo]:
        state = self.snapshot()
        return list_runs(self.runs_dir(), self.lora_dir(), state.name if state.active else None)

    def outputs(self) -> dict[str, Path]:
        """LoRA files in the Lora folder, by name."""
        folder = self.lora_dir()
        return find_lora_files([folder]) if folder.is_dir() else {}

    def _last_run_dir(self) -> Path | None:
        state = self.job.snapshot() if self.job else None
        return state.result.run_dir if state and state.result else None

    def interrupt(self) -> str:
        """Ask the run to save and stop; the queue is held until Resume or Run queue."""
        if self.job is None or not self.job.interrupt():
            return "nothing is training"
        self.queue_held = True
        waiting = self._queue is not None and self._queue.jobs()
        return "interrupt requested: the trainer saves and stops at the next step" + ("; the queue waits until you resume it" if waiting else "")

    def snapshot(self) -> JobState:
        return self.job.snapshot() if self.job else JobState()

    def _model(self, what: str, wait: TrainingJob | None = None):
        """The model lock, or BusyError; a queued job (`wait`) waits for its turn unless it is interrupted."""
        if wait is None:
            if not self.model_lock.acquire(blocking=False):
                raise BusyError(f"the model is busy (training or generating); {what} can start when it is done, or interrupt the training")
            return _Release(self.model_lock)
        while not self.model_lock.acquire(timeout=LOCK_POLL_S):
            if wait.stop_requested:
                raise Cancelled()
        if wait.stop_requested:
            self.model_lock.release()
            raise Cancelled()
        return _Release(self.model_lock)

    def use_model(self, what: str):
        """Context manager for other users of the model (the standalone txt2img): refuses while busy."""
        return self._model(what)

    # --- after training
    def lora_folder(self, values: dict) -> Path:
        if values.get("output_dir"):
            check_inside("output_dir", values["output_dir"], [self.lora_dir()], "the Lora folder")
            return Path(values["output_dir"])
        state = self.snapshot()
        if state.result is not None and state.result.final_path is not None:
            return state.result.final_path.parent
        return Path(self.settings.lora_dir) if self.settings.lora_dir else Path(self.host_factory().lora_dir)

    def saved_files(self, values: dict) -> list[compare.EpochFile]:
        return compare.epoch_files(self.lora_folder(values), values.get("output_name") or "last")

    def comparison(self, values: dict, request: CompareRequest, progress=None) -> Image.Image:
        weights = compare.parse_weights(request.weights)
        width, height = fields.config_from_widgets({"resolution": values.get("resolution", "512")}).resolution  # other options may be mid-edit
        params = GenerationParams(prompt=request.prompt, seed=int(request.seed), steps=int(request.steps), cfg_scale=float(request.cfg_scale),
                                  width=width, height=height)
        with self._model("the comparison"), self.settings.job_lock():
            host = self.host_factory()
            files = self.saved_files(values)
            return compare.comparison_grid(host.generate, files, weights, params, progress)

    def keep(self, values: dict, label: str, final_name: str, replace_existing: bool, delete_epochs: bool) -> str:
        name = (final_name or values.get("output_name") or "").strip()
        problem = name_problem(name)
        if problem:
            raise ValueError(f"final name {name!r} {problem}; {ALLOWED}")
        files = {f.label: f for f in self.saved_files(values)}
        if label not in files:
            raise ValueError(f"choose a saved file to keep (found: {', '.join(files) or 'none'})")
        chosen = files[label].path
        final = chosen.with_name(name + chosen.suffix)
        delete = [f.path for f in files.values() if f.label != "final"] if delete_epochs else []
        result = compare.keep_epoch(chosen, final, replace_existing=replace_existing, delete=delete)
        self.host_factory().register_network(result.path)  # the webui lists it (and drops a cached old version)
        return result.message

    # --- captions
    def caption(self, folder: str, captioner: str, mode: str, extension: str, progress=None) -> str:
        from .tags import caption_folder

        self.check_dataset_folder("train_data_dir", folder)
        if captioner not in self.settings.captioners:
            raise ValueError("captioning needs the webui's interrogators (BLIP, deepbooru); this host has none")
        with self._model("captioning"), self.settings.job_lock():
            written, skipped = caption_folder(Path(folder), self.settings.captioners[captioner], mode=mode, extension=extension, progress=progress)
        return f"captioned {written} image(s) with {captioner}; {skipped} kept their caption"


class _Release:
    """Releases an already acquired lock on exit (so `_model` can refuse without blocking)."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False
