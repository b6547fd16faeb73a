"""backend/operations.py: Forge builds its models with these classes in place of torch's (`using_forge_operations`).

Its Linear is a plain nn.Module, no `nn.Linear` subclass; its Conv2d subclasses `nn.Conv2d`. Both take
their weights at forward time (Forge's `get_weight_and_bias`, which may cast them or add online LoRAs).
"""

import torch
import torch.nn.functional as F
from torch import nn


class ForgeOperations:
    class Linear(nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight, self.bias = None, None
            self.parameters_manual_cast = False

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    class Conv2d(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, self.weight, self.bias)


def with_forge_operations(root: nn.Module) -> nn.Module:
    """`root` as Forge would have built it: every nn.Linear a ForgeOperations.Linear holding the same
    tensors, every nn.Conv2d of class ForgeOperations.Conv2d."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                linear = ForgeOperations.Linear(child.in_features, child.out_features)
                linear.weight, linear.bias = child.weight, child.bias
                setattr(module, name, linear)
            elif type(child) is nn.Conv2d:
                child.__class__ = ForgeOperations.Conv2d
    return root


def move(root: nn.Module) -> None:
    """What `module.to(device)` does to a model whose device changes: new tensors, made in the caller's mode, so
    inside `torch.inference_mode()` (Forge's loader, its sampling) they are inference tensors."""
    for tensor in list(root.parameters()) + list(root.buffers()):
        tensor.data = tensor.data.clone()
