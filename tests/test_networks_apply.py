"""Applying LoRA files for generation: prompt syntax, merge vs on-the-fly, exact restore, re-patching, block weights."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.models.pipeline import GenerationParams, generate
from lib_lora.networks.apply import ActiveLora, LoraPatcher, extract_lora_tags, generate_with_loras
from lib_lora.networks.errors import LoraFormatError, LoraNotFoundError, PromptSyntaxError
from lib_lora.networks.files import load_lora, save_lora
from lib_lora.networks.network import make_network
from lib_lora.networks.prompt import BLOCK_IDS_26, LoraTag
from lib_lora.networks.targets import name_table
from test_networks_files import Q, kohya_by_hand
from test_networks_helpers import one_thread  # noqa: F401 (fixture)

PROMPTS = [
    ("a <lora:x:0.7> cat", "a  cat", [LoraTag("x", 0.7, 0.7)]),
    ("<lora:x>", "", [LoraTag("x", 1.0, 1.0)]),
    ("<lora:x:0.5:0.2>, red", ", red", [LoraTag("x", 0.5, 0.2)]),
    ("<lora:x:te=0.3>", "", [LoraTag("x", 0.3, 0.3)]),  # unet defaults to te, also a keyword te
    ("<lora:x:1:unet=0.4>", "", [LoraTag("x", 1.0, 0.4)]),
    ("<lora:x:te=0.2:unet=0.9>", "", [LoraTag("x", 0.2, 0.9)]),
    ("<lyco:my-lora_v2:-0.5>", "", [LoraTag("my-lora_v2", -0.5, -0.5)]),
    ("<lora:a:1> and <lora:b:0.5>", " and ", [LoraTag("a", 1.0, 1.0), LoraTag("b", 0.5, 0.5)]),
    ("(red:1.2) <lora:a:1:lbw=" + ",".join(["0.5"] * 26) + ">", "(red:1.2) ", [LoraTag("a", 1.0, 1.0, (0.5,) * 26)]),
]


@pytest.mark.parametrize("prompt, cleaned, tags", PROMPTS)
def test_prompt_syntax(prompt, cleaned, tags):
    assert extract_lora_tags(prompt) == (cleaned, tags)


def test_17_block_weights_expand_like_lora_block_weight():
    _, [tag] = extract_lora_tags("<lora:a:1:lbw=0.1,1,2,4,5,7,8,12,13,14,15,16,17,18,19,20,21>")
    weights = dict(zip(BLOCK_IDS_26, tag.block_weights))
    assert weights["BASE"] == 0.1 and weights["IN04"] == 4 and weights["M00"] == 12 and weights["OUT11"] == 21
    assert weights["IN00"] == weights["IN03"] == weights["OUT02"] == 0  # blocks the 17 values do not list
    _, [preset] = extract_lora_tags("<lora:a:1:lbw=OUTS>")
    assert preset.block_weight("IN01") == 0 and preset.block_weight("OUT09") == 1 and preset.block_weight(None) == 1


@pytest.mark.parametrize("prompt, message", [
    ("<lora:x:abc>", "not a number"),
    ("<lora:x:1:lbw=1,2,3>", "17 or 26"),
    ("<lora:x:1:dyn=4>", "dyn="),
    ("<lora:x:1:1:8>", "dyn is not supported"),
    ("<hypernet:x:1>", "hypernet"),
])
def test_prompt_errors(prompt, message):
    with pytest.raises(PromptSyntaxError, match=message):
        extract_lora_tags(prompt)


def _trained_network(ckpt, seed, **kwargs):
    network = make_network(ckpt.unet, ckpt.text_encoder, network_dim=4, network_alpha=2, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return network


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, and two trained LoRAs saved as files: A a LoCon on both models, B a text-encoder LoRA."""
    folder = tmp_path_factory.mktemp("loras")
    ckpt = random_tiny_checkpoint(seed=5)
    a = _trained_network(ckpt, 1, conv_dim=2, conv_alpha=1)
    b = _trained_network(ckpt, 2, train_unet=False)
    save_lora(folder / "styleA.safetensors", a.state_dict(), {"ss_output_name": "Style A"}, save_dtype=torch.float32)
    save_lora(folder / "sub" / "charB.safetensors", b.state_dict(), {}, save_dtype=torch.float32)
    save_lora(folder / "styleA16.safetensors", a.state_dict(), {}, save_dtype=torch.float16)
    return ckpt, a, folder


def outputs(ckpt):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300.0])
    tokens = torch.randint(0, 49408, (1, 1, 77), generator=g)
    with torch.no_grad():
        context = ckpt.text_encoder(tokens)
        return context, ckpt.unet(x, t, context)


def weights(ckpt):
    return {k: v.clone() for m in (ckpt.unet, ckpt.text_encoder) for k, v in m.state_dict().items()}


