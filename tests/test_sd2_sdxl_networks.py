"""LoRA on SD2 and SDXL: kohya's names and module counts, OpenCLIP's fused q/k/v, training, files, application."""

import hashlib
import json

import pytest
import torch

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.demo.tiny import TINY_SDXL_TEXT_2, TINY_TEXT, random_tiny_checkpoint
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.models.architectures import SD2_TEXT, SD2_UNET, SD15_TEXT, SDXL_TEXT_2, SDXL_UNET
from lib_lora.models.checkpoint import save_checkpoint
from lib_lora.models.clip_text import TextEncoder
from lib_lora.models.open_clip_text import OpenClipTextEncoder
from lib_lora.models.pipeline import GenerationParams
from lib_lora.models.unet import UNetModel
from lib_lora.networks.apply import generate_with_loras
from lib_lora.networks.files import load_lora, save_lora
from lib_lora.networks.network import make_network
from lib_lora.networks.patcher import ActiveLora, LoraPatcher
from lib_lora.networks.targets import name_table, text_models_for, text_targets, unet_targets
from lib_lora.train.config import TrainConfig
from lib_lora.train.dataset import size_info
from lib_lora.data.images import FitPlan
from lib_lora.train.trainer import train


@pytest.fixture(scope="module")
def sdxl_meta():
    with torch.device("meta"):
        return UNetModel(SDXL_UNET), TextEncoder(SD15_TEXT), OpenClipTextEncoder(SDXL_TEXT_2)


@pytest.fixture(scope="module")
def sd2_meta():
    with torch.device("meta"):
        return UNetModel(SD2_UNET), OpenClipTextEncoder(SD2_TEXT)


def test_sdxl_module_counts_match_kohyas(sdxl_meta):
    """lora-format.md §3: 72 te1 + 192 te2 text modules, 722 UNet modules for LoRA, 788 with LoCon."""
    unet, te1, te2 = sdxl_meta
    text = [t.name for t in text_targets(text_models_for("sdxl", te1, te2))]
    assert sum(n.startswith("lora_te1_") for n in text) == 72 and sum(n.startswith("lora_te2_") for n in text) == 192
    assert len(unet_targets(unet, include_conv=False)) == 722
    assert len(unet_targets(unet, include_conv=True)) == 788


def test_sd2_module_counts_match_kohyas(sd2_meta):
    """138 text modules: 23 layers x 6, the 24th (unused by the penultimate-layer conditioning) left out."""
    unet, te = sd2_meta
    text = [t.name for t in text_targets(text_models_for("sd2", te))]
    assert len(text) == 138 and not any("_layers_23_" in n for n in text)
    assert "lora_te_text_model_encoder_layers_22_self_attn_q_proj" in text
    assert len(unet_targets(unet, include_conv=False)) == 192 and len(unet_targets(unet, include_conv=True)) == 278


SDXL_NAMES = [  # (kohya name as lora-format.md §5.2 gives it, ldm path, host layer shape)
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q", (640, 640)),
    ("lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k", "input_blocks.7.1.transformer_blocks.9.attn2.to_k", (1280, 2048)),
    ("lora_unet_middle_block_1_proj_out", "middle_block.1.proj_out", (1280, 1280)),
    ("lora_unet_input_blocks_1_0_emb_layers_1", "input_blocks.1.0.emb_layers.1", (320, 1280)),
    ("lora_unet_input_blocks_3_0_op", "input_blocks.3.0.op", (320, 320, 3, 3)),
    ("lora_unet_output_blocks_2_2_conv", "output_blocks.2.2.conv", (1280, 1280, 3, 3)),
    ("lora_unet_output_blocks_8_0_skip_connection", "output_blocks.8.0.skip_connection", (320, 640, 1, 1)),
    ("lora_te1_text_model_encoder_layers_11_mlp_fc2", "transformer.text_model.encoder.layers.11.mlp.fc2", (768, 3072)),
    ("lora_te2_text_model_encoder_layers_31_self_attn_v_proj", "model.transformer.resblocks.31.attn.v_proj", (1280, 1280)),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "model.transformer.resblocks.0.mlp.c_fc", (5120, 1280)),
]


