"""The CLIP text encoder SD1 conditions on, with Hugging Face `CLIPTextModel` parameter names.

SD1 checkpoints store it as `cond_stage_model.transformer.text_model....`; the class names
(`CLIPAttention`, `CLIPMLP`) are Hugging Face's, which kohya's LoRA targets by name.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12  # not visible in tensor shapes; CLIP uses 64-channel heads
    mlp_width: int = 3072


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(config.width, config.width) for _ in range(4))

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d]; a token sees only its left
        return self.out_proj(out.transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.width)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        return self.token_embedding(tokens) + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1, final_norm: bool = True) -> torch.Tensor:
        """tokens [B, 77] -> hidden states [B, 77, width].

        clip_skip N takes the output of the N-th layer from the end, then the final norm, as the
        webui does (`hidden_states[-N]` of Hugging Face's output; 1 = the last layer). SDXL's first
        encoder takes `hidden_states[11]` bare: clip_skip 2 without the final norm.
        """
        layers = self.encoder.layers
        if not 1 <= clip_skip <= len(layers):
            raise ValueError(f"clip_skip must be between 1 and {len(layers)}, got {clip_skip}")
        x = self.embeddings(tokens)
        for layer in layers[: len(layers) - clip_skip + 1]:
            x = layer(x)
        return self.final_layer_norm(x) if final_norm else x


class CLIPTextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(config)


class TextEncoder(nn.Module):
    """ldm's `FrozenCLIPEmbedder` shape: the CLIP model lives under `.transformer`."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.transformer = CLIPTextModel(config)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1, final_norm: bool = True) -> torch.Tensor:
        """tokens [B, n_chunks, 77] -> context [B, n_chunks * 77, width]; chunks encoded separately."""
        b, n, t = tokens.shape
        hidden = self.transformer.text_model(tokens.reshape(b * n, t), clip_skip, final_norm)
        return hidden.reshape(b, n * t, -1)
