"""Choosing blocks at training time: kohya's per-block ranks and LoRA-Block-Weight block names.

kohya's `block_dims`/`block_alphas`/`conv_block_dims`/`conv_block_alphas` network args
(sd-scripts `networks/lora.py`, `get_block_dims_and_alphas` and `get_block_index`) give one rank and
alpha per UNet block: 25 values for SD1/SD2 (IN00..IN11, MID, OUT00..OUT11) and 23 for SDXL
(index 0 the time/label embeddings, IN00..IN08, MID00..MID02 (middle_block.0/.1/.2), OUT00..OUT08, and
22 the final out; 0 and 22 hold no layer kohya targets). kohya numbers a module by its file name:
SD1/SD2 `down_blocks_i_{resnets,attentions}_j` -> 1 + 3i + j (the downsampler j = 2), `mid_block` ->
12, `up_blocks_i_..._j` -> 13 + 3i + j; SDXL `input_blocks_n` -> 1 + n, `middle_block_m` -> 10 + m,
`output_blocks_n` -> 13 + n. On the real SD1/SD2 UNets (two resnets per level) that is the ldm block
number, so IN04 is `input_blocks.4` in both kohya's and LoRA-Block-Weight's counting.
Linear and 1x1-conv layers take `block_dims`/`block_alphas`, 3x3 convs `conv_block_dims`/
`conv_block_alphas`; a rank of 0 leaves the layer without an adapter; the text encoders keep
network_dim/network_alpha.

`train_blocks` (ours) names LoRA-Block-Weight blocks (BASE = the text encoders, IN00..., M00,
OUT00...; `Target.block`), and `cross_attention_only` (ours) keeps only the UNet's cross-attention
layers (`attn2.to_q/to_k/to_v/to_out.0`).
"""

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .errors import NetworkConfigError
from .naming import UNET_PREFIX
from .targets import Target

SD_BLOCK_IDS = (*(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))  # kohya's 25
SDXL_BLOCK_IDS = ("EMB", *(f"IN{i:02d}" for i in range(9)), "MID00", "MID01", "MID02", *(f"OUT{i:02d}" for i in range(9)), "OUT")  # 23
TEXT_BLOCK = "BASE"
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_SDXL_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)_(\d+)_")


def block_ids(sdxl: bool) -> tuple[str, ...]:
    """The blocks `block_dims` lists, in kohya's order (25 for SD1/SD2, 23 for SDXL)."""
    return SDXL_BLOCK_IDS if sdxl else SD_BLOCK_IDS


def kohya_block_index(name: str, sdxl: bool) -> int:
    """kohya's `get_block_index` of a UNet module name (`lora_unet_...`); -1 for a name in no block."""
    if not sdxl:
        if m := _UPDOWN.search(name):
            kind, i, item, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            index = 3 * i + (2 if item in ("upsamplers", "downsamplers") else j)
            return 1 + index if kind == "down" else 13 + index
        return 12 if "mid_block_" in name else -1
    body = name.removeprefix(UNET_PREFIX + "_")
    if body.startswith(("time_embed_", "label_emb_")):
        return 0
    if body.startswith("out_"):
        return 22
    if m := _SDXL_BLOCK.match(body):
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)] + int(m.group(2))
    return -1


@dataclass(frozen=True)
class BlockDims:
    """Per-block (rank, alpha) for linear/1x1 layers and for 3x3 convs (None: no 3x3-conv adapters)."""

    sdxl: bool
    dims: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_dims: tuple[int, ...] | None = None
    conv_alphas: tuple[float, ...] | None = None

    def rank_alpha(self, target: Target) -> tuple[int, float] | None:
        """(rank, alpha) of a UNet target, None for a 3x3 conv without conv dims; rank 0 means no adapter."""
        index = kohya_block_index(target.name, self.sdxl)
        assert index >= 0, f"{target.name} is in no kohya block"  # kohya's targets all sit inside blocks
        if target.kind != "conv":
            return self.dims[index], self.alphas[index]
        return None if self.conv_dims is None else (self.conv_dims[index], self.conv_alphas[index])


def _values(name: str, values: Sequence | None, count: int, ids: tuple[str, ...]) -> tuple | None:
    if values is None:
        return None
    if len(values) != count:
        raise NetworkConfigError(f"{name}: needs {count} values ({ids[0]}..{ids[-1]} in kohya's order), got {len(values)}")
    if any(v < 0 for v in values):
        raise NetworkConfigError(f"{name}: ranks and alphas cannot be negative, got {list(values)}")
    return tuple(values)


def make_block_dims(sdxl: bool, network_dim: int, network_alpha: float, conv_dim: int | None, conv_alpha: float | None, *,
                    block_dims: Sequence[int] | None = None, block_alphas: Sequence[float] | None = None,
                    conv_block_dims: Sequence[int] | None = None, conv_block_alphas: Sequence[float] | None = None) -> BlockDims | None:
    """kohya's `get_block_dims_and_alphas`: None without block_dims; otherwise block_alphas default to
    network_alpha, conv_block_dims to conv_dim (no 3x3-conv adapters without either), conv_block_alphas to
    conv_alpha (default 1). Where kohya ignores a value given without the one it qualifies, we refuse it."""
    if block_dims is None:
        given = [n for n, v in (("block_alphas", block_alphas), ("conv_block_dims", conv_block_dims),
                                ("conv_block_alphas", conv_block_alphas)) if v is not None]
        if given:
            raise NetworkConfigError(f"{given[0]}: works with block_dims only (kohya ignores it without); give block_dims too")
        return None
    ids = block_ids(sdxl)
    count = len(ids)
    dims = _values("block_dims", block_dims, count, ids)
    alphas = _values("block_alphas", block_alphas, count, ids) or (network_alpha,) * count
    conv_alpha = 1.0 if conv_alpha is None else conv_alpha
    conv_dims = _values("conv_block_dims", conv_block_dims, count, ids)
    if conv_dims is None:
        if conv_block_alphas is not None:
            raise NetworkConfigError("conv_block_alphas: works with conv_block_dims only (kohya ignores it without); give "
                                     "conv_block_dims too")
        conv_dims = None if conv_dim is None else (conv_dim,) * count
    conv_alphas = None if conv_dims is None else _values("conv_block_alphas", conv_block_alphas, count, ids) or (conv_alpha,) * count
    return BlockDims(sdxl, dims, alphas, conv_dims, conv_alphas)


def check_train_blocks(train_blocks: Collection[str], available: Collection[str]) -> None:
    """Every named block must exist in this model (BASE always does)."""
    unknown = [b for b in train_blocks if b not in available and b != TEXT_BLOCK]
    if unknown:
        raise NetworkConfigError(f"train_blocks: {', '.join(unknown)} is no block of this model; its blocks are "
                                 f"{TEXT_BLOCK}, {', '.join(sorted(available, key=_block_order))}")


def _block_order(block: str) -> tuple[int, int]:
    kind = 0 if block.startswith("IN") else 1 if block.startswith("M") else 2
    return kind, int(re.sub(r"\D", "", block) or 0)


def keeps(target: Target, train_blocks: Collection[str] | None, cross_attention_only: bool) -> bool:
    """Whether a UNet target is trained: in a chosen block (all without train_blocks) and, if asked, cross-attention."""
    if train_blocks is not None and target.block not in train_blocks:
        return False
    return not cross_attention_only or ".attn2." in f".{target.path}"
