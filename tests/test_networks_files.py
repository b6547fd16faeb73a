"""LoRA files: save precision, metadata and hashes, atomic no-overwrite, the webui card, loading and malformed files."""

import hashlib
import json
import struct

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.networks.errors import LoraFormatError
from lib_lora.networks.files import load_lora, save_lora, write_card
from lib_lora.networks.lora import LoRAModule
from lib_lora.networks.metadata import training_metadata
from lib_lora.networks.network import make_network
from lib_lora.networks.targets import name_table
from test_networks_helpers import one_thread  # noqa: F401 (fixture)

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def trained():
    ckpt = random_tiny_checkpoint(seed=4)
    network = make_network(ckpt.unet, ckpt.text_encoder, network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return network


def metadata(**overrides):
    fields = dict(output_name="mychar", network_dim=4, network_alpha=2.0, network_args={"conv_dim": "2", "conv_alpha": "1"},
                  sd_model_name="tiny-sd.safetensors", resolution=(64, 64), num_train_images=25, num_epochs=3,
                  learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=None, tag_frequency={"10_mychar": {"mychar": 25, "smile": 9}},
                  training_comment="trigger: mychar", clip_skip=2, steps=120, epoch=3, seed=42, training_started_at=1700000000.0,
                  training_finished_at=1700000600.0, optimizer="AdamW")
    return training_metadata(**(fields | overrides))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 0.0), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_save_load_round_trip(trained, tmp_path, dtype, tolerance):
    path = save_lora(tmp_path / "a.safetensors", trained.state_dict(), metadata(), save_dtype=dtype)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}  # alpha included (kohya --save_precision)
        assert set(f.keys()) == set(trained.state_dict())
        assert f.get_tensor(f"{Q}.alpha").shape == ()
    lora = load_lora(path)
    assert set(lora.modules) == set(trained.module_names()) and lora.alias == "mychar"
    for name, module in lora.modules.items():
        original = trained.get_submodule(name)
        shape = original.host.weight.shape
        delta, expected = module.delta_weight(shape), original.delta_weight(shape)
        assert (delta - expected).abs().max() <= tolerance * max(expected.abs().max().item(), 1.0)


def test_metadata_is_kohya_shaped(trained, tmp_path):
    path = save_lora(tmp_path / "a.safetensors", trained.state_dict(), metadata())
    meta = load_lora(path).metadata
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_sd_model_name"] == "tiny-sd.safetensors" and meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_num_train_images"] == "25" and meta["ss_num_epochs"] == "3"
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_text_encoder_lr"] == "None"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_mychar": {"mychar": 25, "smile": 9}}
    assert meta["ss_output_name"] == "mychar" and meta["ss_training_comment"] == "trigger: mychar"
    assert meta["ss_optimizer"] == "AdamW" and meta["ss_clip_skip"] == "2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.title"] == "mychar"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.date"].startswith("2023-11-")


def test_sshs_hashes_follow_the_spec(trained, tmp_path):
    path = save_lora(tmp_path / "a.safetensors", trained.state_dict(), metadata())
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    meta = load_lora(path).metadata
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header_len :]).hexdigest()  # the webui's addnet hash
    assert len(meta["sshs_legacy_hash"]) == 8
    other = save_lora(tmp_path / "b.safetensors", trained.state_dict(), metadata(training_comment="different"))
    assert load_lora(other).metadata["sshs_model_hash"] == meta["sshs_model_hash"]  # metadata does not change it


