"""LoRA files: save (atomic, kohya layout), load (any kohya/LyCORIS file, validated), and the webui card.

A saved file holds exactly the network's state dict (`<name>.lora_down.weight`, `.lora_up.weight`,
0-d `.alpha`) cast to the save precision, plus string metadata with `sshs_*` hashes computed as
kohya does. A loaded file is a `LoraFile`: one validated adapter module per name, so it knows each
module's delta weight; every key is accounted for before anything can be applied. Files that
diffusers/PEFT write (`unet.<path>.lora_A.weight`, `text_encoder_2.<path>.lora_B.weight`, no alpha
tensors) are read by renaming their keys to kohya's (lora-format.md §9.3). Bundled textual-inversion
embeddings (`bundle_emb.<token>...`, lora-format.md §7.8) are written and read beside the modules
(`LoraFile.embeddings`), as the webui reads them (`embeddings.py`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..atomic import write_atomically, write_bytes_atomically
from ..models.tensor_files import read_tensor_file, write_safetensors
from .base import AdapterModule
from .embeddings import BundledEmbedding, embeddings_from_tensors, is_bundle_key
from .errors import LoraFormatError
from .metadata import sshs_hashes
from .naming import SDXL_TEXT_PREFIXES, TEXT_PREFIX, UNET_PREFIX
from .registry import module_from_tensors

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float": torch.float32}
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
KNOWN_PREFIXES = (UNET_PREFIX, TEXT_PREFIX, *SDXL_TEXT_PREFIXES)
CARD_SD_VERSIONS = ("SD1", "SD2", "SDXL", "Unknown")


@dataclass
class LoraFile:
    """A loaded LoRA/LyCORIS file: module name -> validated adapter (unbound), the header metadata, and its
    bundled embeddings by token."""

    path: Path | None
    modules: dict[str, AdapterModule]
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, BundledEmbedding] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem if self.path else "<memory>"

    @property
    def alias(self) -> str:
        """What the webui calls it: `ss_output_name`, else the file stem."""
        return self.metadata.get("ss_output_name") or self.name


def _check_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True")


def save_lora(path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str],
              save_dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """Write `state_dict` (kohya keys) as .safetensors in `save_dtype`, atomically (temp file + rename).

    Every tensor, alpha included, is cast (kohya `--save_precision`); `sshs_model_hash` and
    `sshs_legacy_hash` are computed and added. Raises FileExistsError naming the path unless `overwrite`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a LoRA is saved as .safetensors")
    _check_overwrite(path, overwrite)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata {key!r} must be a string (safetensors metadata is str -> str), got {type(value).__name__}")
    for key in state_dict:
        if "." not in key or not (key.startswith(KNOWN_PREFIXES) or is_bundle_key(key)):
            raise LoraFormatError(f"{key}: not a kohya LoRA key (<lora_unet_|lora_te_...>.<param>, or bundle_emb.<token>...)")
    tensors = {k: v.detach().to("cpu", save_dtype).contiguous() for k, v in state_dict.items()}
    meta = dict(metadata) | sshs_hashes(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, tensors, meta, before_replace=lambda: _check_overwrite(path, overwrite))  # another writer may have won meanwhile


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors (or weights-only .pt/.ckpt) LoRA file."""
    return read_tensor_file(path, LoraFormatError, "LoRA")


def group_by_module(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """`<module>.<param>` keys -> {module: {param: tensor}}; the module part has no dots (lora-format.md §1)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        name, dot, param = key.partition(".")
        if not dot:
            raise LoraFormatError(f"{source}: key {key!r} has no '.<param>' part; not a LoRA key")
        if not name.startswith(tuple(p + "_" for p in KNOWN_PREFIXES)):
            raise LoraFormatError(f"{source}: key {key!r} has an unknown module prefix (kohya's are lora_unet_, lora_te_; "
                                  f"SDXL lora_te1_, lora_te2_)")
        groups.setdefault(name, {})[param] = tensors[key]
    return groups


