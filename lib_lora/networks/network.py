"""A trainable LoRA/LoCon network over a UNet and a text encoder (kohya `networks/lora.py` LoRANetwork).

Each adapter is registered under its kohya name, so `state_dict()` has exactly the file's keys
(`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`) and `load_state_dict` resumes
from a file. The adapters hook the host layers (`apply_to`/`remove`, or `with network:`); the host
models' parameters, names and state dicts never change, so this works on the webui's model too.
"""

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import NetworkConfigError
from .lora import LoRAModule
from .targets import Target, TextModel, as_text_models, num_res_blocks_of, text_targets, unet_targets


class LoraNetwork(nn.Module):
    """The adapters of one training run; text-encoder modules first, then UNet, as kohya orders them."""

    def __init__(self, text_modules: list[LoRAModule], unet_modules: list[LoRAModule], network_args: dict[str, str]):
        super().__init__()
        for module in [*text_modules, *unet_modules]:
            if module.lora_name in self._modules:
                raise NetworkConfigError(f"two layers map to the same kohya name {module.lora_name!r}")
            self.add_module(module.lora_name, module)
        self._text_names = [m.lora_name for m in text_modules]
        self._unet_names = [m.lora_name for m in unet_modules]
        self._network_args = dict(network_args)
        self._multiplier = 1.0

    @property
    def multiplier(self) -> float:
        """Strength of every adapter (the `s` of W x + s·(α/r)·up(down(x))); 1.0 while training."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for module in self.adapters():
            module.multiplier = self._multiplier

    def adapters(self) -> Iterator[LoRAModule]:
        for name in [*self._text_names, *self._unet_names]:
            yield self._modules[name]

    def module_names(self) -> list[str]:
        return [*self._text_names, *self._unet_names]

    def unet_parameters(self) -> list[nn.Parameter]:
        return [p for name in self._unet_names for p in self._modules[name].parameters()]

    def text_encoder_parameters(self, prefix: str | None = None) -> list[nn.Parameter]:
        """Adapters of the text encoder(s); with `prefix` (e.g. `lora_te2`) only that encoder's."""
        names = [n for n in self._text_names if prefix is None or n.startswith(prefix + "_")]
        return [p for name in names for p in self._modules[name].parameters()]

    def network_args(self) -> dict[str, str]:
        """kohya `--network_args` pairs (values as strings) for `ss_network_args`."""
        return dict(self._network_args)

    def apply_to(self) -> "LoraNetwork":
        """Hook every adapter onto its layer (idempotent)."""
        for module in self.adapters():
            module.apply_to()
        return self

    def remove(self) -> None:
        """Unhook every adapter; the host models then compute exactly what they did before."""
        for module in self.adapters():
            module.remove()

    def __enter__(self) -> "LoraNetwork":
        return self.apply_to()

    def __exit__(self, *exc) -> None:
        self.remove()

    def forward(self, *args, **kwargs):
        raise RuntimeError("LoraNetwork is not called; apply_to() hooks it into the UNet and text encoder")


def _check_args(network_dim, network_alpha, conv_dim, conv_alpha, dropout, rank_dropout, module_dropout) -> None:
    for name, value in (("network_dim", network_dim), ("conv_dim", conv_dim)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise NetworkConfigError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("network_alpha", network_alpha), ("conv_alpha", conv_alpha)):
        if value is not None and value < 0:
            raise NetworkConfigError(f"{name} must be >= 0 (0 means alpha = rank), got {value!r}")
    for name, value in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
        if not 0.0 <= value < 1.0:
            raise NetworkConfigError(f"{name} must be in [0, 1), got {value!r}")


def _network_args(conv_dim, conv_alpha, rank_dropout, module_dropout) -> dict[str, str]:
    """The pairs kohya users pass as `--network_args` (network dim/alpha/dropout have their own ss_ keys)."""
    args = {}
    if conv_dim is not None:
        args |= {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}
    if rank_dropout:
        args["rank_dropout"] = str(rank_dropout)
    if module_dropout:
        args["module_dropout"] = str(module_dropout)
    return args


def make_network(
    unet: nn.Module | None,
    text_encoder: nn.Module | Sequence[TextModel] | None,
    *,
    network_dim: int = 4,
    network_alpha: float = 1.0,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    device: torch.device | str | None = None,
) -> LoraNetwork:
    """A fresh LoRA (conv_dim None) or LoCon (conv_dim set) network with kohya's defaults and targets.

    `text_encoder` is SD1's encoder module, or the host's `TextModel` list (SD2, SDXL's two encoders).
    Linear and 1×1-conv layers get rank `network_dim`/`network_alpha`; 3×3 convs (LoCon only) get
    `conv_dim`/`conv_alpha` (default 1, as kohya). `device` defaults to each host layer's device;
    adapters are fp32 whatever the host's dtype. Not yet applied: call `apply_to()` or use `with`.
    """
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    _check_args(network_dim, network_alpha, conv_dim, conv_alpha, dropout, rank_dropout, module_dropout)
    text_models = as_text_models(text_encoder)
    use_unet, use_text = unet is not None and train_unet, bool(text_models) and train_text_encoder
    if not (use_unet or use_text):
        raise NetworkConfigError("nothing to train: no UNet (or train_unet=False) and no text encoder (or train_text_encoder=False)")
    dropouts = {"dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout, "device": device}

    def build(target: Target) -> LoRAModule:
        rank, alpha = (conv_dim, conv_alpha) if target.kind == "conv" else (network_dim, network_alpha)
        return LoRAModule.for_layer(target.name, target.layer, rank, alpha, **dropouts)

    text = [build(t) for t in text_targets(text_models)] if use_text else []
    unet_modules = [build(t) for t in unet_targets(unet, conv_dim is not None, num_res_blocks_of(unet))] if use_unet else []
    return LoraNetwork(text, unet_modules, _network_args(conv_dim, conv_alpha, rank_dropout, module_dropout))
