"""Training LoHa, LoKr and DoRA: worked examples of each formula, the file's keys and shapes (lora-format.md §7),
properties of the trainable modules, the webui 1.10.1's own arithmetic on our files, and training runs that
lower the loss and save files that apply exactly like the trained network.
"""

import json

import pytest
import torch
from torch import nn

from lib_lora.demo.dataset import make_lora_dataset
from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.networks.base import conv_geometry
from lib_lora.networks.errors import NetworkConfigError
from lib_lora.networks.files import load_lora, lora_from_state_dict, save_lora
from lib_lora.networks.functional import (apply_weight, dora_weight, factorization, hadamard_product, loha_delta_weight,
                                          lokr_delta_weight)
from lib_lora.networks.loha import LoHaModule
from lib_lora.networks.lokr import LoKrModule
from lib_lora.networks.lora import LoRAModule
from lib_lora.networks.network import make_network
from lib_lora.networks.patcher import ActiveLora, LoraPatcher
from lib_lora.networks.registry import module_from_tensors
from lib_lora.networks.targets import text_models_for
from lib_lora.train import trainer
from lib_lora.train.config import ConfigError, TrainConfig
from test_networks_helpers import LAYERS, input_for, make_layer, one_thread  # noqa: F401 (fixture)

LINEAR = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # tiny SD1: Linear 64 -> 64
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # tiny SD1: Conv2d 32 -> 32, 3x3


# ---- worked examples: each formula against a hand computation ------------------------------------------


def test_loha_worked_example():
    """(w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/r with r = 1, alpha = 2."""
    tensors = {"hada_w1_a": torch.tensor([[1.0], [2.0]]), "hada_w1_b": torch.tensor([[3.0, 4.0]]),
               "hada_w2_a": torch.tensor([[1.0], [0.5]]), "hada_w2_b": torch.tensor([[2.0, -1.0]]), "alpha": torch.tensor(2.0)}
    # [[3, 4], [6, 8]] ⊙ [[2, -1], [1, -0.5]] = [[6, -4], [6, -4]], times 2 / 1
    by_hand = torch.tensor([[12.0, -8.0], [12.0, -8.0]])
    module = module_from_tensors("lora_unet_x", tensors)
    assert isinstance(module, LoHaModule) and module.rank == 1
    torch.testing.assert_close(module.delta_weight((2, 2)), by_hand)
    w1, w2 = (tensors["hada_w1_a"], tensors["hada_w1_b"]), (tensors["hada_w2_a"], tensors["hada_w2_b"])
    torch.testing.assert_close(loha_delta_weight(w1, w2, 2.0, (2, 2)), by_hand)


def test_lokr_worked_examples():
    w1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    kron = torch.tensor([[0.0, 1.0, 0.0, 2.0],  # kron(W1, W2)[i·2 + j, k·2 + l] = W1[i, k]·W2[j, l]
                         [1.0, 0.0, 2.0, 0.0],
                         [0.0, 3.0, 0.0, 4.0],
                         [3.0, 0.0, 4.0, 0.0]])
    full = module_from_tensors("lora_unet_x", {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)})
    assert isinstance(full, LoKrModule) and full.rank is None and full.scale == 1.0  # both full: alpha ignored
    torch.testing.assert_close(full.delta_weight((4, 4)), kron)
    # low-rank W2 = w2_a @ w2_b = [[1], [0]] @ [[0, 1]] = [[0, 1], [0, 0]], scale alpha / r = 0.5 / 1
    low = module_from_tensors("lora_unet_x", {"lokr_w1": w1, "lokr_w2_a": torch.tensor([[1.0], [0.0]]),
                                              "lokr_w2_b": torch.tensor([[0.0, 1.0]]), "alpha": torch.tensor(0.5)})
    by_hand = 0.5 * torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(low.delta_weight((4, 4)), by_hand)
    torch.testing.assert_close(lokr_delta_weight(w1, w2, 7.0, None, (4, 4)), kron)


