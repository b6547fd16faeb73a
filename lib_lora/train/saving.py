"""Writing the LoRA files of a run: intermediate saves, the final file, its card and metadata.

Names follow kohya: `<name>-000004.safetensors` (epoch 4), `<name>-step00000500.safetensors`,
`<name>.safetensors` at the end, all in the host's Lora folder so the webui lists them.
"""

import glob
import hashlib
import random
import re
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from ..data.batches import bucket_info
from ..data.cache import file_sha256
from ..networks.files import save_lora, write_card
from ..networks.metadata import LEGACY_HASH_LENGTH, LEGACY_HASH_OFFSET, base_model_version, card_sd_version, training_metadata
from .config import ConfigError, TrainConfig
from .run_folder import Progress

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def lora_dir_for(config: TrainConfig, host) -> Path:
    return Path(config.output_dir) if config.output_dir else Path(host.lora_dir)


def check_output_free(config: TrainConfig, host) -> None:
    """Refuse before training, not after it, when a LoRA of this name already exists."""
    folder = lora_dir_for(config, host)
    taken = [folder / f"{config.output_name}.safetensors", *folder.glob(f"{glob.escape(config.output_name)}-*.safetensors")]
    taken = [p for p in taken if p.exists()]
    if taken and not config.overwrite:
        raise ConfigError(f"output_name: {taken[0]} already exists; choose another output_name or set overwrite")



def checkpoint_hashes(path: Path, mtime_ns: int) -> dict[str, str]:
    """kohya's `ss_sd_model_hash` (the webui's old 8-hex hash: sha256 of 64 KiB at 1 MiB) and
    `ss_new_sd_model_hash` (sha256 of the whole file) of the base checkpoint; once per file version."""
    return _hashing(Path(path), mtime_ns).result()


def hash_in_background(path: Path) -> None:
    """Start hashing a base checkpoint on another thread, so that the first save need not wait for it
    (about 1.6 s for a 2 GB SD1.5 file on this project's 2-core machine). Started while the checkpoint
    loads, it uses the core that the one-tensor-at-a-time load leaves idle (hashlib releases the GIL)."""
    path = Path(path)
    if path.is_file():  # a missing file is the loader's to report
        _hashing(path, path.stat().st_mtime_ns)


_HASHES: dict[tuple[Path, int], Future] = {}
_HASHES_LOCK = threading.Lock()


def _hashing(path: Path, mtime_ns: int) -> Future:
    """The hashes of this version of the file: computed once, by the first caller's thread."""
    with _HASHES_LOCK:
        future = _HASHES.get((path, mtime_ns))
        if future is None:
            future = _HASHES[(path, mtime_ns)] = Future()
            threading.Thread(target=_compute_hashes, args=(path, mtime_ns, future), daemon=True, name="lib_lora-hash").start()
    return future


def _compute_hashes(path: Path, mtime_ns: int, future: Future) -> None:
    try:
        with open(path, "rb") as handle:
            handle.seek(LEGACY_HASH_OFFSET)
            legacy = hashlib.sha256(handle.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]
        future.set_result({"sd_model_hash": legacy, "new_sd_model_hash": file_sha256(path)})
    except BaseException as error:  # the caller that waits on the future gets it; a later call tries again
        with _HASHES_LOCK:
            del _HASHES[(path, mtime_ns)]
        future.set_exception(error)


