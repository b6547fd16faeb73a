"""The Forge host: train on Stable Diffusion WebUI Forge's loaded model (`sd_model.forge_objects`), SD1 and SDXL.

    with open_forge_host(config) as host:      # holds call_queue.queue_lock for the whole run
        train(config, host, on_event=on_event)

Forge (lllyasviel/stable-diffusion-webui-forge, gradio 4, its own `backend/`) keeps the webui's
`shared.state`, `call_queue.queue_lock`, `processing` and script callbacks, so the lock, progress,
Interrupt and samples are the webui host's (`WebuiFamilyHost`, `_webui_job`). What differs, read in
Forge's code (`main` @ dfdcbab6, webui-integration.md §5.2):
- The model is `forge_objects.unet` (UnetPatcher -> KModel -> `.diffusion_model`, ldm module names),
  `.clip` (`cond_stage_model.clip_l` / `.clip_g`, each `.transformer` a Hugging Face CLIPTextModel) and
  `.vae`; it loads at the first generation (`sd_models.forge_model_reload`), so the session loads it.
- It is built under `torch.inference_mode()` (backend/loader.py `forge_loader`), and the memory manager
  (backend/memory_management.py) moves and LoRA-merges it inside inference mode, so its weights are
  inference tensors (or, moved by `.to()` outside inference mode, Parameters that hide one), which autograd
  refuses: before a forward with gradients they are replaced by ordinary copies (`_plain_tensors`).
- `get_learned_conditioning` and `encode_first_stage` are `@torch.inference_mode()`: the text
  processing engines and the VAE's `first_stage_model` are called directly instead.
- Its Linear is `backend.operations.ForgeOperations.Linear`, no `nn.Linear` (networks.base.layer_kind
  takes it by name and weight shape); its Conv2d subclasses `nn.Conv2d`.
- Its UNet code is written for inference: BasicTransformerBlock adds into its input in place (`x += n`,
  backend/nn/unet.py) after its LayerNorm saved it, and on the CPU (or with --attention-split/--attention-quad)
  attention is sub-quadratic or split (backend/attention.py), which write their results in place
  (`torch.exp(..., out=...)`). For the session the norms get a copy of their input when it needs gradients,
  and the UNet's attention is PyTorch's scaled_dot_product_attention (found trying Forge on the CPU).
- `load_models_gpu` moves patchers between devices at any call and merges a prompt's LoRA into the
  shared weights when a patched clone loads (`LoraLoader.refresh`). The session trains through the
  original patchers (`forge_objects_original`): loading them puts the model on the device and gives the
  merged weights back, before every training forward that finds them unloaded.
- The Lora extension (extensions-builtin/sd_forge_lora/networks.py) caches files by path
  (`load_lora_state_dict`, lru_cache) and reuses its patched model while `current_lora_hash` is unchanged,
  and the LoraLoader keeps a merge while its file names are the same (`loaded_hash`, backend/patcher/lora.py);
  `register_network` rescans and clears all three, so a new or rewritten file is seen at once.
"""

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from ..models.conditioning import Conditioning
from ..models.pipeline import Embeddings
from ..models.schedule import NoiseSchedule
from ..networks.targets import text_models_for
from ..train.cpu_memory import give_back_freed_memory
from .webui import (NO_EMBEDDINGS, WebuiFamilyHost, WebuiHostError, WebuiTab, _frozen, _shared, _webui_job, activated,
                    output_dir, runs_dir)

_FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)  # what networks.py merges offline; fp8/nf4/gguf are not


def running_in_forge() -> bool:
    """Forge's own package is importable; its model (which has `forge_objects`) exists only after the first generation."""
    return importlib.util.find_spec("modules_forge") is not None


# ---- checks ------------------------------------------------------------------------------------


