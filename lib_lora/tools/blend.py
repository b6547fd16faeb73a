"""`blend`: one LoRA equal to applying several with given weights.

Exact by default: per module, the downs are stacked and the ups stacked with each file's
weight·alpha/r folded in, so up@down = Σ w_i·ΔW_i and alpha = the new rank (scale 1). The rank is
the sum of the inputs' (kohya `merge_lora.py --concat`). With a RankRule, that sum (or, for LoHa/LoKr
modules, the dense Σ w_i·ΔW_i) is cut by SVD to the rule's rank, as kohya's `svd_merge_lora.py`
does (without its 0.99-quantile clamp, so the reported error is the whole error). Conv modules are
blended flat ([out, in·kh·kw]) and written back as a k×k down and a 1×1 up (lora-format.md §2).
"""

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from ..networks.base import AdapterModule
from ..networks.errors import LoraFormatError
from .common import ModuleReport, Progress, ToolError, ToolResult, check_output, no_progress
from .lowrank import (RankRule, concatenate, dense_delta, lowrank_of, merged_in_shape, module_in_shape,
                      spectrum_of_dense, spectrum_of_lowrank)
from .sources import SourceLora, common_architecture, folder_frequencies, load_source, refuse_dora
from .writing import OutputModule, base_fields, describe, network_fields, reduce_module, tool_fields, write_lora

Part = tuple[SourceLora, float, AdapterModule]  # (file, weight, its module of this name)


def _check_shapes(name: str, parts: list[Part]) -> None:
    first, _, module = parts[0]
    for source, _, other in parts[1:]:
        if other.delta_shape() != module.delta_shape():
            raise LoraFormatError(f"{name}: {first.path} has a [{', '.join(map(str, module.delta_shape()))}] delta but "
                                  f"{source.path} a [{', '.join(map(str, other.delta_shape()))}] one (out, in·kh·kw); "
                                  f"the files are for different models")


def _source_rank(parts: list[Part]) -> int | None:
    ranks = [module.rank for _, _, module in parts]
    return None if None in ranks else sum(ranks)


def blend_module(name: str, parts: list[Part], rule: RankRule | None) -> tuple[OutputModule, ModuleReport]:
    """Σ weight·ΔW of one module over the files that have it: concatenated, or cut by SVD when `rule` is given."""
    _check_shapes(name, parts)
    in_shape = merged_in_shape([module_in_shape(m) for _, _, m in parts], name)
    factors = [lowrank_of(m) for _, _, m in parts]
    if all(f is not None for f in factors):
        exact = concatenate([(f, weight) for f, (_, weight, _) in zip(factors, parts)], in_shape)
        if rule is None:
            return OutputModule(name, exact), ModuleReport(name, exact.rank, exact.rank, 0.0)
        spectrum = spectrum_of_lowrank(exact)
    elif rule is None:
        source, _, module = next(p for p, f in zip(parts, factors) if f is None)
        raise ToolError(f"{source.path}: {name} is a {module.algo} module, which has no up/down factors to stack; "
                        f"pass --rank R to blend it by SVD")
    else:
        spectrum = spectrum_of_dense(sum(weight * dense_delta(module) for _, weight, module in parts))
    return reduce_module(name, spectrum, rule, in_shape, _source_rank(parts))


def merged_tags(sources: list[SourceLora]) -> dict[str, str]:
    """`ss_tag_frequency` summed over the inputs and their trigger phrases joined, so the blend shows its tags.

    A field that is not valid JSON adds nothing here (`inspect` names it).
    """
    frequency: dict[str, Counter] = {}
    for folders in (f for source in sources for f in folder_frequencies(source.lora.metadata)):
        for folder, tags in (folders.items() if isinstance(folders, dict) else []):
            frequency.setdefault(folder, Counter()).update(tags if isinstance(tags, dict) else {})
    phrases = list(dict.fromkeys(p for s in sources if (p := s.lora.metadata.get("modelspec.trigger_phrase"))))
    meta = {"ss_tag_frequency": json.dumps(frequency)} if frequency else {}
    return meta | ({"modelspec.trigger_phrase": ", ".join(phrases)} if phrases else {})


def blend_loras(inputs: list[tuple[Path, float]], out, rule: RankRule | None = None, *, dtype: torch.dtype | None = None,
                overwrite: bool = False, progress: Progress = no_progress) -> ToolResult:
    """Write `out`: Σ weight·ΔW of the input files; `dtype` defaults to the first input's."""
    if not inputs:
        raise ToolError("blend needs at least one FILE:WEIGHT")
    out = check_output(out, [path for path, _ in inputs], overwrite)
    sources = [load_source(path) for path, _ in inputs]
    for source in sources:
        refuse_dora(source, "blend")
    architecture = common_architecture(sources)
    weights = [weight for _, weight in inputs]
    names = list(dict.fromkeys(name for source in sources for name in source.lora.modules))
    modules, reports = [], []
    for name in progress(names, "blend"):
        parts = [(s, w, s.lora.modules[name]) for s, w in zip(sources, weights) if name in s.lora.modules]
        module, report = blend_module(name, parts, rule)
        modules.append(module)
        reports.append(report)
    listed = ", ".join(f"{s.path.name}:{w:g}" for s, w in zip(sources, weights))
    how = f"SVD to {describe(rule)}" if rule else "ranks concatenated (exact)"
    options = asdict(rule) if rule else {"exact": True}
    records = [s.record(weight=w) for s, w in zip(sources, weights)]
    metadata = (base_fields(architecture, out.stem, sources[0].lora.metadata.get("modelspec.resolution"))
                | network_fields(modules) | merged_tags(sources)
                | tool_fields("blend", records, f"blend of {listed}, {how}", **options))
    path = write_lora(out, modules, metadata, dtype or sources[0].dtype, overwrite)
    return ToolResult(path, reports)
