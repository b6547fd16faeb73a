"""The webui entry points: scripts/train_lora.py registration, preload.py options, install.py.

Each file is executed the way the webui does it (webui-integration.md §1.2-1.4), against the
stand-in webui in tests/fake_webui. The tab builder is stubbed, so gradio is not needed.
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import fake_webui
import lib_lora.ui
from lib_lora.hosts import webui as webui_host

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def webui(tmp_path, monkeypatch):
    env = fake_webui.install(tmp_path, monkeypatch)
    yield env
    fake_webui.uninstall()


def run_file(path: Path, name: str):
    """As modules/scripts.py load_scripts: spec_from_file_location, module not put in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tab_builder(monkeypatch):
    built = []

    def build_tab(controller, settings=None):
        built.append((controller.host_factory, controller.settings))
        return "<blocks>"

    monkeypatch.setattr(lib_lora.ui, "build_tab", build_tab, raising=False)
    return built


def test_script_registers_the_tab_settings_and_unload(webui, tab_builder):
    run_file(ROOT / "scripts" / "train_lora.py", "train_lora.py")
    registered = webui.modules.script_callbacks.registered
    assert sorted(registered) == ["app_started", "script_unloaded", "ui_settings", "ui_tabs"]
    (on_ui_tabs,) = registered["ui_tabs"]
    assert on_ui_tabs() == [("<blocks>", "Train LoRA", "train_lora")]
    ((host_factory, settings),) = tab_builder
    assert type(host_factory.__self__) is webui_host.WebuiTab and settings.job_lock == host_factory.__self__.session
    assert settings.lora_dir == webui.root / "models" / "Lora" and settings.presets_dir == webui.root / "train-lora" / "presets"
    assert settings.tool_lora_dirs == (webui.root / "models" / "Lora",)  # the Tools' pickers list the webui's folders
    assert settings.checkpoint_dirs == (webui.root / "models" / "Stable-diffusion",)
    assert settings.runs_dir == webui.root / "outputs" / "train-lora"
    assert settings.defaults == {"clip_skip": 1, "mixed_precision": "no"} and set(settings.captioners) == {"BLIP", "DeepBooru"}
    assert registered["script_unloaded"][1:] == [webui_host.interrupt_active]


def test_the_dataset_root_flag_limits_the_tabs_dataset_folders(webui, tab_builder, monkeypatch, tmp_path):
    root = tmp_path / "datasets"
    (root / "mine").mkdir(parents=True)
    monkeypatch.setattr(webui.modules.shared.cmd_opts, "train_lora_dataset_root", str(root))
    module = run_file(ROOT / "scripts" / "train_lora.py", "train_lora.py")
    controller = module.controller()
    assert controller.settings.dataset_roots == (root,)
    assert controller.summary({"train_data_dir": str(tmp_path)}).error.startswith(f"train_data_dir: {tmp_path} is outside the dataset root")
    assert "outside" not in controller.summary({"train_data_dir": str(root / "mine")}).error


