"""The adapter algorithms a file may use, and building one module from its tensors.

Order matters where key sets could overlap, and follows the webui's (lora, hada, lokr). Adding an
algorithm = one file with an `AdapterModule` subclass + one entry here.
"""

import torch

from .base import AdapterModule
from .errors import LoraFormatError
from .loha import LoHaModule
from .lokr import LoKrModule
from .lora import LoRAModule

ALGORITHMS: tuple[type[AdapterModule], ...] = (LoRAModule, LoHaModule, LoKrModule)


def algorithm_for(name: str, keys: set[str]) -> type[AdapterModule]:
    for algorithm in ALGORITHMS:
        if algorithm.matches(keys):
            return algorithm
    first = sorted(keys)[0]
    supported = "lora (lora_down/lora_up[/lora_mid]), loha (hada_w1_a/...), lokr (lokr_w1/lokr_w2...)"
    raise LoraFormatError(f"{name}.{first}: unknown key; module {name} has keys {sorted(keys)}, "
                          f"which match no supported adapter type: {supported}")


def module_from_tensors(name: str, tensors: dict[str, torch.Tensor]) -> AdapterModule:
    """The adapter for one module name of a file, validated (keys, shapes, finiteness)."""
    return algorithm_for(name, set(tensors)).from_tensors(name, tensors)
