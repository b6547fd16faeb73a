"""LoKr (LyCORIS): ΔW = kron(W1, W2) · scale, loaded for inference (lora-format.md §7.2).

W1 = `lokr_w1` [a, c] or `lokr_w1_a` @ `lokr_w1_b`; W2 = `lokr_w2` [b, d(, kh, kw)], or
`lokr_w2_a` @ `lokr_w2_b`, or a Tucker core `lokr_t2` with w2_a [r, b], w2_b [r, d]. The scale is
alpha/r with r the rank of the low-rank factor (w2_b's if W2 is low-rank, else w1_b's), and 1 when
both are full matrices, as in the webui's `network_lokr.py` (Yeh et al. 2023, LyCORIS).
"""

import torch

from .base import AdapterModule, Factor
from .errors import LoraFormatError
from .functional import flat_shape, lokr_delta_weight, rebuild_conventional, rebuild_tucker_factor


class LoKrModule(AdapterModule):
    algo = "lokr"
    required_keys = frozenset()  # either form of each factor; `matches` checks
    optional_keys = frozenset({"alpha", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})

    def __init__(self, lora_name: str, tensors: dict[str, torch.Tensor], alpha: torch.Tensor | None):
        super().__init__(lora_name)
        for key, t in tensors.items():
            self.add_module(key, Factor(t.float(), trainable=False))
        self.register_buffer("alpha", alpha)

    @classmethod
    def matches(cls, keys: set[str]) -> bool:
        has_1 = "lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys
        has_2 = "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
        return has_1 and has_2

    def _w(self, key: str) -> torch.Tensor | None:
        module = self._modules.get(key)
        return None if module is None else module.weight

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "LoKrModule":
        cls.check_keys(name, tensors)
        if not cls.matches(set(tensors)):
            raise LoraFormatError(f"{name}: a LoKr module needs lokr_w1 (or lokr_w1_a + lokr_w1_b) and lokr_w2 (or lokr_w2_a + lokr_w2_b)")
        for full, (a, b) in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))):
            if full in tensors and (a in tensors or b in tensors):
                raise LoraFormatError(f"{name}.{a if a in tensors else b}: given together with {name}.{full}")
        module = cls(name, {k: v for k, v in tensors.items() if k != "alpha"},
                     None if "alpha" not in tensors else tensors["alpha"].detach().float().reshape(()))
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
