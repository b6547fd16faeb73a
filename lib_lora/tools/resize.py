"""`resize`: a LoRA cut to a lower rank by SVD, per module, with kohya `networks/resize_lora.py` semantics.

A fixed rank, or a dynamic one: `fro` keeps the fraction of ‖ΔW‖_F (sv_fro), `energy` of Σ s_i
(sv_cumulative), `ratio` the values above s_max/ratio (sv_ratio), each capped by `rank` when given.
The SVD of up@down is taken exactly from the factors (QR, then the small core), so it is cheap and a
resize to the file's own rank is lossless. Each module keeps its alpha/rank ratio (kohya writes
alpha = scale·new_rank), so the webui shows the same scale; LoHa/LoKr modules become plain LoRA
modules of scale 1. The source's metadata is kept, with dims, comment and `lib_lora.tool` updated.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .common import Progress, ToolError, ToolResult, check_output, no_progress
from .lowrank import RankRule, dense_delta, is_kxk, lowrank_of, module_in_shape, spectrum_of_dense, spectrum_of_lowrank
from .sources import SourceLora, load_source, refuse_dora
from .writing import TOOL_KEY, OutputModule, describe, network_fields, reduce_module, tool_fields, write_lora

DROPPED_KEYS = ("sshs_", TOOL_KEY, "lora_adapter_metadata")  # recomputed, rewritten, or only meant for PEFT keys


def check_reachable(source: SourceLora, rule: RankRule) -> None:
    """Refuse a fixed rank above every module's (nothing would shrink): resizing only lowers ranks."""
    if rule.rank is None or any(value is not None for value in (rule.fro, rule.energy, rule.ratio)):
        return
    caps = [(rule.cap(is_kxk(module_in_shape(m))), m.rank) for m in source.lora.modules.values() if m.rank is not None]
    if caps and all(cap > rank for cap, rank in caps):
        largest = max(rank for _, rank in caps)
        raise ToolError(f"{source.path}: --rank {rule.rank}{f' / --conv-rank {rule.conv_rank}' if rule.conv_rank else ''} "
                        f"is above every module's rank (largest {largest}); resize only lowers ranks")


def _network_args(metadata: dict[str, str]) -> dict[str, str]:
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


def resized_metadata(source: SourceLora, modules: list[OutputModule], rule: RankRule) -> dict[str, str]:
    kept = {k: v for k, v in source.lora.metadata.items() if not k.startswith(DROPPED_KEYS)}
    comment = f"resized from {source.path.name} to {describe(rule)}"
    if old := kept.get("ss_training_comment"):
        comment += f"; {old}"
    return kept | network_fields(modules, _network_args(kept)) | tool_fields("resize", [source.record()], comment, **asdict(rule))


def resize_lora(path, out, rule: RankRule, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                progress: Progress = no_progress) -> ToolResult:
    """Write `out`: every module of `path` at the rank `rule` keeps; `dtype` defaults to the source's."""
    out = check_output(out, [Path(path)], overwrite)
    source = load_source(path)
    refuse_dora(source, "resize")
    check_reachable(source, rule)
    modules, reports = [], []
    for name, module in progress(list(source.lora.modules.items()), "resize"):
        factors = lowrank_of(module)
        spectrum = spectrum_of_lowrank(factors) if factors is not None else spectrum_of_dense(dense_delta(module))
        scale = module.scale if factors is not None else 1.0
        output, report = reduce_module(name, spectrum, rule, module_in_shape(module), module.rank, scale)
        modules.append(output)
        reports.append(report)
    path = write_lora(out, modules, resized_metadata(source, modules, rule), dtype or source.dtype, overwrite)
    return ToolResult(path, reports)