@pytest.mark.parametrize("name, path, shape", SDXL_NAMES, ids=[n for n, _, _ in SDXL_NAMES])
def test_sdxl_targets_carry_kohyas_ldm_style_names(sdxl_meta, name, path, shape):
    unet, te1, te2 = sdxl_meta
    targets = {t.name: t for t in [*unet_targets(unet, True), *text_targets(text_models_for("sdxl", te1, te2))]}
    assert targets[name].path == path and tuple(targets[name].layer.weight.shape) == shape


def test_diffusers_named_sdxl_files_resolve_to_the_same_layers(sdxl_meta):
    """OneTrainer and diffusers-converted SDXL files use diffusers block names; they must land where kohya's do."""
    unet, te1, te2 = sdxl_meta
    table = name_table(unet, text_models_for("sdxl", te1, te2))
    pairs = [("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
             ("down_blocks_0_resnets_1_conv2", "input_blocks_2_0_out_layers_3"),
             ("up_blocks_0_upsamplers_0_conv", "output_blocks_2_2_conv"),
             ("mid_block_attentions_0_proj_in", "middle_block_1_proj_in")]
    for diffusers, ldm in pairs:
        assert table["lora_unet_" + diffusers].layer is table["lora_unet_" + ldm].layer
        assert table["lora_unet_" + diffusers].name == "lora_unet_" + ldm


def test_sdxl_and_sd2_proj_in_tensors_are_two_dimensional():
    ckpt = random_tiny_checkpoint(0, "sdxl")
    network = make_network(ckpt.unet, None, network_dim=2)
    state = network.state_dict()
    assert state["lora_unet_middle_block_1_proj_in.lora_down.weight"].dim() == 2


@pytest.mark.parametrize("mode", ["merge", "onthefly"])
def test_open_clip_qkv_adapters_merge_into_the_fused_projection_and_restore(mode):
    """A te2 LoRA on q/k/v: hooking the slices and merging into in_proj_weight give the same encoder output."""
    ckpt = random_tiny_checkpoint(1, "sdxl")
    models = text_models_for("sdxl", ckpt.text_encoder, ckpt.text_encoder_2)
    network = make_network(None, models, network_dim=2, network_alpha=2)
    for module in network.adapters():
        torch.nn.init.normal_(module.lora_up.weight, std=0.5)
    tokens = torch.randint(0, 49407, (1, 77))
    before = ckpt.text_encoder_2(tokens, final_norm=False, pooled=True)
    original = ckpt.text_encoder_2.model.transformer.resblocks[0].attn.in_proj_weight.clone()
    with torch.no_grad(), network:
        hooked = ckpt.text_encoder_2(tokens, final_norm=False, pooled=True)
    lora = load_lora_from(network)
    with torch.no_grad(), LoraPatcher(None, models, mode) as patcher:
        patcher.apply([ActiveLora(lora)])
        patched = ckpt.text_encoder_2(tokens, final_norm=False, pooled=True)
    for a, b, c in zip(hooked, patched, before):
        assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-3)
    assert torch.equal(ckpt.text_encoder_2.model.transformer.resblocks[0].attn.in_proj_weight, original)


def load_lora_from(network):
    from lib_lora.networks.files import lora_from_state_dict

    return lora_from_state_dict({k: v.detach() for k, v in network.state_dict().items()})


def test_size_info_is_original_crop_and_bucket_with_flips_mirrored():
    plan = FitPlan(resized_size=(640, 512), crop_box=(64, 0, 576, 512))
    assert size_info((1280, 1024), plan, flip=False) == [1024, 1280, 0, 64, 512, 512]
    assert size_info((1280, 1024), plan, flip=True) == [1024, 1280, 0, 640 - 576, 512, 512]
    off_centre = FitPlan(resized_size=(640, 512), crop_box=(100, 0, 612, 512))
    assert size_info((1280, 1024), off_centre, flip=True)[3] == 640 - 612


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data"), concept="star", trigger="zkz", n_images=4, repeats=2, seed=0)


