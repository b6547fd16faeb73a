"""The webui host: train on AUTOMATIC1111's loaded `shared.sd_model` (v1.10), in place, with hooks.

    with open_webui_host(config) as host:      # holds call_queue.queue_lock for the whole run
        train(config, host, on_event=on_event)  # train() also reports each event to host.report

SD1, SD2 (ldm `LatentDiffusion`) and SDXL (sgm `DiffusionEngine`) train in place (Forge's model: forge.py,
which shares `WebuiFamilyHost` and the session helpers here). `open_webui_host`
refuses what cannot work (SD3, the SDXL refiner, inpainting/edit models, fp8, --lowvram,
text-encoder training under --medvram, a TensorRT-style SD UNet) with a
`WebuiHostError` the tab can show, then puts the model in a trainable, clean state and gives every
change back on exit: the built-in Lora extension's merged weights are restored and its
`loaded_networks` cleared, hypernetworks unloaded, cross-attention optimizations undone unless
"Use cross attention optimizations while training" is set (as the webui's own TI training does),
ldm's reentrant block checkpointing switched off (it drops the grads of hooked adapters),
`requires_grad` cleared on the base weights, and OpenCLIP's `nn.MultiheadAttention` given q/k/v/out
children that adapters can hook (networks/fused_attention.py). Progress goes to `shared.state`; Interrupt is honoured.
References are to webui-integration.md (facts 1-10, §2.x).

`modules.*` is imported lazily, inside functions only, so `import lib_lora` works without the webui.
"""

import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path

import torch
from torch import nn

from ..models.conditioning import Conditioning
from ..models.pipeline import Embeddings, GenerationParams
from ..models.schedule import NoiseSchedule
from ..networks.fused_attention import expose_all
from ..networks.targets import TextModel, text_models_for
from ..train.cpu_memory import give_back_freed_memory
from .base import Host

SETTINGS_SECTION = ("train_lora", "Train LoRA")
SETTINGS_CATEGORY = "training"  # shown under Settings > Training
MEDVRAM_POLICIES = ("Train the UNet only", "Refuse")
JOB = "train-lora"
MEDVRAM_TEXT_ENCODER = "Under --medvram only the UNet can be trained (the text encoder moves between devices). Choose UNet only, or restart without --medvram."
_SAMPLERS = {"euler_a": "Euler a", "euler": "Euler", "ddim": "DDIM"}  # lib_lora sampler names -> the webui's
_CHECKPOINT_BLOCKS = frozenset({"ResBlock", "BasicTransformerBlock"})  # what sd_hijack_checkpoint wraps
_FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))

_active: "WebuiFamilyHost | None" = None  # the host of the running session, for on_script_unloaded


NO_EMBEDDINGS = ("Pivotal tuning (trainable trigger-word embeddings) is not available inside the webui yet; train "
                 "standalone (python -m lib_lora train), then use the LoRA here: its bundled embeddings load with it.")


class WebuiHostError(RuntimeError):
    """The webui's loaded model or setup cannot be trained on; the message says why and what to do."""


def _shared():
    from modules import shared

    return shared


def _lora_extension():
    """The built-in Lora extension's `networks` module (A1111), or None when it is disabled (fact 6)."""
    networks = sys.modules.get("networks")
    return networks if hasattr(networks, "loaded_networks") and hasattr(networks, "list_available_networks") else None


# ---- checks ------------------------------------------------------------------------------------


