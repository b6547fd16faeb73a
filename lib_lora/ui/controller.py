"""What the tab's buttons do, as plain methods over widget values (no Gradio here).

One `TabController` per tab: it owns the running job, the plan cache and the model lock, so two
tabs (or two apps in one process) never share state. The host is obtained from the factory only
when work needs the model (Train, Resume, compare, caption, and the preset list tailored to its
architecture when it is opened), since the webui's model can change.
"""

import threading
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
from ..train import presets
from ..train.base_model import BaseModel
from ..train.config import ConfigError, TrainConfig
from ..train.run_folder import STATE_FILE, RunFolder
from ..train.trainer import train
from . import compare, fields
from .planning import PlanCache, summarize
from .report import build_report
from .runner import JobState, TrainingJob
from .settings import TabSettings

THUMBNAILS = 8


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
        self._start_lock = threading.Lock()
        self.job: TrainingJob | None = None
        self.last_config: TrainConfig | None = None

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
        self.plans.clear()  # the user asked for a fresh look
        config = fields.config_from_widgets({**values, "train_data_dir": ""})  # options only; the folder may be wrong
        return build_report(values.get("train_data_dir", ""), caption_extension=config.caption_extension, resolution=config.resolution,
                            enable_bucket=config.enable_bucket, min_bucket_reso=config.min_bucket_reso, max_bucket_reso=config.max_bucket_reso,
                            bucket_no_upscale=config.bucket_no_upscale, reg_folder=values.get("reg_data_dir", ""))

    @staticmethod
    def thumbnails(folder: str, count: int = THUMBNAILS) -> list[Image.Image]:
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

    # --- run
    def start(self, values: dict, *, resume: bool = False, run_dir: str = "") -> TrainingJob:
        """Start training (or resume a run folder) in the background; a failed start is a failed job."""
        with self._start_lock:
            if self.job is not None and self.job.snapshot().active:
                return self.job
            try:
                config = None if resume else fields.config_from_widgets(values)
            except ConfigError as e:
                self.job = TrainingJob.failed(str(e))
                return self.job
            run_dir = run_dir.strip() or (str(self._last_run_dir() or "") if resume else "")
            self.job = TrainingJob(lambda job: self._train(job, config, run_dir, resume)).start()
            return self.job

    def _train(self, job: TrainingJob, config: TrainConfig | None, run_dir: str, resume: bool):
        with self._model("training"), self.settings.job_lock():
            host = self.host_factory()
            job.attach_host(host)
            folder = None
            if resume:
                folder = Path(run_dir) if run_dir else latest_run(host.runs_dir)
                config = RunFolder.open(folder).config()
            self.last_config = config
            return train(config, host, on_event=job.on_event, run_dir=folder, resume=resume)

    def _last_run_dir(self) -> Path | None:
        state = self.job.snapshot() if self.job else None
        return state.result.run_dir if state and state.result else None

    def interrupt(self) -> str:
        if self.job is None or not self.job.interrupt():
            return "nothing is training"
        return "interrupt requested: the trainer saves and stops at the next step"

    def snapshot(self) -> JobState:
        return self.job.snapshot() if self.job else JobState()

    def _model(self, what: str):
        if not self.model_lock.acquire(blocking=False):
            raise BusyError(f"the model is busy (training or generating); {what} can start when it is done, or interrupt the training")
        return _Release(self.model_lock)

    def use_model(self, what: str):
        """Context manager for other users of the model (the standalone txt2img): refuses while busy."""
        return self._model(what)

    # --- after training
    def lora_folder(self, values: dict) -> Path:
        if values.get("output_dir"):
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
        files = {f.label: f for f in self.saved_files(values)}
        if label not in files:
            raise ValueError(f"choose a saved file to keep (found: {', '.join(files) or 'none'})")
        name = (final_name or values.get("output_name") or "").strip()
        if not name or any(ch in name for ch in '/\\:*?"<>|'):
            raise ValueError(f"final name {name!r} must be a plain file name")
        chosen = files[label].path
        final = chosen.with_name(name + chosen.suffix)
        delete = [f.path for f in files.values() if f.label != "final"] if delete_epochs else []
        result = compare.keep_epoch(chosen, final, replace_existing=replace_existing, delete=delete)
        self.host_factory().register_network(result.path)  # the webui lists it (and drops a cached old version)
        return result.message

    # --- captions
    def caption(self, folder: str, captioner: str, mode: str, extension: str, progress=None) -> str:
        from .tags import caption_folder

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