def test_app_started_adds_the_api_on_the_tabs_controller_behind_api_auth(webui, tab_builder, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    monkeypatch.setattr(webui.shared.cmd_opts, "api_auth", "ann:secret,bob:pw", raising=False)
    script = run_file(ROOT / "scripts" / "train_lora.py", "train_lora.py")
    script.on_ui_tabs()
    app = FastAPI()
    script.on_app_started(None, app)
    client = TestClient(app)
    assert client.get("/train-lora/v1/queue").status_code == 401
    assert client.get("/train-lora/v1/queue", auth=("ann", "wrong")).status_code == 401
    answer = client.get("/train-lora/v1/queue", auth=("bob", "pw"))
    assert answer.status_code == 200 and answer.json()["jobs"] == []
    assert script.controller() is script._controller and script._controller.settings is tab_builder[0][1]  # the tab's controller
    hold_queue = webui.modules.script_callbacks.registered["script_unloaded"][-2]
    hold_queue()  # Reload UI: the old controller starts no more jobs
    assert script._controller.queue_held


def test_settings_appear_in_their_own_section_under_training(webui, tab_builder, monkeypatch):
    if importlib.util.find_spec("gradio") is None:
        monkeypatch.setitem(sys.modules, "gradio", types.SimpleNamespace(Radio="Radio"))
    run_file(ROOT / "scripts" / "train_lora.py", "train_lora.py")
    (on_ui_settings,) = webui.modules.script_callbacks.registered["ui_settings"]
    on_ui_settings()
    opts = webui.shared.opts
    assert {"train_lora_runs_dir", "train_lora_medvram_policy"} <= set(opts.data_labels)
    for key in ("train_lora_runs_dir", "train_lora_medvram_policy"):
        assert opts.data_labels[key].section == ("train_lora", "Train LoRA") and opts.data_labels[key].category_id == "training"
    assert opts.data["train_lora_medvram_policy"] == "Train the UNet only"
    opts.data["train_lora_runs_dir"] = str(webui.root / "runs")
    assert webui_host.runs_dir() == webui.root / "runs"


def test_medvram_refuse_policy_refuses_even_unet_only(webui, tab_builder):
    webui.shared.opts.data["train_lora_medvram_policy"] = "Refuse"
    webui.shared.sd_model.lowvram = True
    with pytest.raises(webui_host.WebuiHostError, match="switched off in Settings"):
        webui_host.check_trainable(webui.shared.sd_model, train_text_encoder=False)


def test_unload_interrupts_a_running_session(webui):
    with webui_host.open_webui_host() as host:
        webui_host.interrupt_active()
        assert host.interrupted()
    webui_host.interrupt_active()  # no session: nothing to do


def test_preload_adds_the_options_and_imports_nothing_heavy():
    parser = argparse.ArgumentParser()
    run_file(ROOT / "preload.py", "preload").preload(parser)
    args = parser.parse_args(["--train-lora-dataset-root", "/data", "--train-lora-output-dir", "/loras", "--train-lora-runs-dir", "/runs"])
    assert (args.train_lora_dataset_root, args.train_lora_output_dir, args.train_lora_runs_dir) == ("/data", "/loras", "/runs")
    assert parser.parse_args([]).train_lora_output_dir is None
    code = "import runpy, sys; runpy.run_path(sys.argv[1]); print(sorted({'torch', 'gradio', 'lib_lora'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "preload.py")], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("installed", "env", "expected"), [
    (set(), "", ["lion-pytorch", "prodigyopt"]),
    ({"lion-pytorch", "prodigyopt"}, "", []),
    ({"lion-pytorch", "prodigyopt"}, "1", ["bitsandbytes"]),
])
def test_install_adds_only_what_is_missing_and_never_touches_pins(webui, monkeypatch, installed, env, expected):
    launch = sys.modules.setdefault("launch", importlib.import_module("launch"))
    launch.installed |= installed
    monkeypatch.setitem(os.environ, "TRAIN_LORA_BITSANDBYTES", env)
    run_file(ROOT / "install.py", "install")
    assert [desc.split(": ")[1] for _, desc in launch.pip_calls] == expected
    for command, _ in launch.pip_calls:
        words = command.split()
        assert words[:2] == ["install", "--no-deps"] and len(words) == 3 and not words[2].startswith("-")  # no -U, no extra packages
        assert re.split(r"[<>=]", words[2].strip('"'))[0] in {"lion-pytorch", "prodigyopt", "bitsandbytes"}


def test_the_tools_list_the_webuis_ckpt_dir_first(webui, monkeypatch):
    monkeypatch.setattr(webui.shared.cmd_opts, "ckpt_dir", str(webui.root / "mine"), raising=False)
    monkeypatch.setattr(webui.shared.cmd_opts, "lora_dir", str(webui.root / "loras"))
    assert webui_host.checkpoint_dirs() == (webui.root / "mine", webui.root / "models" / "Stable-diffusion")  # bake writes into the first
    assert webui_host.lora_dirs() == (webui.root / "loras",)
