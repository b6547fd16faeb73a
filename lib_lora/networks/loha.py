"""LoHa (LyCORIS): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/r, trained and loaded (lora-format.md §7.1).

Hadamard product of two low-rank factors (Hyeon-Woo et al., FedPara 2022); r = w1_b.shape[0], and the
product can reach rank r². Without Tucker cores w1_a/w2_a are [out, r] and w1_b/w2_b [r, in·kh·kw]
(2-D also on a conv, as LyCORIS saves them); with Tucker cores (`hada_t1`/`hada_t2`, convs only, read
but not trained here) w1_a/w2_a are [r, out] and w1_b/w2_b [r, in]. Math as the webui's `network_hada.py`.
Training follows LyCORIS `modules/loha.py`: w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0, so an
untrained module adds exactly 0; the forward builds ΔW (products kept out of autograd's memory, see
`functional.hadamard_product`) and applies it as the layer's weight. No neuron or rank dropout (LyCORIS
has none for LoHa either); module dropout is the base class's.
"""

import torch
from torch import nn

from .base import AdapterModule
from .functional import flat_shape, loha_delta_weight

_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaModule(AdapterModule):
    algo = "loha"
    required_keys = frozenset(_KEYS)
    optional_keys = frozenset({"alpha", "hada_t1", "hada_t2", "dora_scale"})

    def __init__(self, lora_name: str, tensors: dict[str, torch.Tensor], alpha: torch.Tensor | None, trainable: bool = False):
        super().__init__(lora_name)
        for key, t in tensors.items():
            self.register_parameter(key, nn.Parameter(t.float(), requires_grad=trainable))  # state-dict key = file key
        self.register_buffer("alpha", alpha)

    def _w(self, key: str) -> torch.Tensor | None:
        return self._parameters.get(key)

    @classmethod
    def for_layer(cls, lora_name: str, layer: nn.Module, rank: int, alpha: float | None, *, module_dropout: float = 0.0,
                  dora_wd: bool = False, device: torch.device | str | None = None) -> "LoHaModule":
        """A fresh trainable module for `layer`, fp32, LyCORIS's init; alpha None or 0 means alpha = rank."""
        device = layer.weight.device if device is None else device
        out, flat_in = flat_shape(layer.weight.shape)
        tensors = {
            "hada_w1_a": torch.randn(out, rank, device=device) * 0.1,
            "hada_w1_b": torch.randn(rank, flat_in, device=device),
            "hada_w2_a": torch.zeros(out, rank, device=device),  # the zero factor: ΔW = 0 until trained
            "hada_w2_b": torch.randn(rank, flat_in, device=device),
        }
        return cls.trained_from(lora_name, tensors, float(alpha or rank), layer, module_dropout=module_dropout, dora_wd=dora_wd)

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
        weights = {k: v for k, v in tensors.items() if k not in ("alpha", "dora_scale")}
        module = cls(name, weights, None if alpha is None else alpha.detach().float().reshape(()))
        module.load_dora(tensors)
        return module

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
        return flat_shape(self._factor_shape({k: p for k, p in self._parameters.items() if p is not None}, "1"))

    def delta_weight(self, shape) -> torch.Tensor:
        w1 = (self._w("hada_w1_a"), self._w("hada_w1_b"))
        w2 = (self._w("hada_w2_a"), self._w("hada_w2_b"))
        return loha_delta_weight(w1, w2, self.alpha_value, shape, self._w("hada_t1"), self._w("hada_t2"))
