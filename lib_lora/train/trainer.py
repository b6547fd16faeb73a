"""The training loop. Reads top to bottom: plan, network, optimizer, then epochs of steps.

It talks only to the `Host` interface, so the same loop trains on the webui's loaded model and on
a checkpoint file. Everything it does is reported through one callback of `TrainEvent`s, which
the CLI progress bar, the tab and the tests subscribe to.
"""

import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..atomic import DiskFullError, require_free_space, write_atomically
from ..models.conditioning import Conditioning, sdxl_vector
from ..models.schedule import NoiseSchedule, rescale_zero_terminal_snr
from ..networks.embeddings import initial_embeddings
from ..networks.network import make_network
from .base_model import BaseModel
from .class_images import FOLDER as CLASS_FOLDER, make_class_images
from .config import ConfigError, TrainConfig, check_for_arch
from .cpu_memory import keep_freed_memory
from .dataset import Batch, BatchEncoder, TrainingData, epoch_batches, latent_cache_bytes, plan_training, plan_warnings
from .distributed import Distributed
from .half_copies import HalfCopies, compute_dtype
from .memory import out_of_memory_advice
from .noise import add_noise, masked_mse, min_snr_weight, offset_noise, pyramid_noise, training_target
from .optim import lr_multiplier, make_optimizer, parameter_groups, warmup_steps_for
from .run_folder import Progress, RunFolder
from .saving import LoraSaver, check_output_free, lora_dir_for
from .samples import parse_sample_prompt


VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what was kept."""


# CUDA's out-of-memory error: torch.OutOfMemoryError since torch 2.5, torch.cuda.OutOfMemoryError (the same class) before
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class TrainEvent:
    kind: str  # prepare | start | step | epoch | save | sample | validation | warning | done
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    paths: list[Path] = field(default_factory=list)
    message: str = ""


@dataclass
class TrainResult:
    run_dir: Path
    final_path: Path | None
    steps: int
    interrupted: bool
    last_loss: float | None


def train(config: TrainConfig, host, *, on_event: Callable[[TrainEvent], None] | None = None, run_dir: Path | None = None, resume: bool = False,
          distributed: Distributed = Distributed()) -> TrainResult:
    """Train a LoRA/LoCon/LoHa/LoKr (with DoRA if asked) on `host` as `config` says; resume=True continues
    the run in run_dir."""
    def emit(event: TrainEvent) -> None:
        if not distributed.is_main:
            return  # under torchrun, process 0 reports for all
        host.report(event)  # the host's own progress display (the webui's job state)
        if on_event is not None:
            on_event(event)

    data = plan_training(config)
    run_dir = Path(run_dir or host.runs_dir / config.output_name)
    check_for_arch(config, host.arch)
    if config.pivotal_tuning and not host.trains_embeddings:
        raise ConfigError("pivotal_tuning: this host cannot train embeddings yet (the webui's own prompt encoding); "
                          "train standalone (python -m lib_lora train) or turn pivotal_tuning off")
    if not resume:
        check_output_free(config, host)
    if resume:
        RunFolder.open(run_dir).check_architecture(host.arch)  # a folder that cannot be resumed is refused before it is locked
    host.clear_interrupt()  # from here on an Interrupt counts: during class images and caching it stops the run at its first step
    claim = RunFolder.claimed(run_dir, lambda note: emit(TrainEvent("warning", message=note)), lora_dir_for(config, host))
    with claim if distributed.is_main else nullcontext():  # only process 0 locks: the others never write there
        if resume or not distributed.is_main:
            run = RunFolder(run_dir)  # only process 0 creates and writes it
        else:
            run = RunFolder.create(run_dir, config, host.arch)
        if config.draws_class_images:
            data = _with_class_images(config, host, data, run, emit, distributed)
        return _train_in(run, config, host, data, resume, emit, distributed)


def _with_class_images(config: TrainConfig, host, data: TrainingData, run: RunFolder, emit, distributed: Distributed) -> TrainingData:
    """Draw the run's class images with the base (process 0; the others wait) and plan with them as regularization."""
    folder = run.path / CLASS_FOLDER
    if distributed.is_main:
        def progress(done: int, total: int) -> None:
            emit(TrainEvent("prepare", done, total, message=f"class images: {done}/{total} drawn with the base model"))

        make_class_images(host, config, [item.caption for item in data.train.items()], folder, progress)
    distributed.any(False)  # a barrier: every process reads the finished folder
    return plan_training(config, reg_dir=folder)


