"""Presets: built-in recipes and user presets, saved and loaded as TOML."""

import tomllib

import pytest

from lib_lora.train import presets
from lib_lora.train.config import ConfigError, TrainConfig


@pytest.mark.parametrize("name", list(presets.BUILTIN_PRESETS))
def test_builtin_presets_are_valid_explained_and_round_trip_through_toml(name):
    preset = presets.BUILTIN_PRESETS[name]
    assert preset.why and preset.builtin
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


def test_user_presets_save_list_and_load(tmp_path):
    config = TrainConfig(train_data_dir="/data/x", output_name="mine", network_dim=12, lr_warmup_steps=0.05, resolution=(512, 768))
    preset = presets.Preset("My Char v2", presets.preset_values(config), "tested on 30 images")
    path = presets.save_preset(tmp_path, preset)
    assert path.name == "my-char-v2.toml"
    found, problems = presets.list_presets(tmp_path)
    assert problems == [] and "My Char v2" in found and "anime character" in found
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
