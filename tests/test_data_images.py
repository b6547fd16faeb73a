"""Image loading (EXIF, alpha, odd modes) and fitting to a bucket (resize, crop, flip)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.data import DatasetError, fit_to_bucket, fit_with_mask, image_to_tensor, load_image, should_flip

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def pixel(image, xy):
    return image.getpixel(xy)


def near(colour, expected, tolerance=8):
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected))


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    image.save(tmp_path / "a.png", exif=exif.tobytes())
    rgb, mask = load_image(tmp_path / "a.png")
    assert rgb.mode == "RGB" and rgb.size == (20, 40) and mask is None
    assert pixel(rgb, (10, 5)) == RED and pixel(rgb, (10, 35)) == BLUE  # left became top


def test_rgba_composited_on_white_and_mask(tmp_path):
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[..., 0] = 255
    pixels[:, :2, 3] = 255  # left half opaque red, right half fully transparent
    pixels[0, 2, 3] = 128
    Image.fromarray(pixels).save(tmp_path / "a.png")
    rgb, mask = load_image(tmp_path / "a.png", with_alpha=True)
    assert pixel(rgb, (0, 0)) == RED and pixel(rgb, (3, 3)) == WHITE
    assert near(pixel(rgb, (2, 0)), (255, 127, 127), 1)  # half alpha: half way to white
    assert mask.dtype == np.float32 and mask.shape == (4, 4)
    assert mask[0, 0] == 1.0 and mask[3, 3] == 0.0 and abs(mask[0, 2] - 128 / 255) < 1e-6
    assert load_image(tmp_path / "a.png")[1] is None


def test_palette_16bit_cmyk_la_and_grey_become_rgb(tmp_path):
    Image.new("RGB", (4, 4), RED).convert("P").save(tmp_path / "p.png")
    sixteen = np.full((4, 4), 32896, np.uint16)  # 32896 / 257 = 128
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "l.bmp")
    transparent_palette = Image.new("P", (4, 4), 0)
    transparent_palette.putpalette([0, 0, 0] * 256)
    transparent_palette.save(tmp_path / "pt.png", transparency=0)
    expected = {"p.png": RED, "g16.png": (128,) * 3, "c.jpg": RED, "la.png": WHITE, "l.bmp": (77,) * 3, "pt.png": WHITE}
    for name, colour in expected.items():
        rgb, _ = load_image(tmp_path / name)
        assert rgb.mode == "RGB" and near(pixel(rgb, (1, 1)), colour), name
    assert load_image(tmp_path / "la.png", with_alpha=True)[1].max() == 0.0
    assert load_image(tmp_path / "pt.png", with_alpha=True)[1] is not None


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="bad.png"):
        load_image(tmp_path / "bad.png")


def test_fit_center_crop_keeps_aspect_and_centre():
    image = Image.new("RGB", (300, 100), BLUE)
    image.paste(RED, (100, 0, 200, 100))  # the middle third is red
    fitted, box = fit_to_bucket(image, (64, 64), random_crop=False, flip=False, rng=random.Random(0))
    assert fitted.size == (64, 64) and box == (64, 0, 128, 64)  # resized to 192x64 first
    assert near(pixel(fitted, (32, 32)), RED) and near(pixel(fitted, (1, 32)), RED)


def test_fit_without_bucketing_covers_the_resolution():
    fitted, box = fit_to_bucket(Image.new("RGB", (50, 80)), (64, 64), random_crop=False, flip=False, rng=random.Random(0))
    assert fitted.size == (64, 64) and box == (0, 19, 64, 83)  # short side 50 -> 64, height 80 -> 102


def test_random_crop_is_seeded_and_varies():
    image = Image.new("RGB", (400, 64))
    boxes = [fit_to_bucket(image, (64, 64), random_crop=True, flip=False, rng=random.Random(s))[1] for s in range(8)]
    again = [fit_to_bucket(image, (64, 64), random_crop=True, flip=False, rng=random.Random(s))[1] for s in range(8)]
    assert boxes == again and len(set(boxes)) > 1
    assert all(0 <= left <= 336 and right - left == 64 for left, _, right, _ in boxes)
    generator_box = fit_to_bucket(image, (64, 64), random_crop=True, flip=False, rng=np.random.default_rng(3))[1]
    assert generator_box == fit_to_bucket(image, (64, 64), random_crop=True, flip=False, rng=np.random.default_rng(3))[1]


def test_flip_and_mask_follow_the_same_crop():
    image = Image.new("RGB", (128, 64), BLUE)
    image.paste(RED, (0, 0, 64, 64))
    mask = np.zeros((64, 128), np.float32)
    mask[:, :64] = 1.0
    fitted, fitted_mask, box = fit_with_mask(image, mask, (64, 64), random_crop=False, flip=True, rng=random.Random(0))
    assert box == (32, 0, 96, 64)
    assert near(pixel(fitted, (60, 10)), RED) and near(pixel(fitted, (3, 10)), BLUE)  # mirrored
    assert fitted_mask.shape == (64, 64) and fitted_mask[10, 60] == 1.0 and fitted_mask[10, 3] == 0.0


def test_no_upscale_resized_size_crops_without_resizing():
    image = Image.new("RGB", (70, 100))
    fitted, box = fit_to_bucket(image, (64, 64), random_crop=False, flip=False, rng=random.Random(0), resized_size=(70, 100))
    assert fitted.size == (64, 64) and box == (3, 18, 67, 82)


def test_should_flip_is_seeded_and_off_without_flip_aug():
    draws = [should_flip(True, random.Random(s)) for s in range(20)]
    assert draws == [should_flip(True, random.Random(s)) for s in range(20)] and any(draws) and not all(draws)
    assert not any(should_flip(False, random.Random(s)) for s in range(20))


def test_image_to_tensor_range_and_layout():
    image = Image.new("RGB", (3, 2), (255, 0, 128))
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[0].eq(1.0).all() and tensor[1].eq(-1.0).all() and abs(tensor[2, 0, 0] - (128 / 127.5 - 1)) < 1e-6
