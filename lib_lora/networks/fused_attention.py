"""Adapters on `torch.nn.MultiheadAttention`, the attention of the webui's OpenCLIP (SD2, SDXL's bigG).

`nn.MultiheadAttention` keeps q, k and v in one fused `in_proj_weight` and never calls its
`out_proj` as a module (it passes the weights to a functional), so a forward hook on a Linear
has nothing to attach to. `expose_projections` gives the module the children our own OpenCLIP
has (`q_proj`, `k_proj`, `v_proj` as views of the fused tensor, lora-format.md §4) and an
instance forward that calls them and `out_proj`; same math, in the same tree the adapters walk.
`undo` gives back the module exactly as it was.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.open_clip_text import FusedSlice


def _attention(mha: nn.MultiheadAttention, query, key, value, attn_mask=None, is_causal=False):
    """nn.MultiheadAttention's output (no weights) computed through the projection children, so their hooks fire."""
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # [T, B, D] -> [B, T, D]
    heads = mha.num_heads
    q, k, v = (p(x).unflatten(-1, (heads, -1)).transpose(1, 2) for p, x in ((mha.q_proj, query), (mha.k_proj, key), (mha.v_proj, value)))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = ~attn_mask  # torch's MHA masks out True; scaled_dot_product_attention keeps True
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype) if attn_mask.is_floating_point() else attn_mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
    out = mha.out_proj(out.transpose(1, 2).flatten(2))
    return out if mha.batch_first else out.transpose(0, 1)


def expose_projections(mha: nn.MultiheadAttention) -> Callable[[], None]:
    """Give `mha` q/k/v/out children whose forward hooks fire; returns the function that undoes it."""
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
        raise ValueError("only OpenCLIP's plain MultiheadAttention (fused in_proj, no bias_k, no dropout) can take adapters")
    width = mha.embed_dim
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        mha.add_module(name, FusedSlice(mha, index, width))

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None:
            raise ValueError("Train LoRA's attention patch does not take a key_padding_mask (OpenCLIP passes none)")
        return _attention(mha, query, key, value, attn_mask, is_causal), None

    mha.forward = forward

    def undo() -> None:
        del mha.forward  # the instance attribute; the class forward shows again
        for name in ("q_proj", "k_proj", "v_proj"):
            del mha._modules[name]

    return undo


def expose_all(root: nn.Module) -> Callable[[], None]:
    """`expose_projections` on every MultiheadAttention under `root`; returns one undo for all."""
    undos = [expose_projections(m) for m in root.modules() if isinstance(m, nn.MultiheadAttention)]

    def undo() -> None:
        for step in reversed(undos):
            step()

    return undo