def check_forge_trainable(sd_model) -> None:
    """Raise WebuiHostError naming the first reason Forge's loaded model cannot be trained here."""
    if sd_model is None:
        raise WebuiHostError("No Stable Diffusion checkpoint could be loaded. Select one at the top of the page, then train.")
    if not (getattr(sd_model, "is_sd1", False) or getattr(sd_model, "is_sdxl", False)):
        raise WebuiHostError(f"The loaded checkpoint is a {type(sd_model).__name__}; Train LoRA trains SD1.x and SDXL models in "
                             "Forge. Load one of those to train (SD2: `python -m lib_lora train` or AUTOMATIC1111's webui).")
    if sd_model.is_sdxl and not hasattr(sd_model, "text_processing_engine_l"):
        raise WebuiHostError("The loaded checkpoint is the SDXL refiner; LoRAs are trained on the SDXL base model or a fine-tune of it. Load one to train.")
    if getattr(sd_model, "is_inpaint", False):
        raise WebuiHostError("The loaded checkpoint is an inpainting model; train on its base model instead.")
    storage = sd_model.forge_objects_original.unet.model.storage_dtype  # a dtype, or "nf4" / "fp4" / "gguf"
    if storage not in _FLOAT_STORAGE:
        raise WebuiHostError(f"The UNet is stored as {storage}; adapters need float16, bfloat16 or float32 weights. Set "
                             "'Diffusion in Low Bits' at the top of the page to Automatic (the model reloads), then train.")


# ---- the host ----------------------------------------------------------------------------------


