"""The LoRA toolbox: inspect a file, blend several, resize one, extract one from two checkpoints, bake into a checkpoint.

Each tool writes a normal kohya-layout LoRA (or, `bake`, a checkpoint) through the library's own
savers, atomically and never over an input or, unless asked, an existing file; its metadata
(`lib_lora.tool`, `ss_training_comment`) names the inputs with their hashes and weights. The math
(`lowrank`) is ΔW = up @ down · alpha/rank as kohya, LyCORIS and the webui compute it
(lora-format.md §2, §7). CLI: `python -m lib_lora inspect|blend|resize|extract|bake` (`cli.py`).
"""

from .bake import bake_loras
from .blend import blend_loras
from .common import ModuleReport, ToolError, ToolResult
from .extract import extract_lora
from .inspect_lora import LoraReport, format_report, inspect_lora
from .lowrank import RankRule
from .resize import resize_lora

__all__ = ["LoraReport", "ModuleReport", "RankRule", "ToolError", "ToolResult", "bake_loras", "blend_loras", "extract_lora",
           "format_report", "inspect_lora", "resize_lora"]
