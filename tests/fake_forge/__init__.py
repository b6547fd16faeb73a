"""A stand-in for the parts of Stable Diffusion WebUI Forge (lllyasviel/stable-diffusion-webui-forge) that Train LoRA touches.

Forge keeps the webui's `modules` (shared, call_queue, progress, devices, paths...), so the stand-in
webui of tests/fake_webui is installed first; then Forge's own parts: `backend` (operations,
memory_management, patchers), `modules_forge`, Forge's `modules.sd_models` (the model loads on the first
generation) and `modules.processing`, and the Lora extension's `networks`. `fake_model.py` shapes our
tiny models as Forge's `shared.sd_model`.
"""

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import fake_webui

ROOT = Path(__file__).resolve().parent
_NAMES = ("backend", "modules_forge")


def _forget() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _NAMES or name.startswith("fake_forge.") or name.startswith("fake_webui.modules"):
            del sys.modules[name]


def install(tmp_path: Path, monkeypatch, *, arch: str = "sd1", loaded: bool = True) -> SimpleNamespace:
    """The stand-in webui with Forge's parts on top; the tiny `arch` model loaded unless `loaded` is False
    (Forge loads it at the first generation)."""
    env = fake_webui.install(tmp_path, monkeypatch, sd_model=False, lora_extension=False)
    _forget()
    monkeypatch.syspath_prepend(str(ROOT))
    for name in ("sd_models", "processing"):
        module = importlib.import_module(f"fake_forge.{name}")
        sys.modules[f"modules.{name}"] = module
        setattr(env.modules, name, module)
    env.modules.sd_models.arch = arch
    networks = sys.modules["networks"] = importlib.import_module("fake_forge.networks")
    memory = importlib.import_module("backend.memory_management")
    if loaded:
        env.modules.sd_models.forge_model_reload()
    return SimpleNamespace(**(vars(env) | {"networks": networks, "memory": memory, "sd_models": env.modules.sd_models,
                                           "processing": env.modules.processing}))


def uninstall() -> None:
    _forget()
    fake_webui.uninstall()
