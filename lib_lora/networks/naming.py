"""kohya module names from module paths: the ldm -> diffusers block mapping of lora-format.md §5-§6.

kohya trains SD1/SD2 on a diffusers-layout UNet, so its files name UNet modules by diffusers paths
(`lora_unet_down_blocks_0_attentions_0_proj_in`); our UNet, like the webui's, has ldm paths
(`input_blocks.1.1.proj_in`). `ldm_to_diffusers` converts by arithmetic on the block indices, with
R = resnets per down level (2 for SD1/SD2): input block n holds level (n-1)//(R+1) item (n-1)%(R+1),
every (R+1)-th input block is a downsampler, output block n holds level n//(R+1) item n%(R+1).
SDXL is the exception kohya makes: its files name UNet modules by the ldm path itself
(`lora_unet_input_blocks_4_1_...`, §5.2), as `unet_ldm_module_name` does.
Text-encoder names are Hugging Face CLIP paths from `text_model.` on, whatever wraps the model;
OpenCLIP layers (SD2, SDXL's second encoder) take the name of their Hugging Face counterpart.
"""

import re

from .errors import NamingError

UNET_PREFIX = "lora_unet"
TEXT_PREFIX = "lora_te"
TEXT_PREFIX_ALIASES = ("lora_te1",)  # SDXL's first-encoder prefix, which the webui and ComfyUI accept for SD1
SDXL_TEXT_PREFIXES = ("lora_te1", "lora_te2")  # SDXL: CLIP-L, OpenCLIP bigG

# ResBlock children, ldm -> diffusers (lora-format.md §6 "resnet inner").
RESNET_CHILDREN = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# Layers outside the blocks (targeted by LyCORIS presets only).
OUTSIDE_BLOCKS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# OpenCLIP resblock layers -> their Hugging Face CLIP names (lora-format.md §4).
OPEN_CLIP_TO_HF = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_LAYER = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.(" + "|".join(map(re.escape, OPEN_CLIP_TO_HF)) + r")$")
_BLOCK_PATH = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)|middle_block\.(\d+)\.(.+)")
_UNET_ROOT = re.compile(r"^(?:.*\.)?diffusion_model\.")


def _resnet_child(rest: str, path: str) -> str:
    if rest not in RESNET_CHILDREN:
        raise NamingError(f"{path}: {rest!r} is no ResBlock layer (expected one of {', '.join(RESNET_CHILDREN)})")
    return RESNET_CHILDREN[rest]


def _item(kind: str, j: int, rest: str, path: str) -> str:
    """`resnets.j.<child>` for sub-module 0 of a block, `attentions.j.<rest>` for a transformer."""
    if kind == "resnets":
        return f"resnets.{j}.{_resnet_child(rest, path)}"
    return f"attentions.{j}.{rest}"


def _input_block(n: int, k: int, rest: str, per_level: int, path: str) -> str:
    if n % per_level == 0 and (k, rest) == (0, "op"):
        return f"down_blocks.{n // per_level - 1}.downsamplers.0.conv"
    i, j = divmod(n - 1, per_level)
    return f"down_blocks.{i}.{_item('resnets' if k == 0 else 'attentions', j, rest, path)}"


def _output_block(n: int, k: int, rest: str, per_level: int, path: str) -> str:
    i, j = divmod(n, per_level)
    if k > 0 and rest == "conv":  # Upsample: sub-index 1 without attention, 2 with (webui §3.3)
        return f"up_blocks.{i}.upsamplers.0.conv"
    return f"up_blocks.{i}.{_item('resnets' if k == 0 else 'attentions', j, rest, path)}"


def _middle_block(m: int, rest: str, path: str) -> str:
    if m == 1:
        return f"mid_block.attentions.0.{rest}"
    return f"mid_block.resnets.{m // 2}.{_resnet_child(rest, path)}"


def unet_relative_path(path: str) -> str:
    """Strip whatever holds the UNet (`model.diffusion_model.`), so webui and our paths compare equal."""
    return _UNET_ROOT.sub("", path)


def ldm_to_diffusers(path: str, num_res_blocks: int = 2) -> str:
    """ldm UNet module path -> diffusers path, e.g. `input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in`."""
    path = unet_relative_path(path)
    for ldm, diffusers in OUTSIDE_BLOCKS.items():
        if path == ldm:
            return diffusers
    m = _BLOCK_PATH.fullmatch(path)
    if m is None:
        raise NamingError(f"{path}: not an ldm UNet layer path (input_blocks.N.K..., middle_block.M..., output_blocks.N.K...)")
    per_level = num_res_blocks + 1
    if m.group(5) is not None:
        return _middle_block(int(m.group(5)), m.group(6), path)
    n, k, rest = int(m.group(2)), int(m.group(3)), m.group(4)
    if m.group(1) == "input_blocks":
        return _input_block(n, k, rest, per_level, path)
    return _output_block(n, k, rest, per_level, path)


def flatten(prefix: str, path: str) -> str:
    """`prefix` + `_` + the dotted path with every `.` turned into `_` (lora-format.md §1)."""
    return f"{prefix}_{path.replace('.', '_')}"


def unet_module_name(path: str, num_res_blocks: int = 2) -> str:
    """The kohya name of an ldm UNet layer: `lora_unet_` + its diffusers path (kohya's SD1/SD2 convention)."""
    return flatten(UNET_PREFIX, ldm_to_diffusers(path, num_res_blocks))


def unet_ldm_module_name(path: str) -> str:
    """The compvis-style name some SD1 files use (`lora_unet_input_blocks_1_1_proj_in`); read, never written."""
    return flatten(UNET_PREFIX, unet_relative_path(path))


def text_model_path(path: str) -> str:
    """The Hugging Face CLIP path of a text-encoder layer, from `text_model.` on.

    `cond_stage_model.wrapped.transformer.text_model.x` -> `text_model.x`; an OpenCLIP layer
    (SD2, SDXL's second encoder) maps as kohya converts it: `transformer.resblocks.N.attn.q_proj` ->
    `text_model.encoder.layers.N.self_attn.q_proj`, `mlp.c_fc` -> `mlp.fc1`, `mlp.c_proj` -> `mlp.fc2`.
    """
    if m := _OPEN_CLIP_LAYER.search(path):
        return f"text_model.encoder.layers.{m.group(1)}.{OPEN_CLIP_TO_HF[m.group(2)]}"
    at = path.find("text_model.")
    if at < 0 or (at > 0 and path[at - 1] != "."):
        raise NamingError(f"{path}: not a CLIP text-encoder layer path (no 'text_model.' or 'transformer.resblocks.' in it)")
    return path[at:]


def text_layer_index(path: str) -> int | None:
    """N of `...layers.N...` (CLIP) or `...resblocks.N...` (OpenCLIP); None outside the encoder layers."""
    m = re.search(r"(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.", path)
    return None if m is None else int(m.group(1))


def text_module_name(path: str, prefix: str = TEXT_PREFIX) -> str:
    """`lora_te_text_model_encoder_layers_0_self_attn_q_proj` from any path ending in `text_model.encoder...`."""
    return flatten(prefix, text_model_path(path))


def block_id(path: str) -> str | None:
    """LoRA-Block-Weight block of an ldm UNet layer: IN00-IN11, M00, OUT00-OUT11; None outside the blocks."""
    path = unet_relative_path(path)
    if m := re.match(r"input_blocks\.(\d+)\.", path):
        return f"IN{int(m.group(1)):02d}"
    if path.startswith("middle_block."):
        return "M00"
    if m := re.match(r"output_blocks\.(\d+)\.", path):
        return f"OUT{int(m.group(1)):02d}"
    return None
