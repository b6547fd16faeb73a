"""The built-in Lora extension's top-level `networks` module (extensions-builtin/Lora/networks.py), reduced.

`merge(module, delta)` does what network_apply_weights does for a loaded LoRA: back the weight up
once and add the delta in place. The test fixture installs this module as sys.modules["networks"].
"""

import os

import torch

from modules import calls, shared

loaded_networks: list = []
available_networks: dict = {}
restored: list = []


def merge(module, delta: torch.Tensor, name: str = "old") -> None:
    with torch.no_grad():
        if getattr(module, "network_weights_backup", None) is None:
            module.network_weights_backup = module.weight.detach().clone()
        module.weight += delta
    module.network_current_names = ((name, 1.0, 1.0, None),)


def network_restore_weights_from_backup(module) -> None:
    module.weight.copy_(module.network_weights_backup)  # as the webui: no no_grad of its own (the caller's job)
    restored.append(module)


def list_available_networks() -> None:
    calls.append("list_available_networks")
    available_networks.clear()
    folder = shared.cmd_opts.lora_dir
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            available_networks[name[: -len(".safetensors")]] = os.path.join(folder, name)
