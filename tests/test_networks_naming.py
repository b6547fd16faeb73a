"""kohya names from ldm paths: a table over every SD1.5 UNet block, the text encoder, and lora-format.md's key list."""

import pytest
import torch

from lib_lora.models.clip_text import TextEncoder
from lib_lora.models.architectures import SD15_TEXT, SD15_UNET
from lib_lora.models.unet import UNetModel
from lib_lora.networks.errors import NamingError
from lib_lora.networks.naming import block_id, ldm_to_diffusers, text_module_name, unet_module_name
from lib_lora.networks.targets import name_table, text_targets, unet_targets
from test_networks_helpers import one_thread  # noqa: F401 (fixture)

# (LBW block, ldm path, diffusers path): every block of SD1.5, each kind of layer it holds at least once.
SD15_TABLE = [
    ("IN00", "input_blocks.0.0", "conv_in"),
    ("IN01", "input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("IN01", "input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
    ("IN02", "input_blocks.2.0.out_layers.3", "down_blocks.0.resnets.1.conv2"),
    ("IN02", "input_blocks.2.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"),
    ("IN03", "input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("IN04", "input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("IN04", "input_blocks.4.1.transformer_blocks.0.attn2.to_k", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("IN05", "input_blocks.5.0.emb_layers.1", "down_blocks.1.resnets.1.time_emb_proj"),
    ("IN05", "input_blocks.5.1.proj_out", "down_blocks.1.attentions.1.proj_out"),
    ("IN06", "input_blocks.6.0.op", "down_blocks.1.downsamplers.0.conv"),
    ("IN07", "input_blocks.7.0.skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),
    ("IN07", "input_blocks.7.1.transformer_blocks.0.ff.net.0.proj", "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("IN08", "input_blocks.8.0.in_layers.2", "down_blocks.2.resnets.1.conv1"),
    ("IN08", "input_blocks.8.1.transformer_blocks.0.ff.net.2", "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2"),
    ("IN09", "input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
    ("IN10", "input_blocks.10.0.in_layers.2", "down_blocks.3.resnets.0.conv1"),
    ("IN11", "input_blocks.11.0.out_layers.3", "down_blocks.3.resnets.1.conv2"),
    ("M00", "middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
    ("M00", "middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
    ("M00", "middle_block.1.transformer_blocks.0.attn2.to_out.0", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("M00", "middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
    ("OUT00", "output_blocks.0.0.skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
    ("OUT01", "output_blocks.1.0.in_layers.2", "up_blocks.0.resnets.1.conv1"),
    ("OUT02", "output_blocks.2.0.out_layers.3", "up_blocks.0.resnets.2.conv2"),
    ("OUT02", "output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("OUT03", "output_blocks.3.0.emb_layers.1", "up_blocks.1.resnets.0.time_emb_proj"),
    ("OUT03", "output_blocks.3.1.proj_in", "up_blocks.1.attentions.0.proj_in"),
    ("OUT04", "output_blocks.4.1.transformer_blocks.0.attn1.to_out.0", "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("OUT05", "output_blocks.5.1.proj_out", "up_blocks.1.attentions.2.proj_out"),
    ("OUT05", "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("OUT06", "output_blocks.6.0.skip_connection", "up_blocks.2.resnets.0.conv_shortcut"),
    ("OUT06", "output_blocks.6.1.transformer_blocks.0.attn2.to_v", "up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v"),
    ("OUT07", "output_blocks.7.1.transformer_blocks.0.ff.net.0.proj", "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj"),
    ("OUT08", "output_blocks.8.1.proj_in", "up_blocks.2.attentions.2.proj_in"),
    ("OUT08", "output_blocks.8.2.conv", "up_blocks.2.upsamplers.0.conv"),
    ("OUT09", "output_blocks.9.0.in_layers.2", "up_blocks.3.resnets.0.conv1"),
    ("OUT09", "output_blocks.9.1.transformer_blocks.0.attn1.to_k", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("OUT10", "output_blocks.10.1.proj_out", "up_blocks.3.attentions.1.proj_out"),
    ("OUT11", "output_blocks.11.0.skip_connection", "up_blocks.3.resnets.2.conv_shortcut"),
    ("OUT11", "output_blocks.11.1.transformer_blocks.0.ff.net.2", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
    (None, "time_embed.0", "time_embedding.linear_1"),
    (None, "time_embed.2", "time_embedding.linear_2"),
    (None, "out.2", "conv_out"),
]


@pytest.fixture(scope="module")
def sd15_meta():
    """Full-size SD1.5 UNet and text encoder on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return UNetModel(SD15_UNET), TextEncoder(SD15_TEXT)


@pytest.mark.parametrize("block, ldm, diffusers", SD15_TABLE)
def test_ldm_to_diffusers_table(block, ldm, diffusers):
    assert ldm_to_diffusers(ldm) == diffusers
    assert unet_module_name(ldm) == "lora_unet_" + diffusers.replace(".", "_")
    assert block_id(ldm) == block
    assert ldm_to_diffusers("model.diffusion_model." + ldm) == diffusers  # the webui's path from sd_model


def test_table_covers_every_sd15_block():
    blocks = {b for b, _, _ in SD15_TABLE if b}
    assert blocks == {f"IN{i:02d}" for i in range(12)} | {"M00"} | {f"OUT{i:02d}" for i in range(12)}


def test_every_sd15_layer_has_a_unique_name(sd15_meta):
    unet, _ = sd15_meta
    paths = [p for p, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    names = [unet_module_name(p) for p in paths]
    assert len(set(names)) == len(paths) == 282  # 278 LoCon targets + time_embed.0/2, conv_in, conv_out


def test_text_names_from_any_wrapper():
    for prefix in ("transformer.", "cond_stage_model.wrapped.transformer.", ""):
        path = prefix + "text_model.encoder.layers.3.self_attn.q_proj"
        assert text_module_name(path) == "lora_te_text_model_encoder_layers_3_self_attn_q_proj"


@pytest.mark.parametrize("bad", ["input_blocks.1.0.in_layers.1", "middle_block.0.foo", "diffusion_model.label_emb.0", "conv_in"])
def test_unknown_unet_paths_raise(bad):
    with pytest.raises(NamingError, match="input_blocks|ResBlock"):
        ldm_to_diffusers(bad)


def test_text_path_without_text_model_raises():
    with pytest.raises(NamingError, match="text_model"):
        text_module_name("encoder.layers.0.mlp.fc1")


def _spec_unet_names(with_conv: bool) -> set[str]:
    """The UNet key list of lora-format.md §5.1, enumerated from its description of the diffusers tree."""
    attn = ["proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"]
    attn += [f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    blocks = []  # (prefix, n_resnets, n_attentions, sampler, resnets with a shortcut)
    for i in range(4):
        blocks.append((f"down_blocks.{i}", 2, 2 if i < 3 else 0, "downsamplers.0.conv" if i < 3 else None, {0} if i in (1, 2) else set()))
        blocks.append((f"up_blocks.{i}", 3, 3 if i > 0 else 0, "upsamplers.0.conv" if i < 3 else None, {0, 1, 2}))
    names = {f"mid_block.attentions.0.{a}" for a in attn}
    if with_conv:
        names |= {f"mid_block.resnets.{j}.{c}" for j in (0, 1) for c in ("conv1", "conv2", "time_emb_proj")}
    for prefix, n_res, n_attn, sampler, shortcuts in blocks:
        names |= {f"{prefix}.attentions.{j}.{a}" for j in range(n_attn) for a in attn}
        if with_conv:
            names |= {f"{prefix}.resnets.{j}.{c}" for j in range(n_res) for c in ("conv1", "conv2", "time_emb_proj")}
            names |= {f"{prefix}.resnets.{j}.conv_shortcut" for j in shortcuts}
            names |= {f"{prefix}.{sampler}"} if sampler else set()
    return {"lora_unet_" + n.replace(".", "_") for n in names}


def test_sd15_targets_reproduce_the_spec_key_list(sd15_meta):
    unet, text = sd15_meta
    te = text_targets(text)
    lierla, locon = unet_targets(unet, include_conv=False), unet_targets(unet, include_conv=True)
    assert (len(te), len(lierla), len(locon)) == (72, 192, 278)  # lora-format.md §3 module counts
    assert {t.name for t in lierla} == _spec_unet_names(with_conv=False)
    assert {t.name for t in locon} == _spec_unet_names(with_conv=True)
    expected_te = {f"lora_te_text_model_encoder_layers_{n}_{s}" for n in range(12)
                   for s in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
    assert {t.name for t in te} == expected_te
    kinds = {t.name: t.kind for t in locon}
    assert kinds["lora_unet_mid_block_attentions_0_proj_in"] == "conv1x1"  # SD1: 4-D LoRA tensors
    assert kinds["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == "conv1x1"
    assert kinds["lora_unet_up_blocks_0_upsamplers_0_conv"] == "conv"
    assert kinds["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == "linear"
    assert sum(k == "conv" for k in kinds.values()) == 50


def test_name_table_accepts_both_unet_styles_and_te1(sd15_meta):
    unet, text = sd15_meta
    table = name_table(unet, text)
    diffusers = table["lora_unet_up_blocks_0_upsamplers_0_conv"]
    assert table["lora_unet_output_blocks_2_1_conv"] is diffusers and diffusers.path == "output_blocks.2.1.conv"
    te = table["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert table["lora_te1_text_model_encoder_layers_0_mlp_fc1"] is te
    assert table["lora_unet_conv_in"].block == "IN00" and te.block == "BASE"