def check_trainable(sd_model, *, train_text_encoder: bool = True) -> None:
    """Raise WebuiHostError naming the first reason this model cannot be trained here (§2.1, §2.8)."""
    shared = _shared()
    if sd_model is None:
        raise WebuiHostError("No Stable Diffusion checkpoint is loaded. Select one at the top of the page, wait for it to load, then train.")
    if hasattr(sd_model, "forge_objects"):
        raise WebuiHostError("This is a Stable Diffusion WebUI Forge model: it trains through the Forge host (lib_lora.hosts.forge), "
                             "which the extension picks in Forge. Restart the webui if Forge's files were added to an A1111 install.")
    kind = _model_kind(sd_model)
    if kind == "SD3":
        raise WebuiHostError("The loaded checkpoint is SD3; Train LoRA trains SD1.x, SD2.x and SDXL models. Load one of those to train.")
    if kind == "SDXL refiner":
        raise WebuiHostError("The loaded checkpoint is the SDXL refiner; LoRAs are trained on the SDXL base model or a fine-tune of it. Load one to train.")
    inpainting = getattr(sd_model.model, "conditioning_key", "crossattn") in ("hybrid", "concat") or getattr(sd_model, "is_sdxl_inpaint", False)
    if inpainting or getattr(sd_model, "cond_stage_key", "txt") == "edit":
        raise WebuiHostError("The loaded checkpoint is an inpainting or instruct-pix2pix model; train on its base model instead.")
    if getattr(shared.cmd_opts, "lowvram", False):
        raise WebuiHostError("Training is not possible with --lowvram (the webui moves each UNet block between devices). Restart without --lowvram, or with --medvram.")
    medvram = getattr(sd_model, "lowvram", False)  # set by lowvram.apply for --medvram (and --lowvram, refused above)
    if medvram and shared.opts.data.get("train_lora_medvram_policy", MEDVRAM_POLICIES[0]) == "Refuse":
        raise WebuiHostError("Training under --medvram is switched off in Settings > Train LoRA. Restart without --medvram, or allow UNet-only training there.")
    if medvram and train_text_encoder:
        raise WebuiHostError(MEDVRAM_TEXT_ENCODER)
    _check_weights(sd_model)


def _model_kind(sd_model) -> str:
    if getattr(sd_model, "is_sd3", False):
        return "SD3"
    if getattr(sd_model, "is_sdxl", False) or getattr(sd_model, "is_ssd", False) or hasattr(sd_model, "conditioner"):
        embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", [])
        text_embedders = [e for e in embedders if hasattr(e, "wrapped")]
        return "SDXL" if len(text_embedders) >= 2 else "SDXL refiner"  # the refiner has bigG alone
    if getattr(sd_model, "is_sd2", False) or hasattr(sd_model.cond_stage_model, "model"):  # SD2: open_clip's `.model`
        return "SD2"
    return "SD1"


def _check_weights(sd_model) -> None:
    from modules import devices, sd_unet

    if sd_unet.current_unet is not None:
        raise WebuiHostError("An alternative SD UNet (e.g. TensorRT) is active and bypasses the PyTorch UNet; set Settings > SD Unet to None to train.")
    weight = next(sd_model.model.diffusion_model.parameters())
    if getattr(devices, "fp8", False) or weight.dtype in _FP8:
        raise WebuiHostError("FP8 weight storage is on; set Settings > Optimizations > FP8 weight to Disable (the model reloads), then train.")


# ---- the host ----------------------------------------------------------------------------------