def test_refuses_to_overwrite(trained, tmp_path):
    path = save_lora(tmp_path / "a.safetensors", trained.state_dict(), {})
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=str(path)):
        save_lora(path, {k: v * 2 for k, v in trained.state_dict().items()}, {})
    assert path.read_bytes() == before
    save_lora(path, {k: v * 2 for k, v in trained.state_dict().items()}, {}, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


def test_rejects_non_string_metadata_and_foreign_keys(trained, tmp_path):
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_lora(tmp_path / "a.safetensors", trained.state_dict(), {"ss_network_dim": 4})
    with pytest.raises(LoraFormatError, match="text_projection"):
        save_lora(tmp_path / "a.safetensors", {"text_projection.weight": torch.zeros(2, 2)}, {})
    assert not list(tmp_path.iterdir())


def test_write_card(tmp_path):
    preview = Image.new("RGB", (64, 64), "red")
    json_path, preview_path = write_card(tmp_path / "mychar.safetensors", activation_text="mychar, smile",
                                         preferred_weight=0.8, sd_version="SD1", preview=preview, notes="trained on 25 images")
    assert json_path.name == "mychar.json" and preview_path.name == "mychar.preview.png"
    card = json.loads(json_path.read_text())
    assert card == {"description": "", "sd version": "SD1", "activation text": "mychar, smile", "preferred weight": 0.8,
                    "negative text": "", "notes": "trained on 25 images"}
    assert Image.open(preview_path).size == (64, 64)
    with pytest.raises(ValueError, match="sd_version"):
        write_card(tmp_path / "x", sd_version="sd1")


def kohya_by_hand(ckpt) -> dict[str, torch.Tensor]:
    """A kohya LoCon file's tensors written out by hand (not by our saver): q of a transformer, a 3×3 conv, TE fc1."""
    g = torch.Generator().manual_seed(9)
    table = name_table(ckpt.unet, ckpt.text_encoder)
    unet_q = table[Q].layer  # [64, 64]
    conv = table["lora_unet_up_blocks_0_upsamplers_0_conv"].layer  # [128, 128, 3, 3]
    fc1 = table["lora_te_text_model_encoder_layers_1_mlp_fc1"].layer  # [512, 128]
    return {
        f"{Q}.lora_down.weight": torch.randn(8, unet_q.in_features, generator=g).half(),
        f"{Q}.lora_up.weight": torch.randn(unet_q.out_features, 8, generator=g).half(),
        f"{Q}.alpha": torch.tensor(4.0).half(),
        "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight": torch.randn(4, 128, 3, 3, generator=g).half(),
        "lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight": torch.randn(conv.out_channels, 4, 1, 1, generator=g).half(),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": torch.randn(8, 128, generator=g),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": torch.randn(fc1.out_features, 8, generator=g),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha": torch.tensor(8.0),
    }


def test_hand_written_kohya_file_loads(tmp_path):
    ckpt = random_tiny_checkpoint(seed=4)
    path = tmp_path / "kohya.safetensors"
    tensors = kohya_by_hand(ckpt)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    lora = load_lora(path)
    assert set(lora.modules) == {k.split(".")[0] for k in tensors}
    conv = lora.modules["lora_unet_up_blocks_0_upsamplers_0_conv"]
    assert isinstance(conv, LoRAModule) and conv.alpha_value is None and conv.scale == 1.0  # no alpha: scale 1
    q = lora.modules[Q]
    expected = tensors[f"{Q}.lora_up.weight"].float() @ tensors[f"{Q}.lora_down.weight"].float() * 4.0 / 8
    torch.testing.assert_close(q.delta_weight((64, 64)), expected)


def _good():
    return {f"{Q}.lora_down.weight": torch.randn(4, 64), f"{Q}.lora_up.weight": torch.randn(64, 4), f"{Q}.alpha": torch.tensor(1.0)}


MALFORMED = [
    ("rank differs between up and down", {f"{Q}.lora_up.weight": torch.randn(64, 3)}, f"{Q}.lora_up.weight"),
    ("bad shape", {f"{Q}.lora_down.weight": torch.randn(4, 64, 3)}, f"{Q}.lora_down.weight"),
    ("up with a kernel", {f"{Q}.lora_up.weight": torch.randn(64, 4, 3, 3)}, f"{Q}.lora_up.weight"),
    ("alpha not a scalar", {f"{Q}.alpha": torch.ones(4)}, f"{Q}.alpha"),
    ("NaN", {f"{Q}.lora_down.weight": torch.full((4, 64), float("nan"))}, f"{Q}.lora_down.weight"),
    ("infinity", {f"{Q}.lora_up.weight": torch.full((64, 4), float("inf"))}, f"{Q}.lora_up.weight"),
    ("unknown param", {f"{Q}.lora_side.weight": torch.randn(4)}, f"{Q}.lora_side.weight"),
    ("DoRA magnitude neither [out, 1] nor [1, in]", {f"{Q}.dora_scale": torch.rand(64, 64)}, f"{Q}.dora_scale"),
    ("DoRA magnitude with a kernel", {f"{Q}.dora_scale": torch.rand(1, 64, 3, 3)}, f"{Q}.dora_scale"),
    ("unknown module type", {"lora_unet_x.w_norm": torch.randn(4), "lora_unet_x.b_norm": torch.randn(4)}, "lora_unet_x.b_norm"),
    ("no param part", {"lora_unet_x": torch.randn(4)}, "lora_unet_x"),
    ("unknown prefix", {"oft_unet_x.oft_blocks": torch.randn(2, 4, 4)}, "oft_unet_x"),
    ("bundled embedding the webui cannot read", {"bundle_emb.mychar.t5": torch.randn(2, 768)}, "bundle_emb.mychar.t5"),
    ("unknown encoder prefix", {"lora_te3_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, "lora_te3_text_model"),
    ("LoHa rank mismatch", {"lora_unet_h.hada_w1_a": torch.randn(8, 2), "lora_unet_h.hada_w1_b": torch.randn(3, 8),
                            "lora_unet_h.hada_w2_a": torch.randn(8, 2), "lora_unet_h.hada_w2_b": torch.randn(2, 8)},
     "lora_unet_h.hada_w1_a"),
    ("LoKr with both forms", {"lora_unet_k.lokr_w1": torch.randn(2, 2), "lora_unet_k.lokr_w1_a": torch.randn(2, 1),
                              "lora_unet_k.lokr_w2": torch.randn(2, 2)}, "lora_unet_k.lokr_w1_a"),
]


@pytest.mark.parametrize("what, change, key", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_name_the_key(tmp_path, what, change, key):
    path = tmp_path / "bad.safetensors"
    save_file(_good() | change, str(path))
    with pytest.raises(LoraFormatError, match=key.replace("*", r"\*")) as e:
        load_lora(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("cut", [4, 20, 200])
def test_truncated_file(tmp_path, cut):
    path = tmp_path / "cut.safetensors"
    save_file(_good(), str(path))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(LoraFormatError, match="cut.safetensors.*truncated"):
        load_lora(path)


def test_saved_files_get_the_permissions_a_plain_write_gives(tmp_path):
    """safetensors >= 0.6 creates its files 0600; a LoRA, a checkpoint and a cached latent must be readable
    by whoever could read a file the user wrote (the webui may run as another user)."""
    import os

    from lib_lora.data.cache import LatentCache
    from lib_lora.demo.tiny import random_tiny_checkpoint
    from lib_lora.models.checkpoint import save_checkpoint
    from lib_lora.atomic import plain_file_mode

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    lora = save_lora(tmp_path / "a.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, {})
    save_checkpoint(random_tiny_checkpoint(0), tmp_path / "c.safetensors")
    cache = LatentCache(tmp_path / "latents")
    cache.put("k" * 40, torch.zeros(4, 2, 2))
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in (plain, lora, tmp_path / "c.safetensors", cache.path_for("k" * 40))}
    assert set(modes.values()) == {plain_file_mode()} == {os.stat(plain).st_mode & 0o777}, modes
    assert not list(tmp_path.glob(".*.tmp"))
