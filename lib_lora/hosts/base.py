"""The Host interface: everything the trainer needs from the model it trains on.

Two implementations: `standalone.py` (our own models loaded from a checkpoint file) and
`webui.py` (the webui's loaded `shared.sd_model`). The trainer sees only this interface.
"""

import threading
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..models.conditioning import Conditioning
from ..models.pipeline import Embeddings, GenerationParams
from ..models.schedule import NoiseSchedule
from ..networks.metadata import base_model_version
from ..networks.targets import TextModel


class Host(ABC):
    """A loaded SD model plus the places and signals that belong to where it runs.

    Subclasses set the attributes in their constructor; the trainer reads them.
    """

    arch: str  # "sd1" | "sd2" | "sdxl"
    unet: nn.Module  # ldm/sgm UNetModel tree (module names as in ldm checkpoints)
    text_encoders: list[TextModel]  # each encoder with its kohya prefix (lora_te; SDXL lora_te1, lora_te2)
    schedule: NoiseSchedule  # fp32 alphas_cumprod on the CPU, and eps|v
    device: torch.device
    dtype: torch.dtype  # dtype of the frozen weights
    model_name: str  # base checkpoint name, for the file's ss_sd_model_name
    checkpoint_path: Path | None = None  # the base checkpoint's file, hashed into ss_sd_model_hash / ss_new_sd_model_hash
    native_size: int | None = None  # side (px) the model was trained at, where not its architecture's (the embedded model: 64)
    lora_dir: Path  # where finished LoRAs go so the host's Lora support finds them
    runs_dir: Path  # where run folders (state, samples, logs) go; never inside lora_dir
    trains_embeddings: bool = True  # encode_text and generate take trainable token embeddings (pivotal tuning)

    def __init__(self):
        self._interrupt = threading.Event()

    @property
    def sd_version(self) -> str:
        """kohya's ss_base_model_version of the loaded model (sd_v1, sd_v2_v, sdxl_base_v1-0, ...)."""
        return base_model_version(self.arch, self.schedule.parameterization == "v")

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8] (posterior mean)."""

    @abstractmethod
    def encode_text(self, captions: list[str], clip_skip: int, embeddings: Embeddings | None = None) -> Conditioning:
        """Captions -> UNet context [B, T, D] (and SDXL's pooled vector); differentiable so text-encoder LoRA can learn.
        `embeddings` (token -> one [n, width] tensor per text encoder) replace their tokens, differentiably."""

    @abstractmethod
    def generate(self, params: GenerationParams, embeddings: Embeddings | None = None) -> list[Image.Image]:
        """Sample images with the model as it is now (live LoRA hooks included); the prompt may
        carry `<lora:name:w>` tags naming files in `lora_dir`, applied for this call only; `embeddings`
        replace their tokens in the prompts."""

    def release_vae_encoder(self) -> None:
        """Every latent the run needs is cached: a host that owns its VAE may free the encoder until
        `encode_pixels` needs it again (the webui's VAE is the webui's: kept)."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute UNet blocks in backward (our UNetModel's switch; hosts with other models override)."""
        self.unet.gradient_checkpointing = enabled

    def interrupt(self) -> None:
        """Ask a running training to stop at the next step (it saves first)."""
        self._interrupt.set()

    def clear_interrupt(self) -> None:
        self._interrupt.clear()

    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def report(self, event) -> None:
        """Show a TrainEvent in the host's own progress display (standalone: none; the CLI and tab subscribe)."""

    def register_network(self, path: Path) -> None:
        """Make a newly written LoRA usable at once (standalone: nothing to refresh)."""