@pytest.mark.parametrize("arch, version, architecture, card", [
    ("sd2", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "SD2"),
    ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "SDXL"),
])
def test_training_saves_a_file_the_webui_files_under_its_model_and_that_applies(arch, version, architecture, card, dataset, tmp_path):
    path = tmp_path / f"{arch}.safetensors"
    save_checkpoint(random_tiny_checkpoint(4, arch), path)
    host = StandaloneHost.from_file(path, out_dir=tmp_path, device="cpu")
    losses = []
    config = TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=2, max_train_epochs=2, learning_rate=2e-3,
                         network_dim=4, network_alpha=4.0, output_name="t", seed=7, text_encoder_lr=1e-3)
    result = train(config, host, on_event=lambda e: e.kind == "step" and losses.append(e.loss))
    assert result.steps == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    lora = load_lora(result.final_path)
    meta = lora.metadata
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == architecture
    assert meta["ss_v2"] == str(arch == "sd2")
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as f:
        f.seek(0x100000)
        assert meta["ss_sd_model_hash"] == hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    assert int(meta["ss_session_id"]) >= 0 and meta["ss_loss_type"] == "l2"
    assert json.loads((host.lora_dir / "t.json").read_text())["sd version"] == card
    prefixes = {name.split("_text_model")[0] for name in lora.modules if "_text_model" in name}
    assert prefixes == ({"lora_te1", "lora_te2"} if arch == "sdxl" else {"lora_te"})
    params = GenerationParams("a zkz star", width=64, height=64, steps=4, seed=1)
    base = generate_with_loras(host.ckpt, params)[0].tobytes()
    with_lora = generate_with_loras(host.ckpt, params.__class__(**{**params.__dict__, "prompt": "a zkz star <lora:t:1>"}), [host.lora_dir])[0]
    zero = generate_with_loras(host.ckpt, params.__class__(**{**params.__dict__, "prompt": "a zkz star <lora:t:0>"}), [host.lora_dir])[0]
    assert with_lora.tobytes() != base and zero.tobytes() == base


def test_sdxl_text_encoders_take_their_own_learning_rates(dataset, tmp_path):
    from lib_lora.train import trainer

    path = tmp_path / "xl.safetensors"
    save_checkpoint(random_tiny_checkpoint(4, "sdxl"), path)
    host = StandaloneHost.from_file(path, out_dir=tmp_path, device="cpu")
    seen, original = {}, trainer._make_optimizer

    def spy(config, network, host):
        opt = original(config, network, host)
        seen.update({g["name"]: (g["lr"], len(g["params"])) for g in opt.param_groups})
        return opt

    trainer._make_optimizer = spy
    try:
        train(TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=8, max_train_steps=1, network_dim=2,
                          output_name="lr", unet_lr=1e-4, text_encoder_lr=2e-5, text_encoder_2_lr=3e-5), host)
    finally:
        trainer._make_optimizer = original
    assert seen["unet"][0] == 1e-4 and seen["text_encoder"][0] == 2e-5 and seen["text_encoder_2"][0] == 3e-5
    per_layer = 6 * 2  # q, k, v, out, fc1, fc2; down and up each
    assert seen["text_encoder"][1] == TINY_TEXT.layers * per_layer and seen["text_encoder_2"][1] == TINY_SDXL_TEXT_2.layers * per_layer


def test_resuming_a_run_on_another_architecture_is_refused(dataset, tmp_path):
    from lib_lora.train.config import ConfigError

    paths = {}
    for arch in ("sd1", "sdxl"):
        paths[arch] = tmp_path / f"{arch}.safetensors"
        save_checkpoint(random_tiny_checkpoint(4, arch), paths[arch])
    config = TrainConfig(train_data_dir=str(dataset), resolution=(64, 64), train_batch_size=8, max_train_steps=1, max_train_epochs=2,
                         network_dim=2, output_name="r")
    host = StandaloneHost.from_file(paths["sd1"], out_dir=tmp_path, device="cpu")
    result = train(config.replace(max_train_steps=0), host)
    other = StandaloneHost.from_file(paths["sdxl"], out_dir=tmp_path, device="cpu")
    with pytest.raises(ConfigError, match=r"was trained on an SD1 model and the loaded model is SDXL"):
        train(config, other, run_dir=result.run_dir, resume=True)