def _train_in(run: RunFolder, config: TrainConfig, host, data: TrainingData, resume: bool, emit, distributed: Distributed) -> TrainResult:
    try:
        encoder = BatchEncoder(host, config, data.choices, run.path / "latents" if config.cache_latents_to_disk else None)
        _check_latent_cache_room(encoder, data, config)
        _cache_latents_first(config, host, data, encoder, emit)
        return _train_with(run, config, host, data, encoder, resume, emit, distributed)
    except DiskFullError as error:
        raise TrainingError(f"{error}. Training stopped; once there is room, resume the run folder {run.path} "
                            "(--resume, or Resume in the tab) to go on from its last saved state") from error


def _train_with(run: RunFolder, config: TrainConfig, host, data: TrainingData, encoder: BatchEncoder, resume: bool, emit,
                distributed: Distributed) -> TrainResult:
    emit(TrainEvent("start", total_steps=data.steps.total_steps, message=data.steps.describe()))
    for note in plan_warnings(config, data, BaseModel.of(host)):
        emit(TrainEvent("warning", message=note))
    outer_rng = torch.get_rng_state()  # the host's own random stream is given back untouched
    torch.manual_seed(config.seed)  # the LoRA down-projections' random init, and later dropout
    embeddings = initial_embeddings([m.module for m in host.text_encoders], config.trigger_tokens, config.init_word,
                                    config.num_vectors_per_token, device=host.device) if config.pivotal_tuning else ()
    network = make_network(
        host.unet if config.train_unet else None,
        host.text_encoders if config.train_text_encoder else None,
        algo="lora" if config.network_type == "locon" else config.network_type,
        network_dim=config.network_dim,
        network_alpha=config.network_alpha,
        conv_dim=config.conv_dim if config.conv_targets else None,
        conv_alpha=config.conv_alpha if config.conv_targets else None,
        dropout=config.network_dropout,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        dora_wd=config.dora_wd,
        lokr_factor=config.lokr_factor,
        block_dims=config.block_values("block_dims"),
        block_alphas=config.block_values("block_alphas"),
        conv_block_dims=config.block_values("conv_block_dims"),
        conv_block_alphas=config.block_values("conv_block_alphas"),
        train_blocks=config.chosen_blocks,
        cross_attention_only=config.cross_attention_only,
        embeddings=embeddings,
        device=host.device,
    )
    host.set_gradient_checkpointing(config.gradient_checkpointing)
    if host.device.type == "cpu":
        keep_freed_memory()  # a fifth of a CPU step was page faults (see cpu_memory.py)
    try:
        with network:  # hooks live only inside; removed even on errors
            return _run(config, host, data, network, encoder, run, resume, emit, distributed)
    finally:
        host.set_gradient_checkpointing(False)
        torch.set_rng_state(outer_rng)
        if config.torch_compile:
            torch._dynamo.reset()  # the compiled graphs hold this run's adapters; the next run's hooks compile afresh


def _seeded_rngs(config: TrainConfig) -> tuple[random.Random, torch.Generator]:
    """Data choices (captions, flips, crops) and noise/timesteps draw from their own seeded streams."""
    return random.Random(config.seed), torch.Generator(device="cpu").manual_seed(config.seed)


def training_schedule(config: TrainConfig, host) -> NoiseSchedule:
    """The host's schedule, with kohya's `--v_parameterization` and `--zero_terminal_snr` applied."""
    alphas = host.schedule.alphas_cumprod
    if config.zero_terminal_snr:
        alphas = rescale_zero_terminal_snr(alphas)
    return NoiseSchedule(alphas, "v" if config.v_parameterization else host.schedule.parameterization)


