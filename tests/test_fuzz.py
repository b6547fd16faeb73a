"""Bounded fuzzing (hypothesis) of the parsers that read what users and other tools hand us (issue #19):
LoRA files (and the safetensors header reader behind checkpoints), caption files and captions, `<lora:...>`
prompt tags, and TOML / JSON training configs and presets. Whatever the input, each either parses or raises the
project's own error naming the input, never an IndexError, KeyError, UnicodeDecodeError or the like.

Derandomized, so a CI run tries the same inputs every time; the example counts keep the whole file
well under 60 s on one CPU core. Crashes the fuzzer found are kept below as explicit regression examples.
"""
import dataclasses
import json
import math
import random
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lib_lora.data import DatasetError, build_caption
from lib_lora.data.text_files import decode_text, read_text
from lib_lora.models.tensor_files import LazyTensors
from lib_lora.networks.errors import LoraFormatError, PromptSyntaxError
from lib_lora.networks.files import LoraFile, load_lora
from lib_lora.networks.prompt import extract_lora_tags
from lib_lora.train.config import ConfigError, TrainConfig
from lib_lora.train.presets import BUILTIN_PRESETS, Preset, list_presets, load_preset, save_preset

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FIELD_NAMES = [f.name for f in dataclasses.fields(TrainConfig)]

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)


def written(tmp_path_factory, data: bytes, suffix: str):
    path = tmp_path_factory.mktemp("fuzz") / f"input{suffix}"
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- LoRA files and safetensors headers

