"""The catalogue of bad inputs (issue #19), through the real entry points: each is refused with a message
naming the file or field and the fix, or accepted with a stated meaning; none loses an existing file or
leaves a half-written one. Every bad file is made here, on the fly. README "Troubleshooting" lists the
messages.
"""
import codecs
import dataclasses
import io
import json
import math
import os
import stat

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from lib_lora.__main__ import main
from lib_lora.data import DatasetError, build_caption, fit_to_bucket, load_image, scan_dataset
from lib_lora.data.text_files import decode_text
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.networks.files import load_lora
from lib_lora.train.config import ConfigError, TrainConfig
from lib_lora.train.dataset import plan_training, plan_warnings
from lib_lora.train.saving import check_output_free
from lib_lora.train.trainer import train

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def noise_bytes(fmt: str, **options) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def flipped(data: bytes, start: int, count: int = 40) -> bytes:
    damaged = bytearray(data)
    for i in range(start, start + count):
        damaged[i] ^= 0x55
    return bytes(damaged)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming `width` x `height`, with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def good_image(path, size=(16, 16), colour=RED):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def refusal(root) -> str:
    with pytest.raises(DatasetError) as error:
        scan_dataset(root)
    return str(error.value)


# ---------------------------------------------------------------- dataset folders

def _only_text_files(root):
    (root / "5_x").mkdir(parents=True)
    (root / "5_x" / "notes.txt").write_text("no image here")
    (root / "5_x" / "a.md").write_text("nor here")


def _folder(name):
    return lambda root: good_image(root / name / "a.png")


LAYOUTS = [  # (case, make the dataset under root, words of the refusal, the folder or file it must name)
    ("missing", None, "does not exist", "dataset"),
    ("empty", lambda root: None, "is empty", "dataset"),
    ("only non-images", _only_text_files, "no usable images", "dataset"),
    ("images directly in root", lambda root: good_image(root / "a.png"), "holds images directly", "dataset"),
    ("0_x", _folder("0_x"), "zero repeats", "0_x"),
    ("abc_x", _folder("abc_x"), "does not start with a repeat count", "abc_x"),
    ("-3_x", _folder("-3_x"), "negative repeats", "-3_x"),
    ("10_ (no name)", _folder("10_"), "no name after its repeat count", "10_"),
]