class LoraSaver:
    def __init__(self, config: TrainConfig, host, data, run):
        self.config, self.host, self.data, self.run = config, host, data, run
        self.folder = lora_dir_for(config, host)
        self.started_at = time.time()
        self.session_id = random.SystemRandom().randint(0, 2**32 - 1)  # kohya's ss_session_id: one per training process
        self.last_path: Path | None = None

    def _model_hashes(self) -> dict[str, str]:
        path = self.host.checkpoint_path
        return checkpoint_hashes(path, path.stat().st_mtime_ns) if path is not None and path.is_file() else {}

    @property
    def v_parameterization(self) -> bool:
        return self.config.v_parameterization or self.host.schedule.parameterization == "v"

    def metadata(self, network, progress: Progress) -> dict[str, str]:
        c, data = self.config, self.data
        tags = data.train.tag_frequency() | (data.reg.tag_frequency() if data.reg else {})
        return training_metadata(
            output_name=c.output_name,
            network_dim=c.network_dim,
            network_alpha=c.network_alpha,
            network_module=network.network_module,
            network_args=network.network_args(),
            base_model_version=base_model_version(self.host.arch, self.v_parameterization),
            v_parameterization=self.v_parameterization,
            sd_model_name=self.host.model_name,
            resolution=tuple(c.resolution),
            num_train_images=data.train.num_with_repeats(),
            num_epochs=c.max_train_epochs,
            learning_rate=c.learning_rate,
            unet_lr=c.unet_lr or None,
            text_encoder_lr=c.text_encoder_lr or None,
            tag_frequency=tags,
            training_comment=c.training_comment or None,
            clip_skip=c.clip_skip,
            steps=progress.global_step,
            epoch=progress.epoch,
            seed=c.seed,
            training_started_at=self.started_at,
            modelspec={"trigger_phrase": c.trigger_words} if c.trigger_words else None,
            num_reg_images=data.reg.num_with_repeats() if data.reg else 0,
            num_batches_per_epoch=data.steps.batches_per_epoch,
            max_train_steps=data.steps.total_steps,
            batch_size_per_device=c.train_batch_size,
            total_batch_size=c.train_batch_size * c.gradient_accumulation_steps,
            gradient_accumulation_steps=c.gradient_accumulation_steps,
            gradient_checkpointing=c.gradient_checkpointing,
            max_grad_norm=c.max_grad_norm,
            optimizer=c.optimizer_type,
            lr_scheduler=c.lr_scheduler,
            lr_warmup_steps=c.lr_warmup_steps,
            mixed_precision=c.mixed_precision,
            noise_offset=c.noise_offset or None,
            multires_noise_iterations=c.multires_noise_iterations or None,
            multires_noise_discount=c.multires_noise_discount,
            min_snr_gamma=c.min_snr_gamma or None,
            prior_loss_weight=c.prior_loss_weight,
            cache_latents=c.cache_latents,
            shuffle_caption=c.shuffle_caption,
            keep_tokens=c.keep_tokens,
            caption_dropout_rate=c.caption_dropout_rate,
            caption_tag_dropout_rate=c.caption_tag_dropout_rate,
            flip_aug=c.flip_aug,
            random_crop=c.random_crop,
            enable_bucket=c.enable_bucket,
            min_bucket_reso=c.min_bucket_reso,
            max_bucket_reso=c.max_bucket_reso,
            bucket_no_upscale=c.bucket_no_upscale,
            bucket_info=bucket_info(data.samples),
            dataset_dirs={s.directory.name: {"n_repeats": s.repeats, "img_count": len(s.items)} for s in data.train.subsets},
            session_id=self.session_id,
            network_dropout=c.network_dropout or None,
            loss_type="l2",
            zero_terminal_snr=c.zero_terminal_snr,
            validation_split=c.validation_split,
            validation_seed=c.seed if c.validation_split else None,
            num_validation_images=len(data.validation_samples),
            **self._model_hashes(),
        )

    def _write(self, path: Path, network, progress: Progress) -> Path:
        save_lora(path, network.state_dict(), self.metadata(network, progress), SAVE_DTYPES[self.config.save_precision], overwrite=True)
        self.last_path = path
        return path

    def save_intermediate(self, network, progress: Progress, *, by_step: bool) -> Path:
        """An epoch- or step-named save; keeps only the last K when save_last_n_epochs is set."""
        suffix = f"step{progress.global_step:08d}" if by_step else f"{progress.epoch:06d}"
        path = self._write(self.folder / f"{self.config.output_name}-{suffix}.safetensors", network, progress)
        self._keep_last(self.config.save_last_n_epochs)
        self.host.register_network(path)
        return path

    def intermediate_files(self) -> list[Path]:
        """This run's epoch/step files, oldest first (a resumed run sees the ones written before too)."""
        pattern = re.compile(re.escape(self.config.output_name) + r"-(\d{6}|step\d{8})\.safetensors")
        return sorted((p for p in self.folder.glob("*.safetensors") if pattern.fullmatch(p.name)), key=lambda p: p.stat().st_mtime_ns)

    def _keep_last(self, keep: int) -> None:
        files = self.intermediate_files()
        for old in files[: -keep] if keep else []:
            old.unlink(missing_ok=True)

    def save_final(self, network, progress: Progress) -> Path:
        """`<name>.safetensors` plus the webui card (trigger words as activation text) and a preview."""
        path = self._write(self.folder / f"{self.config.output_name}.safetensors", network, progress)
        version = card_sd_version(base_model_version(self.host.arch, self.v_parameterization))
        write_card(path, activation_text=self.config.trigger_words, preferred_weight=1.0, sd_version=version, preview=self._latest_sample())
        self.host.register_network(path)
        return path

    def _latest_sample(self):
        from PIL import Image

        samples = sorted(self.run.samples.glob("*.png"), key=lambda p: p.stat().st_mtime)
        return Image.open(samples[-1]) if samples else None
