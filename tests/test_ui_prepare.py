"""Resize + center/focus crop into a new folder."""

import numpy as np
import pytest
from PIL import Image

from lib_lora.data.errors import DatasetError
from lib_lora.ui import prepare


def test_parse_size():
    assert prepare.parse_size("512") == (512, 512) and prepare.parse_size(" 512x768 ") == (512, 768) and prepare.parse_size("640,448") == (640, 448)
    for bad in ("", "abc", "1x2x3", "4"):
        with pytest.raises(ValueError, match="512x768"):
            prepare.parse_size(bad)


@pytest.mark.parametrize("resized, target, focus", [((800, 512), (512, 512), (0.5, 0.5)), ((800, 512), (512, 512), (0.0, 0.3)),
                                                    ((800, 512), (512, 512), (1.0, 1.0)), ((512, 900), (512, 512), (0.5, 0.9))])
def test_crop_box_is_target_sized_and_inside(resized, target, focus):
    left, top, right, bottom = prepare.crop_box(resized, target, focus)
    assert (right - left, bottom - top) == target and 0 <= left and 0 <= top and right <= resized[0] and bottom <= resized[1]


def subject_on_the_right() -> Image.Image:
    pixels = np.full((100, 300, 3), 128, np.uint8)
    pixels[30:70, 230:270] = (255, 0, 0)  # a red square near the right edge, flat grey elsewhere
    return Image.fromarray(pixels)


def test_focus_crop_keeps_the_detail_that_a_center_crop_cuts():
    image = subject_on_the_right()
    fx, fy = prepare.focus_point(image)
    assert fx > 0.7 and 0.35 < fy < 0.65
    focus = np.asarray(prepare.prepare_image(image, (100, 100), "focus"))
    center = np.asarray(prepare.prepare_image(image, (100, 100), "center"))
    assert (focus[..., 1] == 0).sum() > 1000 and (center[..., 1] == 0).sum() == 0


def test_prepare_folder_writes_a_new_dataset_and_leaves_the_source(tmp_path):
    source = tmp_path / "src"
    (source / "10_char").mkdir(parents=True)
    subject_on_the_right().save(source / "10_char" / "a.jpg")
    Image.new("RGB", (64, 40)).save(source / "10_char" / "b.png")
    (source / "10_char" / "a.txt").write_text("char, red square")
    (source / "10_char" / "broken.png").write_bytes(b"nope")
    before = sorted(p.name for p in (source / "10_char").iterdir())
    progress = []
    result = prepare.prepare_folder(source, tmp_path / "out", (64, 64), "focus", progress=lambda i, n: progress.append((i, n)))
    assert result.written == 2 and result.captions == 1 and len(result.skipped) == 1 and progress[-1] == (3, 3)
    out = tmp_path / "out" / "10_char"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a.txt", "b.png"]
    assert Image.open(out / "a.png").size == (64, 64) and Image.open(out / "b.png").size == (64, 64)
    assert (out / "a.txt").read_text() == "char, red square"
    assert sorted(p.name for p in (source / "10_char").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_prepare_refuses_to_overwrite_or_nest(tmp_path):
    source = tmp_path / "src"
    (source / "1_x").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(source / "1_x" / "a.png")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    with pytest.raises(DatasetError, match="not empty"):
        prepare.prepare_folder(source, tmp_path / "taken", (8, 8))
    with pytest.raises(DatasetError, match="inside the source"):
        prepare.prepare_folder(source, source / "out", (8, 8))
    with pytest.raises(DatasetError, match="new folder"):
        prepare.prepare_folder(source, "", (8, 8))
    (tmp_path / "empty").mkdir()
    assert prepare.prepare_folder(source, tmp_path / "empty", (8, 8)).written == 1