PEFT_COMPONENTS = {"unet": UNET_PREFIX, "text_encoder": SDXL_TEXT_PREFIXES[0], "text_encoder_2": SDXL_TEXT_PREFIXES[1]}
PEFT_FACTORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def _peft_alpha(metadata: dict[str, str], component: str) -> float | None:
    """lora_alpha from diffusers' `lora_adapter_metadata` (one config, or one per component); None: scale 1."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return None
    config = config.get(component, config) if isinstance(config, dict) else {}
    alpha = config.get("lora_alpha") if isinstance(config, dict) else None
    return float(alpha) if isinstance(alpha, (int, float)) else None


def from_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys -> kohya keys: `unet.` -> lora_unet_, `text_encoder.` -> lora_te1_ (which SD1/SD2
    models answer to as well), `text_encoder_2.` -> lora_te2_; lora_A/lora_B -> lora_down/lora_up, and an
    alpha tensor where the adapter metadata gives lora_alpha. Keys of any other form are kept as they are."""
    converted = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        path, factor = next(((rest[: -len(f) - 1], f) for f in PEFT_FACTORS if rest.endswith("." + f)), (None, None))
        if component not in PEFT_COMPONENTS or path is None:
            converted[key] = tensor
            continue
        name = f"{PEFT_COMPONENTS[component]}_{path.replace('.', '_')}"
        converted[f"{name}.{PEFT_FACTORS[factor]}"] = tensor
        alpha = _peft_alpha(metadata, component)
        if alpha is not None:
            converted[f"{name}.alpha"] = torch.tensor(alpha)
    return converted


def lora_from_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         path: Path | None = None) -> LoraFile:
    """Validate and build every module; the first problem raises LoraFormatError naming its key."""
    source = str(path) if path else "state dict"
    if not tensors:
        raise LoraFormatError(f"{source}: holds no tensors")
    tensors = from_peft(tensors, metadata or {})
    module_tensors = {k: v for k, v in tensors.items() if not is_bundle_key(k)}
    try:
        modules = {name: module_from_tensors(name, group) for name, group in group_by_module(module_tensors, source).items()}
        embeddings = embeddings_from_tensors(tensors)
    except LoraFormatError as e:
        raise LoraFormatError(f"{source}: {e}") from e
    for module in modules.values():
        module.eval()  # loaded for inference: no training-time dropouts
    return LoraFile(path, modules, dict(metadata or {}), embeddings)


def load_lora(path) -> LoraFile:
    """Load any kohya or LyCORIS LoRA/LoCon/LoHa/LoKr file, fully validated before it is returned."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    return lora_from_state_dict(tensors, metadata, path)


def card_paths(path_or_stem) -> tuple[Path, Path]:
    """(`name.json`, `name.preview.png`) beside `name.safetensors` (webui user metadata and preview)."""
    path = Path(path_or_stem)
    stem = path.with_suffix("") if path.suffix in LORA_SUFFIXES else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".preview.png")


def write_card(path_or_stem, activation_text: str = "", preferred_weight: float = 1.0, sd_version: str = "SD1",
               preview: Image.Image | None = None, description: str = "", negative_text: str = "",
               notes: str = "") -> tuple[Path, Path | None]:
    """Write the webui card: `name.json` in its user-metadata format and `name.preview.png` (if given).

    Field names as in the webui's `extensions-builtin/Lora/ui_edit_user_metadata.py`; "activation
    text" (the trigger words) is added to the prompt with the LoRA, "preferred weight" replaces the
    default multiplier (0 = unset), "sd version" overrides version detection.
    """
    if sd_version not in CARD_SD_VERSIONS:
        raise ValueError(f"sd_version must be one of {CARD_SD_VERSIONS}, got {sd_version!r}")
    json_path, preview_path = card_paths(path_or_stem)
    card = {
        "description": description,
        "sd version": sd_version,
        "activation text": activation_text,
        "preferred weight": float(preferred_weight),
        "negative text": negative_text,
        "notes": notes,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(json_path, json.dumps(card, indent=4, ensure_ascii=False).encode("utf-8"))
    if preview is None:
        return json_path, None
    write_atomically(preview_path, lambda tmp: preview.save(tmp, format="PNG"))
    return json_path, preview_path
