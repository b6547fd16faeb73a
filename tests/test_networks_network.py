"""LoraNetwork on the tiny SD1-layout model, and kohya's counts, shapes and file size on a meta SD1.5."""

import pytest
import torch
from safetensors.torch import load_file

from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.models.clip_text import TextEncoder
from lib_lora.models.architectures import SD15_TEXT, SD15_UNET
from lib_lora.models.unet import UNetModel
from lib_lora.networks.errors import NetworkConfigError
from lib_lora.networks.files import load_lora, save_lora
from lib_lora.networks.network import make_network
from test_networks_helpers import one_thread  # noqa: F401 (fixture)


@pytest.fixture
def tiny():
    ckpt = random_tiny_checkpoint(seed=3)
    ckpt.unet.requires_grad_(False)
    ckpt.text_encoder.requires_grad_(False)
    return ckpt


def unet_inputs(ckpt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, ckpt.unet.config.context_dim, generator=g)
    return x, torch.tensor([10.0, 500.0]), context


def tokens(ckpt):
    return torch.randint(0, 49408, (2, 1, 77), generator=torch.Generator().manual_seed(5))


def outputs(ckpt):
    with torch.no_grad():
        return ckpt.unet(*unet_inputs(ckpt)), ckpt.text_encoder(tokens(ckpt))