@pytest.mark.parametrize("dimension, factor, expected", [
    (320, -1, (16, 20)), (1280, -1, (32, 40)), (64, -1, (8, 8)), (127, -1, (1, 127)), (360, -1, (18, 20)),
    (128, 8, (8, 16)), (128, 4, (4, 32)), (64, 4, (4, 16)), (250, 8, (5, 50)), (320, 3, (2, 160)), (32, -1, (4, 8)),
])
def test_lokr_factorization(dimension, factor, expected):
    """LyCORIS's split: a dividing factor as it is; otherwise the largest divisor <= sqrt and <= factor."""
    assert factorization(dimension, factor) == expected


def _webui_dora(w0, updown, dora_scale):
    """The webui 1.10.1 `network.py` apply_weight_decompose, paraphrased: the norm per input column, always."""
    merged = updown + w0
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (w0.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale / norm) - w0


def test_dora_worked_example_both_orientations():
    """V = W0 + ΔW = [[3, 0], [4, 1]]: column norms 5 and 1, row norms 3 and sqrt(17)."""
    w0 = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    tensors = {"lora_down.weight": torch.tensor([[2.0, -2.0], [2.0, 1.0]]), "lora_up.weight": torch.eye(2), "alpha": torch.tensor(2.0)}
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w0)

    on_input = module_from_tensors("lora_unet_x", tensors | {"dora_scale": torch.tensor([[10.0, 3.0]])})
    on_input.check_target(layer)
    w_d = torch.tensor([[3.0 * 10 / 5, 0.0], [4.0 * 10 / 5, 1.0 * 3 / 1]])  # [[6, 0], [8, 3]]
    torch.testing.assert_close(dora_weight(w0, on_input.delta_weight((2, 2)), on_input.dora_scale), w_d)
    torch.testing.assert_close(on_input.weight_delta(w0, 0.5), 0.5 * (w_d - w0))  # strength s: s·(W_d − W0), the webui's
    torch.testing.assert_close(on_input.weight_delta(w0, 0.5), torch.tensor([[2.5, -1.0], [3.0, 1.5]]))
    torch.testing.assert_close(0.5 * _webui_dora(w0, on_input.delta_weight((2, 2)), on_input.dora_scale), on_input.weight_delta(w0, 0.5))

    on_output = module_from_tensors("lora_unet_x", tensors | {"dora_scale": torch.tensor([[2.0], [1.0]])})
    on_output.check_target(layer)
    s17 = 17 ** 0.5
    torch.testing.assert_close(on_output.weight_delta(w0) + w0, torch.tensor([[2.0, 0.0], [4 / s17, 1 / s17]]))
    # The webui 1.10.1 broadcasts an output-axis magnitude against its input-axis norm: not the same weight.
    assert not torch.allclose(_webui_dora(w0, on_output.delta_weight((2, 2)), on_output.dora_scale), on_output.weight_delta(w0))


def test_hadamard_product_gradients():
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in ((5, 2), (2, 6), (5, 2), (2, 6))]
    assert torch.autograd.gradcheck(hadamard_product, factors)


# ---- the file's keys and shapes, checked by hand against lora-format.md §7 -----------------------------