def assert_bit_identical(ckpt, saved):
    current = weights(ckpt)
    assert all(torch.equal(current[k], v) for k, v in saved.items())
    assert not any(m._forward_hooks for model in (ckpt.unet, ckpt.text_encoder) for m in model.modules())


@pytest.mark.parametrize("file, tolerance", [("styleA", 1e-5), ("styleA16", 2e-3)])
def test_file_reproduces_the_trained_network(setup, file, tolerance):
    ckpt, network, folder = setup
    with network:
        expected = outputs(ckpt)
    lora = load_lora(folder / f"{file}.safetensors")
    for mode in ("merge", "onthefly"):
        with LoraPatcher(ckpt.unet, ckpt.text_encoder, mode) as patcher:
            patcher.apply([ActiveLora(lora)])
            got = outputs(ckpt)
        for g, e in zip(got, expected):
            assert (g - e).abs().max() <= tolerance * e.abs().max()


def test_merge_and_onthefly_agree_with_blends_and_block_weights(setup):
    ckpt, _, folder = setup
    blocks = tuple(np.linspace(0.2, 1.4, 26).tolist())
    loras = [ActiveLora(load_lora(folder / "styleA.safetensors"), 0.8, 0.6, blocks),
             ActiveLora(load_lora(folder / "sub" / "charB.safetensors"), -0.4, 1.0)]
    results = {}
    for mode in ("merge", "onthefly"):
        with LoraPatcher(ckpt.unet, ckpt.text_encoder, mode) as patcher:
            patcher.apply(loras)
            results[mode] = outputs(ckpt)
    for m, o in zip(results["merge"], results["onthefly"]):
        assert (m - o).abs().max() < 1e-4


def test_blend_is_the_weighted_sum_of_deltas(setup):
    ckpt, _, folder = setup
    a, b = load_lora(folder / "styleA.safetensors"), load_lora(folder / "sub" / "charB.safetensors")
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    layer = ckpt.text_encoder.transformer.text_model.encoder.layers[0].self_attn.q_proj
    base = layer.weight.clone()
    with LoraPatcher(ckpt.unet, ckpt.text_encoder) as patcher:
        patcher.apply([ActiveLora(a, 0.5, 1.0), ActiveLora(b, 0.3, 1.0)])
        expected = base + 0.5 * a.modules[name].delta_weight(base.shape) + 0.3 * b.modules[name].delta_weight(base.shape)
        torch.testing.assert_close(layer.weight, expected)
    assert torch.equal(layer.weight, base)


@pytest.mark.parametrize("mode", ["merge", "onthefly"])
def test_100_apply_restore_cycles_are_bit_exact(setup, mode):
    ckpt, _, folder = setup
    saved, before = weights(ckpt), outputs(ckpt)
    a, b = load_lora(folder / "styleA.safetensors"), load_lora(folder / "sub" / "charB.safetensors")
    some = [n for n in a.modules if "down_blocks_1" in n and n.endswith(("resnets_0_conv1", "attentions_0_transformer_blocks_0_attn1_to_q", "attentions_0_proj_in"))]
    assert len(some) == 3  # one layer of each kind: 3x3 conv, Linear, 1x1 conv (and B's text-encoder Linears)
    a = type(a)(a.path, {n: a.modules[n] for n in some}, a.metadata)
    patcher = LoraPatcher(ckpt.unet, ckpt.text_encoder, mode)
    for i in range(100):
        patcher.apply([ActiveLora(a, 0.1 * (i % 7), 1.3)] + ([ActiveLora(b, 0.9)] if i % 3 else []))
        if i % 2:
            patcher.restore()
    patcher.restore()
    assert_bit_identical(ckpt, saved)
    assert all(torch.equal(x, y) for x, y in zip(outputs(ckpt), before))


def test_switching_prompts_repatches_only_what_changed(setup):
    ckpt, _, folder = setup
    a, b = load_lora(folder / "styleA.safetensors"), load_lora(folder / "sub" / "charB.safetensors")
    table = name_table(ckpt.unet, ckpt.text_encoder)
    layers = {"a": {f"{table[n].component}:{table[n].path}" for n in a.modules},
              "b": {f"{table[n].component}:{table[n].path}" for n in b.modules}}
    a_te = {k for k in layers["a"] if k.startswith("text_encoder:")}
    with LoraPatcher(ckpt.unet, ckpt.text_encoder) as patcher:
        assert patcher.apply([ActiveLora(a, 1.0)]) == layers["a"]
        assert patcher.apply([ActiveLora(a, 1.0)]) == set()
        assert patcher.apply([ActiveLora(a, 1.0), ActiveLora(b, 0.5)]) == layers["b"]  # only the layers B touches
        assert patcher.apply([ActiveLora(a, 1.0, 1.0), ActiveLora(b, 0.5, 0.7)]) == set()  # B has no UNet modules
        assert patcher.apply([ActiveLora(a, 0.0, 1.0)]) == a_te | layers["b"]  # A's TE off, B gone; UNet kept
        assert patcher.patched_layers == layers["a"] - a_te


