"""Tag editing on caption files (with preview) and captioning through a host's interrogator."""

from collections import Counter

import pytest
from PIL import Image

from lib_lora.ui import tags


def dataset(root, captions: dict[str, str]):
    folder = root / "3_char"
    folder.mkdir(parents=True)
    for stem, caption in captions.items():
        Image.new("RGB", (16, 16)).save(folder / f"{stem}.png")
        if caption is not None:
            (folder / f"{stem}.txt").write_text(caption)
    return root


def test_parse_tag_edit():
    edit = tags.parse_tag_edit("simple background,  white background", "blue hair => aqua hair\nsmile=grin, hat=>", "zkz", False, 2)
    assert edit.remove == ("simple background", "white background") and edit.add == ("zkz",)
    assert edit.replace == (("blue hair", "aqua hair"), ("smile", "grin"), ("hat", "")) and not edit.add_at_start and edit.min_count == 2
    with pytest.raises(ValueError, match="old => new"):
        tags.parse_tag_edit(replace="just a tag")


@pytest.mark.parametrize("edit, expected", [
    (tags.TagEdit(remove=("Smile",)), ["char", "blue hair", "hat"]),
    (tags.TagEdit(replace=(("blue hair", "aqua hair"), ("hat", ""))), ["char", "aqua hair", "smile"]),
    (tags.TagEdit(replace=(("smile", "char"),)), ["char", "blue hair", "hat"]),  # no duplicate after replacing
    (tags.TagEdit(add=("zkz", "char")), ["zkz", "char", "blue hair", "smile", "hat"]),
    (tags.TagEdit(add=("zkz",), add_at_start=False), ["char", "blue hair", "smile", "hat", "zkz"]),
    (tags.TagEdit(min_count=2), ["char", "blue hair"]),
])
def test_edit_tags(edit, expected):
    counts = Counter({"char": 3, "blue hair": 2, "smile": 1, "hat": 1})
    assert tags.edit_tags(["char", "blue hair", "smile", "hat"], edit, counts) == expected


def test_preview_then_apply_changes_only_what_was_shown(tmp_path):
    root = dataset(tmp_path, {"a": "char, blue hair, smile\nsecond line kept\n", "b": "char, hat", "c": "other", "d": None})
    changes = tags.plan_tag_edits(root, tags.parse_tag_edit(remove="smile, hat", add="char"))
    assert [c.path.name for c in changes] == ["a.txt", "b.txt", "c.txt"]
    assert tags.preview_rows(changes)[0] == ("3_char/a.txt", "char, blue hair, smile", "char, blue hair")
    (root / "3_char" / "c.txt").write_text("edited meanwhile")
    written, skipped = tags.apply_tag_edits(changes)
    assert written == 2 and len(skipped) == 1 and "c.txt" in skipped[0]
    assert (root / "3_char" / "a.txt").read_text() == "char, blue hair\nsecond line kept\n"
    assert (root / "3_char" / "b.txt").read_text() == "char"
    assert (root / "3_char" / "c.txt").read_text() == "edited meanwhile"
    assert not (root / "3_char" / "d.txt").exists()  # images without a caption file are left alone
    again = tags.plan_tag_edits(root, tags.parse_tag_edit(remove="smile, hat", add="char"))
    assert [(c.path.name, c.after) for c in again] == [("c.txt", "char, edited meanwhile")]  # the applied ones are done


def test_tag_counts_are_per_image_and_case_insensitive():
    assert tags.tag_counts(["Char, char, hat", "char"]) == Counter({"char": 2, "hat": 1})


@pytest.mark.parametrize("mode, expected", [("missing only", ("old tags", "a red image")), ("overwrite", ("a red image", "a red image")),
                                            ("append", ("old tags, a red image", "a red image"))])
def test_caption_folder_modes(tmp_path, mode, expected):
    root = dataset(tmp_path, {"a": "old tags", "b": None})
    seen = []
    progress = []

    def captioner(image):
        seen.append(image.size)
        return "a red image "

    written, skipped = tags.caption_folder(root, captioner, mode=mode, progress=lambda i, n: progress.append((i, n)))
    assert ((root / "3_char" / "a.txt").read_text().strip(), (root / "3_char" / "b.txt").read_text().strip()) == expected
    assert written + skipped == 2 and progress[-1] == (2, 2) and all(size == (16, 16) for size in seen)
