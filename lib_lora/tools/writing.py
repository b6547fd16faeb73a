"""Writing a tool's output LoRA: kohya tensors through `save_lora` (atomic, no overwrite) and metadata that
records the inputs.

Every output says what made it: `lib_lora.tool` holds JSON with the tool, each input file with its
`sshs_model_hash` and weight, and the options; `ss_training_comment` says it in words (kohya's
resize_lora rewrites that key the same way). `ss_network_dim`/`ss_network_alpha` are the
common rank/alpha of the Linear modules, or "Dynamic" when they differ (kohya resize_lora's spelling).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..networks.files import save_lora
from ..networks.metadata import base_model_version, modelspec_metadata
from .common import ModuleReport
from .lowrank import LowRank, RankRule, Spectrum, is_kxk, kept_rank, lora_tensors, relative_error, truncate
from .sources import Architecture

DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}
TOOL_KEY = "lib_lora.tool"


@dataclass(frozen=True)
class OutputModule:
    """One module to write: its factors (scale folded in) and the alpha/r the file should carry."""

    name: str
    factors: LowRank
    scale: float = 1.0

    @property
    def alpha(self) -> float:
        return self.scale * self.factors.rank


def reduce_module(name: str, spectrum: Spectrum, rule: RankRule, in_shape: tuple[int, ...], source_rank: int | None,
                  scale: float = 1.0) -> tuple[OutputModule, ModuleReport]:
    """The rank `rule` keeps of one module's spectrum, and its report (the Eckart–Young error of that cut)."""
    rank = kept_rank(rule, spectrum, is_kxk(in_shape))
    report = ModuleReport(name, source_rank, rank, relative_error(spectrum, rank))
    return OutputModule(name, truncate(spectrum, rank, in_shape), scale), report


def describe(rule: RankRule) -> str:
    """A rank rule in kohya's words, for `ss_training_comment`."""
    conv = f", conv rank {rule.conv_rank}" if rule.conv_rank is not None else ""
    for method, value in (("sv_fro", rule.fro), ("sv_cumulative", rule.energy), ("sv_ratio", rule.ratio)):
        if value is not None:
            return f"{method} {value:g}" + (f", at most rank {rule.rank}" if rule.rank else "") + conv
    return f"rank {rule.rank}{conv}"


def _common(values: set) -> str:
    if not values:
        return "None"
    return str(values.pop()) if len(values) == 1 else "Dynamic"


def network_fields(modules: list[OutputModule], args: dict[str, str] | None = None) -> dict[str, str]:
    """`ss_network_module/dim/alpha/args` of what is written; k×k convs give `conv_dim`/`conv_alpha` (kohya's LoCon args)."""
    linear = [m for m in modules if not m.factors.is_kxk_conv]
    conv = [m for m in modules if m.factors.is_kxk_conv]
    args = dict(args or {})
    for key in ("conv_dim", "conv_alpha"):
        args.pop(key, None)
    if conv:
        args |= {"conv_dim": _common({m.factors.rank for m in conv}), "conv_alpha": _common({float(m.alpha) for m in conv})}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _common({m.factors.rank for m in linear}),
        "ss_network_alpha": _common({float(m.alpha) for m in linear}),
        "ss_network_args": json.dumps(args),
    }


def base_fields(architecture: Architecture, title: str, resolution: str | None = None) -> dict[str, str]:
    """The keys that tell loaders the base model (`ss_base_model_version`, `ss_v2`, `modelspec.*`); none if unknown."""
    if architecture.arch is None:
        return {"ss_output_name": title}
    version = base_model_version(architecture.arch, architecture.v_parameterization)
    v_model_size = 768 if architecture.arch == "sd2" and architecture.v_parameterization else None  # SD2 768-v
    size = v_model_size or DEFAULT_RESOLUTION[architecture.arch]
    spec = modelspec_metadata(title=title, base_model_version=version, v_parameterization=architecture.v_parameterization,
                              resolution=size)
    if resolution:
        spec["modelspec.resolution"] = resolution
    return {
        "ss_output_name": title,
        "ss_base_model_version": version,
        "ss_v2": str(architecture.arch == "sd2"),
        "ss_v_parameterization": str(architecture.v_parameterization),
        **spec,
    }


def tool_record(tool: str, inputs: list[dict], **options) -> str:
    """The `lib_lora.tool` value: JSON of the tool, its inputs (file, hash, weight) and the options given."""
    return json.dumps({"tool": tool, "inputs": inputs, **{k: v for k, v in options.items() if v is not None}})


def tool_fields(tool: str, inputs: list[dict], comment: str, **options) -> dict[str, str]:
    """`lib_lora.tool` and, in words, `ss_training_comment` (the webui shows it in the LoRA's card)."""
    return {TOOL_KEY: tool_record(tool, inputs, **options), "ss_training_comment": comment}


def write_lora(out: Path, modules: list[OutputModule], metadata: dict[str, str], dtype: torch.dtype,
               overwrite: bool = False) -> Path:
    """Save `modules` in kohya's layout with `metadata` (hashes added by save_lora), atomically."""
    tensors = {}
    for module in modules:
        tensors |= lora_tensors(module.name, module.factors, module.scale)
    return save_lora(out, tensors, metadata, save_dtype=dtype, overwrite=overwrite)
