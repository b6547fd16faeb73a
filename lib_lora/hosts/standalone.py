"""The standalone host: our own SD1/SD2/SDXL models loaded from a checkpoint file (default: the embedded one)."""

from pathlib import Path

import torch

from ..demo.tiny import DEFAULT_CHECKPOINT, IMAGE_SIZE
from ..models.checkpoint import Checkpoint, load_checkpoint, load_vae_encoder
from ..models.pipeline import Embeddings, GenerationParams, encode_prompts, schedule_for
from ..networks.apply import generate_with_loras
from ..networks.targets import text_models_for
from .base import Host


class StandaloneHost(Host):
    def __init__(self, ckpt: Checkpoint, *, model_name: str, lora_dir: Path, runs_dir: Path):
        super().__init__()
        self.ckpt = ckpt
        self.arch, self.unet = ckpt.arch, ckpt.unet
        self.text_encoders = text_models_for(ckpt.arch, ckpt.text_encoder, ckpt.text_encoder_2)
        self.schedule = schedule_for(ckpt)
        param = next(ckpt.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.model_name = model_name
        self.lora_dir, self.runs_dir = Path(lora_dir), Path(runs_dir)

    @classmethod
    def from_file(cls, checkpoint: Path | None = None, *, out_dir: Path = Path("out"), device: str | None = None,
                  dtype: torch.dtype | None = None, parameterization: str | None = None, draws_images: bool = True) -> "StandaloneHost":
        """Load a checkpoint (default: the embedded tiny model); LoRAs go to out/lora, runs to out/runs.

        `parameterization` "v" or "eps" overrides what the file says (kohya's --v_parameterization).
        `draws_images=False` (a CLI training run with no samples) leaves out the VAE's decoder."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
        path = Path(checkpoint or DEFAULT_CHECKPOINT)
        ckpt = load_checkpoint(path, dtype=dtype, device=device, parameterization=parameterization, vae_decoder=draws_images)
        if ckpt.arch == "sdxl":
            ckpt.vae.float()  # SDXL's VAE overflows in fp16 (NaN latents); it runs in fp32 as the webui's --no-half-vae
        host = cls(ckpt, model_name=path.stem, lora_dir=Path(out_dir) / "lora", runs_dir=Path(out_dir) / "runs")
        host.checkpoint_path = path
        host.native_size = IMAGE_SIZE if path.resolve() == DEFAULT_CHECKPOINT.resolve() else None
        return host

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.ckpt.vae
        if vae.encoder is None:  # released: read it from the file again
            fresh = load_vae_encoder(self.checkpoint_path, self._released_encoder_dtype, self.device)
            vae.encoder, vae.quant_conv = fresh.encoder, fresh.quant_conv
        return vae.encode(pixels.to(self.device, next(vae.encoder.parameters()).dtype)).float()

    def release_vae_encoder(self) -> None:
        """Free the VAE's encoder (SD1.5: 130 MiB in fp32) while every latent a run needs is cached; it is read
        from the checkpoint again if anything encodes later."""
        vae = self.ckpt.vae
        if self.checkpoint_path is None or vae.encoder is None:
            return  # a model not loaded from a file has nowhere to come back from
        self._released_encoder_dtype = next(vae.encoder.parameters()).dtype
        vae.encoder = vae.quant_conv = None

    def encode_text(self, captions: list[str], clip_skip: int, embeddings: Embeddings | None = None):
        return encode_prompts(self.ckpt, captions, clip_skip, embeddings)

    def generate(self, params: GenerationParams, embeddings: Embeddings | None = None):
        """Sample with the model as it is; `<lora:name:w>` tags resolve to files in the Lora folder."""
        return generate_with_loras(self.ckpt, params, [self.lora_dir], embeddings=embeddings)
