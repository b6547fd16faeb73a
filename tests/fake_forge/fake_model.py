"""Our tiny random models in the shapes of Forge's `shared.sd_model` (backend/diffusion_engine/sd15.py, sdxl.py).

sd_model.forge_objects(.original, _after_applying_lora)   ForgeObjects(unet, clip, vae), shallow copies
    .unet          ModelPatcher -> .model KModel -> .diffusion_model: our ldm-named UNet, `.predictor` (sigmas, prediction_type)
    .clip          CLIP: .cond_stage_model.clip_l (.clip_g) IntegratedCLIP, `.transformer` a Hugging-Face-named CLIP model; .patcher
    .vae           VAE: .first_stage_model with encode(x, regulation) / decode / process_in / process_out; .patcher
sd_model.text_processing_engine (SD1) or _l / _g (SDXL), set_clip_skip, and the @torch.inference_mode() calls
get_learned_conditioning, encode_first_stage, decode_first_stage.

Every model is built with ForgeOperations and its weights made inside inference mode, as forge_loader does;
the UNet's attention and transformer blocks are Forge's (backend/nn/unet.py: in-place adds, CPU attention).
"""

from types import SimpleNamespace

import torch
from torch import nn

from backend.nn.unet import as_forge_unet
from backend.operations import move, with_forge_operations
from backend.patcher import CLIP, VAE, ModelPatcher
from lib_lora.demo.tiny import TINY_TEXT, random_tiny_checkpoint
from lib_lora.models.clip_text import CLIPTextModel, TextConfig
from lib_lora.models.schedule import sd_alphas_cumprod
from lib_lora.models.tokenizer import tokenize_batch
from lib_lora.models.conditioning import sdxl_vector

TINY_CLIP_G = TextConfig(width=64, layers=2, heads=2, mlp_width=256)  # bigG in Forge is a Hugging Face CLIP too
CLIP_G_PROJECTION = 48


class HFCLIPTextModel(CLIPTextModel):
    """transformers' CLIPTextModel as the engines call it: hidden states of a layer, and the pooled EOS state."""

    def forward(self, tokens: torch.Tensor, layer_from_end: int, final_norm: bool):
        hidden = self.text_model(tokens, layer_from_end, final_norm)
        last = self.text_model(tokens) if layer_from_end != 1 or not final_norm else hidden
        return hidden, last[torch.arange(tokens.shape[0]), tokens.argmax(-1)]


class IntegratedCLIP(nn.Module):
    def __init__(self, config: TextConfig, projection: int | None = None):
        super().__init__()
        self.transformer = HFCLIPTextModel(config)
        if projection:
            self.transformer.text_projection = nn.Linear(config.width, projection, bias=False)


class ClassicTextProcessingEngine:
    """backend/text_processing/classic_engine.py, reduced: our tokenizer's chunks, `hidden_states[-max(clip_skip,
    minimal_clip_skip)]`, the final norm or not, bigG's pooled output projected. No emphasis, no TI embeddings."""

    def __init__(self, text_encoder, *, minimal_clip_skip, final_layer_norm, return_pooled=False):
        self.text_encoder, self.minimal_clip_skip, self.clip_skip = text_encoder, minimal_clip_skip, minimal_clip_skip
        self.final_layer_norm, self.return_pooled = final_layer_norm, return_pooled

    def __call__(self, texts):
        tokens = tokenize_batch(list(texts)).tokens  # [B, n, 77]
        b, n, t = tokens.shape
        model = self.text_encoder.transformer
        hidden, pooled = model(tokens.reshape(b * n, t), max(self.clip_skip, self.minimal_clip_skip), self.final_layer_norm)
        z = hidden.reshape(b, n * t, -1)
        if self.return_pooled:
            return z, model.text_projection(pooled.reshape(b, n, -1)[:, 0])
        return z


class Prediction(nn.Module):
    def __init__(self):
        super().__init__()
        alphas = sd_alphas_cumprod().double()
        self.prediction_type = "epsilon"
        self.register_buffer("sigmas", ((1 - alphas) / alphas).sqrt().float())


class KModel(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model, self.predictor = unet, Prediction()
        self.storage_dtype = self.computation_dtype = torch.float32


class IntegratedAutoencoderKL(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae, self.scaling_factor, self.shift_factor = vae, vae.scale_factor, 0.0

    def encode(self, x, regulation=None):
        mean, logvar = self.vae.encode_moments(x)
        posterior = SimpleNamespace(mode=lambda: mean, sample=lambda: mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))
        return regulation(posterior) if regulation is not None else posterior.sample()

    def decode(self, z):
        return self.vae.decoder(self.vae.post_quant_conv(z))

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return latent / self.scaling_factor + self.shift_factor


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class StableDiffusion:
    """StableDiffusion (SD1) or, with arch="sdxl", StableDiffusionXL, from Forge's diffusion engines."""

    is_sd2 = is_sd3 = is_inpaint = False

    def __init__(self, arch: str = "sd1", seed: int = 0):
        ckpt = random_tiny_checkpoint(seed, arch)
        self.is_sd1, self.is_sdxl = arch == "sd1", arch == "sdxl"
        encoders = {"clip_l": IntegratedCLIP(TINY_TEXT)} | ({"clip_g": IntegratedCLIP(TINY_CLIP_G, CLIP_G_PROJECTION)} if self.is_sdxl else {})
        clip, unet = CLIP(encoders), ModelPatcher(KModel(as_forge_unet(ckpt.unet)), "unet")
        vae = VAE(IntegratedAutoencoderKL(ckpt.vae))
        with torch.inference_mode():  # backend/loader.py forge_loader
            for model in (unet.model, clip.cond_stage_model, vae.first_stage_model):
                move(with_forge_operations(model.eval()))
        if self.is_sdxl:
            self.text_processing_engine_l = ClassicTextProcessingEngine(encoders["clip_l"], minimal_clip_skip=2, final_layer_norm=False)
            self.text_processing_engine_g = ClassicTextProcessingEngine(encoders["clip_g"], minimal_clip_skip=2, final_layer_norm=False,
                                                                        return_pooled=True)
        else:
            self.text_processing_engine = ClassicTextProcessingEngine(encoders["clip_l"], minimal_clip_skip=1, final_layer_norm=True)
        self.forge_objects = ForgeObjects(unet, clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.sd_checkpoint_info = SimpleNamespace(model_name="tiny", title="tiny.safetensors [0000000000]", filename=None)

    def _engines(self):
        return [self.text_processing_engine_l, self.text_processing_engine_g] if self.is_sdxl else [self.text_processing_engine]

    def set_clip_skip(self, clip_skip):
        for engine in self._engines():
            engine.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        from backend import memory_management

        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        if not self.is_sdxl:
            return self.text_processing_engine(prompt)
        cond_g, pooled = self.text_processing_engine_g(prompt)
        sizes = torch.tensor([[64.0, 64.0]]).repeat(len(prompt), 1)
        return {"crossattn": torch.cat([self.text_processing_engine_l(prompt), cond_g], dim=2),
                "vector": sdxl_vector(pooled, sizes, torch.zeros_like(sizes), sizes)}

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return self.forge_objects.vae.first_stage_model.process_in(self.forge_objects.vae.first_stage_model.encode(x))

    @torch.inference_mode()
    def decode_first_stage(self, x):
        vae = self.forge_objects.vae.first_stage_model
        return vae.decode(vae.process_out(x))