def _make_optimizer(config: TrainConfig, network, host):
    if host.arch == "sdxl":  # each encoder its own rate, as kohya's two --text_encoder_lr values
        text, text_2 = network.text_encoder_parameters("lora_te1"), network.text_encoder_parameters("lora_te2")
    else:
        text, text_2 = network.text_encoder_parameters(), []
    groups = parameter_groups(network.unet_parameters(), text, config.effective_unet_lr, config.effective_text_encoder_lr,
                              text_2, config.effective_text_encoder_2_lr, network.embedding_parameters(), config.embedding_lr)
    return make_optimizer(
        groups,
        optimizer_type=config.optimizer_type,
        weight_decay=config.weight_decay,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        momentum=config.sgd_momentum,
    )


def _set_lr(optimizer, config: TrainConfig, step: int, total: int) -> float:
    mult = lr_multiplier(
        step,
        scheduler=config.lr_scheduler,
        total_steps=total,
        warmup_steps=warmup_steps_for(config.lr_warmup_steps, total),
        num_cycles=config.lr_scheduler_num_cycles,
        power=config.lr_scheduler_power,
    )
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * mult
    return optimizer.param_groups[0]["lr"]


def _cache_latents_first(config: TrainConfig, host, data: TrainingData, encoder: BatchEncoder, emit) -> None:
    """kohya's cache_latents: when the run draws at least as many samples as a full latent cache holds, every latent
    is encoded before the first step, and then the host may free its VAE encoder (SD1.5: 130 MiB; the held-out
    validation images are encoded as they are used, so it stays for them). A shorter run encodes as it goes."""
    entries = encoder.full_cache(data.samples)
    drawn = data.steps.total_steps * config.train_batch_size * config.gradient_accumulation_steps
    if not entries or drawn < len(entries):
        return
    for done, (sample, plan, flip) in enumerate(entries, 1):
        if host.interrupted():
            return  # the run stops after its first step, which encodes what it needs
        encoder.latents(sample, plan, flip)
        emit(TrainEvent("prepare", done, len(entries), message=f"caching latents: {done}/{len(entries)}"))
    if not data.validation_samples:
        host.release_vae_encoder()


