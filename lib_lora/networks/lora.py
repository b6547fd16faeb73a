"""LoRA and LoCon: ΔW = up @ down · alpha/rank (Hu et al. 2021; kohya `networks/lora.py` LoRAModule).

One algorithm for all layer kinds: on a Linear, down [r, in] and up [out, r]; on a conv, down is a
conv with the host's kernel, stride and padding ([r, in, kh, kw], a 1×1 for SD1 proj_in/proj_out,
a 3×3 for LoCon) and up a 1×1 conv [out, r, 1, 1]. LyCORIS's Tucker LoCon adds `lora_mid`
[r, r, kh, kw] between a 1×1 down and the 1×1 up. Training follows kohya: down Kaiming-uniform, up
zero (an untrained module adds exactly 0), neuron dropout on down(x), rank dropout with a
1/(1-p) rescale, module dropout (in the base class). With `dora_wd` the module also trains DoRA's
magnitude (base class); its forward is then weight-based and takes no neuron or rank dropout.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule, Factor, conv_geometry, layer_kind, sole_frozen_host
from .errors import LoraFormatError
from .functional import apply_weight, compiling, flat_shape, lora_delta_weight, low_rank_add, rank_dropout_mask


def _as_linear(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)  # [rows, cols]: 1x1-conv tensors on a Linear host


def _as_conv(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t[:, :, None, None]  # 2-D tensors on a conv host act as 1x1 convs


class LoRAModule(AdapterModule):
    """`lora_down.weight`, `lora_up.weight`, optional `lora_mid.weight`, buffer `alpha` (lora-format.md §2)."""

    algo = "lora"
    required_keys = frozenset({"lora_down.weight", "lora_up.weight"})
    optional_keys = frozenset({"alpha", "lora_mid.weight", "dora_scale"})

    def __init__(self, lora_name: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None,
                 mid: torch.Tensor | None = None, trainable: bool = True):
        super().__init__(lora_name)
        self.lora_down = Factor(down, trainable)
        self.lora_up = Factor(up, trainable)
        self.lora_mid = None if mid is None else Factor(mid, trainable)
        self.register_buffer("alpha", alpha)
        self.dropout = 0.0
        self.rank_dropout = 0.0

    @classmethod
    def for_layer(cls, lora_name: str, layer: nn.Module, rank: int, alpha: float | None, *,
                  dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0, dora_wd: bool = False,
                  device: torch.device | str | None = None) -> "LoRAModule":
        """A fresh trainable module for `layer`, fp32; alpha None or 0 means alpha = rank (kohya); DoRA if `dora_wd`."""
        device = layer.weight.device if device is None else device
        out_features, in_features = layer.weight.shape[:2]
        kernel = tuple(layer.weight.shape[2:])  # () for Linear, (kh, kw) for Conv2d
        down = torch.empty(rank, in_features, *kernel, device=device)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # kohya's (and nn.Linear's) default init
        up = torch.zeros(out_features, rank, *([1, 1] if kernel else []), device=device)
        alpha = float(rank) if not alpha else float(alpha)
        module = cls(lora_name, down, up, torch.tensor(alpha, device=device))
        module.dropout, module.rank_dropout, module.module_dropout = dropout, rank_dropout, module_dropout
        if dora_wd:
            module.init_dora(layer)
        module.bind(layer)
        return module

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "LoRAModule":
        cls.check_keys(name, tensors)
        down, up, mid = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors.get("lora_mid.weight")
        cls.check_ndim(name, "lora_down.weight", down, (2, 4))
        cls.check_ndim(name, "lora_up.weight", up, (2, 4))
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoraFormatError(f"{name}.lora_up.weight: must be a 1x1 kernel, has shape {tuple(up.shape)}")
        rank = down.shape[0]
        cls.check_dim_equal(name, "lora_up.weight", up.shape[1], rank, "its rank (dim 1)")
        if mid is not None:
            cls.check_ndim(name, "lora_mid.weight", mid, (4,))
            cls.check_dim_equal(name, "lora_mid.weight", mid.shape[0], rank, "its rank (dim 0)")
            cls.check_dim_equal(name, "lora_mid.weight", mid.shape[1], rank, "its rank (dim 1)")
        alpha = tensors.get("alpha")
        alpha = None if alpha is None else alpha.detach().float().reshape(())
        module = cls(name, down.float(), up.float(), alpha, None if mid is None else mid.float(), trainable=False)
        module.load_dora(tensors)
        return module

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    def delta_shape(self) -> tuple[int, int]:
        out = self.lora_up.weight.shape[0]
        if self.lora_mid is None:
            return out, flat_shape(self.lora_down.weight.shape)[1]
        return out, self.lora_down.weight.shape[1] * int(self.lora_mid.weight.shape[2:].numel())

    def delta_weight(self, shape) -> torch.Tensor:
        mid = None if self.lora_mid is None else self.lora_mid.weight
        return lora_delta_weight(self.lora_up.weight, self.lora_down.weight, self.alpha_value, shape, mid)

    def _factors(self, layer: nn.Module) -> list[tuple[torch.Tensor, dict]]:
        """(weight, conv geometry) of down[, mid], up in the host's layout; the k×k factor takes the host's geometry."""
        if layer_kind(layer) == "linear":
            return [(_as_linear(self.lora_down.weight), {}), (_as_linear(self.lora_up.weight), {})]
        host = conv_geometry(layer)
        if self.lora_mid is None:
            return [(_as_conv(self.lora_down.weight), host), (_as_conv(self.lora_up.weight), {})]
        return [(_as_conv(self.lora_down.weight), {}), (self.lora_mid.weight, host), (_as_conv(self.lora_up.weight), {})]

    def bypass_delta(self, x: torch.Tensor, layer: nn.Module, strength: float = 1.0) -> torch.Tensor:
        """strength·scale·up(down(x)) with kohya's training-time dropouts; equals x through delta_weight in eval."""
        (down, down_geo), *rest = self._factors(layer)
        h, scale = self._hidden(apply_weight(x, down.to(device=x.device, dtype=x.dtype), **down_geo), layer, strength)
        if scale != 1:  # alpha = rank: no op to launch, forward or backward
            h = h * scale
        for weight, geometry in rest:
            h = apply_weight(h, weight.to(device=x.device, dtype=x.dtype), **geometry)
        return h

    def fused_on(self, layer: nn.Module) -> bool:
        """Whether `add_delta` takes the fused path on `layer`: plain LoRA (no Tucker core, no DoRA) on a Linear or a
        1×1 stride-1 unpadded conv. Only then does the forward use its factors as they are (`Factor.like`)."""
        kind = layer_kind(layer)
        plain_conv = kind == "conv1x1" and layer.stride == (1, 1) and layer.padding == (0, 0)
        return self.lora_mid is None and self.dora_scale is None and (kind == "linear" or plain_conv)

    def add_delta(self, x: torch.Tensor, layer: nn.Module, output: torch.Tensor, strength: float) -> torch.Tensor:
        """output + forward_delta(x), fused for plain LoRA (no Tucker core, no DoRA) on Linear and 1×1-conv hosts.

        Without training-time neuron or rank dropout, one autograd op (`low_rank_add`) computes the down and
        the up projections, the up one added into the output with the scale as its alpha, and backward's
        four matmuls, with none of the reshape and transpose nodes autograd would record and replay; on a
        frozen stock host whose output only this hook sees, it also computes x's gradient through the host
        weight, so that the host's own backward and the sum of x's two gradients drop out. The
        fewer ops per adapter matter twice: on a CPU the layer-wide passes are most of what LoRA costs, and
        a GPU at batch 1 waits on each op's launch. On such a sole frozen host the up projection is added into
        the host's own output in place (no copy of it per adapter); elsewhere out of place, as an in-place add
        into a view of an output autograd tracks makes it copy the whole gradient in backward.
        """
        if not self.fused_on(layer):
            return super().add_delta(x, layer, output, strength)
        plain_conv = layer_kind(layer) != "linear"
        x = x.to(output.dtype)  # under autocast a layer may take fp32 in and give fp16 out
        down = self.lora_down.like(x)  # [r, in(, 1, 1)]
        up = self.lora_up.like(x)  # [out, r(, 1, 1)]
        if self.training and (self.dropout > 0 or self.rank_dropout > 0):
            return self._add_delta_with_dropout(x, layer, output, strength, down.flatten(1), up.flatten(1))
        if not plain_conv:
            down, up = down.flatten(1), up.flatten(1)  # [r, in], [out, r]: 1x1-conv tensors on a Linear host
        host_weight = layer.weight if sole_frozen_host(layer, output) else None
        # kept transposes save two dispatches an adapter eagerly; dynamo cannot trace the check that they are current
        transposed = None if plain_conv or compiling() else (self.lora_down.transposed(down), self.lora_up.transposed(up))
        return low_rank_add(output, x, down, up, self.scale * strength, conv1x1=plain_conv, host_weight=host_weight,
                            transposed=transposed)

    def _add_delta_with_dropout(self, x: torch.Tensor, layer: nn.Module, output: torch.Tensor, strength: float,
                                down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """`add_delta` with kohya's neuron or rank dropout on down(x), through autograd; down [r, in], up [out, r]."""
        if layer_kind(layer) == "linear":
            h, scale = self._hidden(F.linear(x, down), layer, strength)  # [..., r]
            return torch.addmm(output.reshape(-1, up.shape[0]), h.reshape(-1, self.rank), up.t(), alpha=scale).view(output.shape)
        batch, _, height, width = x.shape
        h, scale = self._hidden(torch.matmul(down, x.flatten(2)).view(batch, self.rank, height, width), layer, strength)
        product = torch.baddbmm(output.reshape(batch, up.shape[0], -1), up.expand(batch, -1, -1), h.flatten(2), alpha=scale)
        return product.view(output.shape)

    def _hidden(self, h: torch.Tensor, layer: nn.Module, strength: float) -> tuple[torch.Tensor, float]:
        """down(x) with kohya's dropouts, and the factor strength·scale its up projection is multiplied by."""
        scale = self.scale * strength
        if self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout > 0:
            channel_last = layer_kind(layer) == "linear"
            mask = rank_dropout_mask(h.shape[0], self.rank, self.rank_dropout, h.dim() if channel_last else 4, h.device)
            h = h * mask
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller (kohya)
        return h, scale