KEY_TABLE = {
    # network: {module: {key: shape}}; network_dim 4 / alpha 2, conv_dim 2 / alpha 1 on the tiny SD1 model
    "loha": {
        LINEAR: {"hada_w1_a": (64, 4), "hada_w1_b": (4, 64), "hada_w2_a": (64, 4), "hada_w2_b": (4, 64), "alpha": ()},
        CONV: {"hada_w1_a": (32, 2), "hada_w1_b": (2, 288), "hada_w2_a": (32, 2), "hada_w2_b": (2, 288), "alpha": ()},
    },
    "lokr": {  # 64 = 8·8: rank 4 >= 8/2, so W2 is full and alpha is saved as the rank; 32 = 4·8: rank 2 < 8/2
        LINEAR: {"lokr_w1": (8, 8), "lokr_w2": (8, 8), "alpha": ()},
        CONV: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 72), "alpha": ()},
    },
    "lokr_factor4": {  # 64 = 4·16: rank 4 < 16/2
        LINEAR: {"lokr_w1": (4, 4), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 16), "alpha": ()},
        CONV: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 72), "alpha": ()},
    },
    "locon_dora": {  # input-axis magnitude: [1, in] on a Linear, [1, in, 1, 1] on a conv
        LINEAR: {"lora_down.weight": (4, 64), "lora_up.weight": (64, 4), "alpha": (), "dora_scale": (1, 64)},
        CONV: {"lora_down.weight": (2, 32, 3, 3), "lora_up.weight": (32, 2, 1, 1), "alpha": (), "dora_scale": (1, 32, 1, 1)},
    },
    "loha_dora": {
        LINEAR: {"hada_w1_a": (64, 4), "hada_w1_b": (4, 64), "hada_w2_a": (64, 4), "hada_w2_b": (4, 64), "alpha": (), "dora_scale": (1, 64)},
    },
}
NETWORKS = {"loha": dict(algo="loha"), "lokr": dict(algo="lokr"), "lokr_factor4": dict(algo="lokr", lokr_factor=4),
            "locon_dora": dict(algo="lora", dora_wd=True), "loha_dora": dict(algo="loha", dora_wd=True)}
ALPHAS = {("lokr", LINEAR): 4.0, ("lokr", CONV): 1.0, ("lokr_factor4", LINEAR): 2.0}


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_checkpoint(seed=4)


def _network(ckpt, name, **kwargs):
    return make_network(ckpt.unet, ckpt.text_encoder, network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0,
                        **NETWORKS[name], **kwargs)


@pytest.mark.parametrize("name", list(KEY_TABLE))
def test_file_keys_and_shapes_are_the_spec_table(tiny, name):
    state = _network(tiny, name).state_dict()
    for module, keys in KEY_TABLE[name].items():
        found = {k.split(".", 1)[1]: tuple(v.shape) for k, v in state.items() if k.split(".")[0] == module}
        assert found == keys
        alpha = state[f"{module}.alpha"].item()
        assert alpha == ALPHAS.get((name, module), 2.0 if module == LINEAR else 1.0)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_module_is_one_the_webui_reads(tiny, name):
    """The webui 1.10.1's module types take a key set whole (lora, hada, lokr); it reads alpha and dora_scale on any."""
    webui_keys = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b",
                  "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                  "lokr_w2_b", "lokr_t2"}
    modules = {}
    for key in _network(tiny, name).state_dict():
        module, param = key.split(".", 1)
        modules.setdefault(module, set()).add(param)
    for keys in modules.values():
        assert keys <= webui_keys
        lora = {"lora_up.weight", "lora_down.weight"} <= keys
        hada = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys
        lokr = ("lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys) and ("lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys)
        assert lora + hada + lokr == 1