def _run(config, host, data: TrainingData, network, encoder: BatchEncoder, run: RunFolder, resume: bool, emit,
         distributed: Distributed) -> TrainResult:
    data_rng, noise_rng = _seeded_rngs(config)
    optimizer = _make_optimizer(config, network, host)
    progress = run.load_state(network, optimizer, data_rng, noise_rng) if resume and run.has_state() else Progress()
    save_state = partial(run.save_state, progress, network, optimizer, data_rng, noise_rng)  # progress changes in place
    if resume and distributed.is_main:
        run.truncate_log(progress.global_step)
    saver = LoraSaver(config, host, data, run) if distributed.is_main else None
    scaler = _grad_scaler(config, host)
    text_cache = {} if _can_cache_text(config) else None
    schedule = training_schedule(config, host)
    compiled = _CompiledForwards(host, network, config.dynamo_backend, text_cache is None) if config.torch_compile else nullcontext()
    copies = HalfCopies.for_network(network, compute_dtype(host.dtype, _autocast_dtype(config, host)))  # after load_state
    total = data.steps.total_steps
    last_loss, tick, batches = None, time.perf_counter(), []
    network.train()
    try:
        while progress.global_step < total:
            batches = epoch_batches(data, config, progress.epoch)
            accumulate = config.gradient_accumulation_steps
            for index in range(progress.batch_in_epoch, len(batches)):
                samples = batches[index]
                rows = distributed.rows(len(samples))  # this process's share of the batch (all of it in one process)
                batch = encoder.encode(samples, data_rng, rows)
                noise, timesteps = _draw_noise(config, distributed.agree_shape(batch.latents.shape[1:]), len(samples), noise_rng)
                with compiled:
                    loss = _loss(config, host, schedule, batch, noise[rows], timesteps[rows], text_cache, network) if len(batch.captions) else None
                batch_loss = distributed.total(0.0 if loss is None else loss.item())  # the whole batch's mean loss
                if not math.isfinite(batch_loss):
                    raise TrainingError(f"loss became {batch_loss} at step {progress.global_step + 1}; stopped. The last good save is kept in {saver.last_path if saver and saver.last_path else 'no file yet'}. Lower the learning rate or use fp32/bf16.")
                if loss is not None:
                    scaler.scale(loss / accumulate).backward()
                    if copies is not None:
                        copies.gather_grads()
                progress.batch_in_epoch = index + 1
                if progress.batch_in_epoch % accumulate and progress.batch_in_epoch != len(batches):
                    continue
                lr = _set_lr(optimizer, config, progress.global_step, total)
                distributed.sum_gradients(list(network.parameters()))
                _optimizer_step(config, network, optimizer, scaler)
                if copies is not None:
                    copies.refresh()
                progress.global_step += 1
                last_loss = batch_loss
                now = time.perf_counter()
                event = TrainEvent("step", progress.global_step, total, progress.epoch + 1, last_loss, progress.average_loss(last_loss), lr, 1 / max(now - tick, 1e-9))
                tick = now
                if distributed.is_main:
                    run.log({"step": event.step, "epoch": event.epoch, "loss": last_loss, "avg_loss": event.avg_loss, "lr": lr, "it_per_s": event.it_per_s})
                    emit(event)
                    _step_hooks(config, host, network, run, saver, progress, emit, save_state, total)
                if distributed.any(host.interrupted()):
                    return _stop(config, network, run, saver, progress, save_state, emit, last_loss, interrupted=True)
                if progress.global_step >= total:
                    break
            if progress.batch_in_epoch >= len(batches):
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                if distributed.is_main:
                    _epoch_hooks(config, host, network, data, run, saver, progress, save_state, emit)
        return _stop(config, network, run, saver, progress, save_state, emit, last_loss, interrupted=False)
    except OUT_OF_MEMORY as e:
        progress.batch_in_epoch = _last_whole_step(progress.batch_in_epoch, config.gradient_accumulation_steps, len(batches))
        raise _out_of_memory(config, network, saver, progress, save_state, emit, e) from e
    finally:
        if copies is not None:
            copies.close()


class _CompiledForwards:
    """torch_compile: the forwards of the UNet (and of the text encoders, where they run every step) compiled with the
    adapters' hooks inside, put in place only around a training step's forward, so that samples, validation and class
    images run the modules as they are. Each compiles on its first step (again at each new latent size); the adapters'
    scales are read first, as a tensor read inside the graph would break it at every adapter."""

    def __init__(self, host, network, backend: str, text_encoders: bool):
        modules = [host.unet, *([m.module for m in host.text_encoders] if text_encoders else [])]
        for adapter in network.adapters():
            adapter.cache_scale()
        self.compiled = {module: torch.compile(module.forward, backend=backend) for module in modules}
        self.own = {module: vars(module).get("forward") for module in modules}  # a host may have patched one

    def __enter__(self) -> None:
        for module, forward in self.compiled.items():
            module.forward = forward

    def __exit__(self, *exc) -> None:
        for module, own in self.own.items():
            if own is None:
                del module.forward
            else:
                module.forward = own


def _check_latent_cache_room(encoder: BatchEncoder, data: TrainingData, config: TrainConfig) -> None:
    """Before the first latent is cached to disk: room for all of them, less those a resumed run has already."""
    folder = encoder.cache.directory if encoder.cache is not None else None
    if folder is not None:
        cached = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        require_free_space(folder, latent_cache_bytes(data, config.flip_aug) - cached, "caching latents to disk (cache_latents_to_disk)")


def _can_cache_text(config: TrainConfig) -> bool:
    """Text-encoder outputs are reusable only if the encoder and the trigger embeddings are frozen and captions never change."""
    varying = config.shuffle_caption or config.caption_dropout_rate > 0 or config.caption_tag_dropout_rate > 0
    return not config.train_text_encoder and not config.pivotal_tuning and not varying


