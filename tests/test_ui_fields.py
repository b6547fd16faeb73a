"""The tab's widgets come from TrainConfig: every field placed once, values round-trip."""

import dataclasses

import pytest

from lib_lora.train.config import ConfigError, TrainConfig
from lib_lora.train.presets import BUILTIN_PRESETS, DEMO
from lib_lora.ui import fields


def test_every_layout_name_is_a_field_and_every_field_is_placed_once():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    placed = [n for groups in fields.layout().values() for group in groups.values() for n in group]
    assert sorted(placed) == sorted(names)
    hand_written = [n for groups in fields.LAYOUT.values() for group in groups.values() for n in group]
    assert set(hand_written) <= set(names) and len(hand_written) == len(set(hand_written))


@pytest.mark.parametrize("name, kind", [("network_type", "dropdown"), ("shuffle_caption", "checkbox"), ("network_dim", "int"),
                                        ("learning_rate", "float"), ("lr_warmup_steps", "float"), ("output_name", "text"),
                                        ("sample_prompts", "lines"), ("resolution", "text")])
def test_widget_kind_label_and_info_come_from_the_field(name, kind):
    spec = fields.field_specs()[name]
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    assert spec.kind == kind and spec.info == f.metadata["help"] and spec.label
    assert spec.choices == tuple(f.metadata.get("choices", ()))


@pytest.mark.parametrize("config", [TrainConfig(), TrainConfig(**DEMO), TrainConfig(resolution=(512, 768), sample_prompts=("a", "b --s 5")),
                                    *(TrainConfig(**p.values) for p in BUILTIN_PRESETS.values())])
def test_config_to_widgets_and_back_is_the_same_config(config):
    assert fields.config_from_widgets(fields.config_widget_values(config)) == config


def test_widget_values_are_converted_like_a_user_types_them():
    values = fields.config_widget_values(TrainConfig())
    values.update(network_dim=8.0, resolution="512x768", sample_prompts="one\n\n two \n", learning_rate="", lr_warmup_steps=0.1)
    config = fields.config_from_widgets(values)
    assert config.network_dim == 8 and isinstance(config.network_dim, int)
    assert config.resolution == (512, 768) and config.sample_prompts == ("one", "two")
    assert config.learning_rate == TrainConfig().learning_rate  # an emptied number box means the default
    assert config.lr_warmup_steps == 0.1  # a fraction, not truncated to 0


def test_a_bad_value_is_a_config_error_naming_the_field():
    values = fields.config_widget_values(TrainConfig())
    with pytest.raises(ConfigError, match="resolution"):
        fields.config_from_widgets({**values, "resolution": "500"})
    with pytest.raises(ConfigError, match="network_dim"):
        fields.config_from_widgets({**values, "network_dim": 0})


def test_lycoris_options_sit_with_the_network_options():
    """network_type offers LoHa and LoKr; lokr_factor (a number) and dora_wd (a switch) follow the ranks."""
    group = fields.layout()["Network"]["Network"]
    assert group.index("lokr_factor") > group.index("conv_alpha") and "dora_wd" in group
    specs = fields.field_specs()
    assert specs["network_type"].choices == ("lora", "locon", "loha", "lokr")
    assert (specs["lokr_factor"].kind, specs["lokr_factor"].default) == ("int", -1)
    assert (specs["dora_wd"].kind, specs["dora_wd"].default) == ("checkbox", False)


def test_block_and_pivotal_options_sit_in_the_network_section():
    """kohya's block_dims... and our block choice get a Blocks group; pivotal tuning its own, both under Network."""
    network = fields.layout()["Network"]
    assert network["Blocks"] == ("train_blocks", "cross_attention_only", "block_dims", "block_alphas", "conv_block_dims",
                                 "conv_block_alphas")
    assert network["Pivotal tuning"] == ("pivotal_tuning", "embedding_lr", "init_word", "num_vectors_per_token")
    specs = fields.field_specs()
    assert [specs[n].kind for n in ("train_blocks", "cross_attention_only", "block_dims", "pivotal_tuning", "embedding_lr",
                                    "num_vectors_per_token")] == ["text", "checkbox", "text", "checkbox", "float", "int"]
    config = TrainConfig(block_dims="4," * 24 + "4", train_blocks="IN04,OUT11", pivotal_tuning=True, trigger_words="zkz")
    assert fields.config_from_widgets(fields.config_widget_values(config)) == config