def _webui_updown(tensors: dict[str, torch.Tensor], w0: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The webui 1.10.1's delta for one module, paraphrased from network_lora/network_hada/network_lokr.py and
    network.py (calc_updown, finalize_updown, apply_weight_decompose), written without lib_lora."""
    t = {k: v.double() for k, v in tensors.items()}
    flat = lambda m: m.reshape(m.shape[0], -1)  # noqa: E731
    if "lora_up.weight" in t:
        updown, dim = flat(t["lora_up.weight"]) @ flat(t["lora_down.weight"]), t["lora_down.weight"].shape[0]
    elif "hada_w1_a" in t:
        updown = (t["hada_w1_a"] @ flat(t["hada_w1_b"])) * (t["hada_w2_a"] @ flat(t["hada_w2_b"]))
        dim = t["hada_w1_b"].shape[0]
    else:
        w1 = t["lokr_w1"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2)
    updown = updown.reshape(w0.shape)
    scale = t["alpha"].item() / dim if dim is not None and "alpha" in t else 1.0
    updown = updown * scale
    if "dora_scale" in t:
        updown = _webui_dora(w0, updown, t["dora_scale"])
    return updown * multiplier


@pytest.mark.parametrize("name", list(NETWORKS))
def test_the_webuis_arithmetic_gives_our_merged_weights(tiny, name, tmp_path):
    network = _network(tiny, name)
    _perturb(network, seed=1)
    lora = _saved_and_loaded(network, tmp_path)
    state = {k: v.detach() for k, v in network.state_dict().items()}
    with LoraPatcher(tiny.unet, tiny.text_encoder, "merge") as patcher:
        originals = {n: m.host.weight.detach().clone() for n, m in network.named_children()}
        patcher.apply([ActiveLora(lora, 0.8, 0.7)])
        for module_name, module in network.named_children():
            tensors = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".")[0] == module_name}
            w0 = originals[module_name].double()
            multiplier = 0.8 if module_name.startswith("lora_te") else 0.7
            expected = (w0 + _webui_updown(tensors, w0, multiplier)).float()
            torch.testing.assert_close(module.host.weight, expected, atol=1e-5, rtol=1e-5)


# ---- properties of the trainable modules -----------------------------------------------------------------

TRAINABLE = {
    "loha": lambda layer, **kw: LoHaModule.for_layer("lora_unet_t", layer, 4, 2.0, **kw),
    "lokr": lambda layer, **kw: LoKrModule.for_layer("lora_unet_t", layer, 2, 2.0, **kw),  # 20 = 4·5, 12 = 3·4: low-rank W2
    "lokr_full": lambda layer, **kw: LoKrModule.for_layer("lora_unet_t", layer, 4, 2.0, **kw),  # rank 4 >= 5/2: full W2
    "lokr_factor2": lambda layer, **kw: LoKrModule.for_layer("lora_unet_t", layer, 2, 2.0, factor=2, **kw),
    "lora": lambda layer, **kw: LoRAModule.for_layer("lora_unet_t", layer, 4, 2.0, **kw),
}
TRAINABLE_CASES = [(algo, kind, dora) for algo in TRAINABLE for kind in LAYERS for dora in (False, True) if algo != "lora" or dora]


def _perturb(module: nn.Module, seed: int, std: float = 0.05) -> None:
    """As if trained: every factor non-zero, so every property can fail (DoRA's magnitude too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std * (p.abs().mean().item() or 1.0))


@pytest.mark.parametrize("algo, kind, dora", TRAINABLE_CASES)
def test_untrained_module_changes_nothing(algo, kind, dora):
    layer = make_layer(kind)
    x = input_for(layer)
    before = layer(x)
    module = TRAINABLE[algo](layer, dora_wd=dora)
    assert any(p.abs().sum() > 0 for p in module.parameters())  # random factors beside the zero one
    module.apply_to()
    out = layer(x)
    if dora:  # m/‖W0‖ = 1 up to DoRA's ε
        torch.testing.assert_close(out, before, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(out, before)


@pytest.mark.parametrize("algo, kind, dora", TRAINABLE_CASES)
def test_trained_module_hooked_equals_merged_and_reloaded(algo, kind, dora):
    layer, merged = make_layer(kind), make_layer(kind)
    module = TRAINABLE[algo](layer, dora_wd=dora)
    _perturb(module, seed=3)
    module.eval()
    module.multiplier = 0.7
    x = input_for(layer)
    with torch.no_grad():
        merged.weight += module.weight_delta(merged.weight, 0.7)
    module.apply_to()
    hooked = layer(x)
    module.remove()
    torch.testing.assert_close(hooked, merged(x), atol=1e-5, rtol=1e-5)
    loaded = module_from_tensors("lora_unet_t", {k: v.detach() for k, v in module.state_dict().items()})
    assert type(loaded) is type(module) and loaded.scale == module.scale
    loaded.check_target(layer)
    torch.testing.assert_close(layer(x) + loaded.forward_delta(x, layer, 0.7), hooked, atol=1e-5, rtol=1e-5)
    if not dora:
        expected = apply_weight(x, loaded.delta_weight(layer.weight.shape) * 0.7, **conv_geometry(layer))
        torch.testing.assert_close(module.forward_delta(x, layer, 0.7), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ["loha", "lokr", "lokr_full"])
@pytest.mark.parametrize("kind", ["linear", "conv3x3_s2"])
def test_gradients_reach_every_factor(algo, kind):
    layer = make_layer(kind)
    module = TRAINABLE[algo](layer, dora_wd=True)
    _perturb(module, seed=5)
    module.apply_to()
    layer(input_for(layer)).square().mean().backward()
    module.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_dropouts_that_need_lora_ranks_are_refused():
    ckpt = random_tiny_checkpoint(seed=4)
    with pytest.raises(NetworkConfigError, match="rank_dropout"):
        make_network(ckpt.unet, None, algo="loha", rank_dropout=0.1)
    with pytest.raises(NetworkConfigError, match="DoRA"):
        make_network(ckpt.unet, None, dropout=0.1, dora_wd=True)
    with pytest.raises(NetworkConfigError, match="lokr_factor"):
        make_network(ckpt.unet, None, algo="lokr", lokr_factor=1)
    for changes, field in [(dict(network_type="lokr", network_dropout=0.1), "network_dropout"),
                           (dict(dora_wd=True, rank_dropout=0.2), "rank_dropout"), (dict(network_type="lokr", lokr_factor=0), "lokr_factor"),
                           (dict(network_type="loha", conv_dim=0), "conv_dim")]:
        with pytest.raises(ConfigError, match=field):
            TrainConfig(**changes)


# ---- SDXL: OpenCLIP's fused q/k/v, 2-D proj_in, ldm names --------------------------------------------------


@pytest.mark.parametrize("name", ["lokr", "loha_dora", "locon_dora"])
def test_sdxl_files_apply_like_the_network(name, tmp_path):
    ckpt = random_tiny_checkpoint(seed=2, arch="sdxl")
    models = text_models_for("sdxl", ckpt.text_encoder, ckpt.text_encoder_2)
    network = make_network(ckpt.unet, models, network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0, **NETWORKS[name])
    _perturb(network, seed=2)
    network.eval()
    state = network.state_dict()
    if NETWORKS[name].get("dora_wd"):  # no DoRA on OpenCLIP's q/k/v, which the webui applies against the whole in_proj
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.dora_scale" not in state
        assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.dora_scale" in state
        assert state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale"].shape == (1, 128)
        assert state["lora_unet_middle_block_1_proj_in.dora_scale"].shape == (1, 128)  # Linear proj_in on SDXL
    lora = _saved_and_loaded(network, tmp_path)
    inputs = _sdxl_inputs(ckpt)
    with network:
        expected = _sdxl_outputs(ckpt, *inputs)
    for mode in ("merge", "onthefly"):
        with LoraPatcher(ckpt.unet, models, mode) as patcher:
            patcher.apply([ActiveLora(lora)])
            got = _sdxl_outputs(ckpt, *inputs)
        for g, e in zip(got, expected):
            assert (g - e).abs().max() <= 1e-5 * e.abs().max()


def _sdxl_inputs(ckpt):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 49407, (1, 77), generator=g)


@torch.no_grad()
def _sdxl_outputs(ckpt, x, tokens):
    context_1 = ckpt.text_encoder(tokens[:, None])
    context_2, pooled = ckpt.text_encoder_2(tokens, final_norm=False, pooled=True)
    context = torch.cat([context_1, context_2], dim=-1)
    y = torch.cat([pooled, torch.zeros(1, ckpt.unet.config.adm_in_channels - pooled.shape[-1])], dim=-1)  # sizes: zeros
    return context, ckpt.unet(x, torch.tensor([500.0]), context, y)


def _saved_and_loaded(network, tmp_path):
    path = save_lora(tmp_path / "n.safetensors", network.state_dict(), {}, save_dtype=torch.float32, overwrite=True)
    return load_lora(path)


# ---- training runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_image(tmp_path_factory):
    return make_lora_dataset(tmp_path_factory.mktemp("data"), concept="star", trigger="zkz", n_images=1, repeats=1, seed=3)


RUNS = {
    "loha": dict(network_type="loha"),
    "lokr": dict(network_type="lokr", lokr_factor=4),
    "dora": dict(network_type="locon", dora_wd=True),
}
EXPECTED_ARGS = {
    "loha": {"algo": "loha", "conv_dim": "2", "conv_alpha": "1.0", "dora_wd": "False"},
    "lokr": {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1.0", "factor": "4", "dora_wd": "False"},
    "dora": {"algo": "locon", "conv_dim": "2", "conv_alpha": "1.0", "dora_wd": "True", "wd_on_output": "False"},
}


@pytest.mark.parametrize("run", list(RUNS))
def test_training_lowers_the_loss_and_the_file_applies_like_the_trained_network(run, single_image, tiny_checkpoint_path,
                                                                                tmp_path, monkeypatch):
    """One image, batch 1, one timestep, 20 steps: the loss falls; the saved file, loaded and applied by the
    patcher (merge and on the fly), gives the live network's UNet and text-encoder outputs."""
    built = []
    monkeypatch.setattr(trainer, "make_network", lambda *a, **k: built.append(make_network(*a, **k)) or built[-1])
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    config = TrainConfig(train_data_dir=str(single_image), resolution=(64, 64), train_batch_size=1, max_train_steps=20,
                         max_train_epochs=20, learning_rate=3e-3, min_timestep=400, max_timestep=401, network_dim=4,
                         network_alpha=4.0, conv_dim=2, conv_alpha=1.0, output_name="t", seed=7, save_precision="float", **RUNS[run])
    losses = []
    result = trainer.train(config, host, on_event=lambda e: e.kind == "step" and losses.append(e.loss))
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    network = built[0].eval()
    lora = load_lora(result.final_path)
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(lora.metadata["ss_network_args"]) == EXPECTED_ARGS[run]
    assert set(lora.modules) == set(network.module_names()) and result.steps == 20
    inputs = _sd1_inputs()
    with network:
        expected = _sd1_outputs(host.ckpt, *inputs)
    for mode in ("merge", "onthefly"):
        with LoraPatcher(host.ckpt.unet, host.text_encoders, mode) as patcher:
            patcher.apply([ActiveLora(lora)])
            got = _sd1_outputs(host.ckpt, *inputs)
        for g, e in zip(got, expected):
            assert (g - e).abs().max() <= 1e-5 * e.abs().max()


def _sd1_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), torch.randint(0, 49407, (1, 1, 77), generator=g)


@torch.no_grad()
def _sd1_outputs(ckpt, x, tokens):
    context = ckpt.text_encoder(tokens)
    return context, ckpt.unet(x, torch.tensor([400.0]), context)


def test_state_dict_round_trip_resumes_a_dora_lokr_network(tiny):
    network = _network(tiny, "lokr", dora_wd=True)
    _perturb(network, seed=9)
    again = _network(tiny, "lokr", dora_wd=True)
    again.load_state_dict(network.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), again.state_dict().values()))
    lora = lora_from_state_dict({k: v.detach() for k, v in network.state_dict().items()})
    assert all(m.dora_scale is not None for m in lora.modules.values())