def _grad_scaler(config: TrainConfig, host):
    """Loss scaling whenever fp16 is in the backward pass: fp16 autocast, or a host whose weights are fp16."""
    enabled = host.device.type == "cuda" and (config.mixed_precision == "fp16" or host.dtype == torch.float16)
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch 2.1, as the webui 1.10.1 ships: no torch.amp.GradScaler


def _autocast_dtype(config: TrainConfig, host) -> torch.dtype | None:
    """The dtype of the run's autocast (`mixed_precision` on CUDA), None without one."""
    if config.mixed_precision == "no" or host.device.type != "cuda":
        return None
    return torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16


def _autocast(config: TrainConfig, host):
    dtype = _autocast_dtype(config, host)
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def _encode_text(config, host, captions: list[str], text_cache: dict | None, network) -> Conditioning:
    """The captions' conditioning, the trigger words' embeddings in (pivotal tuning); with a cache (frozen
    encoders, fixed captions) each caption is encoded once."""
    if text_cache is None:
        return host.encode_text(captions, config.clip_skip, **_live_embeddings(network))
    missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
    if missing:
        with torch.no_grad():
            encoded = host.encode_text(missing, config.clip_skip)
            for i, caption in enumerate(missing):
                text_cache[caption] = encoded[i : i + 1]
    return _same_length_cat([text_cache[c] for c in captions])


def _live_embeddings(network) -> dict:
    """`embeddings=` for the host's encode_text/generate when the network learns trigger embeddings, else nothing."""
    vectors = network.embedding_vectors()
    return {"embeddings": vectors} if vectors else {}


