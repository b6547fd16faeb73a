"""The tab's Tools section through its handlers (what its buttons call), on the tiny model: each tool
writes its file into the Lora output folder (bake: the checkpoint folder) with its report; clashes and
bad fields are refused by name; extract and bake wait for the model while it trains."""

from html import unescape

import pytest
import torch

from lib_lora.demo.tiny import random_tiny_checkpoint
from lib_lora.models.checkpoint import save_checkpoint
from lib_lora.networks.files import load_lora, save_lora
from lib_lora.ui.controller import TabController
from lib_lora.ui.settings import TabSettings
from test_tools import random_network, sd1_metadata

pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The webui's layout: models/Lora holds A (LoCon 4, conv 2) and B (LoRA 3), models/Stable-diffusion the base and another."""
    root = tmp_path_factory.mktemp("webui")
    loras, checkpoints = root / "models" / "Lora", root / "models" / "Stable-diffusion"
    loras.mkdir(parents=True)
    checkpoints.mkdir(parents=True)
    ckpt = random_tiny_checkpoint(seed=3)
    save_checkpoint(ckpt, checkpoints / "base.safetensors")
    save_checkpoint(random_tiny_checkpoint(seed=4), checkpoints / "other.safetensors")
    save_lora(loras / "A.safetensors", random_network(ckpt, 1, network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1).state_dict(),
              sd1_metadata("A"), save_dtype=torch.float32)
    save_lora(loras / "B.safetensors", random_network(ckpt, 2, network_dim=3, network_alpha=3).state_dict(), {}, save_dtype=torch.float32)
    return root


@pytest.fixture
def panel(folders, tmp_path):
    """The Tools section of a tab whose Lora output folder is tmp_path/lora (no host is ever made)."""
    from lib_lora.ui.tab import create_tab

    models = folders / "models"
    settings = TabSettings(lora_dir=tmp_path / "lora", runs_dir=tmp_path / "runs", tool_lora_dirs=(models / "Lora",),
                           checkpoint_dirs=(models / "Stable-diffusion",))
    _, controller, tab = create_tab(TabController(lambda: pytest.fail("the tools need no host"), settings))
    return tab.tools


def ranks(path) -> set[int]:
    return {module.rank for module in load_lora(path).modules.values()}


def test_the_pickers_list_the_webui_folders(panel):
    assert panel.inspect_file.choices in (["A.safetensors", "B.safetensors"], [("A.safetensors",) * 2, ("B.safetensors",) * 2])
    assert list(panel.tools.checkpoints()) == ["base.safetensors", "other.safetensors"]


def test_inspect_shows_the_report(panel):
    report = panel.inspect("A.safetensors")
    assert "architecture: sd1 (from ss_base_model_version)" in report and "trigger phrase: zkz" in report
    assert "error" not in panel.inspect("B.safetensors")


def test_blend_and_resize_write_their_files_with_a_module_report(panel, tmp_path):
    blended = panel.blend(["A.safetensors", "B.safetensors"], "1, 0.5", 0, 0, "as the input", "AB")  # 0: as Gradio 3 sends an empty field
    assert "wrote AB.safetensors: " in blended and "relative error max 0," in blended
    assert ranks(tmp_path / "lora" / "AB.safetensors") == {7, 4, 2}  # 4 + 3 where both have the module; A's convs alone
    resized = panel.resize("A.safetensors", "fixed rank", 2, None, None, "fp16", "A_r2")
    assert "wrote A_r2.safetensors: " in resized and "relative error max" in resized
    errors = [float(cell.split("</td>")[0]) for cell in resized.split("<td>")[1:][3::4]]
    assert errors and max(errors) > 0  # a real cut, each module's error reported
    assert ranks(tmp_path / "lora" / "A_r2.safetensors") == {2}
    kept = panel.resize("A.safetensors", "Frobenius norm kept (sv_fro)", 4, 0.999, None, "as the input", "A_fro")
    assert "wrote A_fro.safetensors" in kept