def perturb(network, seed=7):
    """As if trained: every up non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("conv_dim", [None, 4])
def test_untrained_network_leaves_outputs_identical(tiny, conv_dim):
    before = outputs(tiny)
    network = make_network(tiny.unet, tiny.text_encoder, network_dim=8, network_alpha=4, conv_dim=conv_dim)
    with network:
        after = outputs(tiny)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_state_dict_is_the_kohya_file(tiny):
    network = make_network(tiny.unet, tiny.text_encoder, network_dim=8, network_alpha=4, conv_dim=2, conv_alpha=1)
    sd = network.state_dict()
    names = network.module_names()
    assert set(sd) == {f"{n}.{k}" for n in names for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (8, 128)
    assert sd["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].shape == (8, 64, 1, 1)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0
    assert sd["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"].item() == 4.0
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert network.network_args() == {"conv_dim": "2", "conv_alpha": "1"}


def test_remove_restores_the_hosts_exactly(tiny):
    before = outputs(tiny)
    keys = list(tiny.unet.state_dict()) + list(tiny.text_encoder.state_dict())
    network = make_network(tiny.unet, tiny.text_encoder, conv_dim=4)
    perturb(network)
    with network:
        changed = outputs(tiny)
    assert not torch.allclose(changed[0], before[0]) and not torch.allclose(changed[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(outputs(tiny), before))
    assert list(tiny.unet.state_dict()) + list(tiny.text_encoder.state_dict()) == keys
    assert not any(m._forward_hooks for m in [*tiny.unet.modules(), *tiny.text_encoder.modules()])


@pytest.mark.parametrize("train_unet, train_te", [(True, False), (False, True)])
def test_unet_only_and_text_encoder_only(tiny, train_unet, train_te):
    network = make_network(tiny.unet, tiny.text_encoder, train_unet=train_unet, train_text_encoder=train_te)
    names = network.module_names()
    assert all(n.startswith("lora_unet_" if train_unet else "lora_te_") for n in names)
    assert bool(network.unet_parameters()) == train_unet and bool(network.text_encoder_parameters()) == train_te
    perturb(network)
    before = outputs(tiny)
    with network:
        after = outputs(tiny)
    assert torch.equal(after[1], before[1]) == (not train_te)
    assert torch.equal(after[0], before[0]) == (not train_unet)


def test_none_models_and_bad_arguments(tiny):
    assert make_network(None, tiny.text_encoder).module_names()[0].startswith("lora_te_")
    assert make_network(tiny.unet, None).module_names()[0].startswith("lora_unet_")
    with pytest.raises(NetworkConfigError, match="nothing to train"):
        make_network(tiny.unet, None, train_unet=False)
    for bad in ({"network_dim": 0}, {"conv_dim": -1}, {"dropout": 1.0}, {"network_alpha": -1}):
        with pytest.raises(NetworkConfigError, match=next(iter(bad))):
            make_network(tiny.unet, tiny.text_encoder, **bad)


def test_parameter_groups_cover_all_parameters_once(tiny):
    network = make_network(tiny.unet, tiny.text_encoder, conv_dim=4)
    groups = [*network.unet_parameters(), *network.text_encoder_parameters()]
    assert len({id(p) for p in groups}) == len(groups) == len(list(network.parameters()))
    assert all(p.requires_grad for p in groups)


def test_multiplier_scales_the_delta(tiny):
    network = make_network(tiny.unet, None)
    perturb(network)
    before = outputs(tiny)[0]
    with network:
        full = outputs(tiny)[0]
        network.multiplier = 0.0
        assert torch.equal(outputs(tiny)[0], before)
        network.multiplier = 1.0
        assert torch.equal(outputs(tiny)[0], full)


def test_training_steps_change_only_the_adapters(tiny):
    weights = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    network = make_network(tiny.unet, tiny.text_encoder, conv_dim=4, dropout=0.1, rank_dropout=0.1, module_dropout=0.1)
    optimizer = torch.optim.AdamW(
        [{"params": network.unet_parameters(), "lr": 1e-3}, {"params": network.text_encoder_parameters(), "lr": 5e-4}])
    network.train()
    with network:
        for _ in range(3):
            x, t, _ = unet_inputs(tiny)
            context = tiny.text_encoder(tokens(tiny))
            loss = tiny.unet(x, t, context).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.equal(v, weights[k]) for k, v in tiny.unet.state_dict().items())
    assert all(p.grad is None for p in tiny.unet.parameters())
    assert any(p.abs().sum() > 0 for n, p in network.named_parameters() if "lora_up" in n)


def test_resume_from_a_saved_file(tiny, tmp_path):
    network = make_network(tiny.unet, tiny.text_encoder, conv_dim=4)
    perturb(network)
    with network:
        trained = outputs(tiny)
    path = save_lora(tmp_path / "a.safetensors", network.state_dict(), {}, save_dtype=torch.float32)
    resumed = make_network(tiny.unet, tiny.text_encoder, conv_dim=4)
    resumed.load_state_dict(load_file(path))
    with resumed:
        assert all(torch.equal(a, b) for a, b in zip(outputs(tiny), trained))


def test_sd15_rank32_locon16_file(tmp_path):
    """Full-size SD1.5 (meta device, so no model memory): module counts, key count and file size."""
    with torch.device("meta"):
        unet, text = UNetModel(SD15_UNET), TextEncoder(SD15_TEXT)
    lierla = make_network(unet, text, network_dim=32, network_alpha=16, device="cpu")
    assert len(lierla.module_names()) == 72 + 192
    network = make_network(unet, text, network_dim=32, network_alpha=16, conv_dim=16, conv_alpha=8, device="cpu")
    assert len(network.text_encoder_parameters()) == 72 * 2 and len(network.unet_parameters()) == 278 * 2
    sd = network.state_dict()
    assert len(sd) == 3 * (72 + 278) == 1050
    assert sd["lora_unet_up_blocks_1_upsamplers_0_conv.lora_down.weight"].shape == (16, 1280, 3, 3)
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (32, 768)
    assert sd["lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight"].shape == (3072, 32)
    params = sum(v.numel() for v in sd.values())
    path = save_lora(tmp_path / "sd15_r32_c16.safetensors", sd, {"ss_network_dim": "32"}, save_dtype=torch.float16)
    size = path.stat().st_size
    assert 2 * params < size < 2 * params + 200_000  # fp16 tensors + the JSON header
    assert len(load_lora(path).modules) == 350
