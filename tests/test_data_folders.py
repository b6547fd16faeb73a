"""Dataset folder scan: kohya's N_name repeats, captions, sizes, and the errors a user can hit."""
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.data import DatasetError, scan_dataset


def write_image(path: Path, size=(16, 16), colour=(200, 30, 30), caption: str | None = None, ext=".txt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption, encoding="utf-8")
    return path


def test_subsets_repeats_captions_and_sizes(tmp_path):
    write_image(tmp_path / "10_mychar" / "a.png", (32, 16), caption="mychar, red hair\nsecond line ignored")
    write_image(tmp_path / "10_mychar" / "b.jpg", caption="mychar, smile", ext=".caption")
    write_image(tmp_path / "3_my_style" / "c.webp", (16, 48))  # no caption: class token "my_style"
    (tmp_path / "10_mychar" / "notes.md").write_text("not an image")
    scan = scan_dataset(tmp_path)
    assert [(s.name, s.repeats, len(s.items)) for s in scan.subsets] == [("mychar", 10, 2), ("my_style", 3, 1)]
    a, b = scan.subsets[0].items
    (c,) = scan.subsets[1].items
    assert (a.caption, a.caption_source, a.size, a.subset) == ("mychar, red hair", ".txt", (32, 16), "10_mychar")
    assert (b.caption, b.caption_source) == ("mychar, smile", ".caption")
    assert (c.caption, c.caption_source, c.size) == ("my_style", "default", (16, 48))
    assert scan.default_captions == 1 and scan.problems == []
    assert any("1 image(s) have no caption file" in w for w in scan.warnings)
    assert scan.num_images() == 3 and scan.num_with_repeats() == 23
    assert scan.tag_frequency() == {"10_mychar": {"mychar": 2, "red hair": 1, "smile": 1}, "3_my_style": {"my_style": 1}}


def test_chosen_caption_extension_wins_and_is_recorded(tmp_path):
    image = write_image(tmp_path / "1_x" / "a.png", caption="from txt")
    image.with_suffix(".caption").write_text("from caption")
    image.with_suffix(".tags").write_text("from tags")
    assert scan_dataset(tmp_path).subsets[0].items[0].caption_source == ".txt"
    item = scan_dataset(tmp_path, caption_extension=".caption").subsets[0].items[0]
    assert (item.caption, item.caption_source) == ("from caption", ".caption")
    item = scan_dataset(tmp_path, caption_extension="tags").subsets[0].items[0]
    assert (item.caption, item.caption_source) == ("from tags", ".tags")


def test_empty_caption_file_falls_back_to_class_token(tmp_path):
    write_image(tmp_path / "2_cat" / "a.png", caption="  \n")
    item = scan_dataset(tmp_path).subsets[0].items[0]
    assert (item.caption, item.caption_source) == ("cat", "default")


def test_reg_flag_and_uppercase_extension(tmp_path):
    write_image(tmp_path / "1_person" / "R.PNG")
    scan = scan_dataset(tmp_path, is_reg=True)
    assert scan.subsets[0].is_reg and scan.subsets[0].items[0].is_reg


def test_exif_rotation_swaps_the_recorded_size(tmp_path):
    path = tmp_path / "1_x" / "rotated.jpg"
    path.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20)).save(path, exif=exif.tobytes())
    assert scan_dataset(tmp_path).subsets[0].items[0].size == (20, 40)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "is empty"),
        ({"5_x/readme.txt": "hello"}, "no usable images"),
        ({"mychar/a.png": None}, "does not start with a repeat count"),
        ({"0_mychar/a.png": None}, "zero repeats"),
        ({"a.png": None}, "holds images directly"),
    ],
)
def test_folder_errors(tmp_path, layout, message):
    for name, text in layout.items():
        path = tmp_path / name
        if text is None:
            write_image(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        scan_dataset(tmp_path)


def test_missing_root_and_ignored_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    write_image(tmp_path / "4_ok" / "a.png")
    (tmp_path / "logs").mkdir()  # no images: not a subset, not an error
    (tmp_path / "2_empty").mkdir()
    scan = scan_dataset(tmp_path)
    assert [s.name for s in scan.subsets] == ["ok"]


def test_unreadable_files_refused_or_skipped_and_listed(tmp_path):
    write_image(tmp_path / "1_x" / "good.png")
    (tmp_path / "1_x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_image(tmp_path / "1_x" / "binary.png")
    (tmp_path / "1_x" / "binary.txt").write_bytes(b"\x00\x81\x8d\x9d binary, no text encoding")
    with pytest.raises(DatasetError) as error:
        scan_dataset(tmp_path)
    assert "2 unreadable file(s)" in str(error.value)
    assert "broken.png" in str(error.value) and "binary.txt" in str(error.value)
    scan = scan_dataset(tmp_path, allow_unreadable=True)
    assert [i.path.name for i in scan.items()] == ["good.png"]
    assert len(scan.problems) == 2 and "broken.png" in scan.problems[1]


def test_all_images_unreadable_is_still_an_error(tmp_path):
    (tmp_path / "1_x").mkdir()
    (tmp_path / "1_x" / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="no usable images"):
        scan_dataset(tmp_path, allow_unreadable=True)
