"""The base class of every adapter algorithm: file keys as parameter names, injection and checks once.

An algorithm subclass (lora.py, loha.py, lokr.py) declares `algo`, its `required_keys` and
`optional_keys` (the part of each file key after the module name) and implements only the math:
`delta_weight`, `delta_shape`, `from_tensors`, `for_layer` (a fresh trainable module) and, where it
has a cheaper form than building ΔW, `bypass_delta`. Hooking onto a host layer, dtype handling,
module dropout, validation of file tensors and DoRA (an optional `dora_scale` on any algorithm,
lora-format.md §7.4) live here.

The host layer is held outside the module tree (`self.__dict__`), so `state_dict()` is exactly the
file's tensors for this module and the host's own parameters, names and state dict are untouched:
a forward hook adds `multiplier · forward_delta(x)` to the host's output.
"""

from typing import ClassVar

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.utils.hooks import RemovableHandle

from ..models.open_clip_text import FusedSlice
from .errors import LoraFormatError
from .functional import apply_weight, dora_norm, dora_weight, flat_shape, lora_scale


def layer_kind(layer: nn.Module) -> str | None:
    """'linear', 'conv1x1' or 'conv' (any other kernel) for the layers adapters can target; else None.

    An OpenCLIP q/k/v projection (a `FusedSlice` of the fused in_proj) is a Linear to adapters, and so
    is a host's own Linear class (Forge's `ForgeOperations.Linear` is no `nn.Linear` subclass).
    """
    if isinstance(layer, (nn.Linear, FusedSlice)) or _foreign_linear(layer):
        return "linear"
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros":
        return "conv1x1" if tuple(layer.kernel_size) == (1, 1) else "conv"
    return None


def _foreign_linear(layer: nn.Module) -> bool:
    """A class named Linear whose weight is a plain [out_features, in_features] tensor (the shape rules out
    packed 4-bit storage, which adapters cannot read), as Forge builds with `using_forge_operations`."""
    weight = getattr(layer, "weight", None)
    return (type(layer).__name__ == "Linear" and isinstance(weight, torch.Tensor) and weight.is_floating_point()
            and tuple(weight.shape) == (getattr(layer, "out_features", None), getattr(layer, "in_features", None)))


def sole_frozen_host(layer: nn.Module, output: torch.Tensor) -> bool:
    """Whether `output` is exactly x·Wᵀ (+ b) of `layer` in the weight's dtype, seen by one forward hook only.

    A stock torch Linear or Conv2d (not one whose forward a webui extension patched), its weight and bias
    frozen, no pre-hook and no other forward hook on it or global ones: an adapter's backward may then
    compute x's gradient through the host weight itself and send none back through the host.
    """
    stock = type(layer) in (nn.Linear, nn.Conv2d) and type(layer).forward.__module__.startswith("torch.nn.")
    frozen = not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
    alone = len(layer._forward_hooks) == 1 and not (layer._forward_pre_hooks or _global_forward_hooks or _global_forward_pre_hooks)
    return stock and frozen and alone and layer.weight.dtype == output.dtype


def conv_geometry(layer: nn.Module) -> dict:
    """stride/padding/dilation of a host conv (an adapter's k×k factor must use them); {} for Linear."""
    if isinstance(layer, nn.Conv2d):
        return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    return {}


