"""Applying loaded LoRA files to a UNet and text encoder we may not own, and undoing it exactly.

Two modes with the same result (the webui's default and its "Lora functional" setting, §3.6):
* merge: each patched layer's original weight is backed up once (a copy, in its own dtype); the
  layer gets `backup + Σ multiplier·ΔW` computed in fp32 and written in the layer's dtype (a DoRA
  module's term is multiplier·(W_d − W0), its W0 the original weight, `AdapterModule.weight_delta`).
* onthefly: weights stay untouched; a forward hook adds `Σ multiplier·forward_delta(x)`.
`apply` validates every module of every file against the model before touching anything, then
rewrites only the layers whose list of (module, multiplier) changed since the last call; `restore`
(or leaving the `with` block) puts back the exact originals.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import AdapterModule
from .errors import LoraFormatError
from .files import LoraFile
from .prompt import LoraTag, block_weight
from .targets import Target, TextModel, name_table

MODES = ("merge", "onthefly")
Entries = tuple[tuple[AdapterModule, float], ...]  # (module, multiplier) per LoRA touching one layer


@dataclass(frozen=True)
class ActiveLora:
    """A loaded file with its strengths: te/unet multipliers and optional 26 LBW block weights."""

    lora: LoraFile
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    block_weights: tuple[float, ...] | None = None

    @classmethod
    def from_tag(cls, lora: LoraFile, tag: LoraTag) -> "ActiveLora":
        return cls(lora, tag.te_multiplier, tag.unet_multiplier, tag.block_weights)

    def multiplier_for(self, target: Target) -> float:
        base = self.te_multiplier if target.component == "text_encoder" else self.unet_multiplier
        return base * block_weight(self.block_weights, target.block)


class LoraPatcher:
    """Patches `unet` and the text encoder(s) (either may be None) with LoRA files; a context manager.

    `text_encoders` is SD1's encoder module or a `TextModel` list (SD2, SDXL's two with their prefixes).
    """

    def __init__(self, unet: nn.Module | None, text_encoders: "nn.Module | Sequence[TextModel] | None", mode: str = "merge"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._targets = name_table(unet, text_encoders)
        self._current: dict[str, Entries] = {}  # layer path key -> what is applied now
        self._backups: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, RemovableHandle] = {}
        self._layers: dict[str, Target] = {}

    def __enter__(self) -> "LoraPatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @staticmethod
    def _key(target: Target) -> str:
        return f"{target.component}:{target.path}"

    def plan(self, loras: Sequence[ActiveLora]) -> dict[str, Entries]:
        """Layer key -> (module, multiplier) entries; raises LoraFormatError before anything is applied."""
        plan: dict[str, list[tuple[AdapterModule, float]]] = {}
        for active in loras:
            for name, module in active.lora.modules.items():
                target = self._targets.get(name)
                if target is None:
                    raise LoraFormatError(f"{active.lora.path or active.lora.name}: {name}: no layer of that name in this "
                                          f"model (a LoRA for another model type, or a text-encoder LoRA without a text encoder?)")
                try:
                    module.check_target(target.layer)
                except LoraFormatError as e:
                    raise LoraFormatError(f"{active.lora.path or active.lora.name}: {e}") from e
                multiplier = active.multiplier_for(target)
                if multiplier != 0:
                    self._layers[self._key(target)] = target
                    plan.setdefault(self._key(target), []).append((module, multiplier))
        return {key: tuple(entries) for key, entries in plan.items()}

    def apply(self, loras: Sequence[ActiveLora]) -> set[str]:
        """Make the model carry exactly `loras`; returns the layer keys that were (re)patched."""
        plan = self.plan(loras)
        changed = {key for key in set(self._current) | set(plan) if self._current.get(key, ()) != plan.get(key, ())}
        try:
            for key in sorted(changed):
                self._set(key, plan.get(key, ()))
        except BaseException:
            self.restore()  # never leave the model half-patched
            raise
        return changed

    def restore(self) -> None:
        """Put back every original weight and remove every hook; idempotent."""
        for key in list(self._current):
            self._set(key, ())

    @property
    def patched_layers(self) -> set[str]:
        return set(self._current)

    def _set(self, key: str, entries: Entries) -> None:
        layer = self._layers[key].layer
        if self.mode == "merge":
            self._merge(key, layer, entries)
        else:
            self._hook(key, layer, entries)
        if entries:
            self._current[key] = entries
        else:
            self._current.pop(key, None)

    @torch.no_grad()
    def _merge(self, key: str, layer: nn.Module, entries: Entries) -> None:
        weight = layer.weight
        if key not in self._backups:
            self._backups[key] = weight.detach().to("cpu", copy=True)
        backup = self._backups[key]
        if not entries:
            weight.copy_(backup)  # the exact original bits
            del self._backups[key]
            return
        original = backup.to(weight.device, torch.float32, copy=True)  # fp32 (never the backup itself), one rounding
        merged = original.clone()
        for module, multiplier in entries:
            merged += module.weight_delta(original, multiplier)  # each DoRA term against the original W0
        weight.copy_(merged.to(weight.dtype))

    def _hook(self, key: str, layer: nn.Module, entries: Entries) -> None:
        if key in self._hooks:
            self._hooks.pop(key).remove()
        if entries:
            self._hooks[key] = layer.register_forward_hook(_onthefly_hook(entries))


def _onthefly_hook(entries: Entries):
    """A forward hook adding Σ multiplier·forward_delta(x), computed in fp32 and cast to the output dtype."""

    def hook(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0].float()
        delta = sum(module.forward_delta(x, layer, multiplier) for module, multiplier in entries)
        return output + delta.to(output.dtype)

    return hook
