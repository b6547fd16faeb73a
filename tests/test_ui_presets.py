"""Presets: built-in recipes and user presets, saved and loaded as TOML."""

import tomllib

import pytest

from lib_lora.train import presets
from lib_lora.train.base_model import native_size
from lib_lora.train.config import ConfigError, TrainConfig


@pytest.mark.parametrize("name", list(presets.BUILTIN_PRESETS))
def test_builtin_presets_are_valid_explained_and_round_trip_through_toml(name):
    preset = presets.BUILTIN_PRESETS[name]
    assert preset.why and preset.builtin and preset.arch in ("sd1", "sd2", "sdxl")
    TrainConfig(**preset.values)
    text = presets.preset_to_toml(preset)
    assert tomllib.loads(text)  # plain TOML, usable as `train --config`
    loaded = presets.preset_from_toml(text)
    assert (loaded.name, loaded.values, loaded.why) == (preset.name, preset.values, preset.why)


def test_a_preset_file_is_a_run_config(tmp_path):
    path = tmp_path / "style.toml"
    path.write_text(presets.preset_to_toml(presets.BUILTIN_PRESETS["style"]))
    config = TrainConfig.from_toml(path)
    assert config.network_type == "locon" and config.flip_aug


def test_kohya_typical_values():
    anime, real, style, concept = (presets.BUILTIN_PRESETS[n].values for n in ("anime character", "realistic character", "style", "concept"))
    assert anime["clip_skip"] == 2 and anime["network_alpha"] <= anime["network_dim"] and anime["keep_tokens"] == 1
    assert real.get("clip_skip", 1) == 1
    assert not real.get("flip_aug") and style["network_type"] == "locon" and concept["flip_aug"]
    for values in (anime, real, style, concept):
        assert values["resolution"] == (512, 512) and values["save_every_n_epochs"] == 1
        assert 1e-5 <= values["learning_rate"] <= 1e-3 and values["network_alpha"] <= values["network_dim"]


def test_each_architecture_is_offered_its_own_presets_at_its_native_size():
    offered = {arch: presets.list_presets(None, arch)[0] for arch in ("sd1", "sd2", "sdxl")}
    assert list(offered["sd1"]) == ["anime character", "realistic character", "style", "concept", "demo (embedded tiny model)"]
    assert list(offered["sd2"]) == ["SD2 768-v realistic character", "SD2 768-v style", "SD2 768-v concept"]
    assert list(offered["sdxl"]) == ["SDXL character", "SDXL style", "SDXL concept"]
    for arch, found in offered.items():
        side = native_size(arch, "v")  # SD2's presets are for its 768-v models
        for preset in found.values():
            config = TrainConfig(**preset.values)
            if preset.name != "demo (embedded tiny model)":
                assert config.resolution == (side, side) and config.enable_bucket and config.max_bucket_reso == 2 * side
            assert preset.arch == arch and (arch == "sd1" or config.clip_skip == 1)  # SD2 and SDXL ignore clip skip
    assert list(presets.list_presets(None)[0]) == list(presets.BUILTIN_PRESETS)  # the model not known: all


def test_sdxl_presets_follow_kohya_sdxl_practice():
    character, style, concept = (TrainConfig(**presets.BUILTIN_PRESETS[n].values) for n in ("SDXL character", "SDXL style", "SDXL concept"))
    for config in (character, style, concept):
        assert (config.min_bucket_reso, config.max_bucket_reso) == (512, 2048)  # the SDXL paper's buckets, 512x2048 to 2048x512
        assert config.gradient_checkpointing and config.cache_latents and config.mixed_precision == "bf16"
        assert config.noise_offset == 0.0357 and config.min_snr_gamma == 5.0 and config.optimizer_type == "AdamW"
        assert config.effective_unet_lr == 1e-4 and config.network_dim in (16, 32) and config.network_alpha == config.network_dim / 2
    assert not style.train_text_encoder and not concept.train_text_encoder  # UNet only, as kohya advises for SDXL
    assert character.train_text_encoder and character.effective_text_encoder_lr == character.effective_text_encoder_2_lr == 1e-5
    assert style.network_type == "locon" and style.flip_aug and concept.flip_aug and not character.flip_aug


def test_user_presets_save_list_and_load(tmp_path):
    config = TrainConfig(train_data_dir="/data/x", output_name="mine", network_dim=12, lr_warmup_steps=0.05, resolution=(512, 768))
    preset = presets.Preset("My Char v2", presets.preset_values(config), "tested on 30 images")
    path = presets.save_preset(tmp_path, preset)
    assert path.name == "my-char-v2.toml"
    found, problems = presets.list_presets(tmp_path)
    assert problems == [] and "My Char v2" in found and "anime character" in found
    assert all("My Char v2" in presets.list_presets(tmp_path, arch)[0] for arch in ("sd1", "sd2", "sdxl"))  # on every model
    loaded = found["My Char v2"]
    assert loaded.values == {"network_dim": 12, "lr_warmup_steps": 0.05, "resolution": (512, 768)}
    applied = presets.apply_preset(loaded, TrainConfig(train_data_dir="/other", output_name="keep", network_alpha=3.0))
    assert applied.train_data_dir == "/other" and applied.output_name == "keep"  # dataset options stay
    assert applied.network_dim == 12 and applied.network_alpha == TrainConfig().network_alpha  # the rest: defaults + preset
    assert applied.lr_warmup_steps == 0.05


def test_saving_never_overwrites_silently_nor_shadows_a_builtin(tmp_path):
    preset = presets.Preset("mine", {"network_dim": 8})
    presets.save_preset(tmp_path, preset)
    with pytest.raises(ConfigError, match="already exists"):
        presets.save_preset(tmp_path, presets.Preset("mine", {"network_dim": 16}))
    presets.save_preset(tmp_path, presets.Preset("mine", {"network_dim": 16}), overwrite=True)
    assert presets.load_preset(tmp_path / "mine.toml").values == {"network_dim": 16}
    with pytest.raises(ConfigError, match="built-in"):
        presets.save_preset(tmp_path, presets.Preset("Style", {}))
    with pytest.raises(ConfigError, match="built-in"):
        presets.save_preset(tmp_path, presets.Preset("sdxl Character", {}))
    with pytest.raises(ConfigError, match="letters or digits"):
        presets.save_preset(tmp_path, presets.Preset("!!!", {}))
    assert [p.name for p in tmp_path.iterdir()] == ["mine.toml"]  # no temp files left


def test_bad_preset_files_are_reported_by_name(tmp_path):
    (tmp_path / "broken.toml").write_text("network_dim = [")
    (tmp_path / "data.toml").write_text('train_data_dir = "/x"\n')
    (tmp_path / "unknown.toml").write_text("network_rank = 4\n")
    found, problems = presets.list_presets(tmp_path)
    assert set(found) == set(presets.BUILTIN_PRESETS)
    assert len(problems) == 3 and any("broken.toml" in p and "TOML" in p for p in problems)
    assert any("cannot set train_data_dir" in p for p in problems) and any("network_rank" in p for p in problems)
