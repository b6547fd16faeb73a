"""Which layers of a UNet and a text encoder get an adapter, and under which kohya name.

kohya's rule (`networks/lora.py` create_network, lora-format.md §3): inside every module whose class
name is in a target list, every Linear and Conv2d gets an adapter. Our tree and the webui's share
ldm/Hugging Face class names, so the lists are ldm's: `SpatialTransformer` for plain LoRA
("LierLa"), plus `ResBlock`, `Downsample`, `Upsample` when conv_dim is set ("C3Lier"/LoCon);
`CLIPAttention`/`CLIPMLP` in a CLIP text encoder, `ResidualAttentionBlock` in an OpenCLIP one (SD2,
SDXL's second). Paths are read relative to the walked root, so the webui's
`sd_model.model.diffusion_model` and `cond_stage_model` work as ours do.
"""

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from .base import layer_kind
from .errors import NamingError
from .naming import (SDXL_TEXT_PREFIXES, TEXT_PREFIX, TEXT_PREFIX_ALIASES, block_id, text_layer_index, text_module_name,
                     unet_ldm_module_name, unet_module_name)

UNET_TRANSFORMER_CLASSES = frozenset({"SpatialTransformer"})
UNET_CONV_CLASSES = frozenset({"ResBlock", "Downsample", "Upsample"})
TEXT_CLASSES = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "ResidualAttentionBlock"})
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


@dataclass(frozen=True)
class TextModel:
    """A text encoder as adapters see it: the module, its kohya prefix, and whether its last layer is unused.

    SD2 conditions on the penultimate layer, so kohya's converted encoder has 23 layers, not 24: the
    last one gets no adapter (lora-format.md §4).
    """

    module: nn.Module
    prefix: str = TEXT_PREFIX
    skip_last_layer: bool = False


def text_models_for(arch: str, text_encoder: nn.Module, text_encoder_2: nn.Module | None = None) -> list[TextModel]:
    """The text encoders of an sd1 / sd2 / sdxl model with their kohya prefixes (`lora_te`, or `lora_te1` + `lora_te2`)."""
    if arch == "sdxl":
        return [TextModel(text_encoder, SDXL_TEXT_PREFIXES[0]), TextModel(text_encoder_2, SDXL_TEXT_PREFIXES[1])]
    return [TextModel(text_encoder, TEXT_PREFIX, skip_last_layer=arch == "sd2")]


def as_text_models(text_encoders: "nn.Module | Sequence[TextModel] | None") -> list[TextModel]:
    """A bare module is SD1's single encoder (`lora_te`); a list of TextModel is taken as it is."""
    if text_encoders is None:
        return []
    if isinstance(text_encoders, nn.Module):
        return [TextModel(text_encoders)]
    return list(text_encoders)


def uses_ldm_names(unet: nn.Module) -> bool:
    """SDXL (the UNet with `label_emb`): kohya names its modules by ldm path, not by diffusers path."""
    return hasattr(unet, "label_emb")


def unet_targets(unet: nn.Module, include_conv: bool, num_res_blocks: int = 2) -> list[Target]:
    """kohya's UNet targets: transformer layers, plus every ResBlock/down/upsampler layer if `include_conv`."""
    classes = UNET_TRANSFORMER_CLASSES | (UNET_CONV_CLASSES if include_conv else frozenset())
    ldm_names = uses_ldm_names(unet)
    return [
        Target(unet_ldm_module_name(path) if ldm_names else unet_module_name(path, num_res_blocks), path, layer, "unet", layer_kind(layer))
        for path, layer in _layers_inside(unet, classes)
    ]


def text_targets(text_encoders: "nn.Module | Sequence[TextModel]") -> list[Target]:
    """kohya's text-encoder targets: q/k/v/out_proj of every attention and fc1/fc2 (c_fc/c_proj) of every MLP."""
    targets = []
    for model in as_text_models(text_encoders):
        found = list(_layers_inside(model.module, TEXT_CLASSES))
        last = max((text_layer_index(path) for path, _ in found), default=None)
        targets += [
            Target(text_module_name(path, model.prefix), path, layer, "text_encoder", layer_kind(layer))
            for path, layer in found
            if not (model.skip_last_layer and text_layer_index(path) == last)
        ]
    return targets


def num_res_blocks_of(unet: nn.Module) -> int:
    """Resnets per down level R, read from the ldm tree: the first downsampler is input block R + 1."""
    for path, _ in unet.named_modules():
        if m := _FIRST_DOWNSAMPLER.fullmatch(path):
            return int(m.group(1)) - 1
    return 2  # a single-level UNet has no downsampler; SD1/SD2 have R = 2


def name_table(unet: nn.Module | None, text_encoders: "nn.Module | Sequence[TextModel] | None") -> dict[str, Target]:
    """Every name a file may use for any patchable layer -> that layer (the loaders' lookup, lora-format.md §9).

    UNet layers answer to the diffusers-style and the compvis-style name; SD1 text-encoder layers to
    `lora_te_` and `lora_te1_`, SDXL's to their own prefix. Covers all Linear/Conv2d, not only kohya's
    targets, because LyCORIS presets also patch conv_in, conv_out and the time embedding.
    """
    table: dict[str, Target] = {}
    if unet is not None:
        res, ldm_names = num_res_blocks_of(unet), uses_ldm_names(unet)
        for path, layer in unet.named_modules():
            if (kind := layer_kind(layer)) is not None:
                ldm_name = unet_ldm_module_name(path)
                try:
                    diffusers_name = unet_module_name(path, res)
                except NamingError:  # a layer kohya's diffusers layout has no name for: compvis name only
                    diffusers_name = ldm_name
                name = ldm_name if ldm_names else diffusers_name
                table[diffusers_name] = table[ldm_name] = Target(name, path, layer, "unet", kind)
    for model in as_text_models(text_encoders):
        aliases = TEXT_PREFIX_ALIASES if model.prefix == TEXT_PREFIX else ()
        for path, layer in model.module.named_modules():
            if (kind := layer_kind(layer)) is not None and text_layer_index(path) is not None:
                target = Target(text_module_name(path, model.prefix), path, layer, "text_encoder", kind)
                table[target.name] = target
                for prefix in aliases:
                    table[text_module_name(path, prefix)] = target
    return table