class Factor(nn.Module):
    """A bare `weight` parameter, so that file key `<name>.lora_down.weight` is this module's state-dict key.

    `half_copy`, when the trainer sets one (`train.half_copies`), is the weight in the half-precision dtype a model
    computes in, kept current by one multi-tensor copy a step instead of a cast of each factor in every forward.
    """

    def __init__(self, weight: torch.Tensor, trainable: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=trainable)
        self.half_copy: torch.Tensor | None = None  # a plain attribute: not in the state dict
        self._transposed: tuple[torch.Tensor, torch.Tensor] | None = None  # (tensor, its .t() view)

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in x's dtype and on its device: the half copy where it is one, else a cast (none in fp32)."""
        copy = self.half_copy
        if copy is not None and copy.dtype == x.dtype and copy.device == x.device:
            return copy
        return self.weight.to(device=x.device, dtype=x.dtype)

    def transposed(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """tensor.t() for a 2-D `tensor` that is this factor's own (its weight or half copy, as `like` returns them),
        made once and kept: the optimizer and the copies' refresh write those tensors in place, so the view stays
        current, and the forward dispatches no transpose per adapter and step. None for anything else (a fresh cast)."""
        if tensor.dim() != 2 or not (tensor is self.weight or tensor is self.half_copy):
            return None
        kept = self._transposed
        current = kept is not None and kept[0] is tensor and kept[1].data_ptr() == tensor.data_ptr() and kept[1].shape == tensor.shape[::-1]
        if not current:  # new, or its `.data` swapped (a load, a move)
            # of a detached alias: outside autograd (the adapter's Function gets the gradient through `tensor`), so that
            # an optimizer's in-place update of the weight, in grad mode or not, leaves it a plain current view
            kept = self._transposed = (tensor, tensor.detach().t())
        return kept[1]

    def forget_transposed(self) -> None:
        self._transposed = None


class AdapterModule(nn.Module):
    """One adapter on one host layer. Subclasses implement the math; this class hooks and validates."""

    algo: ClassVar[str]
    required_keys: ClassVar[frozenset[str]]
    optional_keys: ClassVar[frozenset[str]] = frozenset({"alpha", "dora_scale"})

    def __init__(self, lora_name: str):
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = 1.0
        self.module_dropout = 0.0
        self.__dict__["host"] = None  # not registered: the host's parameters stay out of our state dict
        self._handle: RemovableHandle | None = None
        self._scale: float | None = None
        self.register_parameter("dora_scale", None)  # DoRA's magnitude m, file key `<name>.dora_scale`
        self.register_load_state_dict_post_hook(self._forget_scale)

    # ---- math, per algorithm -------------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        """The r of scale = alpha / r; None where the algorithm uses no scale (full LoKr factors)."""
        raise NotImplementedError

    @property
    def alpha_value(self) -> float | None:
        alpha = getattr(self, "alpha", None)
        return None if alpha is None else float(alpha.item())

    @property
    def scale(self) -> float:
        """alpha / rank, cached as a Python float: reading a CUDA alpha every forward would sync the GPU."""
        if self._scale is None:
            self.cache_scale()
        return self._scale

    def cache_scale(self) -> None:
        """Read alpha / rank into the Python float now: torch.compile cannot trace the tensor read in a forward."""
        self._scale = lora_scale(self.alpha_value, self.rank)

    def _forget_scale(self, *_) -> None:
        self._scale = None  # load_state_dict may bring another alpha

    def delta_shape(self) -> tuple[int, int]:
        """(out, in·kh·kw) of ΔW as the tensors give it; checked against the target before applying."""
        raise NotImplementedError

    def delta_weight(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """scale·ΔW in the target weight's `shape` (strength not included), in the adapter's dtype."""
        raise NotImplementedError

    def weight_delta(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """What this module adds to the host weight `weight` (W0) at `strength`, fp32 on W0's device.

        strength·scale·ΔW; with DoRA strength·(W_d − W0), W_d = m ⊙ V / ‖V‖ and V = W0 + scale·ΔW: the
        webui's `network.py` (finalize_updown + apply_weight_decompose) and ComfyUI's strength rule.
        """
        delta = self.delta_weight(weight.shape).to(weight.device, torch.float32)
        if self.dora_scale is None:
            return delta * strength
        w0 = weight.detach().float()  # the frozen base weight, in fp32 whatever the host's dtype
        return (dora_weight(w0, delta, self.dora_scale.to(w0.device)) - w0) * strength

    def forward_delta(self, x: torch.Tensor, layer: nn.Module, strength: float = 1.0) -> torch.Tensor:
        """strength·(what this module adds to the host's weight) applied to `x` as the host layer applies a weight.

        DoRA needs the whole adapted weight (its norms), so it goes through `weight_delta` (as LyCORIS's
        forward does); otherwise through the algorithm's `bypass_delta`.
        """
        if self.dora_scale is None:
            return self.bypass_delta(x, layer, strength)
        weight = self.weight_delta(layer.weight, strength).to(device=x.device, dtype=x.dtype)
        return apply_weight(x, weight, **conv_geometry(layer))

    def bypass_delta(self, x: torch.Tensor, layer: nn.Module, strength: float = 1.0) -> torch.Tensor:
        """strength·scale·ΔW applied to `x`; algorithms with a form that never builds ΔW override this."""
        weight = self.delta_weight(layer.weight.shape).to(device=x.device, dtype=x.dtype)
        return apply_weight(x, weight * strength if strength != 1.0 else weight, **conv_geometry(layer))

    # ---- DoRA, shared ------------------------------------------------------------------------------
    def init_dora(self, layer: nn.Module, on_output: bool = False) -> None:
        """Train a magnitude too (DoRA): m starts as W0's norms, so the untrained module changes nothing.

        Input-axis ([1, in(, 1, 1)]) by default: the orientation the webui 1.10.1 applies (README, DoRA).
        """
        w0 = layer.weight.detach().float()
        self.dora_scale = nn.Parameter(dora_norm(w0, on_output))

    def load_dora(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take a file's `dora_scale` (if any) as the frozen magnitude."""
        if (magnitude := tensors.get("dora_scale")) is not None:
            self.dora_scale = nn.Parameter(magnitude.float(), requires_grad=False)

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "AdapterModule":
        """Build from a file's tensors for one module (keys without the `name.` part)."""
        raise NotImplementedError

    # ---- file checks, shared -------------------------------------------------------------------
    @classmethod
    def matches(cls, keys: set[str]) -> bool:
        return cls.required_keys <= keys

    @classmethod
    def check_keys(cls, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Every key is one of the algorithm's; every tensor is finite; alpha is a scalar."""
        for key in sorted(set(tensors) - cls.required_keys - cls.optional_keys):
            known = ", ".join(sorted(cls.required_keys | cls.optional_keys))
            raise LoraFormatError(f"{name}.{key}: unknown key for a {cls.algo} module (its keys: {known})")
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise LoraFormatError(f"{name}.{key}: contains NaN or infinite values")
        alpha = tensors.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise LoraFormatError(f"{name}.alpha: must be a scalar, has shape {tuple(alpha.shape)}")
        magnitude = tensors.get("dora_scale")
        if magnitude is not None and (magnitude.dim() not in (2, 4) or 1 not in magnitude.shape[:2] or set(magnitude.shape[2:]) - {1}):
            raise LoraFormatError(f"{name}.dora_scale: must be [out, 1(, 1, 1)] or [1, in(, 1, 1)], has shape {tuple(magnitude.shape)}")

    @staticmethod
    def check_ndim(name: str, key: str, t: torch.Tensor, ndims: tuple[int, ...]) -> None:
        if t.dim() not in ndims:
            raise LoraFormatError(f"{name}.{key}: expected {' or '.join(map(str, ndims))} dims, got shape {tuple(t.shape)}")

    @staticmethod
    def check_dim_equal(name: str, key: str, got: int, expected: int, what: str) -> None:
        if got != expected:
            raise LoraFormatError(f"{name}.{key}: {what} is {got}, expected {expected}")

    def check_target(self, layer: nn.Module) -> None:
        """Raise if this module cannot be applied to `layer` (layer type or weight shape)."""
        kind = layer_kind(layer)
        if kind is None:
            raise LoraFormatError(f"{self.lora_name}: targets a {type(layer).__name__}, which adapters cannot patch")
        out, flat_in = self.delta_shape()
        want_out, want_in = flat_shape(layer.weight.shape)
        if (out, flat_in) != (want_out, want_in):
            raise LoraFormatError(
                f"{self.lora_name}: its delta weight is [{out}, {flat_in}] (out, in·kh·kw) but the layer's weight "
                f"{tuple(layer.weight.shape)} needs [{want_out}, {want_in}]; the file is for another model"
            )
        if self.dora_scale is not None:
            shape, out, inp = tuple(self.dora_scale.shape[:2]), *layer.weight.shape[:2]
            if shape not in ((out, 1), (1, inp)):
                raise LoraFormatError(f"{self.lora_name}.dora_scale: has shape {tuple(self.dora_scale.shape)}; the layer's "
                                      f"weight {tuple(layer.weight.shape)} needs [{out}, 1] (output-axis) or [1, {inp}] (input-axis)")

    # ---- injection, shared -----------------------------------------------------------------------
    @classmethod
    def trained_from(cls, lora_name: str, tensors: dict[str, torch.Tensor], alpha: float, layer: nn.Module, *,
                     module_dropout: float = 0.0, dora_wd: bool = False) -> "AdapterModule":
        """A trainable module from its initial factors (LoHa, LoKr): its DoRA magnitude taken from the layer, bound to it."""
        device = next(iter(tensors.values())).device
        module = cls(lora_name, tensors, torch.tensor(alpha, device=device), trainable=True)
        module.module_dropout = module_dropout
        if dora_wd:
            module.init_dora(layer)
        module.bind(layer)
        return module

    def bind(self, layer: nn.Module) -> None:
        """Remember the host layer this module adds to (checked, not yet hooked)."""
        self.check_target(layer)
        self.__dict__["host"] = layer

    def apply_to(self) -> None:
        """Start adding to the host's output (idempotent)."""
        if self.host is None:
            raise RuntimeError(f"{self.lora_name}: bind() it to a layer before apply_to()")
        if self._handle is None:
            self._handle = self.host.register_forward_hook(self._forward_hook)

    def remove(self) -> None:
        """Stop adding to the host's output; the host is then exactly as before `apply_to`."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def applied(self) -> bool:
        return self._handle is not None

    def _dropped(self) -> bool:
        """Module dropout (kohya): in training, skip this module for the whole step with probability p."""
        return self.training and self.module_dropout > 0 and bool(torch.rand(()) < self.module_dropout)

    def add_delta(self, x: torch.Tensor, layer: nn.Module, output: torch.Tensor, strength: float) -> torch.Tensor:
        """The host's `output` plus strength·forward_delta(x); algorithms with a fused form override it."""
        return output + self.forward_delta(x, layer, strength).to(output.dtype)

    def _forward_hook(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0 or self._dropped():
            return output
        # On an fp16/bf16 host the delta is computed in the host's dtype, as autocast and the webui do: the
        # adapter's small weights are cast, not the layer-wide activations (fp32 weights keep fp32 grads).
        return self.add_delta(inputs[0], layer, output, self.multiplier)
