"""The LoRA toolbox on tiny models: blend = applying both, resize errors as reported, bake = apply, extract
recovers a baked LoRA, inspect reads architecture and counts, and the CLI refuses to overwrite."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lib_lora.__main__ import main
from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.models.checkpoint import load_checkpoint, save_checkpoint
from lib_lora.models.pipeline import GenerationParams, generate
from lib_lora.networks.apply import generate_with_loras
from lib_lora.networks.errors import LoraFormatError
from lib_lora.networks.files import load_lora, save_lora
from lib_lora.networks.lora import LoRAModule
from lib_lora.networks.metadata import training_metadata
from lib_lora.networks.network import make_network
from lib_lora.networks.patcher import ActiveLora, LoraPatcher
from lib_lora.networks.targets import name_table, text_models_for
from lib_lora.tools import (RankRule, ToolError, bake_loras, blend_loras, extract_lora, inspect_lora, resize_lora)
from lib_lora.tools.lowrank import lowrank_of
from test_networks_apply import outputs
from test_networks_helpers import one_thread  # noqa: F401 (fixture)

FP32 = torch.float32
PARAMS = GenerationParams(prompt="a red circle", steps=3, width=64, height=64, seed=7)


def random_network(ckpt, seed: int, **kwargs):
    """A network with every factor perturbed (lora_up non-zero), so every delta is non-zero."""
    network = make_network(ckpt.unet, text_models_for(ckpt.arch, ckpt.text_encoder, ckpt.text_encoder_2), **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return network


def sd1_metadata(name: str) -> dict[str, str]:
    return training_metadata(output_name=name, network_dim=4, network_alpha=2, base_model_version="sd_v1",
                             tag_frequency={"10_zkz": {"zkz": 12, "purple": 9}}, modelspec={"trigger_phrase": "zkz"})


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The tiny SD1 model saved as a checkpoint, A (LoCon 4/2, conv 2/1) and B (LoRA 3/3) saved in fp32."""
    folder = tmp_path_factory.mktemp("tools")
    ckpt = random_tiny_checkpoint(seed=3)
    save_checkpoint(ckpt, folder / "base.safetensors")
    a = random_network(ckpt, 1, network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    b = random_network(ckpt, 2, network_dim=3, network_alpha=3)
    save_lora(folder / "A.safetensors", a.state_dict(), sd1_metadata("A"), save_dtype=FP32)
    save_lora(folder / "B.safetensors", b.state_dict(), {}, save_dtype=FP32)
    return ckpt, folder


def layer_shapes(ckpt) -> dict[str, torch.Size]:
    table = name_table(ckpt.unet, text_models_for(ckpt.arch, ckpt.text_encoder, ckpt.text_encoder_2))
    return {name: target.layer.weight.shape for name, target in table.items()}


def summed_delta(ckpt, weighted, name):
    shape = layer_shapes(ckpt)[name]
    return sum(w * lora.modules[name].delta_weight(shape) for lora, w in weighted if name in lora.modules)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("wa, wb", [(1.0, 1.0), (0.7, -0.4)])
def test_exact_blend_has_the_weighted_sum_of_deltas(sd1, tmp_path, wa, wb):
    ckpt, folder = sd1
    a, b = load_lora(folder / "A.safetensors"), load_lora(folder / "B.safetensors")
    result = blend_loras([(folder / "A.safetensors", wa), (folder / "B.safetensors", wb)], tmp_path / "AB.safetensors")
    blend = load_lora(result.path)
    assert set(blend.modules) == set(a.modules) | set(b.modules) and result.max_error == 0
    shapes = layer_shapes(ckpt)
    for name, module in blend.modules.items():
        assert module.rank == a.modules[name].rank + (b.modules[name].rank if name in b.modules else 0)
        assert module.alpha_value == module.rank  # scale 1: the weights and scales live in lora_up
        expected = summed_delta(ckpt, [(a, wa), (b, wb)], name)
        assert (module.delta_weight(shapes[name]) - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    conv = blend.modules["lora_unet_down_blocks_0_resnets_0_conv1"]  # kohya's LoCon layout: 3x3 down, 1x1 up
    assert conv.lora_down.weight.shape[2:] == (3, 3) and conv.lora_up.weight.shape[2:] == (1, 1)
    record = json.loads(blend.metadata["lib_lora.tool"])
    assert [(i["file"], i["weight"], i["sshs_model_hash"]) for i in record["inputs"]] == [
        ("A.safetensors", wa, a.metadata["sshs_model_hash"]), ("B.safetensors", wb, b.metadata["sshs_model_hash"])]
    assert blend.metadata["ss_base_model_version"] == "sd_v1" and blend.metadata["modelspec.trigger_phrase"] == "zkz"
    assert json.loads(blend.metadata["ss_tag_frequency"]) == {"10_zkz": {"zkz": 12, "purple": 9}}


def test_exact_blend_generates_the_images_of_both_loras(sd1, tmp_path):
    ckpt, folder = sd1
    blend_loras([(folder / "A.safetensors", 1.0), (folder / "B.safetensors", 1.0)], tmp_path / "AB.safetensors")
    both = generate_with_loras(ckpt, replace(PARAMS, prompt="<lora:A:1><lora:B:1>a red circle"), [folder])
    blended = generate_with_loras(ckpt, replace(PARAMS, prompt="<lora:AB:1>a red circle"), [tmp_path])
    plain = generate(ckpt, PARAMS)
    diff = np.abs(np.asarray(both[0], dtype=int) - np.asarray(blended[0], dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # fp32 sums in another order: a rare uint8 rounding flip
    assert not np.array_equal(np.asarray(both[0]), np.asarray(plain[0]))  # the LoRAs do change the image


def test_blend_by_svd_reports_the_error_it_makes(sd1, tmp_path):
    ckpt, folder = sd1
    a, b = load_lora(folder / "A.safetensors"), load_lora(folder / "B.safetensors")
    result = blend_loras([(folder / "A.safetensors", 1.0), (folder / "B.safetensors", 0.5)], tmp_path / "AB3.safetensors",
                         RankRule(rank=3, conv_rank=1))
    blend, shapes = load_lora(result.path), layer_shapes(ckpt)
    for report in result.modules:
        module = blend.modules[report.name]
        expected = summed_delta(ckpt, [(a, 1.0), (b, 0.5)], report.name)
        assert module.rank == report.rank <= (1 if module.lora_down.weight.shape[2:] == (3, 3) else 3)
        assert relative(module.delta_weight(shapes[report.name]), expected) == pytest.approx(report.error, abs=1e-5)
    assert result.max_error > 0.05  # rank 7 cut to 3: a real loss, reported


def test_resize_to_full_rank_is_lossless(sd1, tmp_path):
    ckpt, folder = sd1
    a = load_lora(folder / "A.safetensors")
    result = resize_lora(folder / "A.safetensors", tmp_path / "A4.safetensors", RankRule(rank=4, conv_rank=2))
    resized, shapes = load_lora(result.path), layer_shapes(ckpt)
    assert result.max_error < 1e-6
    for name, module in resized.modules.items():
        original = a.modules[name]
        assert (module.rank, module.scale) == (original.rank, pytest.approx(original.scale))  # kohya keeps alpha/rank
        assert relative(module.delta_weight(shapes[name]), original.delta_weight(shapes[name])) < 1e-5


@pytest.mark.parametrize("rule", [RankRule(rank=2, conv_rank=1), RankRule(fro=0.9), RankRule(energy=0.8, rank=3)])
def test_resize_reports_the_error_measured_between_the_deltas(sd1, tmp_path, rule):
    ckpt, folder = sd1
    a = load_lora(folder / "A.safetensors")
    result = resize_lora(folder / "A.safetensors", tmp_path / "A_small.safetensors", rule)
    resized, shapes = load_lora(result.path), layer_shapes(ckpt)
    for report in result.modules:
        original = a.modules[report.name].delta_weight(shapes[report.name])
        assert resized.modules[report.name].rank == report.rank <= report.source_rank
        assert relative(resized.modules[report.name].delta_weight(shapes[report.name]), original) == pytest.approx(report.error, abs=1e-5)
        if rule.fro is not None:  # sv_fro keeps 90% of the norm: the error is at most sqrt(1 - 0.9²)
            assert report.error <= (1 - 0.9**2) ** 0.5 + 1e-6
    assert result.max_error > 0.01
    meta = resized.metadata
    assert json.loads(meta["lib_lora.tool"])["inputs"][0]["file"] == "A.safetensors" and meta["ss_output_name"] == "A"
    assert meta["ss_training_comment"].startswith("resized from A.safetensors")


def test_resize_refuses_a_rank_above_every_module(sd1, tmp_path):
    _, folder = sd1
    with pytest.raises(ToolError, match=r"A\.safetensors: --rank 8 is above every module's rank \(largest 4\)"):
        resize_lora(folder / "A.safetensors", tmp_path / "A8.safetensors", RankRule(rank=8))


def test_bake_then_generate_equals_apply_then_generate(sd1, tmp_path):
    ckpt, folder = sd1
    loras = [(folder / "A.safetensors", 0.8), (folder / "B.safetensors", -0.5)]
    out = bake_loras(folder / "base.safetensors", loras, tmp_path / "baked.safetensors")
    baked = load_checkpoint(out)
    with LoraPatcher(ckpt.unet, ckpt.text_encoder) as patcher:
        patcher.apply([ActiveLora(load_lora(path), w, w) for path, w in loras])
        expected, expected_image = outputs(ckpt), generate(ckpt, PARAMS)
    for got, want in zip(outputs(baked), expected):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert np.array_equal(np.asarray(generate(baked, PARAMS)[0]), np.asarray(expected_image[0]))
    record = json.loads(baked.metadata["lib_lora.tool"])
    assert [i["file"] for i in record["inputs"]] == ["base.safetensors", "A.safetensors", "B.safetensors"]
    assert record["inputs"][1]["weight"] == 0.8 and len(record["inputs"][1]["sshs_model_hash"]) == 64


def test_bake_refuses_its_source_and_an_existing_file(sd1, tmp_path):
    _, folder = sd1
    loras = [(folder / "A.safetensors", 1.0)]
    with pytest.raises(ToolError, match="is also an input"):
        bake_loras(folder / "base.safetensors", loras, folder / "base.safetensors", overwrite=True)
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    with pytest.raises(ToolError, match="already exists"):
        bake_loras(folder / "base.safetensors", loras, tmp_path / "taken.safetensors")
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_extract_recovers_a_baked_lora(tmp_path, arch):
    ckpt = random_tiny_checkpoint(seed=11, arch=arch)
    save_checkpoint(ckpt, tmp_path / "base.safetensors")
    network = random_network(ckpt, 4, network_dim=4, network_alpha=4, conv_dim=2, conv_alpha=2)
    save_lora(tmp_path / "lora.safetensors", network.state_dict(), {}, save_dtype=FP32)
    bake_loras(tmp_path / "base.safetensors", [(tmp_path / "lora.safetensors", 1.0)], tmp_path / "tuned.safetensors")
    result = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                          rank=4, conv_rank=2, min_diff=0.0, dtype=FP32)
    lora, extracted, shapes = load_lora(tmp_path / "lora.safetensors"), load_lora(result.path), layer_shapes(ckpt)
    assert set(extracted.modules) == set(lora.modules) and not result.skipped
    errors = [relative(extracted.modules[n].delta_weight(shapes[n]), lora.modules[n].delta_weight(shapes[n])) for n in lora.modules]
    assert max(errors) < 1e-3 and result.max_error < 1e-3
    if arch == "sdxl":
        assert {n.split("_")[1] for n in extracted.modules} == {"unet", "te1", "te2"}
        assert extracted.metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_extract_skips_layers_below_min_diff_and_refuses_when_nothing_differs(sd1, tmp_path):
    _, folder = sd1
    with pytest.raises(ToolError, match="no layer differs"):
        extract_lora(folder / "base.safetensors", folder / "base.safetensors", tmp_path / "x.safetensors", rank=4, min_diff=0.0)


def test_inspect_reads_a_kohya_sd1_file(sd1):
    _, folder = sd1
    report = inspect_lora(folder / "A.safetensors")
    a = load_lora(folder / "A.safetensors")
    convs = [n for n, m in a.modules.items() if m.lora_down.weight.shape[2:] == (3, 3)]
    assert (report.architecture, report.architecture_source) == ("sd1", "ss_base_model_version")
    assert report.components == {"te": sum(n.startswith("lora_te_") for n in a.modules),
                                 "unet": sum(n.startswith("lora_unet_") for n in a.modules)}
    assert report.algorithms == {"lora": len(a.modules) - len(convs), "locon": len(convs)}
    assert report.ranks == {2: len(convs), 4: len(a.modules) - len(convs)}
    assert report.alphas == {1.0: len(convs), 2.0: len(a.modules) - len(convs)}
    assert report.dtypes == {"float32": 3 * len(a.modules)} and report.key_format == "kohya"
    assert report.trigger_phrase == "zkz" and report.top_tags == [("zkz", 12), ("purple", 9)]
    assert report.training["ss_network_dim"] == "4" and report.hashes["sshs_model_hash"] == report.data_hash
    assert not report.problems


def test_inspect_reads_an_sdxl_file_by_its_keys(tmp_path):
    ckpt = random_tiny_checkpoint(seed=2, arch="sdxl")
    network = random_network(ckpt, 1, network_dim=2, network_alpha=1)
    save_lora(tmp_path / "xl.safetensors", network.state_dict(), {}, save_dtype=torch.float16)
    report = inspect_lora(tmp_path / "xl.safetensors")
    names = network.module_names()
    assert (report.architecture, report.architecture_source) == ("sdxl", "module names and shapes")
    assert report.components == {p: sum(n.startswith(f"lora_{p}_") for n in names) for p in ("te1", "te2", "unet")}
    assert report.ranks == {2: len(names)} and report.dtypes == {"float16": 3 * len(names)}


@pytest.mark.parametrize("width, layer, arch", [(768, 0, "sd1"), (1024, 0, "sd2"), (64, 22, "sd2"), (64, 0, None)])
def test_inspect_guesses_sd1_and_sd2_from_text_encoder_shapes(tmp_path, width, layer, arch):
    name = f"lora_te_text_model_encoder_layers_{layer}_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": torch.ones(2, width), f"{name}.lora_up.weight": torch.ones(width, 2)},
              str(tmp_path / "te.safetensors"))
    assert inspect_lora(tmp_path / "te.safetensors").architecture == arch


def test_inspect_reads_diffusers_peft_keys(sd1, tmp_path):
    _, folder = sd1
    tensors = {}
    for name, module in load_lora(folder / "B.safetensors").modules.items():
        component, path = ("unet", name[len("lora_unet_"):]) if name.startswith("lora_unet_") else ("text_encoder", name[len("lora_te_"):])
        tensors[f"{component}.{path}.lora_A.weight"] = module.lora_down.weight
        tensors[f"{component}.{path}.lora_B.weight"] = module.lora_up.weight
    save_file(tensors, str(tmp_path / "peft.safetensors"))
    report = inspect_lora(tmp_path / "peft.safetensors")
    assert report.key_format == "diffusers/PEFT" and set(report.components) == {"te1", "unet"}
    assert report.alphas == {None: report.module_count}


def test_blending_files_of_different_architectures_is_refused(sd1, tmp_path):
    _, folder = sd1
    ckpt = random_tiny_checkpoint(seed=2, arch="sdxl")
    save_lora(tmp_path / "xl.safetensors", random_network(ckpt, 1, network_dim=2).state_dict(), {}, save_dtype=FP32)
    with pytest.raises(LoraFormatError, match=r"A\.safetensors is an SD1 LoRA .*xl\.safetensors is an SDXL LoRA"):
        blend_loras([(folder / "A.safetensors", 1.0), (tmp_path / "xl.safetensors", 1.0)], tmp_path / "mix.safetensors")


def test_loha_modules_blend_by_svd_only(sd1, tmp_path):
    """LoHa has no up/down pair to stack: exact blending refuses it, SVD at full rank reproduces it (flat 3x3 conv too)."""
    ckpt, folder = sd1
    shapes, g = layer_shapes(ckpt), torch.Generator().manual_seed(3)
    tensors = {}
    for name in ("lora_unet_down_blocks_1_attentions_0_proj_out", "lora_unet_down_blocks_0_resnets_0_conv1"):
        out, flat_in = shapes[name][0], shapes[name][1:].numel()
        for i in ("1", "2"):  # LyCORIS stores a conv factor flat: [r, in·kh·kw]
            tensors[f"{name}.hada_w{i}_a"] = torch.randn(out, 2, generator=g) * 0.1
            tensors[f"{name}.hada_w{i}_b"] = torch.randn(2, flat_in, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(tmp_path / "loha.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    inputs = [(tmp_path / "loha.safetensors", 1.0), (folder / "B.safetensors", 1.0)]
    with pytest.raises(ToolError, match="loha module.*pass --rank"):
        blend_loras(inputs, tmp_path / "exact.safetensors")
    blend = load_lora(blend_loras(inputs, tmp_path / "svd.safetensors", RankRule(rank=64)).path)
    loha, b = load_lora(tmp_path / "loha.safetensors"), load_lora(folder / "B.safetensors")
    conv = blend.modules["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.lora_down.weight.shape[2:] == (3, 3)
    for name in tensors.keys() - {"alpha"}:
        name = name.split(".")[0]
        expected = summed_delta(ckpt, [(loha, 1.0), (b, 1.0)], name)
        assert relative(blend.modules[name].delta_weight(shapes[name]), expected) < 1e-5


def test_a_tucker_locon_becomes_a_conventional_one_exactly():
    g = torch.Generator().manual_seed(0)
    module = LoRAModule("lora_unet_x_conv1", torch.randn(3, 8, 1, 1, generator=g), torch.randn(6, 3, 1, 1, generator=g),
                        torch.tensor(1.5), torch.randn(3, 3, 3, 3, generator=g), trainable=False)
    factors = lowrank_of(module)
    assert factors.in_shape == (8, 3, 3)
    torch.testing.assert_close(factors.delta().reshape(6, 8, 3, 3), module.delta_weight((6, 8, 3, 3)))


def test_cli_runs_each_tool_and_refuses_to_overwrite(sd1, tmp_path, capsys):
    _, folder = sd1
    a, b, base = (str(folder / n) for n in ("A.safetensors", "B.safetensors", "base.safetensors"))
    out = tmp_path / "out"
    runs = [
        (["inspect", a], "architecture: sd1"),
        (["blend", f"{a}:1", f"{b}:0.5", "-o", f"{out}/blend.safetensors"], "blend.safetensors"),
        (["blend", a, b, "--rank", "2", "-o", f"{out}/blend2.safetensors", "--precision", "fp16"], "relative error max"),
        (["resize", a, "--fro", "0.9", "-o", f"{out}/fro.safetensors", "-v"], "rank 4 ->"),
        (["bake", base, f"{a}:0.7", "-o", f"{out}/baked.safetensors"], "baked.safetensors"),
        (["extract", base, f"{out}/baked.safetensors", "--rank", "4", "--conv-rank", "2", "-o", f"{out}/x.safetensors"], "x.safetensors"),
    ]
    for argv, expected in runs:
        assert main(argv) == 0, argv
        assert expected in capsys.readouterr().out
    assert inspect_lora(out / "blend2.safetensors").dtypes == {"float16": inspect_lora(out / "blend2.safetensors").module_count * 3}
    refusals = [
        (["blend", a, "-o", f"{out}/blend.safetensors"], "already exists; choose another name or pass --overwrite"),
        (["resize", a, "--rank", "2", "-o", a, "--overwrite"], "is also an input"),
        (["bake", base, a, "-o", base, "--overwrite"], "is also an input"),
        (["extract", base, f"{out}/baked.safetensors", "--rank", "4", "-o", f"{out}/x.safetensors"], "already exists"),
        (["inspect", f"{folder}/missing.safetensors"], "missing.safetensors: no such LoRA file"),
        (["blend", f"{folder}/missing.safetensors:1", "-o", f"{out}/m.safetensors"], "missing.safetensors: no such LoRA file"),
    ]
    for argv, message in refusals:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert main(["blend", a, b, "-o", f"{out}/blend.safetensors", "--overwrite"]) == 0


def test_dora_modules_are_reported_and_refused_by_blend_and_resize(sd1, tmp_path):
    ckpt, folder = sd1
    name = "lora_unet_down_blocks_1_attentions_0_proj_out"
    tensors = {k: v.clone() for k, v in load_lora(folder / "B.safetensors").modules[name].state_dict().items()}
    tensors = {f"{name}.{k}": v for k, v in tensors.items()} | {f"{name}.dora_scale": torch.ones(layer_shapes(ckpt)[name][0], 1)}
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    assert inspect_lora(tmp_path / "dora.safetensors").algorithms == {"lora+dora": 1}
    with pytest.raises(ToolError, match=f"dora.safetensors: {name} is a DoRA module"):
        blend_loras([(tmp_path / "dora.safetensors", 1.0)], tmp_path / "x.safetensors", RankRule(rank=2))
    with pytest.raises(ToolError, match="DoRA"):
        resize_lora(tmp_path / "dora.safetensors", tmp_path / "y.safetensors", RankRule(rank=2))