def test_block_weights_zero_leave_blocks_untouched(setup):
    ckpt, _, folder = setup
    a = load_lora(folder / "styleA.safetensors")
    saved = weights(ckpt)
    only_in04 = tuple(1.0 if block == "IN04" else 0.0 for block in BLOCK_IDS_26)
    with LoraPatcher(ckpt.unet, ckpt.text_encoder) as patcher:
        changed = patcher.apply([ActiveLora(a, 1.0, 1.0, only_in04)])
        assert changed and all(k.startswith("unet:input_blocks.4.") for k in changed)
        current = weights(ckpt)
        differ = {k for k, v in saved.items() if not torch.equal(current[k], v)}
        assert differ == {k.removeprefix("unet:") + ".weight" for k in changed}


def test_hand_written_kohya_loha_and_lokr_files_apply(tmp_path):
    ckpt = random_tiny_checkpoint(seed=4)
    table = name_table(ckpt.unet, ckpt.text_encoder)
    tensors = kohya_by_hand(ckpt)
    name_k, name_c = "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k", "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors |= {f"{name_k}.{k}": v for k, v in _loha_for(table[name_k].layer).items()}
    assert table[name_c].layer.weight.shape == (32, 32, 3, 3)  # LoKr: 32 = 4·8 both ways
    tensors |= {f"{name_c}.lokr_w1": torch.randn(4, 4), f"{name_c}.lokr_w2_a": torch.randn(8, 2),
                f"{name_c}.lokr_w2_b": torch.randn(2, 8 * 9), f"{name_c}.alpha": torch.tensor(1.0)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    lora = load_lora(path)
    assert {type(m).__name__ for m in lora.modules.values()} == {"LoRAModule", "LoHaModule", "LoKrModule"}
    saved, base = weights(ckpt), outputs(ckpt)
    results = {}
    for mode in ("merge", "onthefly"):
        with LoraPatcher(ckpt.unet, ckpt.text_encoder, mode) as patcher:
            patcher.apply([ActiveLora(lora, 0.8, 0.9)])
            if mode == "merge":
                q = table[Q]
                by_hand = tensors[f"{Q}.lora_up.weight"].float() @ tensors[f"{Q}.lora_down.weight"].float() * 4 / 8
                torch.testing.assert_close(q.layer.weight, saved[f"{q.path}.weight"] + 0.9 * by_hand)
            results[mode] = outputs(ckpt)
    assert all((m - o).abs().max() < 1e-4 for m, o in zip(results["merge"], results["onthefly"]))
    assert not torch.allclose(results["merge"][1], base[1])
    assert_bit_identical(ckpt, saved)


def _loha_for(layer):
    g = torch.Generator().manual_seed(11)
    out, inp = layer.weight.shape
    return {"hada_w1_a": torch.randn(out, 2, generator=g) * 0.1, "hada_w1_b": torch.randn(2, inp, generator=g) * 0.1,
            "hada_w2_a": torch.randn(out, 2, generator=g) * 0.1, "hada_w2_b": torch.randn(2, inp, generator=g) * 0.1,
            "alpha": torch.tensor(1.0)}


@pytest.mark.parametrize("mode", ["merge", "onthefly"])
@pytest.mark.parametrize("problem", ["unknown module", "wrong shape"])
def test_a_file_for_another_model_applies_nothing(setup, tmp_path, mode, problem):
    ckpt, network, _ = setup
    sd = dict(network.state_dict())
    if problem == "unknown module":
        bad = "lora_unet_up_blocks_3_attentions_0_proj_in"  # the tiny UNet has 3 levels: no up_blocks.3
        sd |= {f"{bad}.lora_down.weight": torch.randn(4, 32, 1, 1), f"{bad}.lora_up.weight": torch.randn(32, 4, 1, 1)}
    else:
        bad = "lora_unet_up_blocks_2_resnets_0_conv2"  # its layer is [32, 32, 3, 3]; the file says 64 out
        sd |= {f"{bad}.lora_up.weight": torch.randn(64, 2, 1, 1)}
    path = save_lora(tmp_path / "bad.safetensors", sd, {}, save_dtype=torch.float32)
    saved = weights(ckpt)
    with LoraPatcher(ckpt.unet, ckpt.text_encoder, mode) as patcher:
        with pytest.raises(LoraFormatError, match=bad):
            patcher.apply([ActiveLora(load_lora(path))])
        assert not patcher.patched_layers
        assert_bit_identical(ckpt, saved)


def test_low_precision_host_restores_exactly(setup):
    ckpt, _, folder = setup
    a = load_lora(folder / "styleA.safetensors")
    half = random_tiny_checkpoint(seed=5)
    half.unet.to(torch.bfloat16)
    saved = {k: v.clone() for k, v in half.unet.state_dict().items()}
    with LoraPatcher(half.unet, None) as patcher:
        with pytest.raises(LoraFormatError, match="lora_te_"):
            patcher.apply([ActiveLora(a)])  # a text-encoder LoRA needs the text encoder
    a_unet = type(a)(a.path, {k: m for k, m in a.modules.items() if k.startswith("lora_unet")}, a.metadata)
    with LoraPatcher(half.unet, None) as patcher:
        patcher.apply([ActiveLora(a_unet)])
        assert half.unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
        assert not torch.equal(half.unet.state_dict()["input_blocks.1.0.in_layers.2.weight"], saved["input_blocks.1.0.in_layers.2.weight"])
    assert all(torch.equal(v, saved[k]) for k, v in half.unet.state_dict().items())


def _params(prompt):
    return GenerationParams(prompt=prompt, steps=1, width=64, height=64, seed=3)


def test_generate_with_loras(setup):
    ckpt, _, folder = setup
    plain = np.asarray(generate(ckpt, _params("a red circle"))[0], dtype=np.int16)
    zero = np.asarray(generate_with_loras(ckpt, _params("a red circle<lora:styleA:0>"), [folder])[0], dtype=np.int16)
    assert np.array_equal(plain, zero)  # tag cut from the prompt, weight 0 changes nothing
    merged = np.asarray(generate_with_loras(ckpt, _params("a red circle<lora:Style A:1.5><lora:charB:1>"), [folder])[0], dtype=np.int16)
    onthefly = np.asarray(generate_with_loras(ckpt, _params("a red circle<lora:styleA:1.5><lora:charB:1>"), [folder],
                                              mode="onthefly")[0], dtype=np.int16)
    assert np.abs(merged - plain).max() > 0 and np.abs(merged - onthefly).max() <= 1  # alias and stem name one file


def test_unknown_lora_name_lists_the_available(setup):
    ckpt, _, folder = setup
    with pytest.raises(LoraNotFoundError, match="'nope'.*available: charB, styleA, styleA16"):
        generate_with_loras(ckpt, _params("x <lora:nope:1>"), [folder])


def test_cli_generate_with_lora_dir(tiny_checkpoint_path, tmp_path, capsys):
    from lib_lora.__main__ import main
    from lib_lora.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint_path)
    folder = tmp_path / "loras"
    save_lora(folder / "mine.safetensors", _trained_network(ckpt, 3).state_dict(), {})
    common = ["generate", "--checkpoint", str(tiny_checkpoint_path), "--width", "64", "--height", "64", "--steps", "1"]
    out = tmp_path / "x.png"
    assert main([*common, "--prompt", "a <lora:mine:0.8> circle", "--lora-dir", str(folder), "--out", str(out)]) == 0
    assert out.is_file()
    assert main([*common, "--prompt", "<lora:other:1>", "--lora-dir", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no LoRA named 'other'" in err and "available: mine" in err
    assert main([*common, "--prompt", "<lora:mine:1>", "--out", str(out)]) == 2
    assert "--lora-dir" in capsys.readouterr().err


def test_lycoris_locon_file_with_tucker_and_extra_targets(tmp_path):
    """LyCORIS's `full` preset also patches conv_in, conv_out and the time embedding; its Tucker LoCon has lora_mid."""
    ckpt = random_tiny_checkpoint(seed=6)
    table = name_table(ckpt.unet, ckpt.text_encoder)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name in ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1", "lora_unet_mid_block_resnets_0_conv2"):
        out, inp, *k = table[name].layer.weight.shape
        tucker = name.endswith("conv2")
        down = torch.randn(2, inp, *([1, 1] if tucker else k), generator=g) * 0.1
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": torch.randn(out, 2, *([1, 1] if k else []), generator=g) * 0.1,
                    f"{name}.alpha": torch.tensor(1.0)}
        if tucker:
            tensors[f"{name}.lora_mid.weight"] = torch.randn(2, 2, *k, generator=g) * 0.1
    path = tmp_path / "lycoris.pt"
    torch.save(tensors, path)  # an old-style .pt file
    lora = load_lora(path)
    results = {}
    for mode in ("merge", "onthefly"):
        with LoraPatcher(ckpt.unet, ckpt.text_encoder, mode) as patcher:
            assert len(patcher.apply([ActiveLora(lora)])) == 4
            results[mode] = outputs(ckpt)[1]
    assert (results["merge"] - results["onthefly"]).abs().max() < 1e-4
    assert table["lora_unet_conv_in"].block == "IN00" and table["lora_unet_conv_out"].block is None
