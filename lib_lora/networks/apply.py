"""Generation with LoRAs in the standalone host: `<lora:name:w>` tags resolved in LoRA folders.

Names resolve like the webui's (§3.1): a file stem anywhere under the folders (recursive;
.safetensors, .pt, .ckpt), else the `ss_output_name` alias in a .safetensors header. A tagged file's
bundled embeddings apply to the prompt (and the negative prompt) while it is tagged, whatever its
strength, as the webui registers them; the first file bundling a token wins.
"""

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..models.checkpoint import Checkpoint
from ..models.pipeline import Embeddings, GenerationParams, generate
from .embeddings import vectors_for_model, widths_of
from .errors import LoraNotFoundError
from .files import LORA_SUFFIXES, load_lora
from .patcher import ActiveLora, LoraPatcher
from .prompt import LoraTag, extract_lora_tags
from .targets import text_models_for

__all__ = ["ActiveLora", "LoraPatcher", "extract_lora_tags", "find_lora_files", "resolve_lora", "generate_with_loras"]


def find_lora_files(lora_dirs: Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Stem -> path of every LoRA file under the folders (a later duplicate stem wins, as in the webui)."""
    found: dict[str, Path] = {}
    for folder in lora_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise LoraNotFoundError(f"LoRA folder {folder} does not exist")
        for path in sorted(folder.rglob("*")):
            if path.suffix in LORA_SUFFIXES and path.is_file() and not path.name.startswith("."):
                found[path.stem] = path
    return found


def _alias(path: Path) -> str | None:
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("ss_output_name")
    except (SafetensorError, OSError):
        return None  # unreadable files fail with a clear error when loaded by stem


def resolve_lora(name: str, files: dict[str, Path]) -> Path:
    """The file a tag names: by stem, else by `ss_output_name`; else an error listing what exists."""
    if name in files:
        return files[name]
    for path in files.values():
        if _alias(path) == name:
            return path
    available = ", ".join(sorted(files)) or "none"
    raise LoraNotFoundError(f"no LoRA named {name!r} in the LoRA folders; available: {available}")


def load_tagged(tags: Sequence[LoraTag], lora_dirs: Iterable[str | os.PathLike]) -> list[ActiveLora]:
    """Load each tagged file once (validated) and pair it with its tag's strengths."""
    lora_dirs = list(lora_dirs)
    if tags and not lora_dirs:
        raise LoraNotFoundError(f"the prompt uses <lora:{tags[0].name}:...> but no LoRA folder was given (--lora-dir)")
    files = find_lora_files(lora_dirs) if tags else {}
    loaded = {}
    active = []
    for tag in tags:
        path = resolve_lora(tag.name, files)
        if path not in loaded:
            loaded[path] = load_lora(path)
        active.append(ActiveLora.from_tag(loaded[path], tag))
    return active


def bundled_embeddings(loras: Sequence[ActiveLora], text_models) -> Embeddings:
    """Token -> vectors of the tagged files' bundled embeddings, checked against the model's encoders."""
    widths = widths_of([model.module for model in text_models])
    found: dict = {}
    for active in loras:
        source = str(active.lora.path or active.lora.name)
        for name, vectors in vectors_for_model(active.lora.embeddings.values(), widths, source).items():
            found.setdefault(name, vectors)
    return found


def generate_with_loras(ckpt: Checkpoint, params: GenerationParams, lora_dirs: Iterable[str | os.PathLike] = (),
                        mode: str = "merge", callback: Callable | None = None, embeddings: Embeddings | None = None):
    """`generate` with the prompt's `<lora:...>` tags applied (and cut from the prompt), then undone; their
    bundled embeddings, after `embeddings` (e.g. those being trained), replace their tokens in the prompts."""
    prompt, tags = extract_lora_tags(params.prompt)
    loras = load_tagged(tags, list(lora_dirs))
    text_models = text_models_for(ckpt.arch, ckpt.text_encoder, ckpt.text_encoder_2)
    vectors = dict(embeddings or {})
    for name, found in bundled_embeddings(loras, text_models).items():
        vectors.setdefault(name, found)
    with LoraPatcher(ckpt.unet, text_models, mode) as patcher:
        patcher.apply(loras)
        return generate(ckpt, replace(params, prompt=prompt), callback, vectors or None)