@pytest.mark.parametrize("case, make, words, named", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_unusable_dataset_folders_are_refused_by_name(tmp_path, case, make, words, named):
    root = tmp_path / "dataset"
    if make is not None:
        root.mkdir()
        make(root)
    message = refusal(root)
    assert words in message and named in message, message


def test_kohya_would_skip_the_folders_we_refuse_and_the_message_says_so(tmp_path):
    for name in ("0_x", "abc_x", "-3_x"):
        good_image(tmp_path / name / name / "a.png")
        assert "kohya" in refusal(tmp_path / name)


def test_huge_repeats_are_allowed_and_the_step_math_shows_them(tmp_path):
    good_image(tmp_path / "999999_x" / "a.png", (64, 64))
    assert scan_dataset(tmp_path).subsets[0].repeats == 999999
    steps = plan_training(TrainConfig(train_data_dir=str(tmp_path), resolution=(64, 64))).steps
    assert steps.total_steps == 999999 and "1 images x 999999 repeats" in steps.describe()


def test_symlink_loops_do_not_recurse(tmp_path):
    subset = tmp_path / "1_x"
    good_image(subset / "a.png")
    (subset / "up").symlink_to("..")  # a folder loop
    (subset / "one.png").symlink_to("two.png")  # a file loop, with an image's name
    (subset / "two.png").symlink_to("one.png")
    (tmp_path / "2_root").symlink_to(tmp_path)  # the root inside itself: no images there, so not a subset
    scan = scan_dataset(tmp_path)
    assert [item.path.name for item in scan.items()] == ["a.png"]


# ---------------------------------------------------------------- image files

def _animated(fmt):
    def make():
        frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
        buffer = io.BytesIO()
        frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return buffer.getvalue()
    return make


BROKEN_IMAGES = [  # (file name, its bytes, words of the reason)
    ("zero.png", lambda: b"", "empty file (0 bytes)"),
    ("zero.jpg", lambda: b"", "empty file (0 bytes)"),
    ("zero.webp", lambda: b"", "empty file (0 bytes)"),
    ("truncated.png", lambda: noise_bytes("PNG")[:5000], "cut short"),
    ("truncated.jpg", lambda: noise_bytes("JPEG", quality=90)[:3000], "cut short"),
    ("truncated.webp", lambda: noise_bytes("WEBP", quality=90)[:1500], "damaged"),
    ("corrupt.png", lambda: flipped(noise_bytes("PNG"), 3000), "damaged"),
    ("corrupt.jpg", lambda: flipped(noise_bytes("JPEG", quality=90), 1200), "damaged"),  # libjpeg decodes some damage silently
    ("corrupt.webp", lambda: flipped(noise_bytes("WEBP", quality=90), 30), "damaged"),
    ("text.png", lambda: b"this is a caption saved with the wrong name\n", "not in an image format we read"),
    ("html.jpg", lambda: b"<!DOCTYPE html><html>403 Forbidden</html>", "not in an image format we read"),
    ("bomb.png", lambda: png_header_only(20000, 20000), "400,000,000 pixels"),
    ("large.png", lambda: png_header_only(10000, 10000), "10000x10000"),
]


@pytest.mark.parametrize("name, make, words", BROKEN_IMAGES, ids=[c[0] for c in BROKEN_IMAGES])
def test_broken_images_are_named_before_training_and_can_be_skipped(tmp_path, name, make, words):
    good_image(tmp_path / "1_x" / "good.png")
    (tmp_path / "1_x" / name).write_bytes(make())
    message = refusal(tmp_path)
    assert name in message and words in message and "allow_unreadable_images" in message, message
    scan = scan_dataset(tmp_path, allow_unreadable=True)
    assert [item.path.name for item in scan.items()] == ["good.png"] and name in scan.problems[0]
    with pytest.raises(DatasetError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_image(tmp_path / "1_x" / name)  # the trainer's loader says the same


@pytest.mark.parametrize("width, height", [(20000, 20000), (10000, 10000)])
def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch, width, height):
    (tmp_path / "1_x").mkdir()
    (tmp_path / "1_x" / "bomb.png").write_bytes(png_header_only(width, height))

    def never(self):
        raise AssertionError("a decompression bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", never)
    message = refusal(tmp_path)
    assert "bomb.png" in message and "decompression bombs, so it was not loaded: downscale it" in message


def _png(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def _rotated_jpeg():
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))  # left half red; stored sideways, shown rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def _rgba():
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 0] = 255  # red, fully transparent: white once composited
    return _png(Image.fromarray(pixels))


def _encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


ODD_IMAGES = [  # (file name, its bytes, size as seen, colour at (0, 0) after loading as RGB, a warning's words)
    ("one.png", lambda: _png(Image.new("RGB", (1, 1), RED)), (1, 1), RED, None),
    ("animated.gif", _animated("GIF"), (8, 8), RED, "animated (2 frames): only its first frame is used"),
    ("animated.webp", _animated("WEBP"), (8, 8), RED, "animated (2 frames): only its first frame is used"),
    ("sixteen.png", lambda: _png(Image.fromarray(np.full((8, 8), 32896, np.uint16))), (8, 8), (128, 128, 128), None),
    ("palette.png", lambda: _png(Image.new("RGB", (8, 8), RED).convert("P")), (8, 8), RED, None),
    ("cmyk.jpg", lambda: _encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), (8, 8), RED, None),
    ("rotated.jpg", _rotated_jpeg, (20, 40), RED, None),
    ("rgba.png", _rgba, (8, 8), WHITE, None),
    ("grey.png", lambda: _png(Image.new("L", (8, 8), 77)), (8, 8), (77, 77, 77), None),
    ("grey.bmp", lambda: _encoded(Image.new("L", (8, 8), 77), "BMP"), (8, 8), (77, 77, 77), None),
]


