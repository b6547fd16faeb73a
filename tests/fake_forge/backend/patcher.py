"""backend/patcher/{base,clip,vae,lora}.py, reduced: patchers share their model and its LoraLoader.

`LoraLoader.refresh` is Forge's: when the set of patches changes it puts every backed-up weight back,
then merges the patches into new Parameters (in inference mode), backing each original up first.
"""

import torch
from torch import nn

from backend import memory_management


def _owner(root: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, name = key.rpartition(".")
    return root.get_submodule(path), name


class LoraLoader:
    def __init__(self, model: nn.Module):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.inference_mode()
    def refresh(self, lora_patches: dict) -> None:
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        for key, weight in self.backup.items():
            setattr(*_owner(self.model, key), weight)
        self.backup = {}
        for patches in lora_patches.values():
            for key, deltas in patches.items():
                owner, name = _owner(self.model, key)
                weight = getattr(owner, name)
                self.backup.setdefault(key, weight)
                merged = weight.float() + sum(strength * delta.reshape(weight.shape) for strength, delta in deltas)
                setattr(owner, name, nn.Parameter(merged.to(weight.dtype), requires_grad=False))
        self.loaded_hash = hashes


class ModelPatcher:
    def __init__(self, model: nn.Module, name: str):
        self.model, self.name = model, name
        self.lora_patches: dict = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self) -> "ModelPatcher":
        patcher = ModelPatcher(self.model, self.name + "'")
        patcher.lora_patches = dict(self.lora_patches)
        return patcher

    def add_patches(self, *, filename, patches: dict, strength_patch=1.0, strength_model=1.0, online_mode=False) -> set:
        """patches: model key -> delta; keeps those the model has (Forge: named_parameters)."""
        keys = {k for k, _ in self.model.named_parameters()}
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = {
            k: [(strength_patch, delta)] for k, delta in patches.items() if k in keys}
        return set(patches) & keys

    def refresh_loras(self) -> None:
        self.lora_loader.refresh(self.lora_patches)


class CLIP:
    def __init__(self, models: dict[str, nn.Module]):
        self.cond_stage_model = nn.ModuleDict(models)  # JointTextEncoder: clip_l (and clip_g)
        self.patcher = ModelPatcher(self.cond_stage_model, "clip")

    def clone(self) -> "CLIP":
        clip = CLIP.__new__(CLIP)
        clip.cond_stage_model, clip.patcher = self.cond_stage_model, self.patcher.clone()
        return clip


class VAE:
    def __init__(self, model: nn.Module):
        self.first_stage_model = model
        self.device, self.vae_dtype = memory_management.get_torch_device(), torch.float32
        self.patcher = ModelPatcher(model, "vae")