def _same_length_cat(parts: list[Conditioning]) -> Conditioning:
    """Concatenate contexts of different chunk counts by repeating their last chunk (rare: >75 tokens)."""
    length = max(p.context.shape[1] for p in parts)
    padded = [Conditioning(torch.cat([p.context] + [p.context[:, -77:]] * ((length - p.context.shape[1]) // 77), dim=1), p.pooled)
              for p in parts]
    return Conditioning.cat(padded)


def _predict(host, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, size_info: torch.Tensor) -> torch.Tensor:
    """The UNet's output; SDXL also gets its vector y (pooled text + each sample's size and crop)."""
    context = cond.context.to(host.dtype)
    if cond.pooled is None:
        return host.unet(noisy.to(host.dtype), timesteps, context)
    y = sdxl_vector(cond.pooled, size_info[:, 0:2], size_info[:, 2:4], size_info[:, 4:6]).to(host.dtype)
    return host.unet(noisy.to(host.dtype), timesteps, context, y)


def _draw_noise(config: TrainConfig, latent_shape: torch.Size, batch_size: int, noise_rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and timesteps of a whole batch (every process draws them all and keeps its rows)."""
    noise = torch.randn((batch_size, *latent_shape), generator=noise_rng)
    if config.noise_offset:
        noise = offset_noise(noise, config.noise_offset, noise_rng)
    if config.multires_noise_iterations:
        noise = pyramid_noise(noise, config.multires_noise_iterations, config.multires_noise_discount, noise_rng)
    return noise, torch.randint(config.min_timestep, config.max_timestep, (batch_size,), generator=noise_rng)


def _loss(config: TrainConfig, host, schedule: NoiseSchedule, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor, text_cache,
          network) -> torch.Tensor:
    """One micro-batch (or a process's rows of it): noise the latents, predict, weighted MSE against the target,
    summed over the rows and divided by the whole batch's size (one process: the mean)."""
    latents = batch.latents.to(host.device)
    noise = noise.to(host.device)
    alphas = schedule.alphas_cumprod
    noisy = add_noise(latents, noise, alphas.to(host.device), timesteps.to(host.device))
    with _autocast(config, host):
        cond = _encode_text(config, host, batch.captions, text_cache, network)
        prediction = _predict(host, noisy, timesteps.to(host.device), cond, batch.size_info)
    target = training_target(latents, noise, alphas.to(host.device), timesteps.to(host.device), schedule.parameterization)
    if config.prior_loss_target == "base" and batch.is_reg.any():
        target = _base_target_for_reg_rows(config, host, network, batch, noisy, timesteps.to(host.device), target, text_cache)
    per_sample = masked_mse(prediction, target, None if batch.masks is None else batch.masks.to(host.device))
    weights = torch.where(batch.is_reg, config.prior_loss_weight, 1.0).to(host.device)
    if config.min_snr_gamma:
        weights = weights * min_snr_weight(alphas, timesteps, config.min_snr_gamma, schedule.parameterization).to(host.device)
    return (per_sample * weights).sum() / batch.batch_size


def _base_target_for_reg_rows(config: TrainConfig, host, network, batch: Batch, noisy: torch.Tensor, timesteps: torch.Tensor,
                              target: torch.Tensor, text_cache) -> torch.Tensor:
    """`target` with its regularization rows replaced by the base model's own prediction (every adapter off) on
    the same noisy latents and captions: their loss is then zero until the LoRA changes what the base draws for
    those prompts, where the noise target also asks the LoRA to fit the regularization images themselves."""
    rows = batch.is_reg.to(host.device)
    strength, network.multiplier = network.multiplier, 0.0
    try:
        with torch.no_grad(), _autocast(config, host):
            captions = [caption for caption, reg in zip(batch.captions, batch.is_reg.tolist()) if reg]
            cond = _encode_text(config, host, captions, text_cache, network)
            base = _predict(host, noisy[rows], timesteps[rows], cond, batch.size_info[batch.is_reg])
    finally:
        network.multiplier = strength
    target = target.clone()
    target[rows] = base.to(target.dtype)
    return target


def _optimizer_step(config: TrainConfig, network, optimizer, scaler) -> None:
    if config.max_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), config.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _step_hooks(config, host, network, run, saver, progress, emit, save_state: Callable[[], None], total: int) -> None:
    """Step-named saves and samples; a step-named save saves the resumable state too (kohya's save_state), last,
    so a run killed after it resumes here and one killed before it redoes these steps and their files."""
    step = progress.global_step
    saving = config.save_every_n_steps and step % config.save_every_n_steps == 0
    if saving:
        emit(TrainEvent("save", step, epoch=progress.epoch + 1, paths=[saver.save_intermediate(network, progress, by_step=True)]))
    if config.sample_every_n_steps and step % config.sample_every_n_steps == 0:
        emit(TrainEvent("sample", step, epoch=progress.epoch + 1, paths=render_samples(config, host, network, run, f"s{step:06d}")))
    if saving and step < total:  # the last step's state is saved by the epoch's end or the stop
        save_state()


def _epoch_hooks(config, host, network, data, run, saver, progress, save_state: Callable[[], None], emit) -> None:
    """Validation, epoch-named saves and samples, then the resumable state (last: see _step_hooks)."""
    epoch, step = progress.epoch, progress.global_step
    emit(TrainEvent("epoch", step, data.steps.total_steps, epoch))
    if data.validation is not None:
        val_loss = validation_loss(config, host, network, data)
        run.log({"step": step, "epoch": epoch, "val_loss": val_loss})
        emit(TrainEvent("validation", step, epoch=epoch, loss=val_loss))
    is_last = step >= data.steps.total_steps
    if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0 and not is_last:
        emit(TrainEvent("save", step, epoch=epoch, paths=[saver.save_intermediate(network, progress, by_step=False)]))
    if config.sample_every_n_epochs and epoch % config.sample_every_n_epochs == 0:
        emit(TrainEvent("sample", step, epoch=epoch, paths=render_samples(config, host, network, run, f"e{epoch:04d}")))
    save_state()


def _stop(config, network, run, saver, progress, save_state: Callable[[], None], emit, last_loss, *, interrupted: bool) -> TrainResult:
    """Save the resumable state and the LoRA (final, or a step-named one when interrupted); process 0 only."""
    if saver is None:
        return TrainResult(run.path, None, progress.global_step, interrupted, last_loss)
    save_state()
    path = saver.save_intermediate(network, progress, by_step=True) if interrupted else saver.save_final(network, progress)
    emit(TrainEvent("save", progress.global_step, epoch=progress.epoch, paths=[path]))
    emit(TrainEvent("done", progress.global_step, epoch=progress.epoch, loss=last_loss, paths=[path], message="interrupted" if interrupted else "finished"))
    return TrainResult(run.path, path, progress.global_step, interrupted, last_loss)


def _last_whole_step(batch_in_epoch: int, accumulate: int, batches: int) -> int:
    """The batch index of the last optimizer step: inside a gradient-accumulation group, the group's start (the
    loop steps after every `accumulate` batches and after the epoch's last one)."""
    return batch_in_epoch if batch_in_epoch == batches else batch_in_epoch - batch_in_epoch % accumulate


def _out_of_memory(config, network, saver, progress: Progress, save_state: Callable[[], None], emit, error) -> TrainingError:
    """After CUDA ran out of memory: free what the failed step held, save the state and the LoRA of the last whole
    optimizer step (as Interrupt does, so Resume continues there), and say how to fit."""
    network.zero_grad(set_to_none=True)  # a half-accumulated step is dropped; its micro-batches run again on resume
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    kept = "nothing was trained yet, so nothing was saved"
    if saver is not None and progress.global_step:
        path = saver.save_intermediate(network, progress, by_step=True)
        save_state()  # last, as every save: a crash before it redoes the step
        emit(TrainEvent("save", progress.global_step, epoch=progress.epoch, paths=[path]))
        kept = f"the LoRA so far is saved as {path} and the run can be resumed from step {progress.global_step}"
    return TrainingError(f"out of GPU memory at step {progress.global_step + 1} ({str(error).splitlines()[0][:120]}); {kept}. "
                         f"To fit: {out_of_memory_advice(config)}")


@torch.no_grad()
def validation_loss(config: TrainConfig, host, network, data: TrainingData) -> float:
    """Mean loss over the held-out images at fixed timesteps and fixed noise, so epochs compare."""
    network.eval()
    try:
        encoder = BatchEncoder(host, config.replace(flip_aug=False, random_crop=False), data.choices, None)
        rng, noise_rng = random.Random(0), torch.Generator().manual_seed(0)
        schedule, losses = training_schedule(config, host), []
        for t in VALIDATION_TIMESTEPS:
            for sample in data.validation_samples:
                batch = encoder.encode([sample], rng)
                latents = batch.latents.to(host.device)
                noise = torch.randn(latents.shape, generator=noise_rng).to(host.device)
                timesteps = torch.full((1,), t, device=host.device)
                alphas = schedule.alphas_cumprod.to(host.device)
                noisy = add_noise(latents, noise, alphas, timesteps)
                cond = host.encode_text([batch.captions[0]], config.clip_skip, **_live_embeddings(network))
                prediction = _predict(host, noisy, timesteps, cond, batch.size_info)
                target = training_target(latents, noise, alphas, timesteps, schedule.parameterization)
                losses.append(masked_mse(prediction, target, None).item())
        return sum(losses) / len(losses)
    finally:
        network.train()


def render_samples(config: TrainConfig, host, network, run: RunFolder, tag: str) -> list[Path]:
    """Render each sample prompt with the network as trained so far; files in the run's samples/."""
    network.eval()
    paths = []
    try:
        for i, line in enumerate(config.sample_prompts):
            params = parse_sample_prompt(line, width=config.resolution[0], height=config.resolution[1], sampler=config.sample_sampler, clip_skip=config.clip_skip, default_seed=config.seed + i)
            for j, image in enumerate(host.generate(params, **_live_embeddings(network))):
                paths.append(write_atomically(run.samples / f"{tag}-{i:02d}-{j}.png", lambda tmp: image.save(tmp, format="PNG")))
    finally:
        network.train()
    return paths
