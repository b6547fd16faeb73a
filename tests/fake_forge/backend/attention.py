"""backend/attention.py: the attention Forge picks at start. On the CPU it is sub-quadratic attention, which
exponentiates in place (`torch.exp(..., out=...)`) and so cannot be differentiated."""

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, T, inner] -> [B, H, T, d]


def attention_pytorch(q, k, v, heads, mask=None):
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def attention_sub_quad(q, k, v, heads, mask=None):
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = scores - scores.amax(-1, keepdim=True)
    torch.exp(scores, out=scores)
    return (scores / scores.sum(-1, keepdim=True) @ v).transpose(1, 2).flatten(2)


def attention_xformers(q, k, v, heads, mask=None):
    raise NotImplementedError("xformers is not installed")


attention_function = attention_sub_quad
