"""A stand-in for the parts of AUTOMATIC1111's webui (v1.10.1) that Train LoRA touches.

`modules/` mirrors the webui's module names and the attributes we use; every call that matters
(locking, hijack undo/redo, Lora unmerge, gc) is appended to `modules.calls`, so tests can check
order. `launch.py` stands in for the webui's launch helpers (install.py), `lora_networks.py` for
the built-in Lora extension's top-level `networks` module. `fake_model.py` wraps our tiny models
in objects shaped like the webui's `shared.sd_model`.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent

import importlib
import sys
from types import SimpleNamespace

import torch

_NAMES = ("modules", "launch", "networks")


def _forget() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _NAMES:
            del sys.modules[name]


def install(tmp_path: Path, monkeypatch, *, sd_model=True, lora_extension=True, arch: str = "sd1") -> SimpleNamespace:
    """Put a fresh stand-in webui on sys.path (state reset), with a tiny model of `arch` loaded and folders under tmp_path."""
    _forget()
    monkeypatch.syspath_prepend(str(ROOT))
    modules = importlib.import_module("modules")
    shared = importlib.import_module("modules.shared")
    paths = importlib.import_module("modules.paths")
    for name in ("call_queue", "devices", "sd_hijack", "sd_unet", "processing", "progress", "script_callbacks"):
        importlib.import_module(f"modules.{name}")
    safe = importlib.import_module("modules.safe")
    monkeypatch.setattr(torch, "load", safe.load)  # as the webui does at startup
    paths.data_path, paths.models_path = str(tmp_path), str(tmp_path / "models")
    shared.cmd_opts.lora_dir = str(tmp_path / "models" / "Lora")
    if sd_model:
        from fake_webui.fake_model import DiffusionEngine, LatentDiffusion

        shared.sd_model = DiffusionEngine() if arch == "sdxl" else LatentDiffusion(arch=arch)
    networks = None
    if lora_extension:
        networks = importlib.import_module("fake_webui.lora_networks")
        networks = importlib.reload(networks)
        sys.modules["networks"] = networks
    return SimpleNamespace(modules=modules, shared=shared, calls=modules.calls, networks=networks, root=tmp_path)


def uninstall() -> None:
    _forget()
    sys.modules.pop("fake_webui.lora_networks", None)
