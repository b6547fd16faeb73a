"""Prompt tokens -> what the UNet conditions on, for SD1, SD2 and SDXL alike.

* SD1: CLIP-L's hidden states after `clip_skip`, through the final norm (the webui's rule).
* SD2: OpenCLIP ViT-H's penultimate states through `ln_final` (always; clip skip does not apply).
* SDXL: CLIP-L's `hidden_states[11]` and OpenCLIP bigG's penultimate states, both bare, joined along
  the width (768 + 1280 = 2048), plus the "vector" `y` of the UNet's `label_emb`: bigG's pooled
  output followed by sinusoidal embeddings of original size, crop offset and target size
  (sgm `GeneralConditioner`; kohya's `get_size_embeddings`).
OpenCLIP encoders see every token after the first end-of-text as 0, as the webui pads them.
Textual-inversion vectors replace the token embeddings at their fixes' places, one tensor per encoder
(SDXL: CLIP-L's, then bigG's), as the webui's `EmbeddingsWithFixes` does; gradients reach the vectors.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .tokenizer import EOS, EmbeddingFix, apply_emphasis
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


def token_embedding_of(encoder: nn.Module) -> nn.Module:
    """The token-embedding layer of a CLIP or OpenCLIP text encoder (ours, or the webui's wrapped one), by name."""
    for name, module in encoder.named_modules():
        if name.rpartition(".")[2] == "token_embedding":
            return module
    raise ValueError(f"{type(encoder).__name__} has no token_embedding layer")


def put_vectors(embedded: torch.Tensor, fixes: Sequence[EmbeddingFix], vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """embedded [rows, 77, D] with each fix's vectors [n, D] from its position on, cut at the row's end
    (webui `EmbeddingsWithFixes.forward`); a new tensor, differentiable in the vectors."""
    out = embedded.clone()
    for fix in fixes:
        vec = vectors[fix.name]
        n = min(out.shape[1] - fix.position, vec.shape[0])
        out[fix.row, fix.position : fix.position + n] = vec[:n].to(out.device, out.dtype)
    return out


def _put_vectors_hook(fixes: Sequence[EmbeddingFix], vectors: Mapping[str, torch.Tensor]):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return put_vectors(output, fixes, vectors)

    return hook


@contextmanager
def _vectors_at_fixes(encoders: Sequence[nn.Module], fixes: Sequence[EmbeddingFix],
                      vectors: Mapping[str, Sequence[torch.Tensor]] | None) -> Iterator[None]:
    """While inside, each encoder's token embedding puts its own vectors (index i of each name's) at the fixes."""
    with ExitStack() as stack:
        if fixes:
            for i, encoder in enumerate(encoders):
                hook = _put_vectors_hook(fixes, {name: vecs[i] for name, vecs in vectors.items()})
                stack.callback(token_embedding_of(encoder).register_forward_hook(hook).remove)
        yield


def encode_chunks(models, tokens: torch.Tensor, weights: torch.Tensor, clip_skip: int = 1, fixes: Sequence[EmbeddingFix] = (),
                  vectors: Mapping[str, Sequence[torch.Tensor]] | None = None) -> Conditioning:
    """Token chunks [B, n, 77] and emphasis weights -> Conditioning; `models` has arch and text encoder(s).
    `fixes` (from the tokenizer) place `vectors` (name -> one [n, width] tensor per text encoder)."""
    device = next(models.text_encoder.parameters()).device
    tokens, weights = tokens.to(device), weights.to(device)
    arch = models.arch
    encoders = [models.text_encoder] + ([models.text_encoder_2] if arch == "sdxl" else [])
    with _vectors_at_fixes(encoders, fixes, vectors):
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
