"""After training: saved files, the epoch x weight grid, and keeping one epoch as the final LoRA."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora.hosts.standalone import StandaloneHost
from lib_lora.models.pipeline import GenerationParams
from lib_lora.networks.files import save_lora
from lib_lora.networks.network import make_network
from lib_lora.ui import compare


def touch(path, text="x"):
    path.write_text(text)
    return path


@pytest.fixture
def run_files(tmp_path):
    for name in ("c-000002", "c-000010", "c-000001", "c-step00000050", "c", "cc-000001", "c-old", "other"):
        touch(tmp_path / f"{name}.safetensors", name)
    touch(tmp_path / "c.json", json.dumps({"activation text": "zkz"}))
    return tmp_path


def test_epoch_files_are_the_runs_saves_in_order(run_files):
    files = compare.epoch_files(run_files, "c")
    assert [f.label for f in files] == ["epoch 1", "epoch 2", "epoch 10", "step 50", "final"]
    assert [f.path.stem for f in files] == ["c-000001", "c-000002", "c-000010", "c-step00000050", "c"]
    assert compare.epoch_files(run_files / "missing", "c") == []


def test_parse_weights():
    assert compare.parse_weights("0.4, 0.7,1") == (0.4, 0.7, 1.0) and compare.parse_weights("1;0") == (1.0, 0.0)
    with pytest.raises(ValueError, match="'x' is not a number"):
        compare.parse_weights("0.5, x")
    with pytest.raises(ValueError, match="at least one"):
        compare.parse_weights(" , ")


def test_grid_renders_every_file_at_every_weight_with_one_seed(run_files):
    calls = []

    def generate(params):
        calls.append(params)
        return [Image.new("RGB", (params.width, params.height), (len(calls) * 20, 0, 0))]

    files = compare.epoch_files(run_files, "c")[:2]
    progress = []
    grid = compare.comparison_grid(generate, files, (0.5, 1.0), GenerationParams("a zkz star", seed=3, width=64, height=64, batch_size=4),
                                   progress=lambda i, n: progress.append((i, n)))
    assert [p.prompt for p in calls] == ["a zkz star <lora:c-000001:0.5>", "a zkz star <lora:c-000001:1>",
                                         "a zkz star <lora:c-000002:0.5>", "a zkz star <lora:c-000002:1>"]
    assert {p.seed for p in calls} == {3} and {p.batch_size for p in calls} == {1} and progress[-1] == (4, 4)
    assert grid.width > 2 * 64 * 3 and grid.height > 2 * 64 * 3  # scaled up 3x for a 64 px model, with labels
    with pytest.raises(ValueError, match="no saved LoRA files"):
        compare.comparison_grid(generate, [], (1.0,), GenerationParams("x"))


def test_standalone_host_generate_applies_lora_tags_for_that_call_only(tiny_checkpoint_path, tmp_path):
    """The comparison grid relies on host.generate resolving `<lora:name:w>` from the host's Lora folder."""
    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    network = make_network(host.unet, host.text_encoders, network_dim=4, network_alpha=4)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.2)
    save_lora(host.lora_dir / "tagged.safetensors", network.state_dict(), {}, save_dtype=torch.float32)
    pixels = lambda prompt: np.asarray(host.generate(GenerationParams(prompt, steps=4, width=64, height=64))[0], dtype=float)
    plain = pixels("a red square")
    assert np.abs(pixels("a red square <lora:tagged:1>") - plain).mean() > 1.0
    assert np.array_equal(pixels("a red square"), plain)  # nothing stays applied after the call


def test_keep_copies_the_epoch_atomically_and_never_overwrites_silently(run_files):
    chosen, final = run_files / "c-000002.safetensors", run_files / "c.safetensors"
    with pytest.raises(ValueError, match="already exists"):
        compare.keep_epoch(chosen, final)
    assert final.read_text() == "c"
    result = compare.keep_epoch(chosen, final, replace_existing=True)
    assert final.read_text() == "c-000002" and chosen.exists() and result.deleted == []
    kept = compare.keep_epoch(run_files / "c-000001.safetensors", run_files / "c_best.safetensors")
    assert (run_files / "c_best.safetensors").read_text() == "c-000001"
    assert json.loads((run_files / "c_best.json").read_text()) == {"activation text": "zkz"}  # the run's card came along
    assert "kept c-000001.safetensors as c_best.safetensors" in kept.message
    assert not [p for p in run_files.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="already is the final file"):
        compare.keep_epoch(final, final, replace_existing=True)


def test_keep_deletes_the_epoch_files_only_when_asked(run_files):
    epochs = [f.path for f in compare.epoch_files(run_files, "c") if f.label != "final"]
    result = compare.keep_epoch(run_files / "c-000010.safetensors", run_files / "c_final.safetensors", delete=epochs)
    assert sorted(p.name for p in result.deleted) == sorted(p.name for p in epochs)
    assert (run_files / "c_final.safetensors").read_text() == "c-000010"
    assert [f.label for f in compare.epoch_files(run_files, "c")] == ["final"]
    assert (run_files / "cc-000001.safetensors").exists() and (run_files / "c-old.safetensors").exists()
