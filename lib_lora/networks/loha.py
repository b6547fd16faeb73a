"""LoHa (LyCORIS): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/r, loaded for inference (lora-format.md §7.1).

Hadamard product of two low-rank factors (Hyeon-Woo et al., FedPara 2022); r = w1_b.shape[0].
With Tucker cores (`hada_t1`/`hada_t2`, convs only) w1_a/w2_a are [r, out] and w1_b/w2_b [r, in].
Math as the webui's `network_hada.py`.
"""

import torch

from .base import AdapterModule, Factor
from .functional import flat_shape, loha_delta_weight

_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaModule(AdapterModule):
    algo = "loha"
    required_keys = frozenset(_KEYS)
    optional_keys = frozenset({"alpha", "hada_t1", "hada_t2"})

    def __init__(self, lora_name: str, tensors: dict[str, torch.Tensor], alpha: torch.Tensor | None):
        super().__init__(lora_name)
        for key, t in tensors.items():
            self.add_module(key, Factor(t.float(), trainable=False))  # state-dict key `hada_w1_a.weight`
        self.register_buffer("alpha", alpha)

    def _w(self, key: str) -> torch.Tensor | None:
        module = self._modules.get(key)
        return None if module is None else module.weight

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "LoHaModule":
        cls.check_keys(name, tensors)
        for key in _KEYS:
            cls.check_ndim(name, key, tensors[key], (2, 4))
        for i in ("1", "2"):
            a, b, t = tensors[f"hada_w{i}_a"], tensors[f"hada_w{i}_b"], tensors.get(f"hada_t{i}")
            if t is None:  # a [out, r] @ b [r, in...]
                cls.check_dim_equal(name, f"hada_w{i}_a", a.shape[1], b.shape[0], "its rank (dim 1)")
            else:  # a [r, out], b [r, in], t [r, r, kh, kw]
                cls.check_ndim(name, f"hada_t{i}", t, (4,))
                cls.check_dim_equal(name, f"hada_w{i}_a", a.shape[0], t.shape[0], "its rank (dim 0)")
                cls.check_dim_equal(name, f"hada_w{i}_b", b.shape[0], t.shape[1], "its rank (dim 0)")
        cls.check_dim_equal(name, "hada_w2_b", flat_shape(cls._factor_shape(tensors, "2"))[0],
                            flat_shape(cls._factor_shape(tensors, "1"))[0], "the factor's out dim")
        alpha = tensors.get("alpha")
        weights = {k: v for k, v in tensors.items() if k != "alpha"}
        return cls(name, weights, None if alpha is None else alpha.detach().float().reshape(()))

    @staticmethod
    def _factor_shape(tensors: dict[str, torch.Tensor], i: str) -> tuple[int, ...]:
        """Shape of factor i's product: [out, in·kh·kw] plain, [out, in, kh, kw] Tucker."""
        a, b, t = tensors[f"hada_w{i}_a"], tensors[f"hada_w{i}_b"], tensors.get(f"hada_t{i}")
        if t is None:
            return a.shape[0], flat_shape(b.shape)[1]
        return a.shape[1], b.shape[1], *t.shape[2:]

    @property
    def rank(self) -> int:
        return self._w("hada_w1_b").shape[0]

    def delta_shape(self) -> tuple[int, int]:
        return flat_shape(self._factor_shape({k: m.weight for k, m in self._modules.items()}, "1"))

    def delta_weight(self, shape) -> torch.Tensor:
        w1 = (self._w("hada_w1_a"), self._w("hada_w1_b"))
        w2 = (self._w("hada_w2_a"), self._w("hada_w2_b"))
        return loha_delta_weight(w1, w2, self.alpha_value, shape, self._w("hada_t1"), self._w("hada_t2"))
