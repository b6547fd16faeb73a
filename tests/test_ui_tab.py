"""The Gradio tab and app build on the installed Gradio; `import lib_lora` never needs Gradio."""

import dataclasses
from html import escape
import subprocess
import sys
from pathlib import Path

import pytest

from lib_lora.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_lib_lora_and_the_plain_ui_modules_import_without_gradio():
    code = ("import sys; import lib_lora, lib_lora.__main__, lib_lora.ui, lib_lora.ui.controller, lib_lora.ui.chart, lib_lora.ui.toolbox; "
            "assert 'gradio' not in sys.modules, 'gradio was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_ui_command_is_registered():
    from lib_lora.__main__ import build_parser

    args = build_parser().parse_args(["ui", "--port", "7999", "--checkpoint", "x.safetensors"])
    assert args.port == 7999 and args.bind == "127.0.0.1" and args.checkpoint == Path("x.safetensors")


@pytest.fixture
def gr():
    return pytest.importorskip("gradio")


def component_ids(blocks) -> set[str]:
    return {block.elem_id for block in blocks.blocks.values() if getattr(block, "elem_id", None)}


def test_build_tab_makes_one_widget_per_option_and_no_host(gr, tmp_path):
    from lib_lora.ui import TabSettings, build_tab

    blocks = build_tab(lambda: pytest.fail("the host is made only when work needs it"), TabSettings(presets_dir=tmp_path))
    assert isinstance(blocks, gr.Blocks)
    ids = component_ids(blocks)
    assert {f"train_lora_{f.name}" for f in dataclasses.fields(TrainConfig)} <= ids
    assert {"train_lora_train", "train_lora_stop", "train_lora_resume", "train_lora_chart", "train_lora_progress", "train_lora_report"} <= ids
    # The webui's Ctrl+Enter handler clicks buttons whose id ends in _generate/_interrupt/_skip in the current tab.
    buttons = [b.elem_id or "" for b in blocks.blocks.values() if isinstance(b, gr.Button)]
    assert buttons and not [i for i in buttons if i.endswith(("_generate", "_interrupt", "_skip"))]


def test_captioning_is_offered_only_when_the_host_has_captioners(gr, tmp_path):
    from lib_lora.ui.tab import NO_CAPTIONER, create_tab
    from lib_lora.ui.settings import TabSettings

    _, _, bare = create_tab(lambda: None, TabSettings())
    assert bare.cap_run.interactive is False and escape(NO_CAPTIONER) in bare.cap_note.value
    _, _, offered = create_tab(lambda: None, TabSettings(captioners={"BLIP": lambda image: "a photo"}))
    assert offered.cap_run.interactive is not False and offered.cap_model.value == "BLIP"


def test_the_standalone_app_builds(gr, tiny_checkpoint_path, tmp_path):
    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.ui.app import AppOptions, build_app

    host = StandaloneHost.from_file(tiny_checkpoint_path, out_dir=tmp_path, device="cpu")
    app = build_app(host, AppOptions(tmp_path, embedded=True))
    ids = component_ids(app)
    assert {"lora_app_prompt", "lora_app_generate", "lora_app_image", "train_lora_train"} <= ids
    assert (tmp_path / "lora").is_dir()


def test_a_page_load_re_attaches_the_run_panel_and_the_tools_are_there(gr, tmp_path):
    """In the webui as in the app: opening or reloading the page starts the progress poller (one yield when idle)."""
    from lib_lora.ui.tab import create_tab
    from lib_lora.ui.settings import TabSettings

    blocks, _, tab = create_tab(lambda: pytest.fail("no host at build"), TabSettings())
    loads = [d for d in blocks.dependencies if d.get("trigger") == "load"]
    assert [d["outputs"] for d in loads] == [[c._id for c in tab.watched]]
    tools = {"train_lora_tab_tools", "train_lora_inspect_run", "train_lora_blend_run", "train_lora_resize_run", "train_lora_extract_run",
             "train_lora_bake_run", "train_lora_run_note"}
    assert tools <= component_ids(blocks)