def test_sdxl_block_weights_take_lora_block_weights_sdxl_layouts(tmp_path):
    """12 values (BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05): BASE alone is the text encoders alone."""
    from lib_lora.networks.prompt import BLOCK_IDS_26, parse_block_weights

    weights = dict(zip(BLOCK_IDS_26, parse_block_weights("1,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.1,1.2")))
    assert (weights["BASE"], weights["IN04"], weights["IN08"], weights["M00"], weights["OUT00"], weights["OUT05"]) == (1, 0.1, 0.4, 0.5, 0.6, 1.2)
    assert weights["IN01"] == weights["OUT06"] == 0
    twenty = dict(zip(BLOCK_IDS_26, parse_block_weights(",".join(str(i) for i in range(20)))))
    assert twenty["IN08"] == 9 and twenty["M00"] == 10 and twenty["OUT08"] == 19

    ckpt = random_tiny_checkpoint(6, "sdxl")
    network = make_network(ckpt.unet, text_models_for("sdxl", ckpt.text_encoder, ckpt.text_encoder_2), network_dim=2, network_alpha=2)
    for module in network.adapters():
        torch.nn.init.normal_(module.lora_up.weight, std=0.3)
    save_lora(tmp_path / "xl.safetensors", network.state_dict(), {}, save_dtype=torch.float32)
    params = GenerationParams("a red circle", width=64, height=64, steps=3, seed=2)

    def image(tags):
        return generate_with_loras(ckpt, GenerationParams(**{**params.__dict__, "prompt": "a red circle " + tags}), [tmp_path])[0].tobytes()

    assert image("<lora:xl:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0>") == image("<lora:xl:1:0>") != image("<lora:xl:1>")


def test_a_diffusers_peft_sdxl_file_applies_like_the_same_kohya_file(tmp_path):
    """diffusers writes `unet.<diffusers path>.lora_A.weight`, `text_encoder_2.<HF path>.lora_B.weight` and
    keeps alpha in its adapter metadata; it must patch the same layers with the same deltas."""
    ckpt = random_tiny_checkpoint(7, "sdxl")
    models = text_models_for("sdxl", ckpt.text_encoder, ckpt.text_encoder_2)
    table = name_table(ckpt.unet, models)
    network = make_network(ckpt.unet, models, network_dim=2, network_alpha=1)
    for module in network.adapters():
        torch.nn.init.normal_(module.lora_up.weight, std=0.3)
    kohya = {k: v.detach() for k, v in network.state_dict().items()}
    save_lora(tmp_path / "kohya.safetensors", kohya, {}, save_dtype=torch.float32)
    peft = {}
    for module in network.adapters():
        target = table[module.lora_name]
        if target.component == "unet":
            from lib_lora.networks.naming import ldm_to_diffusers

            key = "unet." + ldm_to_diffusers(target.path, 2)
        else:
            from lib_lora.networks.naming import text_model_path

            key = ("text_encoder_2." if module.lora_name.startswith("lora_te2_") else "text_encoder.") + text_model_path(target.path)
        peft[key + ".lora_A.weight"] = module.lora_down.weight.detach()
        peft[key + ".lora_B.weight"] = module.lora_up.weight.detach()
    from safetensors.torch import save_file

    save_file(peft, str(tmp_path / "peft.safetensors"), metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 1, "r": 2})})
    assert len(load_lora(tmp_path / "peft.safetensors").modules) == len(network.module_names())
    params = GenerationParams("a red circle", width=64, height=64, steps=3, seed=2)
    images = [generate_with_loras(ckpt, GenerationParams(**{**params.__dict__, "prompt": f"a red circle <lora:{n}:1>"}), [tmp_path])[0]
              for n in ("kohya", "peft")]
    assert images[0].tobytes() == images[1].tobytes()