MODULES = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_x", "unet.a.b", "bundle_emb.zkz"]
PARAMS = ["lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
          "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "dora_scale", "lora_A.weight", "string_to_param.*", "clip_l", "diff", "w"]
DTYPES = ["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "X9", ""]


@st.composite
def header_entries(draw, data_size: int):
    """A header entry, usually well formed (so the checks past the first one are reached), sometimes not."""
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    shape = draw(st.lists(st.integers(-2, 6) | st.sampled_from([2**40, 2**63]), max_size=4))
    begin = draw(st.integers(-1, data_size + 1))
    offsets = draw(st.just([begin, begin + draw(st.integers(-1, 64))]) | json_values)
    return {"dtype": draw(st.sampled_from(DTYPES) | json_values), "shape": draw(st.just(shape) | json_values), "data_offsets": offsets}


@st.composite
def safetensors_files(draw) -> bytes:
    """8-byte little-endian header length, a JSON header of fuzzed entries and metadata, then data bytes."""
    data = draw(st.binary(max_size=96))
    keys = st.builds(lambda m, p: f"{m}.{p}", st.sampled_from(MODULES), st.sampled_from(PARAMS)) | st.text(max_size=10)
    header = draw(st.dictionaries(keys, header_entries(len(data)), max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3) | json_values)
    text = json.dumps(header) if draw(st.integers(0, 4)) else draw(st.text(max_size=40))
    raw = text.encode("utf-8", "surrogatepass")
    length = draw(st.just(len(raw)) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + raw + data


@st.composite
def valid_lora_files(draw) -> bytes:
    """A well-formed safetensors file of small F32 tensors under LoRA-like keys with random shapes: the
    module builders must refuse mismatched shapes by name."""
    names = draw(st.lists(st.builds(lambda m, p: f"{m}.{p}", st.sampled_from(MODULES), st.sampled_from(PARAMS)), min_size=1, max_size=5, unique=True))
    header, offset = {}, 0
    for name in names:
        shape = draw(st.lists(st.integers(0, 4), max_size=4))
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def loads_or_refuses(path) -> None:
    try:
        assert isinstance(load_lora(path), LoraFile)
    except LoraFormatError as e:
        assert str(path) in str(e)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch says so of random bytes read as a .pt, then refuses them
@FUZZ
@given(data=st.binary(max_size=200) | safetensors_files(), suffix=st.sampled_from([".safetensors", ".pt"]))
def test_any_bytes_load_as_a_lora_or_raise_lora_format_error_naming_the_file(tmp_path_factory, data, suffix):
    loads_or_refuses(written(tmp_path_factory, data, suffix))


@FUZZ
@given(data=valid_lora_files())
def test_tensors_of_any_shape_under_lora_keys_load_or_are_refused_by_name(tmp_path_factory, data):
    loads_or_refuses(written(tmp_path_factory, data, ".safetensors"))


@FUZZ
@given(data=st.binary(max_size=120) | safetensors_files())
@example(data=struct.pack("<Q", 2) + b"[]")  # a header that is JSON but no object
@example(data=struct.pack("<Q", 20) + b'{"__metadata__": [1]}')
@example(data=struct.pack("<Q", 54) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}')
@example(data=struct.pack("<Q", 56) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}')
@example(data=struct.pack("<Q", 59) + b'{"a": {"dtype": "U8", "shape": [9223372036854775808], "data_offsets": [0, 1]}}')
def test_the_checkpoint_header_reader_checks_or_refuses_any_header(tmp_path_factory, data):
    path = written(tmp_path_factory, data, ".safetensors")
    try:
        tensors = LazyTensors(path, LoraFormatError)
    except LoraFormatError as e:
        assert str(path) in str(e)
        return
    for key in tensors:  # every entry the header check let through reads in full
        assert tensors[key].numel() >= 0


# ---------------------------------------------------------------- captions


@FUZZ
@given(data=st.binary(max_size=120) | st.text(max_size=60).map(lambda t: t.encode("utf-16")))
def test_caption_files_of_any_bytes_are_read_or_refused_by_name(tmp_path_factory, data):
    path = written(tmp_path_factory, data, ".txt")
    try:
        text, _ = read_text(path)
    except DatasetError as e:
        assert str(path) in str(e) and decode_text(data) == (None, None)
        return
    assert isinstance(text, str)


@FUZZ
@given(caption=st.text(max_size=80), triggers=st.text(max_size=20).filter(lambda t: len(t.splitlines()) <= 1), shuffle=st.booleans(), keep=st.integers(0, 5),
       dropout=st.floats(0, 1), tag_dropout=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_any_caption_text_builds_a_one_line_caption(caption, triggers, shuffle, keep, dropout, tag_dropout, seed):
    built = build_caption(caption, trigger_words=triggers, shuffle=shuffle, keep_tokens=keep, caption_dropout_rate=dropout,
                          tag_dropout_rate=tag_dropout, rng=random.Random(seed))
    assert isinstance(built, str) and len(built.splitlines()) <= 1  # only the caption's first line, as kohya


# ---------------------------------------------------------------- <lora:...> prompts

SYNTAX = st.text(alphabet="<>:=,. -0123456789eElorayctunbwALNOE\\", max_size=40)


@FUZZ
@given(prompt=st.lists(SYNTAX | st.text(max_size=10) | st.just("<lora:") | st.just("<lyco:x:") | st.just("lbw="), max_size=6).map("".join))
def test_any_prompt_gives_its_lora_tags_or_a_prompt_syntax_error(prompt):
    try:
        rest, tags = extract_lora_tags(prompt)
    except PromptSyntaxError as e:
        assert str(e)
        return
    assert all(tag.name and len(tag.block_weights or [0] * 26) == 26 for tag in tags) and len(rest) <= len(prompt)


# ---------------------------------------------------------------- TOML and JSON configs


@FUZZ
@given(values=st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), json_values, max_size=5))
def test_any_option_values_make_a_config_or_a_config_error(values):
    try:
        config = TrainConfig.from_dict(values)
    except ConfigError as e:
        assert str(e)
        return
    assert TrainConfig.from_dict(config.to_dict()) == config


@FUZZ
@given(data=st.binary(max_size=120) | st.text(max_size=80).map(str.encode)
       | st.builds(lambda k, v: f"{k} = {v}\n".encode(), st.sampled_from(FIELD_NAMES), st.sampled_from(
           ['"x"', "1", "-1", "nan", "inf", "1e400", "[1, 2]", '"512x"', "true", "{a = 1}", "1979-05-27", '""', "[]"])))
@example(data=b"output_name = \"\xff\"")  # not UTF-8
def test_any_toml_file_makes_a_config_or_a_config_error_naming_the_file(tmp_path_factory, data):
    path = written(tmp_path_factory, data, ".toml")
    try:
        TrainConfig.from_toml(path)
    except ConfigError as e:
        assert str(e)


@FUZZ
@given(text=st.text(max_size=30))
@example(text="line one\nline two")
@example(text="tab\tand DEL\x7f")
def test_every_text_option_survives_the_toml_round_trip(tmp_path_factory, text):
    config = TrainConfig(trigger_words=text, training_comment=text, sample_prompts=(text,))
    path = written(tmp_path_factory, config.to_toml().encode(), ".toml")
    assert TrainConfig.from_toml(path) == config


BUILTIN_NAMES = {name.lower() for name in BUILTIN_PRESETS}


@FUZZ
@given(name=st.text(min_size=1, max_size=20).filter(lambda n: any(ch.isalnum() and ch.isascii() for ch in n)
                                                      and n.strip().lower() not in BUILTIN_NAMES),  # those are refused
       why=st.text(max_size=30), comment=st.text(max_size=20))
def test_a_saved_preset_loads_back_with_its_values_and_a_one_line_name(tmp_path_factory, name, why, comment):
    preset = Preset(name, {"init_word": comment, "network_dim": 8}, why)
    loaded = load_preset(save_preset(tmp_path_factory.mktemp("presets"), preset))
    assert loaded.values == preset.values
    for given, read in ((name, loaded.name), (why, loaded.why)):
        assert read.isprintable()  # one line, no control characters
        if all(ch.isprintable() or ch.isspace() for ch in given):
            assert read == " ".join(given.split())  # white space and line breaks as single spaces, nothing else changed


@pytest.mark.parametrize("name, why, shown", [("two\nlines", "", ("two lines", "")), ("cr\rname", "why\u2028not", ("cr name", "why not")),
                                              ("nul\x00ok", "tab\there", ("nulok", "tab here"))])
def test_line_breaks_in_a_preset_name_become_spaces(tmp_path, name, why, shown):
    loaded = load_preset(save_preset(tmp_path, Preset(name, {"network_dim": 8}, why)))
    assert (loaded.name, loaded.why) == shown


@FUZZ
@given(data=st.binary(max_size=120) | st.text(max_size=80).map(str.encode))
@example(data=b"# name: \xff\nnetwork_dim = 4")  # not UTF-8
def test_any_preset_file_loads_or_is_listed_as_a_problem(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("presets")
    (folder / "mine.toml").write_bytes(data)
    found, problems = list_presets(folder)
    assert len(found) + len(problems) == len(list_presets(None)[0]) + 1
    assert all(p.startswith(str(folder / "mine.toml")) for p in problems)


@pytest.mark.parametrize("values", [{"resolution": [512, 512, 512]}, {"resolution": {"a": 1}}, {"learning_rate": None}])
def test_odd_json_values_are_config_errors(values):
    with pytest.raises(ConfigError):
        TrainConfig.from_dict(values)
