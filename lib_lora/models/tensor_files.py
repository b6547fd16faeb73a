"""Reading a flat dict of tensors from .safetensors or a weights-only torch file, with named errors."""

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def read_tensor_file(path: Path, error: type[ValueError], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata; any unreadable file raises `error` naming the path.

    Torch files are read with `weights_only=True`, so they can never run code; a top-level
    `state_dict` entry (ldm .ckpt files) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what} file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from e
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles; all mean the same to the user
        raise error(f"{path}: not a readable torch file (or it holds more than tensors): {e}") from e
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise error(f"{path}: holds no flat dict of tensors")
    return data, {}


class LazyTensors(Mapping):
    """A .safetensors file's tensors, each read from disk when asked for and not kept.

    Loading a checkpoint through it converts one tensor at a time to the compute dtype, so an fp16
    SDXL file becomes fp32 weights without ever holding the whole fp16 copy beside them.
    """

    def __init__(self, path: Path, error: type[ValueError]):
        try:
            self._file = safe_open(str(path), framework="pt")
            self._keys = list(self._file.keys())
            self._key_set = set(self._keys)
            self.metadata = dict(self._file.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from e
        self._path, self._error = path, error

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise self._error(f"{self._path}: tensor {key!r} cannot be read (truncated or corrupted?): {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._key_set
