"""The webui's `<lora:...>` prompt syntax, and LoRA-Block-Weight per-block strengths.

Tags (webui `modules/extra_networks.py` parse_prompt + `extensions-builtin/Lora/extra_networks_lora.py`):
`<lora:NAME>`, `<lora:NAME:w>` (te = unet = w), `<lora:NAME:te:unet>`, keywords `te=`, `unet=`; an
item with one `=` is a keyword, others are positional. te = positional 1 (default 1.0), then `te=`;
unet = positional 2, else te, then `unet=`. `lyco` is an alias of `lora`. Tags are cut out of the
prompt with nothing put in their place, as the webui does.

Block weights (hako-mikan/sd-webui-lora-block-weight): `lbw=` with 17 values (BASE, IN01, IN02,
IN04, IN05, IN07, IN08, M00, OUT03..OUT11: the SD1 blocks that hold attention), 26 values (BASE,
IN00..IN11, M00, OUT00..OUT11) or a preset name; for SDXL, LoRA-Block-Weight's own layouts: 12
values (BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05: SDXL's blocks with attention) or 20 (BASE,
IN00..IN08, M00, OUT00..OUT08). Every form expands to the 26 slots with 0 for the blocks it does not
list (SDXL's blocks are IN00..IN08, M00, OUT00..OUT08 by the same ldm numbering). BASE scales the
text encoder(s); a UNet layer outside every block (time embedding, final conv) keeps weight 1.
"""

import re
from dataclasses import dataclass

from .errors import PromptSyntaxError

BLOCK_IDS_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCK_IDS_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
BLOCK_IDS_SDXL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
BLOCK_IDS_SDXL_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
BLOCK_LAYOUTS = {len(ids): ids for ids in (BLOCK_IDS_26, BLOCK_IDS_17, BLOCK_IDS_SDXL_12, BLOCK_IDS_SDXL_20)}
# LoRA-Block-Weight's default presets, in its 17-value form.
BLOCK_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
}
NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_TYPES = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` of a prompt: which file and how strongly (block_weights: 26 values or None)."""

    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    block_weights: tuple[float, ...] | None = None

    def block_weight(self, block: str | None) -> float:
        return block_weight(self.block_weights, block)


def block_weight(block_weights: tuple[float, ...] | None, block: str | None) -> float:
    """The factor of a layer in LBW block `block` (None: outside the blocks, or no block weights -> 1)."""
    if block_weights is None or block is None:
        return 1.0
    return block_weights[BLOCK_IDS_26.index(block)]


def _float(value: str, what: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptSyntaxError(f"{tag}: {what} {value!r} is not a number") from None


def parse_block_weights(text: str, tag: str = "lbw") -> tuple[float, ...]:
    """17 or 26 (SD1/SD2), 12 or 20 (SDXL) comma-separated weights, or a preset name -> the 26 weights
    BASE, IN00..IN11, M00, OUT00..OUT11."""
    text = BLOCK_PRESETS.get(text.strip(), text)
    values = [_float(v.strip(), "block weight", tag) for v in text.split(",")]
    if len(values) not in BLOCK_LAYOUTS:
        raise PromptSyntaxError(f"{tag}: lbw needs 17 or 26 comma-separated weights (SDXL: 12 or 20) or a preset "
                                f"({', '.join(BLOCK_PRESETS)}), got {len(values)} values")
    by_block = dict(zip(BLOCK_LAYOUTS[len(values)], values))
    return tuple(by_block.get(block, 0.0) for block in BLOCK_IDS_26)


def _split_items(args: str) -> tuple[list[str], dict[str, str]]:
    """Positional items and `key=value` items, as the webui's ExtraNetworkParams splits them."""
    positional, named = [], {}
    for item in args.split(":"):
        parts = item.split("=")
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    return positional, named


def parse_lora_tag(args: str, tag: str) -> LoraTag:
    """The part after `<lora:` -> LoraTag, with the webui's defaults and keyword overrides."""
    positional, named = _split_items(args)
    if not positional or not positional[0].strip():
        raise PromptSyntaxError(f"{tag}: no LoRA name")
    unknown = sorted(set(named) - {"te", "unet", "lbw"})
    if unknown:
        raise PromptSyntaxError(f"{tag}: unsupported keyword {unknown[0]}= (supported: te=, unet=, lbw=)")
    if len(positional) > 3:
        raise PromptSyntaxError(f"{tag}: too many values; use <lora:name:te:unet> (dyn is not supported)")
    te = _float(positional[1], "te multiplier", tag) if len(positional) > 1 else 1.0
    te = _float(named["te"], "te multiplier", tag) if "te" in named else te
    unet = _float(positional[2], "unet multiplier", tag) if len(positional) > 2 else te
    unet = _float(named["unet"], "unet multiplier", tag) if "unet" in named else unet
    blocks = parse_block_weights(named["lbw"], tag) if "lbw" in named else None
    return LoraTag(positional[0].strip(), te, unet, blocks)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(prompt without its `<lora:...>` tags, the tags in order). Other extra-network types are an error."""
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind not in LORA_TAG_TYPES:
            raise PromptSyntaxError(f"{match.group(0)}: extra network type {kind!r} is not supported here (only lora)")
        tags.append(parse_lora_tag(args, match.group(0)))
        return ""

    return NETWORK_TAG.sub(take, prompt), tags
