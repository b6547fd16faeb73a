"""Adapter modules: properties over algorithm × layer kind × dtype (STYLE.md §11)."""

import pytest
import torch
import torch.nn.functional as F

from lib_lora.networks.base import conv_geometry
from lib_lora.networks.functional import apply_weight
from lib_lora.networks.lora import LoRAModule
from lib_lora.networks.registry import module_from_tensors
from test_networks_helpers import CASES, LAYERS, input_for, make_layer, one_thread, random_tensors, reference_delta  # noqa: F401 (fixture)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _adapter(variant, layer, seed=2):
    return module_from_tensors("lora_unet_test", random_tensors(variant, layer, seed))


@pytest.mark.parametrize("variant, kind", CASES)
def test_delta_weight_equals_reference_math(variant, kind):
    layer = make_layer(kind)
    tensors = random_tensors(variant, layer)
    module = module_from_tensors("lora_unet_test", tensors)
    module.check_target(layer)
    torch.testing.assert_close(module.delta_weight(layer.weight.shape), reference_delta(variant, tensors, layer))


@pytest.mark.parametrize("variant, kind", CASES)
def test_forward_delta_equals_delta_weight_applied(variant, kind):
    layer = make_layer(kind)
    module, x = _adapter(variant, layer), input_for(layer)
    expected = apply_weight(x, module.delta_weight(layer.weight.shape), **conv_geometry(layer))
    torch.testing.assert_close(module.forward_delta(x, layer), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant, kind", CASES)
def test_hooked_equals_merged_weight(variant, kind):
    layer, merged = make_layer(kind), make_layer(kind)
    module, x = _adapter(variant, layer), input_for(layer)
    module.multiplier = 0.7
    with torch.no_grad():
        merged.weight += 0.7 * module.delta_weight(layer.weight.shape)
    module.bind(layer)
    module.apply_to()
    assert (layer(x) - merged(x)).abs().max() < 1e-4
    module.remove()


def _output_and_grads(out: torch.Tensor, tensors) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out.square().sum().backward()
    found = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), found


@pytest.mark.parametrize("kind", list(LAYERS))
def test_fused_training_step_matches_plain_sum(kind):
    """The hook's fused path gives the output and gradients of output + forward_delta(x)."""
    layer = make_layer(kind)
    module = LoRAModule.for_layer("lora_unet_test", layer, rank=4, alpha=2.0)
    torch.nn.init.normal_(module.lora_up.weight)
    module.multiplier = 0.8
    x = input_for(layer).requires_grad_(True)
    tensors = (x, module.lora_down.weight, module.lora_up.weight)
    expected = _output_and_grads(layer(x) + module.forward_delta(x, layer, 0.8), tensors)
    module.apply_to()
    got = _output_and_grads(layer(x), tensors)
    module.remove()
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("update", ["optimizer step", "load_state_dict", "weights replaced"])
def test_the_adapter_follows_its_weights_wherever_they_change(update):
    """A hooked Linear keeps its factors' transposes from step to step (no transpose dispatched per forward); after
    an optimizer step (in place through `.data`: Lion), a load of other weights, or a factor's tensor replaced, its
    output is the new weights' and not the old ones'."""
    layer = make_layer("linear")
    module = LoRAModule.for_layer("lora_unet_test", layer, rank=4, alpha=2.0)
    torch.nn.init.normal_(module.lora_up.weight)
    x = input_for(layer)
    module.apply_to()
    layer(x).sum().backward()  # the first forward keeps the transposes
    if update == "optimizer step":
        for p in module.parameters():
            p.data.add_(p.grad, alpha=-0.5)  # through .data, as lion-pytorch writes it
    elif update == "load_state_dict":
        module.load_state_dict({k: torch.randn_like(v) if v.dim() else v for k, v in module.state_dict().items()})
    else:
        module.lora_down.weight.data = torch.randn_like(module.lora_down.weight)
    down, up = module.lora_down.weight, module.lora_up.weight  # the plain sum, from the module's current tensors
    expected = F.linear(x, layer.weight, layer.bias) + module.scale * F.linear(F.linear(x, down), up)
    with torch.no_grad():
        got = layer(x)
    module.remove()
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1x1"])
def test_a_hooked_output_can_be_changed_in_place(kind):
    """Host blocks change a layer's output in place through a view (Forge's `x += attn(x)`); gradients stay right."""
    layer = make_layer(kind)
    module = LoRAModule.for_layer("lora_unet_test", layer, rank=4, alpha=2.0)
    torch.nn.init.normal_(module.lora_up.weight)
    x = input_for(layer).requires_grad_(True)
    tensors = (x, module.lora_down.weight, module.lora_up.weight)
    expected = _output_and_grads((layer(x) + module.forward_delta(x, layer)) * 2, tensors)
    module.apply_to()
    out = layer(x)
    out.transpose(0, 1).mul_(2)
    got = _output_and_grads(out, tensors)
    module.remove()
    for g, e in zip([got[0], *got[1]], [expected[0], *expected[1]]):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1x1"])