class WebuiFamilyHost(Host):
    """What A1111 and Forge share: samples through `processing`, progress in `shared.state`, Interrupt,
    block checkpointing by class name (both UNets keep ldm's ResBlock/BasicTransformerBlock) and the Lora rescan.

    Subclasses set the model attributes and say in `_after_sampling` how a sample's `<lora:...>` is undone.
    """

    trains_embeddings = False  # its prompts go through the webui's own tokenizer and embedding database

    def __init__(self, sd_model, *, lora_dir: Path, runs_dir: Path):
        super().__init__()
        self.sd_model = sd_model
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.model_name = getattr(info, "model_name", None) or "unknown"
        filename = getattr(info, "filename", None)
        self.checkpoint_path = Path(filename) if filename and Path(filename).is_file() else None
        self.lora_dir, self.runs_dir = Path(lora_dir), Path(runs_dir)
        self._checkpointed: list[nn.Module] = []
        self._progress = (0, 0, "")  # job_count, job_no, textinfo of the training, restored after previews

    def generate(self, params: GenerationParams, embeddings: Embeddings | None = None):
        """Samples through `processing.process_images`, with the training adapters live (their hooks fire)."""
        from modules import processing

        if embeddings:
            raise WebuiHostError(NO_EMBEDDINGS)
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=self.sd_model, prompt=params.prompt, negative_prompt=params.negative_prompt, steps=params.steps,
            cfg_scale=params.cfg_scale, seed=params.seed, width=params.width, height=params.height, batch_size=params.batch_size,
            sampler_name=_SAMPLERS.get(params.sampler, params.sampler), do_not_save_grid=True, do_not_save_samples=True,
            do_not_reload_embeddings=True, override_settings=self._sample_settings(params), override_settings_restore_afterwards=True,
        )
        try:
            with closing(p):
                processed = processing.process_images(p)
        finally:
            self._after_sampling()  # a <lora:...> in a sample prompt merged weights (§2.10)
            self._show_progress()
        images = list(processed.images[processed.index_of_first_image:])
        if images:
            _shared().state.assign_current_image(images[0])
        return images

    def _after_sampling(self) -> None:
        """Undo what a sample's `<lora:name:w>` did to the model."""
        raise NotImplementedError

    def _sample_settings(self, params: GenerationParams) -> dict:
        settings = {"CLIP_stop_at_last_layers": params.clip_skip}
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        if info is not None:  # pin the loaded checkpoint: process_images would otherwise load the selected one
            settings["sd_model_checkpoint"] = info.title
        return settings

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute ResBlocks and transformer blocks in backward, non-reentrant (fact 7), per instance.

        The wrapper calls the block's class `forward` at call time, so the webui's own class patches
        stay in effect; it only checkpoints when grad is on, so previews run as usual.
        """
        self._remove_checkpointing()
        if not enabled:
            return
        for block in self.unet.modules():
            if type(block).__name__ in _CHECKPOINT_BLOCKS:
                block.forward = _checkpointed_forward(block)
                self._checkpointed.append(block)

    def _remove_checkpointing(self) -> None:
        while self._checkpointed:
            del self._checkpointed.pop().forward  # the instance attribute; the class forward shows again

    # -- progress, interrupt, registration
    def interrupted(self) -> bool:
        return super().interrupted() or bool(_shared().state.interrupted)

    def clear_interrupt(self) -> None:
        super().clear_interrupt()
        _shared().state.interrupted = False

    def report(self, event) -> None:
        """Mirror a TrainEvent into `shared.state` (train() calls this for every event) (job_count = steps, job_no = step, one-line textinfo)."""
        count, step, text = self._progress
        if event.kind == "prepare":
            count, step, text = event.total_steps, event.step, f"Training LoRA: {event.message}"
        elif event.kind == "start":
            count, step, text = event.total_steps, 0, f"Training LoRA: {event.total_steps} steps"
        elif event.kind == "step":
            count, step = event.total_steps or count, event.step
            text = f"Training LoRA: step {event.step}/{count}, epoch {event.epoch}, loss {event.avg_loss:.4f}"
        elif event.kind in ("save", "sample", "done") and event.paths:
            text = f"Training LoRA: step {event.step}/{count}, {event.kind}: {Path(event.paths[-1]).name}"
        self._progress = (count, step, text)
        self._show_progress()

    def _show_progress(self) -> None:
        state = _shared().state
        state.job_count, state.job_no, state.textinfo = self._progress
        state.sampling_step, state.sampling_steps = 0, 0

    def register_network(self, path: Path) -> None:
        """Rescan the Lora folder so the cards and `<lora:name:w>` know the file now (§3.1, §3.6).

        The extra-networks cards still need the page's refresh buttons clicked (fact 10); the tab does that.
        """
        networks = _lora_extension()
        if networks is not None:
            networks.list_available_networks()


class WebuiHost(WebuiFamilyHost):
    """`shared.sd_model` as a Host. Build it through `open_webui_host`, which prepares and restores the model."""

    def __init__(self, sd_model, *, lora_dir: Path, runs_dir: Path):
        super().__init__(sd_model, lora_dir=lora_dir, runs_dir=runs_dir)
        from modules import devices

        self.arch = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl"}[_model_kind(sd_model)]
        self.unet = sd_model.model.diffusion_model
        self.text_encoders = _text_models(sd_model, self.arch)
        alphas = getattr(sd_model, "alphas_cumprod_original", None)  # fp32 copy; alphas_cumprod may be downcast (§2.6)
        alphas = sd_model.alphas_cumprod if alphas is None else alphas
        self.schedule = NoiseSchedule(alphas.detach().float().cpu(), getattr(sd_model, "parameterization", "eps"))
        self.device = torch.device(devices.device)
        self.dtype = next(self.unet.parameters()).dtype

    # -- model access (Host interface)
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The webui's VAE path (§2.5) with the posterior mean, not a sample, as the Host contract says.

        sgm's (SDXL) encode_first_stage samples and scales in one call, so for SDXL the mean is taken
        from the VAE's encoder and quant_conv directly and scaled by the model's scale_factor (0.13025).
        """
        from modules import devices

        m = self.sd_model
        pixels = pixels.to(devices.device, devices.dtype_vae)
        if self.arch == "sdxl":
            with torch.no_grad():
                vae = m.first_stage_model
                mean = vae.quant_conv(vae.encoder(pixels)).chunk(2, dim=1)[0]
                latents = (m.scale_factor * mean).float()
            if not torch.isfinite(latents).all():
                raise WebuiHostError("The SDXL VAE gave NaN latents in half precision. Restart the webui with --no-half-vae "
                                     "(or select the fp16-fix SDXL VAE in Settings > VAE), then train.")
            return latents
        posterior = m.encode_first_stage(pixels)
        mean = posterior.mode() if hasattr(posterior, "mode") else posterior
        return m.get_first_stage_encoding(mean).float()  # a tensor in: scale_factor * mean

    def encode_text(self, captions: list[str], clip_skip: int, embeddings: Embeddings | None = None) -> Conditioning:
        """The webui's own conditioning (chunking, emphasis, TI embeddings) with `clip_skip` applied.

        SD1/SD2: `cond_stage_model` is the `*WithCustomWords` embedder; nothing on its forward path
        runs under no_grad, so text-encoder adapters get gradients (§2.4). Its clip skip is the
        global `opts.CLIP_stop_at_last_layers`, set for this call only (SD2 ignores it, as the webui).
        SDXL: the conditioner's two text embedders are called directly (not through the conditioner,
        which would wrap them in no_grad unless `is_trainable`, fact 7): CLIP-L's states and bigG's
        states joined, and bigG's pooled vector; the trainer adds each sample's size embeddings.
        """
        if embeddings:
            raise WebuiHostError(NO_EMBEDDINGS)
        if getattr(self.sd_model, "lowvram", False) and torch.is_grad_enabled() and any(_has_hooks(t.module) for t in self.text_encoders):
            raise WebuiHostError(MEDVRAM_TEXT_ENCODER)  # the session could not know the config; the adapters tell
        if self.arch == "sdxl":
            clip_l, big_g = self.sd_model.conditioner.embedders[:2]
            context_g, pooled = big_g(list(captions))
            return Conditioning(torch.cat([clip_l(list(captions)), context_g], dim=-1), pooled)
        opts = _shared().opts
        saved = opts.data.get("CLIP_stop_at_last_layers", 1)
        opts.data["CLIP_stop_at_last_layers"] = clip_skip
        try:
            return Conditioning(self.sd_model.cond_stage_model(list(captions)))
        finally:
            opts.data["CLIP_stop_at_last_layers"] = saved

    def _after_sampling(self) -> None:
        clear_loaded_networks(self.sd_model)


