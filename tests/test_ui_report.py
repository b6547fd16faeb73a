"""The dataset report: counts, sizes, buckets, captions, tags and problems."""

from PIL import Image

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.ui.report import build_report, report_html


def image(path, size, caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_demo_dataset(tmp_path):
    folder = make_lora_dataset(tmp_path / "ds", n_images=12, repeats=10)
    report = build_report(folder, resolution=(64, 64))
    assert report.images == 12 and report.samples == 120 and not report.error
    assert [(s.folder, s.repeats, s.images, s.captioned) for s in report.subsets] == [("10_zkz", 10, 12, 12)]
    assert report.sizes == {(64, 64): 12} and report.buckets == {(64, 64): 12} and report.upscaled == 0
    html = report_html(report)
    assert "12 images" in html and "10_zkz" in html and "64x64 (12)" in html


def test_buckets_sizes_captions_tags_and_problems(tmp_path):
    root = tmp_path / "ds"
    image(root / "5_char" / "wide.png", (768, 512), "char, red hair, smile")
    image(root / "5_char" / "tall.png", (512, 768), "char, red hair")
    image(root / "5_char" / "small.png", (256, 256))  # no caption (the class token "char" is used), smaller than 512
    image(root / "2_outfit" / "a.png", (512, 512), "char, dress")
    (root / "5_char" / "broken.png").write_bytes(b"not a png")
    image(root / "loose.png", (512, 512))
    reg = tmp_path / "reg"
    image(reg / "1_person" / "r.png", (512, 512), "person")
    report = build_report(root, resolution=(512, 512), enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024, reg_folder=reg)
    assert report.images == 4 and report.samples == 5 * 3 + 2 * 1
    assert {s.folder: (s.repeats, s.images, s.captioned, s.is_reg) for s in report.subsets} == {
        "2_outfit": (2, 1, 1, False), "5_char": (5, 3, 2, False), "1_person": (1, 1, 1, True)}
    assert report.buckets[(512, 512)] == 3 and report.buckets[(640, 384)] == 1 and report.buckets[(384, 640)] == 1  # nearest aspect (1.67)
    assert report.upscaled == 1 and any("smaller than their training size" in w for w in report.warnings)
    assert dict(report.tags)["char"] == 4 and dict(report.tags)["red hair"] == 2
    assert any("broken.png" in p for p in report.problems) and any("loose.png" in p for p in report.problems)
    assert any("no caption file" in w for w in report.warnings)


def test_unusable_folders_are_an_error_in_the_report(tmp_path):
    assert "does not exist" in build_report(tmp_path / "nope").error
    (tmp_path / "flat").mkdir()
    image(tmp_path / "flat" / "a.png", (64, 64))
    report = build_report(tmp_path / "flat")
    assert "subfolder named like 10_name" in report.error and "10_name" in report_html(report)


def test_html_is_escaped(tmp_path):
    image(tmp_path / "ds" / "3_<b>x" / "a.png", (64, 64), "<script>alert(1)</script>")
    html = report_html(build_report(tmp_path / "ds", resolution=(64, 64)))
    assert "<script>" not in html and "&lt;script&gt;" in html and "3_&lt;b&gt;x" in html
