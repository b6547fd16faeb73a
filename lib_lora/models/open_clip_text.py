"""The OpenCLIP text transformer that SD2 (ViT-H) and SDXL's second encoder (ViT-bigG) condition on.

Parameter names are open_clip's, as the checkpoints store them under `cond_stage_model.model.` (SD2)
and `conditioner.embedders.1.model.` (SDXL): `transformer.resblocks.N.attn.in_proj_weight` (q, k and
v fused in one [3d, d] tensor), `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`, `ln_1`, `ln_2`,
`positional_embedding`, `ln_final`, `text_projection`.

kohya names these layers in Hugging Face's layout with q/k/v apart (`..._self_attn_q_proj`,
lora-format.md §4), so the attention exposes each third of the fused projection as a child module
(`attn.q_proj`, a `FusedSlice`) that owns no parameter: adapters hook it like any Linear, and a merge
writes into the fused tensor it views. The state dict is exactly open_clip's.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OpenClipConfig:
    """Defaults: SD2's ViT-H/14 text tower. SDXL's bigG: width 1280, 32 layers, 20 heads, mlp 5120, projection 1280."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 1024
    layers: int = 24
    heads: int = 16  # not visible in tensor shapes; OpenCLIP uses 64-channel heads
    mlp_width: int = 4096
    projection_dim: int = 1024


class FusedSlice(nn.Module):
    """One of q/k/v: rows [index·d, (index+1)·d) of the attention's fused `in_proj_weight` and bias, as a Linear.

    Holds no parameter (the owner is kept outside the module tree), so the state dict is unchanged;
    `weight` is a view, so writing into it (a merged LoRA) writes into the fused tensor.
    """

    def __init__(self, owner: nn.Module, index: int, width: int):
        super().__init__()
        self.__dict__["owner"] = owner
        self.index, self.in_features, self.out_features = index, width, width

    @property
    def weight(self) -> torch.Tensor:
        d = self.out_features
        return self.owner.in_proj_weight[self.index * d : (self.index + 1) * d]

    @property
    def bias(self) -> torch.Tensor:
        d = self.out_features
        return self.owner.in_proj_bias[self.index * d : (self.index + 1) * d]

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class OpenClipAttention(nn.Module):
    """Causal multi-head self-attention in `nn.MultiheadAttention`'s parameter layout."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * width, width)))  # as nn.MultiheadAttention
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.q_proj, self.k_proj, self.v_proj = (FusedSlice(self, i, width) for i in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d]
        return self.out_proj(out.transpose(1, 2).flatten(2))


class OpenClipMLP(nn.Module):
    """open_clip's `mlp` Sequential (c_fc, gelu, c_proj) with the same child names; exact GELU."""

    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: OpenClipConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = OpenClipAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = OpenClipMLP(config.width, config.mlp_width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, config: OpenClipConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class OpenClipTextModel(nn.Module):
    """The text tower of an open_clip `CLIP` (the visual tower is not kept in SD checkpoints)."""

    def __init__(self, config: OpenClipConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.randn(config.max_positions, config.width) * 0.01)  # open_clip's init
        self.transformer = OpenClipTransformer(config)
        self.ln_final = nn.LayerNorm(config.width)
        self.text_projection = nn.Parameter(torch.randn(config.width, config.projection_dim) * config.width**-0.5)


class OpenClipTextEncoder(nn.Module):
    """sgm/ldm's `FrozenOpenCLIPEmbedder` shape: the open_clip model lives under `.model`."""

    def __init__(self, config: OpenClipConfig):
        super().__init__()
        self.config = config
        self.model = OpenClipTextModel(config)

    def forward(self, tokens: torch.Tensor, *, final_norm: bool, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, 77] -> (penultimate hidden states [B, 77, width], pooled [B, projection] or None).

        SD2 conditions on `ln_final(penultimate)` (`final_norm=True`); SDXL on the bare penultimate
        states plus the pooled vector: `ln_final(last)` at the end-of-text token (the highest id, as
        open_clip finds it with argmax) times `text_projection` (sgm `FrozenOpenCLIPEmbedder2`).
        The last block runs only when the pooled vector is asked for.
        """
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding
        blocks = m.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        hidden = m.ln_final(x) if final_norm else x
        if not pooled:
            return hidden, None
        last = m.ln_final(blocks[-1](x))
        eot = last[torch.arange(last.shape[0], device=last.device), tokens.argmax(dim=-1)]
        return hidden, eot @ m.text_projection
