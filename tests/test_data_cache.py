"""Latent cache: keys follow the file's content and the fit; disk entries are atomic safetensors files."""
import os
from pathlib import Path

import torch
from PIL import Image

from lib_lora.data import ImageItem, LatentCache

BUCKET, CROP = (64, 64), (0, 0, 64, 64)


def image_item(path: Path, colour) -> ImageItem:
    Image.new("RGB", (8, 8), colour).save(path)
    return ImageItem(path, "c", ".txt", "1_x", False, (8, 8))


def test_key_changes_with_content_and_fit(tmp_path):
    cache = LatentCache(None)
    item = image_item(tmp_path / "a.png", (1, 2, 3))
    key = cache.key_for(item, BUCKET, CROP, False)
    assert key == cache.key_for(item, BUCKET, CROP, False)
    others = {
        cache.key_for(item, (64, 128), CROP, False),
        cache.key_for(item, BUCKET, (1, 0, 65, 64), False),
        cache.key_for(item, BUCKET, CROP, True),
        cache.key_for(item, BUCKET, CROP, False, resized_size=(70, 64)),
        LatentCache(None, namespace="other-vae").key_for(item, BUCKET, CROP, False),
    }
    assert key not in others and len(others) == 5
    image_item(tmp_path / "a.png", (9, 9, 9))
    os.utime(tmp_path / "a.png", ns=(1, 1))  # a new mtime even on a coarse-clock filesystem
    assert cache.key_for(item, BUCKET, CROP, False) != key
    copy = image_item(tmp_path / "b.png", (9, 9, 9))
    assert cache.key_for(copy, BUCKET, CROP, False) == cache.key_for(item, BUCKET, CROP, False)  # same bytes


def test_memory_cache_round_trip():
    cache = LatentCache(None)
    assert cache.get("k") is None
    latent = torch.randn(4, 8, 8)
    cache.put("k", latent)
    assert "k" in cache and len(cache) == 1 and torch.equal(cache.get("k"), latent)


def test_disk_cache_round_trip_atomic_and_corrupt_entry(tmp_path):
    directory = tmp_path / "latents"
    cache = LatentCache(directory)
    latent = torch.randn(4, 8, 6)
    cache.put("abc", latent)
    assert sorted(p.name for p in directory.iterdir()) == ["abc.safetensors"]  # no temporary left
    assert torch.equal(LatentCache(directory).get("abc"), latent)  # a new process finds it
    cache.path_for("bad").write_bytes(b"truncated")
    assert cache.get("bad") is None and not cache.path_for("bad").exists()
    assert cache.get("missing") is None and len(cache) == 1
