"""backend/memory_management.py, reduced: one device (the CPU), entries per patcher, clones unloaded, LoRAs refreshed on load.

As in Forge, `load_models_gpu` loads each patcher not already loaded: it first unloads the patcher's
clones (other patchers of the same model), then moves the model (in the caller's mode: inference
tensors when the caller runs in inference mode, as Forge's sampling and conditioning do) and refreshes
its LoRA patches into the weights. `calls` records each load, named by the patchers' `name`.
"""

import torch

from backend.operations import move

current_loaded_models: list = []
calls: list[str] = []


class LoadedModel:
    def __init__(self, model):
        self.model = model  # a ModelPatcher

    def model_load(self):
        move(self.model.model)
        self.model.refresh_loras()

    def __eq__(self, other):
        return self.model is other.model


def get_torch_device() -> torch.device:
    return torch.device("cpu")


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0) -> None:
    calls.append("load " + " + ".join(m.name for m in models))
    for patcher in models:
        entry = LoadedModel(patcher)
        if entry in current_loaded_models:
            current_loaded_models.insert(0, current_loaded_models.pop(current_loaded_models.index(entry)))
            continue
        current_loaded_models[:] = [e for e in current_loaded_models if e.model.model is not patcher.model]  # unload_model_clones
        entry.model_load()
        current_loaded_models.insert(0, entry)


def load_model_gpu(model) -> None:
    load_models_gpu([model])


def unload_all_models() -> None:
    current_loaded_models.clear()


def soft_empty_cache(force=False) -> None:
    pass