@pytest.mark.parametrize("name, make, size, colour, warning", ODD_IMAGES, ids=[c[0] for c in ODD_IMAGES])
def test_odd_images_load_as_rgb(tmp_path, name, make, size, colour, warning):
    path = tmp_path / "1_x" / name
    path.parent.mkdir()
    path.write_bytes(make())
    scan = scan_dataset(tmp_path)
    assert scan.items()[0].size == size
    if warning:
        assert any(name in w and warning in w for w in scan.warnings), scan.warnings
    rgb, _ = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == size
    assert all(abs(a - b) <= 8 for a, b in zip(rgb.getpixel((0, 0)), colour)), rgb.getpixel((0, 0))
    fitted, _ = fit_to_bucket(rgb, (64, 64), random_crop=False, flip=False, rng=np.random.default_rng(0))
    assert fitted.size == (64, 64)


# ---------------------------------------------------------------- captions

TAGS = ", ".join(f"tag{i}" for i in range(1000))
LONG = "a very long caption " * 500  # 10,000 characters
CAPTIONS = [  # (case, the file's bytes, the caption read, the encoding a warning names, None: no warning)
    ("UTF-8 BOM", codecs.BOM_UTF8 + "1girl, smile".encode(), "1girl, smile", None),
    ("CRLF", b"1girl, smile\r\nsecond line\r\n", "1girl, smile", None),
    ("emoji", "1girl, \U0001f431, \u2764\ufe0f".encode(), "1girl, \U0001f431, \u2764\ufe0f", None),
    ("1,000 tags", TAGS.encode(), TAGS, None),
    ("10,000 characters", LONG.encode(), LONG.strip(), None),
    ("GBK", "1girl, 长发, 蓝眼睛, 微笑, 看着观众".encode("gbk"), "1girl, 长发, 蓝眼睛, 微笑, 看着观众", "GBK"),
    ("GBK sentence", "一只可爱的猫坐在窗台上".encode("gbk"), "一只可爱的猫坐在窗台上", "GBK"),
    ("Shift-JIS", "1girl, 長い髪, 笑顔, セーラー服".encode("cp932"), "1girl, 長い髪, 笑顔, セーラー服", "Shift-JIS"),
    ("Shift-JIS katakana", "アニメ".encode("cp932"), "アニメ", "Shift-JIS"),
    ("cp1252", "café, naïve, Größe, “quoted” – dash".encode("cp1252"), "café, naïve, Größe, “quoted” – dash", "cp1252"),
    ("cp1252 read as CJK by others", "Crème brûlée, æsir".encode("cp1252"), "Crème brûlée, æsir", "cp1252"),
    ("UTF-16 LE BOM", "1girl, 猫, smile".encode("utf-16"), "1girl, 猫, smile", "UTF-16 (BOM)"),
    ("UTF-16 BE BOM", codecs.BOM_UTF16_BE + "1girl, 猫".encode("utf-16-be"), "1girl, 猫", "UTF-16 (BOM)"),
    ("UTF-16 LE no BOM", "1girl, 猫, smile".encode("utf-16-le"), "1girl, 猫, smile", "UTF-16 LE (no BOM)"),
    ("UTF-16 BE no BOM", "1girl, 猫, smile".encode("utf-16-be"), "1girl, 猫, smile", "UTF-16 BE (no BOM)"),
]


@pytest.mark.parametrize("case, data, caption, encoding", CAPTIONS, ids=[c[0] for c in CAPTIONS])
def test_captions_in_any_common_encoding_are_read_and_named(tmp_path, case, data, caption, encoding):
    image = good_image(tmp_path / "1_x" / "a.png")
    image.with_suffix(".txt").write_bytes(data)
    scan = scan_dataset(tmp_path)
    assert scan.items()[0].caption == caption
    notes = [w for w in scan.warnings if "a.txt" in w]
    if encoding is None:
        assert notes == []
    else:
        assert len(notes) == 1 and f"read as {encoding}" in notes[0] and "re-save it as UTF-8" in notes[0], notes


