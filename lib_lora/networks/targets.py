"""Which layers of a UNet and a text encoder get an adapter, and under which kohya name.

kohya's rule (`networks/lora.py` create_network, lora-format.md §3): inside every module whose class
name is in a target list, every Linear and Conv2d gets an adapter. Our tree and the webui's share
ldm/Hugging Face class names, so the lists are ldm's: `SpatialTransformer` for plain LoRA
("LierLa"), plus `ResBlock`, `Downsample`, `Upsample` when conv_dim is set ("C3Lier"/LoCon);
`CLIPAttention`/`CLIPMLP` in the text encoder. Paths are read relative to the walked root, so the
webui's `sd_model.model.diffusion_model` and `cond_stage_model` work as ours do.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .base import layer_kind
from .errors import NamingError
from .naming import TEXT_PREFIX_ALIASES, block_id, text_module_name, unet_ldm_module_name, unet_module_name

UNET_TRANSFORMER_CLASSES = frozenset({"SpatialTransformer"})
UNET_CONV_CLASSES = frozenset({"ResBlock", "Downsample", "Upsample"})
TEXT_CLASSES = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"})
_FIRST_DOWNSAMPLER = re.compile(r"(?:.*\.)?input_blocks\.(\d+)\.0\.op")


@dataclass(frozen=True)
class Target:
    """A layer that gets (or may get) an adapter: its kohya name, where it is, what it is."""

    name: str
    path: str
    layer: nn.Module
    component: str  # "unet" | "text_encoder"
    kind: str  # "linear" | "conv1x1" | "conv"

    @property
    def block(self) -> str | None:
        """LoRA-Block-Weight block: BASE for the text encoder, IN00..OUT11 in the UNet, None outside blocks."""
        return "BASE" if self.component == "text_encoder" else block_id(self.path)


def _layers_inside(root: nn.Module, classes: frozenset[str]) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every Linear/Conv2d inside a module of one of `classes`, each once, in tree order."""
    seen = set()
    for path, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_path, child in module.named_modules():
            full = f"{path}.{child_path}" if child_path else path
            if layer_kind(child) is not None and full not in seen:
                seen.add(full)
                yield full, child


def unet_targets(unet: nn.Module, include_conv: bool, num_res_blocks: int = 2) -> list[Target]:
    """kohya's UNet targets: transformer layers, plus every ResBlock/down/upsampler layer if `include_conv`."""
    classes = UNET_TRANSFORMER_CLASSES | (UNET_CONV_CLASSES if include_conv else frozenset())
    return [
        Target(unet_module_name(path, num_res_blocks), path, layer, "unet", layer_kind(layer))
        for path, layer in _layers_inside(unet, classes)
    ]


def text_targets(text_encoder: nn.Module) -> list[Target]:
    """kohya's text-encoder targets: q/k/v/out_proj of every CLIPAttention and fc1/fc2 of every CLIPMLP."""
    return [
        Target(text_module_name(path), path, layer, "text_encoder", layer_kind(layer))
        for path, layer in _layers_inside(text_encoder, TEXT_CLASSES)
    ]


def num_res_blocks_of(unet: nn.Module) -> int:
    """Resnets per down level R, read from the ldm tree: the first downsampler is input block R + 1."""
    for path, _ in unet.named_modules():
        if m := _FIRST_DOWNSAMPLER.fullmatch(path):
            return int(m.group(1)) - 1
    return 2  # a single-level UNet has no downsampler; SD1/SD2 have R = 2


def name_table(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, Target]:
    """Every name a file may use for any patchable layer -> that layer (the loaders' lookup, lora-format.md §9).

    UNet layers answer to the diffusers-style and the compvis-style name; text-encoder layers to
    `lora_te_` and `lora_te1_`. Covers all Linear/Conv2d, not only kohya's targets, because LyCORIS
    presets also patch conv_in, conv_out and the time embedding.
    """
    table: dict[str, Target] = {}
    if unet is not None:
        res = num_res_blocks_of(unet)
        for path, layer in unet.named_modules():
            if (kind := layer_kind(layer)) is not None:
                ldm_name = unet_ldm_module_name(path)
                try:
                    name = unet_module_name(path, res)
                except NamingError:  # a layer kohya's diffusers layout has no name for: compvis name only
                    name = ldm_name
                table[name] = table[ldm_name] = Target(name, path, layer, "unet", kind)
    if text_encoder is not None:
        for path, layer in text_encoder.named_modules():
            if (kind := layer_kind(layer)) is not None and "text_model." in path:
                target = Target(text_module_name(path), path, layer, "text_encoder", kind)
                table[target.name] = target
                for prefix in TEXT_PREFIX_ALIASES:
                    table[text_module_name(path, prefix)] = target
    return table

