"""`bake`: LoRAs merged into a checkpoint, saved as a new .safetensors (never over the source).

The merge is the webui's (and generation's) merge mode: `LoraPatcher` writes W + Σ w·ΔW computed in
fp32 into each layer (text encoders and UNet at the same weight), then the patched models are saved
with `save_checkpoint` in the source's dtype, or fp16. The base is loaded in the dtype it stores, so
an fp16 file is merged with one rounding, as the webui merges into its fp16 model.
"""

import os
from pathlib import Path

import torch

from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..networks.patcher import ActiveLora, LoraPatcher
from ..networks.targets import text_models_for
from ..train.saving import checkpoint_hashes
from .common import ToolError, check_output
from .sources import checkpoint_dtype, load_source
from .writing import TOOL_KEY, tool_record


def _save_new(ckpt, out: Path, dtype: torch.dtype | None, metadata: dict[str, str], overwrite: bool) -> None:
    """save_checkpoint to a temporary name, then rename, re-checking that no one took `out` meanwhile."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.baking.safetensors")
    try:
        save_checkpoint(ckpt, tmp, dtype=dtype, extra_metadata=metadata)
        if out.exists() and not overwrite:
            raise ToolError(f"{out}: was created while baking; choose another name or pass --overwrite")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def bake_loras(base, loras: list[tuple[Path, float]], out, *, fp16: bool = False, overwrite: bool = False) -> Path:
    """Write `out`: `base` with each LoRA merged at its weight; refuses `out` == `base` and an existing `out`."""
    base = Path(base)
    if not loras:
        raise ToolError("bake needs at least one LORA:WEIGHT")
    out = check_output(out, [base, *(path for path, _ in loras)], overwrite)
    sources = [load_source(path) for path, _ in loras]
    ckpt = load_checkpoint(base, dtype=checkpoint_dtype(base))
    records = [s.record(weight=w) for s, (_, w) in zip(sources, loras)]
    base_record = {"file": base.name, "role": "base", **checkpoint_hashes(base, base.stat().st_mtime_ns)}
    metadata = {k: v for k, v in ckpt.metadata.items() if not k.startswith("lib_lora.")}
    metadata[TOOL_KEY] = tool_record("bake", [base_record, *records], fp16=fp16)
    with LoraPatcher(ckpt.unet, text_models_for(ckpt.arch, ckpt.text_encoder, ckpt.text_encoder_2), "merge") as patcher:
        patcher.apply([ActiveLora(s.lora, w, w) for s, (_, w) in zip(sources, loras)])
        _save_new(ckpt, out, torch.float16 if fp16 else None, metadata, overwrite)
    return out