def test_every_tag_of_a_long_caption_reaches_the_step():
    tags = build_caption(TAGS, trigger_words="zkz", shuffle=True, keep_tokens=1, rng=np.random.default_rng(0)).split(", ")
    assert tags[0] == "zkz" and len(tags) == 1001 and sorted(tags[1:]) == sorted(TAGS.split(", "))


@pytest.mark.parametrize("data", [b"\x00\x81\x8d\x9d\x00binary", bytes(range(256)), noise_bytes("PNG")[:200]],
                         ids=["NUL and undefined bytes", "every byte", "a PNG named .txt"])
def test_bytes_of_no_encoding_are_a_clear_error_naming_the_caption(tmp_path, data):
    image = good_image(tmp_path / "1_x" / "a.png")
    image.with_suffix(".txt").write_bytes(data)
    message = refusal(tmp_path)
    assert "caption" in message and "a.txt" in message and "re-save it as UTF-8" in message


@pytest.mark.parametrize("text, codec", [
    ("Größe", "cp1252"), ("déjà vu", "cp1252"), ("Æ", "cp1252"), ("Mädchen, lächelnd, Straße", "cp1252"),
    ("风景, 山, 湖, 日落", "gbk"), ("赛博朋克城市夜景, 霓虹灯", "gbk"), ("龙", "gbk"),
    ("東京", "cp932"), ("風景、山、湖、夕焼け", "cp932"), ("ソフト表示", "cp932"),
])
def test_the_encoding_order_tells_overlapping_code_pages_apart(text, codec):
    assert decode_text(text.encode(codec))[0] == text


# ---------------------------------------------------------------- file names, read-only datasets

STRANGE_NAMES = ["猫 cat.png", "ねこ 'single' \"double\".png", "new\nline.png", "émoji 🐱 ÿ.png", " leading space.png", "Ωμέγα-Ж.png"]


def test_file_and_folder_names_in_any_script_with_spaces_quotes_and_newlines(tmp_path):
    folder = tmp_path / "2_ねこ 'cat' \"q\""
    for i, name in enumerate(STRANGE_NAMES):
        good_image(folder / name, colour=(i * 40, 0, 0)).with_suffix(".txt").write_text(f"tag{i}", encoding="utf-8")
    scan = scan_dataset(tmp_path)
    assert sorted(item.path.name for item in scan.items()) == sorted(STRANGE_NAMES)
    assert scan.subsets[0].name == "ねこ 'cat' \"q\"" and all(load_image(item.path)[0].mode == "RGB" for item in scan.items())