@pytest.mark.parametrize("host", ["trainable weight", "another hook first"])
def test_gradients_through_the_host_are_kept_where_the_adapter_cannot_compute_them(kind, host):
    """On a frozen host the adapter's backward computes x's gradient through the host weight itself; a host
    that trains its own weight, or whose output another hook changed, keeps its own backward (nothing lost)."""
    layer = make_layer(kind)
    module = LoRAModule.for_layer("lora_unet_test", layer, rank=4, alpha=2.0)
    torch.nn.init.normal_(module.lora_up.weight)
    x = input_for(layer).requires_grad_(True)
    tensors = [x, module.lora_down.weight, module.lora_up.weight]
    if host == "trainable weight":
        layer.weight.requires_grad_(True)
        tensors.append(layer.weight)
    else:
        layer.register_forward_hook(lambda _, inputs, output: output * 1.5)
    expected = _output_and_grads(layer(x) + module.forward_delta(x, layer), tensors)
    module.apply_to()
    got = _output_and_grads(layer(x), tensors)
    module.remove()
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_untrained_lora_leaves_output_identical(kind, dtype):
    layer = make_layer(kind, dtype=dtype)
    x = input_for(layer)
    before = layer(x)
    module = LoRAModule.for_layer("lora_unet_test", layer, rank=4, alpha=1.0)
    assert module.lora_down.weight.abs().sum() > 0 and not module.lora_up.weight.any()
    module.apply_to()
    out = layer(x)
    assert out.dtype == dtype and torch.equal(out, before)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_stays_fp32_on_a_low_precision_host(kind, dtype):
    layer32 = make_layer(kind)
    layer = make_layer(kind, dtype=dtype)
    module = module_from_tensors("lora_unet_test", random_tensors("lora", layer))
    module.bind(layer)
    module.apply_to()
    x = input_for(layer32)
    out = layer(x.to(dtype))
    assert out.dtype == dtype and module.lora_down.weight.dtype == torch.float32
    expected = layer32(x) + apply_weight(x, module.delta_weight(layer32.weight.shape), **conv_geometry(layer32))
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_100_apply_remove_cycles_leave_the_layer_bit_identical(kind):
    layer = make_layer(kind)
    weight, x = layer.weight.clone(), input_for(layer)
    before = layer(x)
    module = _adapter("lora", layer)
    module.bind(layer)
    for _ in range(100):
        module.apply_to()
        module.apply_to()  # idempotent
        module.remove()
    assert torch.equal(layer.weight, weight) and not layer._forward_hooks
    assert torch.equal(layer(x), before)


def _trainable(kind, **dropouts):
    layer = make_layer(kind)
    module = LoRAModule.for_layer("lora_unet_test", layer, rank=4, alpha=2.0, **dropouts)
    with torch.no_grad():
        module.lora_up.weight.normal_()  # as if trained, so dropouts show
    return layer, module


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dropouts", [{"dropout": 0.5}, {"rank_dropout": 0.5}, {"module_dropout": 0.5}])
def test_dropouts_act_only_in_training(kind, dropouts):
    layer, module = _trainable(kind, **dropouts)
    x = input_for(layer)
    base = layer(x)
    module.apply_to()
    module.eval()
    eval_out = layer(x)
    expected = base + apply_weight(x, module.delta_weight(layer.weight.shape), **conv_geometry(layer))
    torch.testing.assert_close(eval_out, expected, atol=1e-5, rtol=1e-5)
    module.train()
    torch.manual_seed(3)
    train_outs = [layer(x) for _ in range(8)]
    assert any(not torch.allclose(o, eval_out) for o in train_outs)


def test_rank_dropout_rescales_kept_ranks():
    layer, module = _trainable("linear", rank_dropout=0.5)
    x = input_for(layer)
    module.train()
    torch.manual_seed(0)
    out = module.forward_delta(x, layer)
    torch.manual_seed(0)
    mask = torch.rand(x.shape[0], 4) > 0.5  # the same draw as the module's
    h = F.linear(x, module.lora_down.weight) * mask[:, None, :]
    torch.testing.assert_close(out, F.linear(h, module.lora_up.weight) * module.scale / 0.5)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_reach_only_the_adapter(kind):
    layer, module = _trainable(kind)
    weight = layer.weight.clone()
    module.apply_to()
    module.train()
    layer(input_for(layer)).square().mean().backward()
    assert module.lora_up.weight.grad is not None and module.lora_up.weight.grad.abs().sum() > 0
    assert module.lora_down.weight.grad.abs().sum() > 0
    assert layer.weight.grad is None and torch.equal(layer.weight, weight)


def test_host_state_dict_and_names_are_untouched():
    layer = make_layer("conv3x3")
    keys = list(layer.state_dict())
    module = LoRAModule.for_layer("lora_unet_test", layer, rank=4, alpha=1.0)
    module.apply_to()
    assert list(layer.state_dict()) == keys and list(layer.named_children()) == []
    assert set(module.state_dict()) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert module.state_dict()["alpha"].shape == () and module.lora_down.weight.shape == (4, 12, 3, 3)
    assert module.lora_up.weight.shape == (20, 4, 1, 1)


def test_alpha_zero_means_rank():
    module = LoRAModule.for_layer("lora_unet_test", make_layer("linear"), rank=8, alpha=0)
    assert module.alpha_value == 8.0 and module.scale == 1.0