class ForgeHost(WebuiFamilyHost):
    """Forge's loaded model as a Host. Build it through `open_forge_host`, which prepares and restores the model."""

    def __init__(self, sd_model, *, lora_dir: Path, runs_dir: Path):
        super().__init__(sd_model, lora_dir=lora_dir, runs_dir=runs_dir)
        from backend import memory_management

        objects = sd_model.forge_objects_original
        self.patchers = (objects.unet, objects.clip.patcher)  # loaded together for every training forward
        self.vae = objects.vae
        self.arch = "sdxl" if sd_model.is_sdxl else "sd1"
        kmodel = objects.unet.model
        self.unet = kmodel.diffusion_model
        encoders = objects.clip.cond_stage_model
        self.text_encoders = text_models_for(self.arch, encoders.clip_l.transformer,
                                             encoders.clip_g.transformer if self.arch == "sdxl" else None)
        self.schedule = _schedule(kmodel.predictor)
        self.device = torch.device(memory_management.get_torch_device())
        self.dtype = kmodel.computation_dtype  # KModel.apply_model casts the UNet's inputs to it

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """Every base weight: UNet, text encoders and VAE."""
        return chain(self.unet.parameters(), self.sd_model.forge_objects_original.clip.cond_stage_model.parameters(),
                     self.vae.first_stage_model.parameters())

    # -- model access (Host interface)
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Forge's VAE path (`encode_first_stage`: encode, then `process_in` = scale and shift), with the posterior mean."""
        self.load(self.vae.patcher)
        model = self.vae.first_stage_model
        with torch.no_grad():
            moments = model.encode(pixels.to(self.vae.device, self.vae.vae_dtype), regulation=lambda posterior: posterior.mode())
            latents = model.process_in(moments.float())
        if not torch.isfinite(latents).all():
            raise WebuiHostError("The VAE gave NaN latents in half precision. Restart Forge with --vae-in-fp32 "
                                 "(or select an fp16-fix VAE), then train.")
        return latents

    def encode_text(self, captions: list[str], clip_skip: int, embeddings: Embeddings | None = None) -> Conditioning:
        """Forge's text processing engines (chunking, emphasis, TI embeddings) outside inference mode, `clip_skip` for this call.

        SD1: `text_processing_engine`. SDXL: CLIP-L's and bigG's states joined and bigG's pooled vector
        (as StableDiffusionXL.get_learned_conditioning); the trainer adds each sample's size embeddings.
        """
        if embeddings:
            raise WebuiHostError(NO_EMBEDDINGS)
        self.load(*self.patchers)
        engines = _text_engines(self.sd_model)
        saved = [engine.clip_skip for engine in engines]
        self.sd_model.set_clip_skip(clip_skip)  # Forge's own switch (SDXL: both engines, at least 2)
        try:
            if self.arch == "sdxl":
                context_g, pooled = engines[1](list(captions))
                return Conditioning(torch.cat([engines[0](list(captions)), context_g], dim=-1), pooled)
            return Conditioning(engines[0](list(captions)))
        finally:
            for engine, value in zip(engines, saved):
                engine.clip_skip = value

    # -- Forge's memory manager and Lora loader
    def load(self, *patchers) -> None:
        """Put `patchers` on the device unless the memory manager holds them; loading an original patcher unloads
        its LoRA-patched clones and restores the weights they merged (memory_management.load_models_gpu).

        Inside inference mode, as all of Forge's callers: `Module.to()` outside it would give Forge's inference
        Parameters ordinary `.data`, and its own sampling then fails ("Inference tensors do not track version counter").
        """
        from backend import memory_management

        loaded = {id(entry.model) for entry in memory_management.current_loaded_models}
        if any(id(p) not in loaded for p in patchers):
            with torch.inference_mode():
                memory_management.load_models_gpu(list(patchers))

    def _before_forward(self, module: nn.Module, args) -> None:
        """Forward pre-hook on the UNet and text encoders; Forge's own sampling (inference mode) is left alone."""
        if torch.is_inference_mode_enabled():
            return
        self.load(*self.patchers)
        if torch.is_grad_enabled():
            _plain_tensors(module)

    @contextmanager
    def forward_hooks(self) -> Iterator[None]:
        """The hooks training needs: loading and plain weights before each forward, copies for the block norms."""
        roots = [self.unet] + [t.module for t in self.text_encoders]
        handles = [m.register_forward_pre_hook(self._before_forward) for m in roots]
        handles += [norm.register_forward_pre_hook(_copy_of_input) for norm in _block_norms(self.unet)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _after_sampling(self) -> None:
        """Nothing to undo: process_images starts each batch from `forge_objects_original` and the Lora extension
        re-patches when the prompt's files change, and the next training forward loads the original patchers,
        which gives back the weights a sample's `<lora:...>` merged (`load`)."""

    def register_network(self, path: Path) -> None:
        """Rescan the Lora folder and drop Forge's caches, each keyed by file name or path: the Lora extension's
        file cache and patched model (`current_lora_hash`), and the merge in the weights (`LoraLoader.loaded_hash`:
        marked stale, so the next load restores and merges afresh). A file written again under a used name is
        then seen at once."""
        super().register_network(path)
        cached_loader = getattr(sys.modules.get("networks"), "load_lora_state_dict", None)
        if cached_loader is not None:
            cached_loader.cache_clear()
        _forget_patched_loras(self.sd_model)
        for patcher in self.patchers:
            if Path(path).name in patcher.lora_loader.loaded_hash:
                patcher.lora_loader.loaded_hash = "stale " + patcher.lora_loader.loaded_hash


def _forget_patched_loras(sd_model) -> None:
    """Make the Lora extension patch afresh at the next generation: no hash and no patched objects. The hash alone
    must not go: a prompt without `<lora:...>` then matches it and reuses the last patched objects (seen in Forge:
    after a sample with a LoRA, the next plain txt2img kept that LoRA)."""
    sd_model.current_lora_hash = str([])
    sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects_original.shallow_copy()


def _block_norms(unet: nn.Module) -> list[nn.Module]:
    """norm1/norm2/norm3 of every BasicTransformerBlock: each sees an input the block then adds into in place."""
    return [getattr(block, name) for block in unet.modules() if type(block).__name__ == "BasicTransformerBlock"
            for name in ("norm1", "norm2", "norm3") if getattr(block, name, None) is not None]


def _copy_of_input(norm: nn.Module, args: tuple):
    """Forward pre-hook: a LayerNorm saves its input for backward, and Forge's block then changes that input in
    place (`x += n`); given a copy, the saved tensor stays as it was."""
    if torch.is_grad_enabled() and args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


@contextmanager
def _differentiable_attention() -> Iterator[None]:
    """PyTorch's attention in the UNet for the session unless Forge's choice is already differentiable (PyTorch or
    xformers): its sub-quadratic and split attention compute in place. CrossAttention reads the module global
    `backend.nn.unet.attention_function` at each call."""
    from backend import attention
    from backend.nn import unet

    chosen = unet.attention_function
    if chosen not in (attention.attention_pytorch, attention.attention_xformers):
        unet.attention_function = attention.attention_pytorch
    try:
        yield
    finally:
        unet.attention_function = chosen


def _schedule(predictor) -> NoiseSchedule:
    """ᾱ from the sigmas Forge samples with (ᾱ = 1/(σ²+1), backend/modules/k_prediction.py), and eps|v."""
    if predictor.prediction_type not in ("epsilon", "v_prediction"):
        raise WebuiHostError(f"The loaded model predicts '{predictor.prediction_type}'; Train LoRA trains epsilon and v-prediction models.")
    alphas = (1 / (predictor.sigmas.detach().double().cpu() ** 2 + 1)).float()
    return NoiseSchedule(alphas, "v" if predictor.prediction_type == "v_prediction" else "eps")


def _text_engines(sd_model) -> list:
    if sd_model.is_sdxl:
        return [sd_model.text_processing_engine_l, sd_model.text_processing_engine_g]
    return [sd_model.text_processing_engine]


def _plain_tensors(root: nn.Module) -> None:
    """Replace inference-mode weights and buffers by ordinary copies (new Parameters, same requires_grad) so
    autograd may use them; ordinary ones are left as they are."""
    for module in root.modules():
        for name, param in module._parameters.items():
            if param is not None and _made_in_inference_mode(param):
                module._parameters[name] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and _made_in_inference_mode(buffer):
                module._buffers[name] = buffer.clone()


def _made_in_inference_mode(tensor: torch.Tensor) -> bool:
    """An inference tensor, or one that was: `Module.to()` outside inference mode gives an inference Parameter
    ordinary `.data` (is_inference() is then False) but no version counter, and autograd refuses it all the same."""
    if tensor.is_inference():
        return True
    try:
        tensor._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return True
    return False


# ---- the session -------------------------------------------------------------------------------


def _loaded_model():
    """Forge loads the selected checkpoint on the first generation; the session loads it as generation does."""
    from modules import sd_models

    sd_models.forge_model_reload()
    return _shared().sd_model


@contextmanager
def open_forge_host(*, hold_lock: bool = True, id_task: str | None = None) -> Iterator[ForgeHost]:
    """Lock, load and check Forge's model, yield a ForgeHost, and give everything back on exit.

    hold_lock and id_task as for `open_webui_host`. Nothing depends on the config: Forge's memory manager
    loads the text encoder whenever it is needed, in every memory mode.
    """
    from modules import devices

    with ExitStack() as stack:
        if hold_lock:
            stack.enter_context(_webui_job(id_task))
        _shared().state.textinfo = "Preparing to train LoRA"
        sd_model = _loaded_model()
        check_forge_trainable(sd_model)
        host = ForgeHost(sd_model, lora_dir=output_dir(), runs_dir=runs_dir())
        if host.device.type == "cpu":  # as in the A1111 webui: Forge goes on after the run (--always-cpu)
            stack.callback(give_back_freed_memory)
        stack.callback(devices.torch_gc)
        host.load(*host.patchers)  # the last generation's LoRA is unmerged here
        stack.enter_context(_frozen(host.base_parameters(), host.unet))
        stack.enter_context(host.forward_hooks())
        stack.enter_context(_differentiable_attention())
        stack.callback(host._remove_checkpointing)
        yield stack.enter_context(activated(host))


class ForgeTab(WebuiTab):
    """The tab's binding in Forge: `open_forge_host` as the job lock, ForgeHost as the host."""

    def session(self):
        return open_forge_host()

    def unprepared_host(self) -> ForgeHost:
        sd_model = _shared().sd_model
        check_forge_trainable(sd_model)
        return ForgeHost(sd_model, lora_dir=output_dir(), runs_dir=runs_dir())