def _text_models(sd_model, arch: str) -> list[TextModel]:
    """The webui's text encoders in the trees the adapters walk (§2.2): HF CLIP, or open_clip's model."""
    if arch == "sdxl":
        clip_l, big_g = sd_model.conditioner.embedders[:2]
        return text_models_for(arch, clip_l.wrapped.transformer, big_g.wrapped.model)
    wrapped = sd_model.cond_stage_model.wrapped
    return text_models_for(arch, wrapped.model if arch == "sd2" else wrapped.transformer)


def _has_hooks(root: nn.Module) -> bool:
    return any(m._forward_hooks for m in root.modules())


def _checkpointed_forward(block: nn.Module) -> Callable:
    forward = type(block).forward

    def checkpointed(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
        return forward(block, *args, **kwargs)

    return checkpointed


# ---- preparing and restoring the webui's state -------------------------------------------------


def clear_loaded_networks(sd_model) -> None:
    """Unmerge the Lora extension's networks: restore each backed-up weight and forget what was applied (fact 6)."""
    networks = _lora_extension()
    if networks is None:
        return
    networks.loaded_networks.clear()
    with torch.no_grad():  # it copy_()s into the weights, which ldm leaves requiring grad (the webui calls it under no_grad too)
        for module in sd_model.modules():
            if getattr(module, "network_weights_backup", None) is not None or getattr(module, "network_bias_backup", None) is not None:
                networks.network_restore_weights_from_backup(module)
            if hasattr(module, "network_current_names"):
                module.network_current_names = ()


@contextmanager
def _unloaded_hypernetworks() -> Iterator[None]:
    shared = _shared()
    saved = list(shared.loaded_hypernetworks)
    shared.loaded_hypernetworks.clear()  # every optimized attention forward applies them (§2.9)
    try:
        yield
    finally:
        shared.loaded_hypernetworks[:] = saved


@contextmanager
def _training_attention() -> Iterator[None]:
    """As modules/textual_inversion/ui.py: undo the optimizations unless the user keeps them for training."""
    from modules import sd_hijack

    if _shared().opts.data.get("training_xattention_optimizations", False):
        yield
        return
    saved = _attention_functions()
    sd_hijack.undo_optimizations()
    try:
        yield
    finally:
        sd_hijack.apply_optimizations()
        # apply_optimizations() alone does not give back what was there: undo_optimizations() gives sgm's VAE
        # AttnBlock ldm's forward, and optimizers that leave AttnBlock alone (InvokeAI, the CPU default) never put
        # sgm's own back, so every later SDXL image decoded a little differently (17 of 196,608 values off by 1 at
        # 256 px in webui 1.10.1 on the CPU). Put back exactly what was there.
        for owner, name, value in saved:
            setattr(owner, name, value)


def _attention_functions() -> list[tuple[object, str, object]]:
    """The functions `sd_hijack.undo_optimizations` and `apply_optimizations` swap, as they are now."""
    import importlib

    saved = []
    for package in ("ldm", "sgm"):
        try:
            model = importlib.import_module(f"{package}.modules.diffusionmodules.model")
            attention = importlib.import_module(f"{package}.modules.attention")
        except ImportError:
            continue
        saved += [(model, "nonlinearity", model.nonlinearity), (model.AttnBlock, "forward", model.AttnBlock.forward),
                  (attention.CrossAttention, "forward", attention.CrossAttention.forward)]
    return saved


@contextmanager
def _frozen(parameters: Iterable[nn.Parameter], unet: nn.Module) -> Iterator[None]:
    """requires_grad off on every base weight and ldm's reentrant checkpoint flags off; both restored."""
    grads = [(p, p.requires_grad) for p in parameters]
    flags = [(m, name) for m in unet.modules() for name in ("checkpoint", "use_checkpoint") if getattr(m, name, None) is True]
    had_attribute = "gradient_checkpointing" in vars(unet)
    for p, _ in grads:
        p.requires_grad_(False)
    for m, name in flags:
        setattr(m, name, False)  # ldm's CheckpointFunction only differentiates w.r.t. the block's own parameters
    try:
        yield
    finally:
        for m, name in flags:
            setattr(m, name, True)
        for p, flag in grads:
            with torch.inference_mode(p.is_inference()):  # Forge's weights (inference tensors) take requires_grad only there
                p.requires_grad_(flag)
        if not had_attribute:
            vars(unet).pop("gradient_checkpointing", None)  # older trainers set it on the UNet itself


@contextmanager
def _medvram_unet(sd_model) -> Iterator[None]:
    """Under --medvram, run the webui's move-to-GPU hook of `sd_model.model` when we call its UNet directly (§2.8)."""
    if not getattr(sd_model, "lowvram", False):
        yield
        return
    wrapper = sd_model.model

    def to_gpu(module, args):
        for hook in list(wrapper._forward_pre_hooks.values()):  # lowvram's send_me_to_gpu is not importable
            hook(wrapper, ())

    handle = wrapper.diffusion_model.register_forward_pre_hook(to_gpu)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _webui_job(id_task: str | None) -> Iterator[None]:
    """queue_lock + shared.state.begin/end (+ the progress task), as wrap_gradio_gpu_call does (§4)."""
    from modules import call_queue, progress

    shared = _shared()
    if id_task:
        progress.add_task_to_queue(id_task)
    with call_queue.queue_lock:
        shared.state.begin(job=id_task or JOB)
        progress.start_task(id_task)
        try:
            yield
        finally:
            progress.finish_task(id_task)
            shared.state.end()


@contextmanager
def open_webui_host(config=None, *, hold_lock: bool = True, id_task: str | None = None) -> Iterator[WebuiHost]:
    """Lock, check and prepare `shared.sd_model`, yield a WebuiHost, and restore everything on exit.

    `config` (a TrainConfig) tells whether the text encoder will be trained (refused under --medvram);
    without it, text-encoder training under --medvram is refused at its first step (`encode_text`).
    hold_lock=False when the caller already holds `queue_lock` (e.g. inside wrap_gradio_gpu_call,
    which is not reentrant: taking it twice would deadlock); then it also owns shared.state.begin/end.
    """
    train_text_encoder = False if config is None else config.train_text_encoder
    with ExitStack() as stack:
        if hold_lock:
            stack.enter_context(_webui_job(id_task))
        shared = _shared()
        shared.state.textinfo = "Preparing to train LoRA"
        sd_model = shared.sd_model
        check_trainable(sd_model, train_text_encoder=train_text_encoder)
        host = WebuiHost(sd_model, lora_dir=output_dir(), runs_dir=runs_dir())
        if host.device.type == "cpu":  # the trainer kept freed memory for its steps; the webui goes on
            stack.callback(give_back_freed_memory)
        stack.callback(_finish, sd_model)
        clear_loaded_networks(sd_model)
        stack.enter_context(_unloaded_hypernetworks())
        stack.enter_context(_training_attention())
        stack.enter_context(_frozen(sd_model.parameters(), host.unet))
        stack.enter_context(_medvram_unet(sd_model))
        for model in host.text_encoders:
            stack.callback(expose_all(model.module))  # OpenCLIP's MultiheadAttention: hookable q/k/v/out
        stack.callback(host._remove_checkpointing)
        yield stack.enter_context(activated(host))


def _finish(sd_model) -> None:
    from modules import devices

    clear_loaded_networks(sd_model)
    devices.torch_gc()


@contextmanager
def activated(host: WebuiFamilyHost) -> Iterator[WebuiFamilyHost]:
    """The session's host, for the tab's `host()` and for `interrupt_active` (on_script_unloaded)."""
    global _active
    _active = host
    try:
        yield host
    finally:
        _active = None


class WebuiTab:
    """What the tab (`lib_lora.ui.build_tab`) gets from the webui: a host factory and a job lock.

    The tab enters `session()` (its `job_lock`) around training, the comparison grid and
    captioning, and calls `host()` inside; `session` is `open_webui_host`, so the lock, the checks
    and the model's preparation and restoration wrap exactly the tab's use of the model. Outside a
    session `host()` gives an unprepared host, good for `lora_dir` and `register_network`.
    """

    def session(self):
        return open_webui_host()

    def host(self) -> WebuiFamilyHost:
        return _active if _active is not None else self.unprepared_host()

    def unprepared_host(self) -> WebuiFamilyHost:
        sd_model = _shared().sd_model
        check_trainable(sd_model, train_text_encoder=False)
        return WebuiHost(sd_model, lora_dir=output_dir(), runs_dir=runs_dir())


def captioners() -> dict[str, Callable]:
    """The webui's interrogators as image -> caption functions (the tab's captioning)."""

    def blip(image) -> str:
        return _shared().interrogator.interrogate(image.convert("RGB"))

    def deepbooru(image) -> str:
        from modules import deepbooru

        return deepbooru.model.tag(image.convert("RGB"))

    return {"BLIP": blip, "DeepBooru": deepbooru}


def interrupt_active() -> None:
    """Ask a running training to stop and save (on_script_unloaded: a UI reload must not leave hooks behind)."""
    if _active is not None:
        _active.interrupt()


# ---- folders, names, settings ------------------------------------------------------------------


def output_dir() -> Path:
    """Where finished LoRAs go: --train-lora-output-dir, else the Lora extension's folder (§1.3)."""
    folder = getattr(_shared().cmd_opts, "train_lora_output_dir", None)
    return Path(folder) if folder else lora_dirs()[0]


def lora_dirs() -> tuple[Path, ...]:
    """The Lora extension's folder (--lora-dir, else <models>/Lora): what the Tools' LoRA pickers list (§1.3)."""
    from modules import paths

    folder = getattr(_shared().cmd_opts, "lora_dir", None)
    return (Path(folder or Path(paths.models_path) / "Lora"),)


def checkpoint_dirs() -> tuple[Path, ...]:
    """Where the webui lists checkpoints: --ckpt-dir (when given) first, then <models>/Stable-diffusion (sd_models.py);
    the Tools' checkpoint pickers list them and bake writes into the first, so the webui lists the result."""
    from modules import paths

    given = getattr(_shared().cmd_opts, "ckpt_dir", None)
    return tuple(dict.fromkeys([*([Path(given)] if given else []), Path(paths.models_path) / "Stable-diffusion"]))


def runs_dir() -> Path:
    """Run folders (state, samples, logs): setting, else --train-lora-runs-dir, else <data>/outputs/train-lora.

    Never inside the extension (updates `git reset --hard` it, §1.7) nor the Lora folder.
    """
    from modules import paths

    shared = _shared()
    folder = shared.opts.data.get("train_lora_runs_dir") or getattr(shared.cmd_opts, "train_lora_runs_dir", None)
    return Path(folder or Path(paths.data_path) / "outputs" / "train-lora")


def dataset_root() -> Path | None:
    """--train-lora-dataset-root: the only folder the tab and the API read datasets from (None: any path; ui/roots.py)."""
    folder = getattr(_shared().cmd_opts, "train_lora_dataset_root", None)
    return Path(folder) if folder else None


def versioned_output_name(folder: Path, name: str) -> str:
    """`name`, or `name_v2`, `name_v3`... : the first stem with no file in `folder` (fact 10: never reuse a name)."""
    taken = {p.stem for p in Path(folder).glob("*.safetensors")} if Path(folder).is_dir() else set()
    used = lambda stem: stem in taken or any(t.startswith(stem + "-") for t in taken)  # noqa: E731 - epoch/step files
    if not used(name):
        return name
    base = re.sub(r"_v\d+$", "", name)
    return next(f"{base}_v{n}" for n in range(2, 10_000) if not used(f"{base}_v{n}"))


def presets_dir() -> Path:
    """The user's presets, outside the extension folder (which updates reset)."""
    from modules import paths

    return Path(paths.data_path) / "train-lora" / "presets"


def config_defaults() -> dict:
    """TrainConfig values the webui decides: its clip skip, and fp16 autocast when the model is fp16 on CUDA."""
    from modules import devices

    shared = _shared()
    half = getattr(devices, "dtype_unet", torch.float32) == torch.float16 and torch.device(devices.device).type == "cuda"
    return {"clip_skip": int(shared.opts.data.get("CLIP_stop_at_last_layers", 1)), "mixed_precision": "fp16" if half else "no"}


def add_settings() -> None:
    """on_ui_settings: the extension's section in Settings."""
    import gradio as gr

    shared = _shared()
    options = {
        "train_lora_runs_dir": shared.OptionInfo("", "Folder for training runs (state, samples, logs); empty = outputs/train-lora"),
        "train_lora_medvram_policy": shared.OptionInfo(MEDVRAM_POLICIES[0], "Under --medvram", gr.Radio, {"choices": list(MEDVRAM_POLICIES)}).info(
            "--lowvram is always refused; the text encoder cannot be trained under --medvram"
        ),
    }
    for key, info in options.items():
        info.section, info.category_id = SETTINGS_SECTION, SETTINGS_CATEGORY
        shared.opts.add_option(key, info)
