"""Our tiny random models wrapped in the shapes of the webui's `shared.sd_model` (hijacked).

SD1 and SD2 (ldm LatentDiffusion):
sd_model.model.diffusion_model             our ldm-named UNetModel
sd_model.cond_stage_model                  like FrozenCLIPEmbedderWithCustomWords / FrozenOpenCLIPEmbedderWithCustomWords:
                                           called with a list of texts, uses opts.CLIP_stop_at_last_layers (SD1)
          .wrapped.transformer.text_model  SD1: our CLIP text model (kohya names from `text_model.`)
          .wrapped.model                   SD2: open_clip's layout, its attention torch's nn.MultiheadAttention
                                           on sequence-first tensors, as open_clip runs inside the webui
sd_model.encode_first_stage(x)             a posterior with mode()/sample(), under no_grad as in ldm
sd_model.get_first_stage_encoding(z)       scale_factor * z (tensor) or * posterior.sample()

SDXL (sgm DiffusionEngine): `conditioner` (also `cond_stage_model`) with embedders[0] (CLIP-L,
`.wrapped.transformer`) and embedders[1] (bigG, `.wrapped.model`, returns (z, pooled)), a UNet taking
y, `encode_first_stage` returning scaled latents already sampled, `get_first_stage_encoding` identity.
"""

from collections import OrderedDict
from types import SimpleNamespace

import torch
from torch import nn

from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.models.pipeline import encode_prompts
from lib_lora.models.schedule import sd_alphas_cumprod


class ResidualAttentionBlock(nn.Module):
    """open_clip's block as the webui runs it: nn.MultiheadAttention on [T, B, D] with a float causal mask."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x):  # our encoder hands [B, T, D]; open_clip permutes to [T, B, D] before its blocks
        x = x.transpose(0, 1)
        mask = torch.full((x.shape[0], x.shape[0]), float("-inf"), device=x.device).triu(1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return (x + self.mlp(self.ln_2(x))).transpose(0, 1)


def with_torch_attention(encoder):
    """Our OpenCLIP encoder with each block replaced by open_clip's torch-MHA block, same weights."""
    config = encoder.config
    blocks = encoder.model.transformer.resblocks
    for i, block in enumerate(blocks):
        replacement = ResidualAttentionBlock(config.width, config.heads, config.mlp_width)
        replacement.load_state_dict(block.state_dict())
        blocks[i] = replacement.eval()
    return encoder


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


class FrozenOpenCLIPEmbedderWithCustomWords(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.wrapped = with_torch_attention(text_encoder)  # has .model, as ldm's FrozenOpenCLIPEmbedder

    def forward(self, texts):
        return encode_prompts(SimpleNamespace(text_encoder=self.wrapped, arch="sd2"), texts).context


class LatentDiffusion(nn.Module):
    cond_stage_key = "txt"

    def __init__(self, seed: int = 0, arch: str = "sd1"):
        super().__init__()
        ckpt = random_tiny_checkpoint(seed, arch)
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3, self.is_ssd = arch == "sd1", arch == "sd2", False, False, False
        self.model = DiffusionWrapper(ckpt.unet)
        embedder = FrozenCLIPEmbedderWithCustomWords if arch == "sd1" else FrozenOpenCLIPEmbedderWithCustomWords
        self.cond_stage_model = embedder(ckpt.text_encoder)
        self.first_stage_model = ckpt.vae
        self.scale_factor = ckpt.vae.scale_factor
        self.parameterization = ckpt.parameterization
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


class SDXLEmbedder(nn.Module):
    """One of GeneralConditioner's text embedders: CLIP-L (index 0) or bigG (index 1, also returns pooled)."""

    def __init__(self, conditioner_models, index: int):
        super().__init__()
        self.__dict__["models"] = conditioner_models  # both encoders: the webui encodes each with its own hijack
        self.index = index
        # sgm's FrozenCLIPEmbedder (.transformer) and FrozenOpenCLIPEmbedder2 (.model)
        self.wrapped = conditioner_models.text_encoder if index == 0 else conditioner_models.text_encoder_2
        self.is_trainable = False

    def forward(self, texts):
        cond = encode_prompts(self.models, texts)
        width = self.models.text_encoder.config.width
        if self.index == 0:
            return cond.context[..., :width]
        return cond.context[..., width:], cond.pooled


class GeneralConditioner(nn.Module):
    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        models = SimpleNamespace(arch="sdxl", text_encoder=text_encoder, text_encoder_2=with_torch_attention(text_encoder_2))
        self.embedders = nn.ModuleList([SDXLEmbedder(models, 0), SDXLEmbedder(models, 1)])


class OpenAIWrapper(DiffusionWrapper):
    def forward(self, x, t, c):
        return self.diffusion_model(x, t, c["crossattn"], c["vector"])


class DiffusionEngine(nn.Module):
    """sgm's SDXL model after the webui's extend_sdxl: flags, conditioner, schedule and the sgm VAE calls."""

    is_sd1, is_sd2, is_sdxl, is_sd3, is_ssd = False, False, True, False, False

    def __init__(self, seed: int = 0):
        super().__init__()
        ckpt = random_tiny_checkpoint(seed, "sdxl")
        self.model = OpenAIWrapper(ckpt.unet)
        self.conditioner = GeneralConditioner(ckpt.text_encoder, ckpt.text_encoder_2)
        self.cond_stage_model = self.conditioner  # after the hijack it IS the conditioner
        self.first_stage_model = ckpt.vae
        self.scale_factor = ckpt.vae.scale_factor
        self.parameterization = "eps"
        self.lowvram = False
        self.alphas_cumprod_original = sd_alphas_cumprod()
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod())
        self.sd_checkpoint_info = SimpleNamespace(model_name="tinyxl", title="tinyxl.safetensors [0000000000]")
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def encode_first_stage(self, x):
        mean, logvar = self.first_stage_model.encode_moments(x)
        return self.scale_factor * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))  # sgm samples

    def get_first_stage_encoding(self, z):
        return z  # the webui patches sgm's to identity
