"""Our tiny random SD1 models wrapped in the shapes of the webui's `shared.sd_model` (ldm LatentDiffusion, hijacked).

sd_model.model.diffusion_model             our ldm-named UNetModel
sd_model.cond_stage_model                  like FrozenCLIPEmbedderWithCustomWords: called with a list of
                                           texts, uses opts.CLIP_stop_at_last_layers
          .wrapped.transformer.text_model  our CLIP text model (kohya names from `text_model.`)
sd_model.encode_first_stage(x)             a posterior with mode()/sample(), under no_grad as in ldm
sd_model.get_first_stage_encoding(z)       scale_factor * z (tensor) or * posterior.sample()
"""

from types import SimpleNamespace

import torch
from torch import nn

from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.models.pipeline import encode_prompts
from lib_lora.models.schedule import sd_alphas_cumprod


class DiagonalGaussian:
    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar

    def mode(self):
        return self.mean

    def sample(self):
        return self.mean + torch.exp(0.5 * self.logvar) * torch.randn_like(self.mean)


class DiffusionWrapper(nn.Module):
    conditioning_key = "crossattn"

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c_crossattn):
        return self.diffusion_model(x, t, torch.cat(c_crossattn, 1))


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.wrapped = text_encoder  # has .transformer.text_model, as ldm's FrozenCLIPEmbedder

    def forward(self, texts):
        from modules import shared

        return encode_prompts(SimpleNamespace(text_encoder=self.wrapped, arch="sd1"), texts, shared.opts.data["CLIP_stop_at_last_layers"]).context


class LatentDiffusion(nn.Module):
    cond_stage_key = "txt"
    is_sd1, is_sd2, is_sdxl, is_sd3, is_ssd = True, False, False, False, False

    def __init__(self, seed: int = 0):
        super().__init__()
        ckpt = random_tiny_checkpoint(seed)
        self.model = DiffusionWrapper(ckpt.unet)
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(ckpt.text_encoder)
        self.first_stage_model = ckpt.vae
        self.scale_factor = ckpt.vae.scale_factor
        self.parameterization = "eps"
        self.lowvram = False
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().half())  # as with use_downcasted_alpha_bar
        self.alphas_cumprod_original = sd_alphas_cumprod()
        self.sd_checkpoint_info = SimpleNamespace(model_name="tiny", title="tiny.safetensors [0000000000]")
        for p in self.parameters():
            p.requires_grad_(True)  # ldm leaves the UNet and VAE trainable; only the CLIP embedder freezes itself
        for p in self.cond_stage_model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return DiagonalGaussian(*self.first_stage_model.encode_moments(x))

    def get_first_stage_encoding(self, posterior):
        z = posterior if isinstance(posterior, torch.Tensor) else posterior.sample()
        return self.scale_factor * z
