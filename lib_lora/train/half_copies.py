"""Half-precision copies of the adapters' fp32 weights, for a model that computes in fp16 or bf16.

The adapters train in fp32 (the optimizer's state and the saved file), but on an fp16/bf16 model (or under
autocast) each factor is used in the model's dtype: cast in every forward, and its gradient cast back in every
backward, two kernels per factor and step (about 1,050 a step for SD1.5 with the text encoder, a fifth of what
a GPU launches at batch 1). Here each trainable factor keeps a copy in the half dtype that the forward uses
directly (`Factor.like`): after each optimizer step one multi-tensor copy refreshes all of them, and after each
backward one multi-tensor copy moves their gradients into the fp32 weights' (the standard "master weights" of
mixed-precision training). The arithmetic is the casts' own: the same values forward, the same fp32 gradients.
"""

import torch
from torch import nn

from ..networks.base import Factor

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(host_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """The half dtype the adapters compute in: the model's own, else autocast's; None for fp32 (nothing to copy)."""
    if host_dtype in HALF:
        return host_dtype
    return autocast_dtype if autocast_dtype in HALF else None


class HalfCopies:
    """The trainable factors of `network` with a copy in `dtype` each, for the length of a training run."""

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        self.factors = [m for m in network.modules() if isinstance(m, Factor) and m.weight.requires_grad]
        self.weights = [f.weight for f in self.factors]
        self.copies = [torch.empty_like(w, dtype=dtype).requires_grad_() for w in self.weights]
        self.grad_buffers = [None] * len(self.weights)  # fp32, each allocated at its first gradient and reused
        self.scratch = [None] * len(self.weights)  # fp32, only for accumulating a second gradient into a step's
        for factor, copy in zip(self.factors, self.copies):
            factor.half_copy = copy
        self.refresh()

    def refresh(self) -> None:
        """The copies take the fp32 weights' values: after every optimizer step (and any load of the weights)."""
        with torch.no_grad():
            _copy_all(self.copies, self.weights)

    def gather_grads(self) -> None:
        """Move the copies' gradients of the last backward into the fp32 weights' gradients: a weight without one
        (the step's first backward) gets a buffer it reuses every step; one that has a gradient (accumulation, or
        autograd's own from a path that cast the weight) has the new one added in fp32."""
        fresh, accumulate = ([], []), ([], [], [])
        for index, (weight, copy) in enumerate(zip(self.weights, self.copies)):
            if copy.grad is None:
                continue
            if weight.grad is None:
                weight.grad = self._buffer(self.grad_buffers, index)
                fresh[0].append(weight.grad)
                fresh[1].append(copy.grad)
            else:
                accumulate[0].append(weight.grad)
                accumulate[1].append(self._buffer(self.scratch, index))
                accumulate[2].append(copy.grad)
            copy.grad = None  # else the next backward would add into it in place
        if fresh[0]:
            _copy_all(*fresh)
        if accumulate[0]:
            _copy_all(accumulate[1], accumulate[2])
            torch._foreach_add_(accumulate[0], accumulate[1])

    def _buffer(self, buffers: list, index: int) -> torch.Tensor:
        if buffers[index] is None:
            buffers[index] = torch.empty_like(self.weights[index])
        return buffers[index]

    def close(self) -> None:
        """The factors compute from their fp32 weights again (after the run: the webui may keep the network)."""
        for factor in self.factors:
            factor.half_copy = None
            factor.forget_transposed()  # which may hold the copy
        self.copies, self.grad_buffers, self.scratch = [], [], []


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Each source into its target, casting: one multi-tensor op (on CUDA one kernel per dtype pair, whatever the
    count); a loop where torch has no `_foreach_copy_` (before 2.1)."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)
    else:
        for target, source in zip(targets, sources):
            target.copy_(source)
