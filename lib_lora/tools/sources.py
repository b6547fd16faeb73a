"""Reading a tool's input files: LoRAs with their raw dtype, data hash and base architecture; checkpoint dtypes.

The architecture comes from the metadata when the trainer wrote it (`ss_base_model_version`,
`modelspec.architecture`, `ss_v2`; lora-format.md §8), else from the modules themselves: a `lora_te2_`
module means SDXL; the cross-attention's context width (768 SD1, 1024 SD2, 2048 SDXL), a text layer
index above 11 (SD2's 23 layers) or the text width (768 SD1, 1024 SD2) tell the rest (§4, §5).
"""

import hashlib
import json
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.checkpoint import ARCH_NAMES, UNET_PREFIX
from ..networks.base import AdapterModule
from ..networks.errors import LoraFormatError
from ..networks.files import LoraFile, lora_from_state_dict, read_tensors
from .common import ToolError

CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TEXT_WIDTHS = {768: "sd1", 1024: "sd2"}
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_TEXT_LAYER = re.compile(r"^lora_te1?_text_model_encoder_layers_(\d+)_")


@dataclass(frozen=True)
class Architecture:
    """sd1 / sd2 / sdxl, or None when neither metadata nor shapes tell; `source` says which told."""

    arch: str | None
    v_parameterization: bool
    source: str

    @property
    def label(self) -> str:
        return ARCH_NAMES.get(self.arch, "unknown")


def arch_from_metadata(metadata: dict[str, str]) -> tuple[str, str] | None:
    """(arch, key that told) from kohya's or ModelSpec's keys; other trainers' spellings (sd_1.5, sdxl_1.0) too."""
    version = metadata.get("ss_base_model_version", "")
    for pattern, arch in ((r"sdxl", "sdxl"), (r"sd_v?2", "sd2"), (r"sd_v?1", "sd1")):
        if re.match(pattern, version):
            return arch, "ss_base_model_version"
    spec = metadata.get("modelspec.architecture", "")
    for prefix, arch in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if spec.startswith(prefix):
            return arch, "modelspec.architecture"
    if metadata.get("ss_v2") == "True":
        return "sd2", "ss_v2"
    return None


def arch_from_modules(modules: dict[str, AdapterModule]) -> str | None:
    """The architecture the module names and shapes imply, or None (e.g. a tiny test model's widths)."""
    if any(name.startswith("lora_te2_") for name in modules):
        return "sdxl"
    for name, module in modules.items():
        if name.endswith("_attn2_to_k") and (arch := CONTEXT_WIDTHS.get(module.delta_shape()[1])):
            return arch
    layers = [int(m.group(1)) for name in modules if (m := _TEXT_LAYER.match(name))]
    if layers and max(layers) > 11:
        return "sd2"
    for name, module in modules.items():
        if _TEXT_LAYER.match(name) and name.endswith("_self_attn_q_proj") and (arch := TEXT_WIDTHS.get(module.delta_shape()[0])):
            return arch
    return None


def v_parameterization(metadata: dict[str, str]) -> bool:
    version = metadata.get("ss_base_model_version", "")
    return (metadata.get("ss_v_parameterization") == "True" or metadata.get("modelspec.prediction_type") == "v"
            or version.endswith("_v"))


def architecture_of(lora: LoraFile) -> Architecture:
    v = v_parameterization(lora.metadata)
    if found := arch_from_metadata(lora.metadata):
        return Architecture(found[0], v, found[1])
    arch = arch_from_modules(lora.modules)
    return Architecture(arch, v, "module names and shapes" if arch else "nothing (no metadata, no telling shapes)")


