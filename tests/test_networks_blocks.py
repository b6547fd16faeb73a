"""Block selection at training time: kohya's block_dims/block_alphas/conv_block_dims/conv_block_alphas
(sd-scripts networks/lora.py get_block_index, get_block_dims_and_alphas), train_blocks and cross_attention_only.

Full-size SD1.5 and SDXL UNets on the meta device (no model memory) give kohya's real block layout.
"""

import pytest
import torch

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.models.architectures import SD15_TEXT, SD15_UNET, SDXL_UNET
from lib_lora.models.checkpoint import save_checkpoint
from lib_lora.models.clip_text import TextEncoder
from lib_lora.models.unet import UNetModel
from lib_lora.networks.blocks import SD_BLOCK_IDS, SDXL_BLOCK_IDS, kohya_block_index
from lib_lora.networks.errors import NetworkConfigError
from lib_lora.networks.files import load_lora
from lib_lora.networks.network import make_network
from lib_lora.networks.targets import name_table
from lib_lora.train.config import ConfigError, TrainConfig, check_for_arch
from lib_lora.train.trainer import train
from test_networks_helpers import one_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def sd15():
    with torch.device("meta"):
        return UNetModel(SD15_UNET), TextEncoder(SD15_TEXT)


@pytest.fixture(scope="module")
def sdxl_unet():
    with torch.device("meta"):
        return UNetModel(SDXL_UNET)


# kohya names -> kohya's block (its order: SD1 IN00..IN11 = 0..11, MID = 12, OUT00..OUT11 = 13..24).
SD1_TABLE = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
    "lora_unet_down_blocks_0_resnets_1_conv2": "IN02",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": "IN04",
    "lora_unet_down_blocks_1_resnets_1_time_emb_proj": "IN05",
    "lora_unet_down_blocks_2_downsamplers_0_conv": "IN09",
    "lora_unet_down_blocks_3_resnets_0_conv1": "IN10",
    "lora_unet_down_blocks_3_resnets_1_conv2": "IN11",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": "MID",
    "lora_unet_mid_block_resnets_1_conv1": "MID",
    "lora_unet_up_blocks_0_resnets_0_conv1": "OUT00",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
    "lora_unet_up_blocks_1_attentions_2_proj_out": "OUT05",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "OUT05",
    "lora_unet_up_blocks_2_resnets_0_conv_shortcut": "OUT06",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0": "OUT11",
}
# SDXL: 0 = time/label embeddings, IN00..IN08 = 1..9, MID00..MID02 = 10..12 (middle_block.0/.1/.2), OUT00..OUT08 = 13..21, 22 = out.
SDXL_TABLE = {
    "lora_unet_time_embed_0": "EMB",
    "lora_unet_label_emb_0_0": "EMB",
    "lora_unet_input_blocks_1_0_in_layers_2": "IN01",
    "lora_unet_input_blocks_3_0_op": "IN03",
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v": "IN04",
    "lora_unet_input_blocks_8_1_proj_out": "IN08",
    "lora_unet_middle_block_0_emb_layers_1": "MID00",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj": "MID01",
    "lora_unet_middle_block_2_out_layers_3": "MID02",
    "lora_unet_output_blocks_0_1_proj_in": "OUT00",
    "lora_unet_output_blocks_2_2_conv": "OUT02",
    "lora_unet_output_blocks_8_0_skip_connection": "OUT08",
    "lora_unet_out_2": "OUT",
}


@pytest.mark.parametrize("name, block", SD1_TABLE.items())
def test_sd1_block_index_is_kohyas(name, block):
    assert len(SD_BLOCK_IDS) == 25
    assert kohya_block_index(name, sdxl=False) == SD_BLOCK_IDS.index(block)


@pytest.mark.parametrize("name, block", SDXL_TABLE.items())
def test_sdxl_block_index_is_kohyas(name, block):
    assert len(SDXL_BLOCK_IDS) == 23
    assert kohya_block_index(name, sdxl=True) == SDXL_BLOCK_IDS.index(block)


def ranks(network):
    sd = network.state_dict()
    return {n: (sd[f"{n}.lora_down.weight"].shape[0], sd[f"{n}.alpha"].item()) for n in network.module_names()}


