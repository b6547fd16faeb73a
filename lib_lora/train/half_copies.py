"""Half-precision copies of the adapters' fp32 weights, for a model that computes in fp16 or bf16.

The adapters train in fp32 (the optimizer's state and the saved file), but on an fp16/bf16 model (or under
autocast) each factor is used in the model's dtype: cast in every forward, and its gradient cast back in every
backward, two kernels per factor and step (about 1,050 a step for SD1.5 with the text encoder, a fifth of what
a GPU launches at batch 1). Here each factor of a fused LoRA (`LoRAModule.fused_on`) keeps a copy in the half
dtype that the forward uses as it is (`Factor.like`): after each optimizer step one multi-tensor copy refreshes
all of them, and after each backward one multi-tensor copy moves their gradients into the fp32 weights' (the
"master weights" of mixed-precision training). The values are the casts' own, forward and backward, with one
difference: a factor used twice in one forward (the webui's text encoder run once per 75-token chunk) has its
uses' gradients summed in the half dtype before they are widened, where each cast summed them in fp32.

Used from torch 2.4, whose CUDA `_foreach_copy_` casts between dtypes in its multi-tensor fast path (pytorch#127186);
before it the cast falls back to a copy per tensor, which is what the forward's casts cost already. The cost in
memory: the fp32 gradients are kept allocated between steps (buffers reused, not freed and allocated again).
"""

import torch
from torch import nn

from ..networks.base import Factor
from ..networks.lora import LoRAModule

HALF = (torch.float16, torch.bfloat16)
FAST_CROSS_DTYPE_COPY = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)


def compute_dtype(host_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """The half dtype the adapters compute in: autocast's where it is on (it sets the layers' outputs, which the
    adapters follow), else the model's own; None for fp32 (nothing to copy)."""
    if autocast_dtype in HALF:
        return autocast_dtype
    return host_dtype if host_dtype in HALF else None


def fused_factors(network: nn.Module) -> list[Factor]:
    """The trainable factors whose forward uses them as they are: the fused LoRAs' (not LoHa, LoKr, DoRA, Tucker or
    3x3 LoCon, which build their delta from the fp32 weights)."""
    found = []
    for module in network.modules():
        if isinstance(module, LoRAModule) and module.host is not None and module.fused_on(module.host):
            found += [f for f in (module.lora_down, module.lora_up) if f.weight.requires_grad]
    return found


class HalfCopies:
    """The factors, each with a copy in `dtype`, for the length of a training run; `for_network` makes one."""

    def __init__(self, factors: list[Factor], dtype: torch.dtype):
        self.factors = factors
        self.weights = [f.weight for f in factors]
        self.copies = [torch.empty_like(w, dtype=dtype).requires_grad_() for w in self.weights]
        self.grad_buffers: list[torch.Tensor | None] = [None] * len(self.weights)  # fp32, allocated once each
        for factor, copy in zip(self.factors, self.copies):
            factor.half_copy = copy
        self.refresh()

    @classmethod
    def for_network(cls, network: nn.Module, dtype: torch.dtype | None) -> "HalfCopies | None":
        """Copies for a run computing in `dtype`; None where there is nothing to gain (fp32, no fused LoRA, an older
        torch)."""
        factors = fused_factors(network) if dtype in HALF and FAST_CROSS_DTYPE_COPY else []
        return cls(factors, dtype) if factors else None

    def refresh(self) -> None:
        """The copies take the fp32 weights' values: at the start, and after every optimizer step."""
        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.weights)

    def gather_grads(self) -> None:
        """Move the last backward's gradients from the copies into the fp32 weights' gradients: a weight without one
        (the step's first backward) gets its buffer, copied into; one that has a gradient (gradient accumulation) has
        the new one added in fp32."""
        new_weight_grads, new_grads, old_weight_grads, more_grads = [], [], [], []
        for index, (weight, copy) in enumerate(zip(self.weights, self.copies)):
            if copy.grad is None:
                continue
            if weight.grad is None:
                weight.grad = self._buffer(index)
                new_weight_grads.append(weight.grad)
                new_grads.append(copy.grad)
            else:
                old_weight_grads.append(weight.grad)
                more_grads.append(copy.grad)
            copy.grad = None  # else the next backward would add into it in place
        if new_grads:
            torch._foreach_copy_(new_weight_grads, new_grads)
        if more_grads:
            torch._foreach_add_(old_weight_grads, more_grads)

    def _buffer(self, index: int) -> torch.Tensor:
        if self.grad_buffers[index] is None:
            self.grad_buffers[index] = torch.empty_like(self.weights[index])
        return self.grad_buffers[index]

    def close(self) -> None:
        """The factors compute from their fp32 weights again (after the run: the webui may keep the network), and
        the copies and buffers are let go."""
        for factor in self.factors:
            factor.half_copy = None
            factor.forget_transposed()  # which may hold the copy
        self.factors, self.weights, self.copies, self.grad_buffers = [], [], [], []
