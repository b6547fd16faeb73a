"""The VAE's training pictures: broad, seeded, and the photos read from package files without a download."""
import importlib.util

import numpy as np
import pytest
from PIL import Image

from lib_lora.demo import photos
from lib_lora.demo.build_vae import codec_pictures
from lib_lora.demo.codec_images import broad_image


def test_broad_pictures_are_seeded_and_cover_light_dark_and_every_hue():
    first = [np.asarray(broad_image(np.random.default_rng(seed))) for seed in range(60)]
    again = [np.asarray(broad_image(np.random.default_rng(seed))) for seed in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    means = np.array([image.reshape(-1, 3).mean(0) for image in first])  # [60, 3]
    assert means.mean(1).max() > 160 and means.mean(1).min() < 80  # light and dark pictures
    assert all((np.argmax(means, 1) == channel).any() for channel in range(3))  # red-, green- and blue-dominant ones
    assert all(image.reshape(-1, 3).std(0).max() > 2 for image in first)  # never a blank picture


def test_codec_batches_mix_world_broad_and_photo_pictures(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    loaded = photos.load_photos([tmp_path / "p.png"])
    pictures, world = codec_pictures(np.random.default_rng(1), 8, loaded)
    assert len(pictures) == 8 and world == 2 and all(p.size == (64, 64) for p in pictures)
    crops = photos.photo_crops(loaded, 3, np.random.default_rng(2))
    assert all(np.asarray(crop).std() > 20 for crop in crops)  # the noise photo, not a blank
    no_photos, world = codec_pictures(np.random.default_rng(1), 8, [])
    assert len(no_photos) == 8 and world == 2


def test_missing_photo_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "skimage" else real(name))
    with pytest.raises(photos.PhotosMissing, match="requirements-build.txt"):
        photos.photo_paths()