def snapshot(root) -> dict:
    """Every entry under `root` with its size, modification time and mode."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            info = os.lstat(os.path.join(folder, name))
            entries[os.path.relpath(os.path.join(folder, name), root)] = (info.st_size, info.st_mtime_ns, info.st_mode)
    return entries


def test_training_on_a_read_only_dataset_writes_nothing_there(tmp_path, tiny_checkpoint_path):
    dataset = tmp_path / "dataset"
    folder = dataset / "2_ねこ 'cat'"
    for i, name in enumerate(STRANGE_NAMES[:3]):
        good_image(folder / name, (64, 64), (i * 80, 40, 200)).with_suffix(".txt").write_bytes(f"zkz, 猫 {i}".encode("gbk"))
    for path in [*folder.iterdir(), folder, dataset]:
        path.chmod(stat.S_IREAD | (stat.S_IEXEC if path.is_dir() else 0))  # enforced unless run as root
    before = snapshot(dataset)
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "out", device="cpu")
    config = TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), max_train_steps=2, output_name="ro",
                         cache_latents=True, cache_latents_to_disk=True)
    try:
        result = train(config, host)
        after = snapshot(dataset)
    finally:
        for path in [dataset, folder, *folder.iterdir()]:
            path.chmod(stat.S_IRWXU)
    assert after == before
    assert any((result.run_dir / "latents").iterdir())  # the latent cache went to the run folder
    assert list(json.loads(load_lora(result.final_path).metadata["ss_tag_frequency"])) == ["2_ねこ 'cat'"]


# ---------------------------------------------------------------- options

NUMERIC_FIELDS = [f for f in dataclasses.fields(TrainConfig) if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)]
HUGE = {int: 10**9, float: 1e12}
VALUES = {"0": 0, "-1": -1, "nan": math.nan, "inf": math.inf, "huge": None}
# Which of VALUES each option takes, and what they mean; any other numeric option takes 0 and huge only.
ACCEPTED = {
    "network_dim": set(),  # at least 1; at most 1280 (the widest layer's rank) for lora/locon/loha
    "train_batch_size": {"huge"},  # above the dataset's size: refused by the dataset check (tested below)
    "gradient_accumulation_steps": {"huge"},  # one optimizer step per epoch
    "max_train_epochs": {"huge"},  # trains until interrupted; the step math shows the count
    "lr_scheduler_num_cycles": {"huge"},
    "lokr_factor": {"-1", "huge"},  # -1: LyCORIS's balanced split; a factor that divides nothing: balanced
    "clip_skip": set(),  # 1..12, SD1's layers
    "seed": {"0", "huge"},  # 0..2**63-1; -1 is refused: it does not mean random here
    "noise_offset": {"0"},  # 0..1
    "multires_noise_discount": {"0"},  # 0..1
    "num_class_images": {"0"},  # 0..100000, each drawn before training starts
    "class_images_cfg_scale": set(),  # 1..30
    "learning_rate": {"huge"},  # > 0; the tab warns outside the optimizer's usual range
    "max_timestep": set(),  # min < max <= 1000
    "min_timestep": {"0"},
    "max_bucket_reso": set(), "min_bucket_reso": set(),  # positive multiples of 64 up to 8192
    "caption_dropout_rate": {"0"}, "caption_tag_dropout_rate": {"0"}, "network_dropout": {"0"}, "rank_dropout": {"0"},
    "module_dropout": {"0"}, "validation_split": {"0"}, "adam_beta1": {"0"}, "adam_beta2": {"0"}, "sgd_momentum": {"0"},  # [0, 1)
}
# Meanings of the accepted values elsewhere: 0 turns off max_train_steps, save_*, sample_*, unet_lr and the text
# encoder rates (then learning_rate), max_grad_norm, min_snr_gamma and multires noise; network_alpha and
# conv_alpha 0 mean alpha = rank (kohya); huge ranks or alphas are warned about (alpha > dim).
NUMERIC_CASES = [(f.name, label) for f in NUMERIC_FIELDS for label in VALUES]


def _value(name: str, label: str):
    default = next(f.default for f in NUMERIC_FIELDS if f.name == name)
    return HUGE[type(default)] if label == "huge" else VALUES[label]


@pytest.mark.parametrize("name, label", NUMERIC_CASES, ids=[f"{n}={v}" for n, v in NUMERIC_CASES])
def test_every_numeric_option_at_zero_negative_nan_inf_and_huge(tmp_path, name, label):
    """Directly, as the tab and the CLI give it (from_dict), and from a TOML file: the same answer."""
    value, accepted = _value(name, label), ACCEPTED.get(name, {"0", "huge"})
    toml = tmp_path / "run.toml"
    toml.write_text(f"{name} = {_toml_number(value)}\n")
    for make in (lambda: TrainConfig(**{name: value}), lambda: TrainConfig.from_dict({name: value}), lambda: TrainConfig.from_toml(toml)):
        if label in accepted:
            config = make()
            assert all(math.isfinite(getattr(config, f.name)) for f in NUMERIC_FIELDS)  # no NaN reaches the trainer
        else:
            with pytest.raises(ConfigError) as error:
                make()
            assert str(error.value).startswith(name) or str(error.value).startswith("min_timestep/max_timestep"), str(error.value)


def _toml_number(value) -> str:
    return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan" if isinstance(value, float) and math.isnan(value) else repr(value))


@pytest.mark.parametrize("field, value, closest", [
    ("optimizer_type", "adamw", "AdamW"), ("optimizer_type", "Adam8bit", "AdamW8bit"), ("optimizer_type", "prodigy", "Prodigy"),
    ("lr_scheduler", "cosine_restarts", "cosine_with_restarts"), ("lr_scheduler", "Constant", "constant"),
    ("network_type", "LoCon", "locon"), ("mixed_precision", "bf61", "bf16"),
])
def test_unknown_choices_name_the_closest_known_option(field, value, closest):
    with pytest.raises(ConfigError, match=rf"^{field}: '{value}' is not one of .*\(did you mean {closest}\?\)"):
        TrainConfig(**{field: value})


def test_cli_names_the_field_and_the_closest_option(tmp_path, capsys):
    assert main(["train", "--train_data_dir", str(tmp_path), "--optimizer_type", "adamw"]) == 2
    assert "error: optimizer_type: 'adamw' is not one of" in capsys.readouterr().err
    config = tmp_path / "run.toml"
    config.write_text("[network]\nnetwrok_dim = 8\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "netwrok_dim (did you mean network_dim?)" in capsys.readouterr().err


TOML_CASES = [  # (file text, words of the refusal)
    ("network_dim = 4.5", "network_dim: cannot use 4.5, which needs a whole number"),
    ("network_dim = true", "network_dim: cannot use True, which needs a whole number"),
    ('network_dim = "four"', "network_dim: cannot use 'four', which needs a whole number"),
    ('learning_rate = "fast"', "learning_rate: cannot use 'fast', which needs a number"),
    ('shuffle_caption = "maybe"', "shuffle_caption: cannot use 'maybe', which needs true or false"),
    ('trigger_words = ["zkz", "purple"]', "trigger_words: cannot use ['zkz', 'purple'], which needs text"),
    ("output_name = 2024", "output_name: cannot use 2024, which needs text"),
    ('resolution = "512xabc"', "resolution: cannot use '512xabc', which needs width and height"),
    ('resolution = [512, 512, 512]', "resolution: give width and height"),
    ("sample_prompts = 3", "sample_prompts: cannot use 3, which needs a list"),
    ("learning_rat = 1e-4", "unknown option(s) learning_rat (did you mean learning_rate?)"),
    ("[data]\nshuffle_captions = true", "shuffle_captions (did you mean shuffle_caption?)"),
    ("network_dim = ", "cannot read the TOML config"),
]


@pytest.mark.parametrize("text, words", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_toml_with_wrong_types_or_unknown_keys_is_named(tmp_path, text, words):
    path = tmp_path / "run.toml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_toml(path)
    assert words in str(error.value), str(error.value)


def test_whole_floats_and_strings_from_widgets_and_flags_still_work():
    config = TrainConfig.from_dict({"network_dim": 8.0, "learning_rate": "1e-4", "shuffle_caption": "yes", "resolution": "512x768"})
    assert (config.network_dim, config.learning_rate, config.shuffle_caption, config.resolution) == (8, 1e-4, True, (512, 768))


@pytest.mark.parametrize("changes, words", [
    (dict(resolution=(100, 64)), "resolution: 100 is not a positive multiple of 64"),
    (dict(resolution=(512, 520)), "resolution: 520 is not a positive multiple of 64"),
    (dict(min_bucket_reso=100), "min_bucket_reso: 100 is not a positive multiple of 64"),
    (dict(resolution=(16384, 16384)), "resolution: 16384 is above 8192 px"),
    (dict(network_dim=4096), "network_dim: must be at most 1280 for lora"),
])
def test_sizes_off_the_grid_or_beyond_any_model_are_refused(changes, words):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**changes)
    assert str(error.value).startswith(words), str(error.value)


@pytest.fixture
def small_dataset(tmp_path):
    for i in range(3):
        good_image(tmp_path / "data" / "2_zkz" / f"{i}.png", (64, 64))
    return tmp_path / "data"


def test_alpha_above_dim_is_warned_and_batch_above_the_dataset_refused(small_dataset):
    config = TrainConfig(train_data_dir=str(small_dataset), resolution=(64, 64), network_dim=4, network_alpha=16.0)
    assert any(w.startswith("network_alpha 16.0 > network_dim 4") for w in plan_warnings(config, plan_training(config)))
    with pytest.raises(DatasetError, match=r"batch size 7 is larger than the dataset \(6 samples per epoch"):
        plan_training(config.replace(train_batch_size=7))


# ---------------------------------------------------------------- output names

BAD_NAMES = [
    ("slash", "my/lora", "contains /"), ("dot dot", "..", "names a folder"), ("dot", ".", "names a folder"),
    ("traversal", "../lora", "contains /"), ("backslash", "my\\lora", "contains \\"), ("NUL", "lo\x00ra", "control character"),
    ("newline", "lo\nra", "control character"), ("absolute", "/etc/passwd", "contains /"), ("drive", "C:\\loras\\x", "contains : \\"),
    ("CON", "CON", "Windows device name"), ("con.txt", "con.txt", "Windows device name"), ("PRN", "prn", "Windows device name"),
    ("AUX", "AUX", "Windows device name"), ("NUL name", "NUL.tar.gz", "Windows device name"), ("COM1", "COM1", "Windows device name"),
    ("com9.x", "com9.x", "Windows device name"), ("LPT1", "LPT1", "Windows device name"), ("lpt9", "lpt9", "Windows device name"),
    ("300 characters", "x" * 300, "300 bytes long"), ("long in UTF-8", "猫" * 100, "300 bytes long"),
    ("trailing dot", "mylora.", "ends with a dot"), ("trailing space", "mylora ", "ends with a dot or space"),
    ("leading space", " mylora", "starts with a space"), ("empty", "", "is empty"), ("spaces", "   ", "is empty"),
    ("star", "my*lora", "contains *"), ("question", "what?", "contains ?"), ("pipe", "a|b", "contains |"),
    ("quote", 'say "hi"', 'contains "'),
]


@pytest.mark.parametrize("case, name, words", BAD_NAMES, ids=[c[0] for c in BAD_NAMES])
def test_bad_output_names_are_refused_saying_what_is_allowed(case, name, words):
    with pytest.raises(ConfigError) as error:
        TrainConfig(output_name=name)
    message = str(error.value)
    assert message.startswith("output_name:") and words in message and "a name may use letters of any script" in message, message


@pytest.mark.parametrize("name", ["mychar", "my char v2", "ねこ", "Ωμέγα", "a[1]", "v1.5-final", "COM10", "console", "x" * 200, "it's"])
def test_good_output_names_are_accepted(name):
    assert TrainConfig(output_name=name).output_name == name


@pytest.mark.parametrize("existing", ["t.safetensors", "t-000001.safetensors", "a[1]-step00000010.safetensors"])
def test_an_existing_lora_is_never_overwritten_unless_asked(tmp_path, existing):
    name = existing.split("-")[0].removesuffix(".safetensors")
    (tmp_path / existing).write_bytes(b"the user's file")
    config = TrainConfig(output_dir=str(tmp_path), output_name=name)
    with pytest.raises(ConfigError, match=rf"^output_name: .*{existing.replace('[', '.').replace(']', '.')} already exists"):
        check_output_free(config, host=None)
    assert (tmp_path / existing).read_bytes() == b"the user's file"
    check_output_free(config.replace(overwrite=True), host=None)


def test_a_refused_run_leaves_the_existing_lora_and_no_run_folder(small_dataset, tmp_path, tiny_checkpoint_path):
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path / "out", device="cpu")
    existing = host.lora_dir / "mine.safetensors"
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"the user's file")
    with pytest.raises(ConfigError, match="^output_name: .*mine.safetensors already exists"):
        train(TrainConfig(train_data_dir=str(small_dataset), resolution=(64, 64), output_name="mine"), host)
    assert existing.read_bytes() == b"the user's file"
    assert sorted(p.name for p in host.lora_dir.iterdir()) == ["mine.safetensors"]
    assert not (tmp_path / "out" / "runs" / "mine").exists()
