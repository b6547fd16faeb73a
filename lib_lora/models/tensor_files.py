"""Reading a flat dict of tensors from .safetensors or a weights-only torch file, with named errors."""

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import write_atomically


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
        data = load_weights_only(path)
    except Exception as e:  # torch raises many types for bad pickles; all mean the same to the user
        raise error(f"{path}: not a readable torch file (or it holds more than tensors): {e}") from e
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise error(f"{path}: holds no flat dict of tensors")
    return data, {}


def load_weights_only(path: Path):
    """A torch file through torch's weights-only reader, which never runs code.

    Called as `torch.serialization.load`: the webui replaces `torch.load` with its own checker
    (modules/safe.py), which refuses the `.format_version` entry torch 2.x writes into every file,
    prints the refusal and returns None.
    """
    return torch.serialization.load(str(path), map_location="cpu", weights_only=True)


# safetensors dtype names -> torch dtypes (the format's own spelling)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")) if hasattr(torch, attr)},
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's own limit


class LazyTensors(Mapping):
    """A .safetensors file's tensors, each read from disk into its own memory when asked for, and not kept.

    Loading a checkpoint through it converts one tensor at a time to the compute dtype, so an fp16
    SDXL file becomes fp32 weights without the fp16 copy beside them. Plain reads rather than a
    memory map: a map of the whole file would count in the process's resident memory until closed.
    The header is checked against the file's size, so a header that lies gives a clear error.
    """

    def __init__(self, path: Path, error: type[ValueError]):
        self._path, self._error = Path(path), error
        try:
            size = self._path.stat().st_size
            with open(self._path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict) or not isinstance(metadata := header.pop("__metadata__", None) or {}, dict):
                raise ValueError("the header is not a JSON object of tensor entries with a __metadata__ object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise error(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from e
        self.metadata = {str(k): str(v) for k, v in metadata.items()}
        self._data_start, self._entries = 8 + header_len, {}
        self._staging = torch.empty(0, dtype=torch.uint8)
        for key, entry in header.items():
            self._entries[key] = self._check_entry(key, entry, size - self._data_start)

    def _check_entry(self, key: str, entry, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int]:
        """(dtype, shape, offset) of one tensor, after checking its header entry against the file."""
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
                raise ValueError("shape and data_offsets must be whole numbers, not negative")
        except (KeyError, TypeError, ValueError) as e:
            raise self._error(f"{self._path}: header entry {key!r} is malformed ({e!r})") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise self._error(f"{self._path}: header entry {key!r} claims bytes {begin}..{end} for {nbytes} bytes of "
                              f"{entry['dtype']} {list(shape)}, in a data area of {data_size} bytes (truncated or corrupted?)")
        return dtype, shape, begin

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, converted to `dtype` if given. A conversion goes through one staging buffer that
        every read reuses: a fresh file-dtype copy per tensor, freed after its conversion, would leave
        the heap full of holes (about half a GiB for SD1.5 in fp16 -> fp32)."""
        file_dtype, shape, begin = self._entries[key]
        if dtype is None or dtype == file_dtype:
            tensor = torch.empty(shape, dtype=file_dtype)
            self._read_into(key, begin, tensor)
            return tensor
        nbytes = math.prod(shape) * file_dtype.itemsize
        if self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
        staged = self._staging[:nbytes].view(file_dtype).view(shape)
        self._read_into(key, begin, staged)
        return staged.to(dtype, copy=True)

    def _read_into(self, key: str, begin: int, tensor: torch.Tensor) -> None:
        buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(bytearray())
        with open(self._path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise self._error(f"{self._path}: tensor {key!r} is cut short (truncated file?)")

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries



def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      before_replace: Callable[[], None] | None = None) -> Path:
    """Save a .safetensors file atomically, with a plain write's permissions (lib_lora/atomic.py)."""
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), before_replace,
                            size=safetensors_size(tensors, metadata))


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """About the file's size: the tensors' bytes plus a header of their names, shapes and the metadata."""
    header = len(json.dumps(metadata or {})) + sum(len(name) + 96 for name in tensors)  # 96: dtype, shape and offsets
    return header + sum(t.numel() * t.element_size() for t in tensors.values())