def test_bake_then_extract_recovers_the_lora(panel, folders, tmp_path):
    baked = panel.bake("base.safetensors", ["B.safetensors"], "", False, "tuned")
    tuned = folders / "models" / "Stable-diffusion" / "tuned.safetensors"
    assert "wrote tuned.safetensors: base.safetensors with B.safetensors at 1" in baked and tuned.is_file()
    extracted = panel.extract("base.safetensors", "tuned.safetensors", 3, None, 0.0, "fp32", "cpu", "B_back")
    assert "wrote B_back.safetensors: " in extracted
    back, original = load_lora(tmp_path / "lora" / "B_back.safetensors"), load_lora(folders / "models" / "Lora" / "B.safetensors")
    assert set(back.modules) == set(original.modules) and ranks(tmp_path / "lora" / "B_back.safetensors") == {3}
    tuned.unlink()


def test_an_existing_name_is_refused_and_the_file_kept(panel, tmp_path):
    assert "wrote AB.safetensors" in panel.blend(["A.safetensors", "B.safetensors"], "", None, None, "as the input", "AB")
    first = (tmp_path / "lora" / "AB.safetensors").read_bytes()
    refused = panel.blend(["A.safetensors"], "", None, None, "as the input", "AB")
    assert "Output name: " in refused and "AB.safetensors already exists" in refused and "train-lora-error" in refused
    assert (tmp_path / "lora" / "AB.safetensors").read_bytes() == first
    over_the_base = panel.bake("base.safetensors", ["A.safetensors"], "", False, "base")
    assert "Output name: " in over_the_base and "base.safetensors already exists" in over_the_base


@pytest.mark.parametrize("call, field", [
    (lambda p: p.blend([], "", None, None, "as the input", "x"), "LoRA files: choose at least one"),
    (lambda p: p.blend(["A.safetensors"], "1, 2", None, None, "as the input", "x"), "Weights: give 1 finite number"),
    (lambda p: p.blend(["A.safetensors"], "", None, 2, "as the input", "x"), "Conv rank: give a Rank too"),
    (lambda p: p.blend(["A.safetensors"], "", None, None, "as the input", "../x"), "Output name: '../x' contains /"),
    (lambda p: p.resize("A.safetensors", "fixed rank", 0, None, None, "fp16", "x"), "Rank: 0 is not a positive whole number"),
    (lambda p: p.resize("A.safetensors", "Frobenius norm kept (sv_fro)", None, 1.5, None, "fp16", "x"), "Kept: fro must be in (0, 1]"),
    (lambda p: p.resize("../../etc/A.safetensors", "fixed rank", 2, None, None, "fp16", "x"), "LoRA file: '../../etc/A.safetensors' is not a file in"),
    (lambda p: p.extract("base.safetensors", "base.safetensors", 4, None, 0.01, "fp16", "cpu", "x"), "Tuned checkpoint: choose another"),
    (lambda p: p.extract("base.safetensors", "", 4, None, 0.01, "fp16", "cpu", "x"), "Tuned checkpoint: choose a file"),
    (lambda p: p.bake("", ["A.safetensors"], "", False, "x"), "Base checkpoint: choose a file"),
])
def test_bad_fields_are_refused_by_name(panel, tmp_path, call, field):
    shown = unescape(call(panel))
    assert field in shown and "train-lora-error" in shown
    assert not (tmp_path / "lora" / "x.safetensors").exists()


def test_tools_that_load_checkpoints_wait_while_the_model_is_in_use(panel, tmp_path):
    with panel.tools.c.use_model("training"):  # as a run holds it
        assert "the model is busy" in panel.bake("base.safetensors", ["B.safetensors"], "", False, "busy")
        assert "the model is busy" in panel.extract("base.safetensors", "other.safetensors", 4, None, 0.0, "fp16", "cpu", "busy")
        assert "architecture: sd1" in panel.inspect("A.safetensors")  # files only: these run while training
        assert "wrote B_r2.safetensors" in panel.resize("B.safetensors", "fixed rank", 2, None, None, "fp16", "B_r2")
    assert not (tmp_path / "lora" / "busy.safetensors").exists()
