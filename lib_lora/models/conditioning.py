"""Prompt tokens -> what the UNet conditions on, for SD1, SD2 and SDXL alike.

* SD1: CLIP-L's hidden states after `clip_skip`, through the final norm (the webui's rule).
* SD2: OpenCLIP ViT-H's penultimate states through `ln_final` (always; clip skip does not apply).
* SDXL: CLIP-L's `hidden_states[11]` and OpenCLIP bigG's penultimate states, both bare, joined along
  the width (768 + 1280 = 2048), plus the "vector" `y` of the UNet's `label_emb`: bigG's pooled
  output followed by sinusoidal embeddings of original size, crop offset and target size
  (sgm `GeneralConditioner`; kohya's `get_size_embeddings`).
OpenCLIP encoders see every token after the first end-of-text as 0, as the webui pads them.
"""

from dataclasses import dataclass

import torch

from .tokenizer import EOS, apply_emphasis
from .unet import timestep_embedding

SIZE_EMBEDDING_DIM = 256  # per number: (height, width), (top, left), (height, width) -> 6 x 256


@dataclass
class Conditioning:
    """Text conditioning: cross-attention context [B, T, D] and, for SDXL, the pooled text vector [B, P]."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.context.to(*args, **kwargs), None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def __getitem__(self, index) -> "Conditioning":
        """Rows of the batch (a slice or index list), keeping the batch dimension."""
        return Conditioning(self.context[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.context for p in parts]), pooled)


def pad_after_end(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Every token after the first end-of-text becomes `pad_id` (the webui's OpenCLIP `id_pad`)."""
    is_end = tokens == EOS
    after_first_end = (is_end.cumsum(-1) - is_end.long()) > 0
    return tokens.masked_fill(after_first_end, pad_id)


def _emphasised(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z [B, n·77, D] with each 77-token chunk weighted and mean-restored as the webui does."""
    b, n, t = weights.shape
    z = z.reshape(b, n, t, -1)
    return torch.stack([apply_emphasis(z[:, i], weights[:, i]) for i in range(n)], dim=1).reshape(b, n * t, -1)


def _open_clip(encoder, tokens: torch.Tensor, *, final_norm: bool, pooled: bool):
    """Run an OpenCLIP encoder on [B, n, 77] chunks: context [B, n·77, D] and the first chunk's pooled vector."""
    b, n, t = tokens.shape
    hidden, vector = encoder(pad_after_end(tokens).reshape(b * n, t), final_norm=final_norm, pooled=pooled)
    return hidden.reshape(b, n * t, -1), None if vector is None else vector.reshape(b, n, -1)[:, 0]


def encode_chunks(models, tokens: torch.Tensor, weights: torch.Tensor, clip_skip: int = 1) -> Conditioning:
    """Token chunks [B, n, 77] and emphasis weights -> Conditioning; `models` has arch and text encoder(s)."""
    device = next(models.text_encoder.parameters()).device
    tokens, weights = tokens.to(device), weights.to(device)
    arch = models.arch
    if arch == "sd1":
        return Conditioning(_emphasised(models.text_encoder(tokens, clip_skip), weights))
    if arch == "sd2":
        hidden, _ = _open_clip(models.text_encoder, tokens, final_norm=True, pooled=False)
        return Conditioning(_emphasised(hidden, weights))
    clip_l = models.text_encoder(tokens, clip_skip=2, final_norm=False)
    big_g, pooled = _open_clip(models.text_encoder_2, tokens, final_norm=False, pooled=True)
    return Conditioning(torch.cat([_emphasised(clip_l, weights), _emphasised(big_g.to(clip_l.dtype), weights)], dim=-1), pooled)


def size_embedding(values: torch.Tensor) -> torch.Tensor:
    """[B, k] numbers -> [B, k·256] sinusoidal embeddings, one per number (sgm `ConcatTimestepEmbedderND`)."""
    b, k = values.shape
    return timestep_embedding(values.reshape(-1), SIZE_EMBEDDING_DIM).reshape(b, k * SIZE_EMBEDDING_DIM)


def sdxl_vector(pooled: torch.Tensor, original_hw: torch.Tensor, crop_top_left: torch.Tensor, target_hw: torch.Tensor) -> torch.Tensor:
    """SDXL's `y` [B, P + 1536]: pooled text, then embeddings of (h, w) original, (top, left) crop, (h, w) target."""
    sizes = [size_embedding(v.to(pooled.device).float()) for v in (original_hw, crop_top_left, target_hw)]
    return torch.cat([pooled.float(), *sizes], dim=-1).to(pooled.dtype)