def test_sd15_block_dims_give_each_block_its_rank_and_no_module_at_rank_0(sd15):
    """25 values in kohya's order; IN04 at rank 0 has no module; the text encoder keeps network_dim."""
    unet, text = sd15
    dims = [0, 1, 2, 3, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
    alphas = [d / 2 for d in dims]
    network = make_network(unet, text, network_dim=8, network_alpha=4, block_dims=dims, block_alphas=alphas, device="cpu")
    found = ranks(network)
    unet_found = {n: ra for n, ra in found.items() if n.startswith("lora_unet_")}
    assert all(ra == (8, 4.0) for n, ra in found.items() if n.startswith("lora_te_")) and len(found) - len(unet_found) == 72
    for name, (rank, alpha) in unet_found.items():
        index = kohya_block_index(name, sdxl=False)
        assert (rank, alpha) == (dims[index], alphas[index]), name
    by_block = {}
    for name in unet_found:
        by_block.setdefault(SD_BLOCK_IDS[kohya_block_index(name, False)], []).append(name)
    # LierLa: 12 layers per transformer; SD1's transformers sit in IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11
    assert {b: len(v) for b, v in by_block.items()} == {b: 12 for b in ("IN01", "IN02", "IN05", "IN07", "IN08", "MID",
                                                                         *(f"OUT{i:02d}" for i in range(3, 12)))}
    assert network.network_args() == {"block_dims": ",".join(map(str, dims)), "block_alphas": ",".join(map(str, alphas))}


def test_sd15_conv_block_dims_and_kohya_defaults(sd15):
    """3x3 convs take conv_block_dims; linear/1x1 layers of a resnet take block_dims; conv_dim fills conv_block_dims."""
    unet, _ = sd15
    dims = [4] * 25
    dims[SD_BLOCK_IDS.index("OUT00")] = 0
    conv = list(range(25))
    conv[SD_BLOCK_IDS.index("IN03")] = 0
    network = make_network(unet, None, network_dim=8, network_alpha=2, conv_dim=3, block_dims=dims, conv_block_dims=conv, device="cpu")
    found = ranks(network)
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" not in found  # IN03 at conv rank 0
    assert found["lora_unet_down_blocks_1_downsamplers_0_conv"] == (6, 1.0)  # IN06; conv_block_alphas default conv_alpha 1
    assert found["lora_unet_down_blocks_0_resnets_0_conv1"] == (1, 1.0) and found["lora_unet_up_blocks_3_resnets_2_conv1"] == (24, 1.0)
    assert found["lora_unet_up_blocks_0_resnets_0_conv1"] == (13, 1.0)  # OUT00: rank-0 linears, convs kept (kohya)
    assert "lora_unet_up_blocks_0_resnets_0_time_emb_proj" not in found and "lora_unet_up_blocks_0_resnets_0_conv_shortcut" not in found
    assert found["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == (4, 2.0)  # 1x1: block_dims, block_alphas = network_alpha
    filled = ranks(make_network(unet, None, conv_dim=6, conv_alpha=3, block_dims=[4] * 25, device="cpu"))
    assert filled["lora_unet_mid_block_resnets_0_conv2"] == (6, 3.0)  # kohya: conv_block_dims = [conv_dim] * 25
    linear_only = ranks(make_network(unet, None, block_dims=[4] * 25, device="cpu"))
    assert len(linear_only) == 192  # no conv_dim, no conv_block_dims: kohya's LierLa targets


def test_sdxl_block_dims_use_kohyas_23_blocks(sdxl_unet):
    dims = list(range(23))
    network = make_network(sdxl_unet, None, network_dim=8, block_dims=dims, conv_dim=2, device="cpu")
    found = ranks(network)
    assert found["lora_unet_middle_block_0_emb_layers_1"][0] == 10 and found["lora_unet_middle_block_0_in_layers_2"][0] == 2
    assert found["lora_unet_middle_block_1_proj_in"][0] == 11 and found["lora_unet_middle_block_2_emb_layers_1"][0] == 12
    assert found["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v"][0] == 5
    assert found["lora_unet_output_blocks_8_0_skip_connection"][0] == 21 and found["lora_unet_output_blocks_2_2_conv"][0] == 2
    assert len(found) == 788  # every kohya LoCon target: none sits in the embeddings (0) or IN00 (conv_in)
    with pytest.raises(NetworkConfigError, match="block_dims: needs 23 values"):
        make_network(sdxl_unet, None, block_dims=[4] * 25, device="cpu")


def test_block_option_errors(sd15):
    unet, text = sd15
    cases = [({"block_alphas": [1] * 25}, "block_alphas: works with block_dims only"),
             ({"conv_block_dims": [1] * 25}, "conv_block_dims: works with block_dims only"),
             ({"block_dims": [4] * 25, "conv_block_alphas": [1] * 25}, "conv_block_alphas: works with conv_block_dims only"),
             ({"block_dims": [4] * 24}, "block_dims: needs 25 values"),
             ({"block_dims": [4] * 24 + [-1]}, "cannot be negative"),
             ({"train_blocks": ["IN04", "OUT12"]}, "train_blocks: OUT12 is no block"),
             ({"block_dims": [0] * 25, "train_text_encoder": False}, "nothing to train")]
    for kwargs, message in cases:
        with pytest.raises(NetworkConfigError, match=message):
            make_network(unet, text, device="cpu", **kwargs)


def test_train_blocks_give_exactly_the_layers_of_the_chosen_blocks(sd15):
    unet, text = sd15
    table = name_table(unet, text)
    chosen = {"IN04", "M00", "OUT11"}
    network = make_network(unet, text, conv_dim=4, train_blocks=chosen, device="cpu")
    assert {table[n].block for n in network.module_names()} == chosen  # no BASE: no text-encoder module
    expected = make_network(unet, None, conv_dim=4, device="cpu").module_names()
    assert network.module_names() == [n for n in expected if table[n].block in chosen]
    with_text = make_network(unet, text, train_blocks={"BASE", "IN04"}, device="cpu").module_names()
    assert sum(n.startswith("lora_te_") for n in with_text) == 72 and {table[n].block for n in with_text} == {"BASE", "IN04"}


def test_cross_attention_only_keeps_the_unets_attn2_layers(sd15, sdxl_unet):
    unet, text = sd15
    network = make_network(unet, text, conv_dim=4, cross_attention_only=True, train_text_encoder=False, device="cpu")
    names = network.module_names()
    assert len(names) == 16 * 4 and all("_attn2_to_" in n for n in names)
    assert network.network_args()["cross_attention_only"] == "True"
    xl = make_network(sdxl_unet, None, cross_attention_only=True, train_blocks=["M00"], device="cpu").module_names()
    assert len(xl) == 10 * 4 and all(n.startswith("lora_unet_middle_block_1_") and "_attn2_" in n for n in xl)


def test_config_parses_checks_and_records_the_block_options():
    c = TrainConfig(block_dims=",".join(["4"] * 25), block_alphas=" 2, " * 24 + "2", train_blocks="base, in04 OUT11")
    assert c.block_values("block_dims") == (4,) * 25 and c.block_values("block_alphas") == (2.0,) * 25
    assert c.chosen_blocks == ("BASE", "IN04", "OUT11") and c.train_unet and c.train_text_encoder
    assert not TrainConfig(train_blocks="IN04").train_text_encoder and not TrainConfig(train_blocks="BASE").train_unet
    toml_lists = TrainConfig.from_dict({"block_dims": [4] * 25, "train_blocks": ["IN04", "OUT11"]})  # TOML arrays
    assert toml_lists.block_values("block_dims") == (4,) * 25 and toml_lists.chosen_blocks == ("IN04", "OUT11")
    for values, message in [({"block_alphas": "1," * 24 + "1"}, "block_alphas: works together with block_dims"),
                            ({"block_dims": "4," * 23 + "4"}, "block_dims: needs 25 values"),
                            ({"block_dims": "4," * 24 + "x"}, "not a comma-separated list"),
                            ({"block_dims": "4," * 24 + "4", "conv_block_dims": "4," * 24 + "4"}, "conv_block_dims: .* choose locon"),
                            ({"train_blocks": "IN04, MID"}, "train_blocks: MID is no block name"),
                            ({"train_blocks": "BASE", "network_train_unet_only": True}, "leaves nothing to train"),
                            ({"cross_attention_only": True, "train_blocks": "BASE"}, "cross_attention_only")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**values)
    check_for_arch(TrainConfig(block_dims="4," * 22 + "4"), "sdxl")
    with pytest.raises(ConfigError, match="block_dims: 23 values are for SDXL"):
        check_for_arch(TrainConfig(block_dims="4," * 22 + "4"), "sd1")
    with pytest.raises(ConfigError, match="SDXL has no IN09"):
        check_for_arch(TrainConfig(train_blocks="IN09"), "sdxl")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data"), concept="star", trigger="zkz", n_images=2, repeats=1, seed=0)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_training_with_chosen_blocks_and_ranks(arch, dataset, tmp_path):
    """A run with train_blocks and block_dims trains exactly those modules at those ranks, and the file says so."""
    path = tmp_path / "base.safetensors"
    save_checkpoint(random_tiny_checkpoint(1, arch), path)
    host = StandaloneHost.from_file(path, out_dir=tmp_path, device="cpu")
    count = 23 if arch == "sdxl" else 25
    dims = [2] * count
    mid = 11 if arch == "sdxl" else 12  # kohya's middle transformer block: SDXL MID01, SD1 MID
    dims[mid] = 6
    config = TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=2, max_train_steps=2, learning_rate=1e-3,
                         network_dim=4, output_name="blocks", train_blocks="M00,OUT01", block_dims=",".join(map(str, dims)),
                         network_train_unet_only=True, seed=3)
    result = train(config, host)
    lora = load_lora(result.final_path)
    table = name_table(host.unet, host.text_encoders)
    assert {table[n].block for n in lora.modules} == {"M00", "OUT01"}
    for name, module in lora.modules.items():
        assert module.rank == (6 if table[name].block == "M00" else 2), name
    args = lora.metadata["ss_network_args"]
    assert '"train_blocks": "M00,OUT01"' in args and f'"block_dims": "{",".join(map(str, dims))}"' in args
    assert result.last_loss is not None and result.last_loss == result.last_loss  # finite (the trainer stops on NaN)