def file_data_hash(path: Path) -> str | None:
    """sha256 of a .safetensors file's tensor region: kohya's `sshs_model_hash` and the webui's addnet hash (§8.1)."""
    if path.suffix != ".safetensors":
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class SourceLora:
    """An input LoRA: the validated file, the dtype it stores, its data hash and its base architecture."""

    lora: LoraFile
    dtype: torch.dtype
    data_hash: str | None
    architecture: Architecture
    key_format: str
    dtype_counts: dict[str, int]

    @property
    def path(self) -> Path:
        return self.lora.path

    def record(self, **fields) -> dict:
        """How the output's `lib_lora.tool` metadata names this input."""
        return {"file": self.path.name, "sshs_model_hash": self.data_hash or self.lora.metadata.get("sshs_model_hash"), **fields}


def is_dora(module: AdapterModule) -> bool:
    return getattr(module, "dora_scale", None) is not None


def refuse_dora(source: SourceLora, tool: str) -> None:
    """DoRA's change depends on the base weight's norms (lora-format.md §7.4): without the checkpoint it has no
    low-rank form, so blend and resize refuse it by name rather than drop its magnitude."""
    for name, module in source.lora.modules.items():
        if is_dora(module):
            raise ToolError(f"{source.path}: {name} is a DoRA module (dora_scale), whose change depends on the base "
                            f"weights; {tool} cannot write it as a LoRA: bake it into a checkpoint, then extract")


def _key_format(tensors: dict[str, torch.Tensor]) -> str:
    peft = any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in tensors)
    return "diffusers/PEFT" if peft else "kohya"


def load_source(path) -> SourceLora:
    """Read and validate a LoRA file (kohya, LyCORIS or diffusers/PEFT keys); errors name the file."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    lora = lora_from_state_dict(tensors, metadata, path)
    counts = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    return SourceLora(lora, dtype, file_data_hash(path), architecture_of(lora), _key_format(tensors),
                      {str(k).removeprefix("torch."): n for k, n in counts.items()})


def common_architecture(sources: list[SourceLora]) -> Architecture:
    """The architecture all inputs share; files that say different ones are refused, naming both."""
    known = [s for s in sources if s.architecture.arch is not None]
    for other in known[1:]:
        if other.architecture.arch != known[0].architecture.arch:
            raise LoraFormatError(
                f"{known[0].path} is an {known[0].architecture.label} LoRA (from {known[0].architecture.source}) but "
                f"{other.path} is an {other.architecture.label} LoRA (from {other.architecture.source}); "
                f"LoRAs of different architectures cannot be combined")
    return known[0].architecture if known else sources[0].architecture


def checkpoint_dtype(path) -> torch.dtype:
    """The floating dtype a .safetensors checkpoint stores its UNet in (fp32 for .ckpt or when unreadable here)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return torch.float32
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(UNET_PREFIX):
                return SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


def folder_frequencies(metadata: dict[str, str], problems: list[str] | None = None) -> list:
    """The {folder: {tag: count}} maps: `ss_tag_frequency`, else each `ss_datasets` entry's `tag_frequency`.

    kohya writes `ss_tag_frequency` as the merge of the per-dataset maps, so only one source is read.
    """
    for key in ("ss_tag_frequency", "ss_datasets"):
        if key not in metadata:
            continue
        try:
            value = json.loads(metadata[key])
        except json.JSONDecodeError as e:
            if problems is not None:
                problems.append(f"{key}: not valid JSON ({e})")
            continue
        if key == "ss_tag_frequency":
            return [value]
        return [d.get("tag_frequency", {}) for d in (value if isinstance(value, list) else []) if isinstance(d, dict)]
    return []


def tag_counts(metadata: dict[str, str]) -> tuple[Counter, list[str]]:
    """Caption tag counts summed over the training folders, and the problems met reading them."""
    counts, problems = Counter(), []
    for frequency in folder_frequencies(metadata, problems):
        for tags in (frequency.values() if isinstance(frequency, dict) else []):
            if isinstance(tags, dict):
                counts.update({tag: int(n) for tag, n in tags.items() if isinstance(n, (int, float))})
    return counts, problems
