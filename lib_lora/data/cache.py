"""Latent cache in memory or on disk, keyed by what the latent depends on.

A key hashes the image file's bytes (so an edited image misses), the bucket, the resized size, the
crop box and the flip, plus a caller-chosen `namespace` (the VAE's identity: a latent from another
VAE must miss too). On disk each key is one `<key>.safetensors` file holding the tensor "latent",
written to a temporary file and renamed, so a crash never leaves a half-written entry.
With random crop every step has a new crop box, so caching is pointless there (kohya disables it).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..models.tensor_files import write_safetensors

from .folders import ImageItem

logger = logging.getLogger(__name__)

KEY_VERSION = "v1"  # bump when resizing or encoding changes what a key means
TENSOR_NAME = "latent"
SUFFIX = ".safetensors"
READ_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LatentCache:
    """Latents by key: in a dict when `directory` is None, else one safetensors file per key."""

    def __init__(self, directory: Path | str | None, namespace: str = "") -> None:
        self.directory = Path(directory) if directory is not None else None
        self.namespace = namespace
        self._memory: dict[str, torch.Tensor] = {}
        self._hashes: dict[tuple[Path, int, int], str] = {}  # (path, size, mtime_ns) -> content hash
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def content_hash(self, path: Path) -> str:
        """sha256 of the file, remembered while its size and mtime stay the same."""
        stat = os.stat(path)
        stamp = (Path(path).resolve(), stat.st_size, stat.st_mtime_ns)
        if stamp not in self._hashes:
            self._hashes[stamp] = file_sha256(path)
        return self._hashes[stamp]

    def key_for(
        self,
        item: ImageItem,
        bucket: tuple[int, int],
        crop: tuple[int, int, int, int],
        flip: bool,
        resized_size: tuple[int, int] | None = None,
    ) -> str:
        """A hex key naming the latent of `item` fitted to `bucket` with this crop and flip."""
        parts = [KEY_VERSION, self.namespace, self.content_hash(item.path), _size(bucket), _size(resized_size)]
        parts += [",".join(str(int(c)) for c in crop), "flip" if flip else "noflip"]
        return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()[:40]

    def path_for(self, key: str) -> Path:
        if self.directory is None:
            raise ValueError("an in-memory LatentCache has no files")
        return self.directory / f"{key}{SUFFIX}"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached latent, or None. An unreadable file counts as a miss and is removed, so it is re-encoded."""
        if self.directory is None:
            return self._memory.get(key)
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)[TENSOR_NAME]
        except (SafetensorError, OSError, KeyError) as error:
            logger.warning("latent cache entry %s is unreadable (%s); it will be re-encoded", path, error)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        latent = tensor.detach().to("cpu").contiguous()
        if self.directory is None:
            self._memory[key] = latent.clone()
            return
        write_safetensors(self.path_for(key), {TENSOR_NAME: latent})

    def __contains__(self, key: str) -> bool:
        if self.directory is None:
            return key in self._memory
        return self.path_for(key).is_file()

    def __len__(self) -> int:
        if self.directory is None:
            return len(self._memory)
        return sum(1 for _ in self.directory.glob(f"*{SUFFIX}"))


def _size(size: tuple[int, int] | None) -> str:
    return "-" if size is None else f"{int(size[0])}x{int(size[1])}"
