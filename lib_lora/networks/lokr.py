"""LoKr (LyCORIS): ΔW = kron(W1, W2) · scale, trained and loaded (lora-format.md §7.2).

W1 = `lokr_w1` [a, c] or `lokr_w1_a` @ `lokr_w1_b`; W2 = `lokr_w2` [b, d(, kh, kw)], or
`lokr_w2_a` @ `lokr_w2_b`, or a Tucker core `lokr_t2` with w2_a [r, b], w2_b [r, d]. The scale is
alpha/r with r the rank of the low-rank factor (w2_b's if W2 is low-rank, else w1_b's), and 1 when
both are full matrices, as in the webui's `network_lokr.py` (Yeh et al. 2023, LyCORIS).

Training follows LyCORIS `modules/lokr.py` without its extras (decompose_both, Tucker): out = a·b and
in = c·d split by `factorization(dim, factor)`; W1 full [a, c], Kaiming-uniform; W2 low-rank
(w2_a [b, r] Kaiming-uniform, w2_b [r, d·kh·kw] zero) unless r >= max(b, d)/2, where a rank-r factor
would be no smaller than the full one and W2 is a full [b, d(, kh, kw)] matrix, zero-initialised, with
scale 1 (alpha is then saved as r, as LyCORIS does). The forward never builds kron(W1, W2): see
`functional.kron_forward`. No neuron or rank dropout; module dropout is the base class's.
"""

import math

import torch
from torch import nn

from .base import AdapterModule, conv_geometry, layer_kind
from .errors import LoraFormatError
from .functional import (factorization, flat_shape, kron_forward, lokr_delta_weight, rebuild_conventional,
                         rebuild_tucker_factor)


class LoKrModule(AdapterModule):
    algo = "lokr"
    required_keys = frozenset()  # either form of each factor; `matches` checks
    optional_keys = frozenset({"alpha", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                               "dora_scale"})

    def __init__(self, lora_name: str, tensors: dict[str, torch.Tensor], alpha: torch.Tensor | None, trainable: bool = False):
        super().__init__(lora_name)
        for key, t in tensors.items():
            self.register_parameter(key, nn.Parameter(t.float(), requires_grad=trainable))  # state-dict key = file key
        self.register_buffer("alpha", alpha)

    @classmethod
    def matches(cls, keys: set[str]) -> bool:
        has_1 = "lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys
        has_2 = "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
        return has_1 and has_2

    def _w(self, key: str) -> torch.Tensor | None:
        return self._parameters.get(key)

    @classmethod
    def for_layer(cls, lora_name: str, layer: nn.Module, rank: int, alpha: float | None, *, factor: int = -1,
                  module_dropout: float = 0.0, dora_wd: bool = False, device: torch.device | str | None = None) -> "LoKrModule":
        """A fresh trainable module for `layer`, fp32, LyCORIS's shapes and init; alpha None or 0 means alpha = rank."""
        device = layer.weight.device if device is None else device
        (a, b), (c, d) = factorization(layer.weight.shape[0], factor), factorization(layer.weight.shape[1], factor)
        kernel = tuple(layer.weight.shape[2:])  # () for Linear
        tensors = {"lokr_w1": _kaiming(a, c, device=device)}
        if rank >= max(b, d) / 2:  # LyCORIS: a full W2 is then no larger than its two factors
            tensors["lokr_w2"] = torch.zeros(b, d, *kernel, device=device)
            alpha = rank  # both factors full: scale 1, saved as alpha = r (LyCORIS), which every loader reads as 1
        else:
            tensors |= {"lokr_w2_a": _kaiming(b, rank, device=device),
                        "lokr_w2_b": torch.zeros(rank, d * math.prod(kernel), device=device)}
        return cls.trained_from(lora_name, tensors, float(alpha or rank), layer, module_dropout=module_dropout, dora_wd=dora_wd)

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "LoKrModule":
        cls.check_keys(name, tensors)
        if not cls.matches(set(tensors)):
            raise LoraFormatError(f"{name}: a LoKr module needs lokr_w1 (or lokr_w1_a + lokr_w1_b) and lokr_w2 (or lokr_w2_a + lokr_w2_b)")
        for full, (a, b) in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))):
            if full in tensors and (a in tensors or b in tensors):
                raise LoraFormatError(f"{name}.{a if a in tensors else b}: given together with {name}.{full}")
        module = cls(name, {k: v for k, v in tensors.items() if k not in ("alpha", "dora_scale")},
                     None if "alpha" not in tensors else tensors["alpha"].detach().float().reshape(()))
        module.load_dora(tensors)
        try:
            module.factors()
        except RuntimeError as e:  # matmul/einsum of mismatched factor shapes
            raise LoraFormatError(f"{name}.lokr_w2_b: the LoKr factor shapes do not fit together: {e}") from e
        return module

    @property
    def rank(self) -> int | None:
        for key in ("lokr_w2_b", "lokr_w1_b"):  # w2's rank wins, as in the webui
            if (w := self._w(key)) is not None:
                return w.shape[0]
        return None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1 [a, c], W2 [b, d·kh·kw] or [b, d, kh, kw])."""
        w1 = self._w("lokr_w1")
        if w1 is None:
            w1 = self._w("lokr_w1_a") @ self._w("lokr_w1_b")  # [a, c]
        w2 = self._w("lokr_w2")
        if w2 is None and self._w("lokr_t2") is not None:
            w2 = rebuild_tucker_factor(self._w("lokr_t2"), self._w("lokr_w2_a"), self._w("lokr_w2_b"))  # [b, d, kh, kw]
        elif w2 is None:
            a, b = self._w("lokr_w2_a"), self._w("lokr_w2_b")
            w2 = rebuild_conventional(a, b, (a.shape[0], flat_shape(b.shape)[1]))  # [b, d·kh·kw]
        return w1, w2

    def delta_shape(self) -> tuple[int, int]:
        w1, w2 = self.factors()
        return w1.shape[0] * w2.shape[0], w1.shape[1] * flat_shape(w2.shape)[1]

    def delta_weight(self, shape) -> torch.Tensor:
        w1, w2 = self.factors()  # a flat W2 gives the same kron as its [b, d, kh, kw] form once reshaped
        return lokr_delta_weight(w1, w2, self.alpha_value, self.rank, shape)

    def bypass_delta(self, x: torch.Tensor, layer: nn.Module, strength: float = 1.0) -> torch.Tensor:
        """strength·scale·kron(W1, W2)·x without building the Kronecker product (LyCORIS's bypass forward)."""
        w1, w2 = (w.to(device=x.device, dtype=x.dtype) for w in self.factors())
        if layer_kind(layer) == "linear":
            w2 = w2.reshape(w2.shape[0], -1)  # [b, d]: a 4-D [b, d, 1, 1] factor on a Linear host
        else:
            w2 = w2.reshape(w2.shape[0], -1, *layer.weight.shape[2:])  # [b, d, kh, kw]
        return kron_forward(x, w1 * (self.scale * strength), w2, **conv_geometry(layer))


def _kaiming(rows: int, cols: int, device) -> torch.Tensor:
    """A [rows, cols] factor initialised as LyCORIS (and nn.Linear) do: Kaiming-uniform with a = sqrt(5)."""
    t = torch.empty(rows, cols, device=device)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t
