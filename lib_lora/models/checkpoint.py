"""Reading and writing ldm/sgm single-file checkpoints, with the architecture read from the tensors.

SD1.x, SD2.x and SDXL files, full-size or tiny, load through the same code. The architecture comes
from where the text encoders live (lora-format.md §4, webui-integration.md §2): SD1's CLIP under
`cond_stage_model.transformer.`, SD2's OpenCLIP under `cond_stage_model.model.`, SDXL's pair under
`conditioner.embedders.0.transformer.` and `conditioner.embedders.1.model.`. Channel counts, depths,
context width, vocabulary and layer counts come from tensor shapes. What shapes cannot tell
(attention head counts, latent scale, eps/v) comes from safetensors metadata keys `lib_lora.*`
when present, else from each architecture's own values; v-prediction also from the `v_pred` marker
key that SDXL v-pred fine-tunes carry, or from `modelspec.prediction_type`, and for an SD2 file that
says nothing from the webui's own test of the UNet's output (`sd2_predicts_v`).
"""

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .clip_text import TextConfig, TextEncoder
from .open_clip_text import OpenClipConfig, OpenClipTextEncoder
from .tensor_files import LazyTensors, read_tensor_file, write_safetensors
from .unet import UNetConfig, UNetModel
from .vae import DECODER_PREFIXES, SD_LATENT_SCALE, SDXL_LATENT_SCALE, AutoencoderKL, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.", "conditioner.embedders.1.")
ARCHITECTURES = ("sd1", "sd2", "sdxl")

# Keys that real files carry beside the weights and that inference does not use: EMA copies, ldm's
# precomputed DDPM buffers, Hugging Face's position-id buffer, open_clip's logit scale and attention
# mask, and the v-prediction / zero-terminal-SNR markers of SDXL v-pred fine-tunes (read, then dropped).
IGNORED_KEY = re.compile(
    r"^(model_ema\.|(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|v_pred|ztsnr)$|"
    r"(cond_stage_model|conditioner\.embedders\.0)\.transformer\.text_model\.embeddings\.position_ids$|"
    r"(cond_stage_model|conditioner\.embedders\.1)\.model\.(logit_scale|attn_mask)$)"
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as an SD1/SD2/SDXL checkpoint; the message names the file."""


@dataclass
class Checkpoint:
    """The models of a checkpoint plus what shapes cannot tell.

    `text_encoder` is SD1's CLIP, SD2's OpenCLIP or SDXL's first encoder (CLIP-L); `text_encoder_2`
    is SDXL's second (OpenCLIP bigG), None otherwise.
    """

    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder | OpenClipTextEncoder
    parameterization: str = "eps"
    metadata: dict[str, str] = field(default_factory=dict)
    text_encoder_2: OpenClipTextEncoder | None = None
    arch: str = "sd1"

    def components(self) -> list[tuple[str, torch.nn.Module]]:
        """(key prefix in the file, model) for every model of the checkpoint."""
        return [(UNET_PREFIX, self.unet), (VAE_PREFIX, self.vae), *zip(text_prefixes(self.arch), self.text_models())]

    def text_models(self) -> list[torch.nn.Module]:
        return [self.text_encoder] if self.text_encoder_2 is None else [self.text_encoder, self.text_encoder_2]


def text_prefixes(arch: str) -> tuple[str, ...]:
    """Where an architecture's text encoders live in the file."""
    return SDXL_TEXT_PREFIXES if arch == "sdxl" else (TEXT_PREFIX,)


def detect_architecture(keys) -> str:
    """sd1, sd2 or sdxl from where the text encoders live; CheckpointError for what we cannot train."""
    keys = list(keys)
    if any(k.startswith(SDXL_TEXT_PREFIXES[1] + "model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.") for k in keys):
        raise CheckpointError("an SDXL refiner (one OpenCLIP text encoder under conditioner.embedders.0); "
                              "train on an SDXL base model or a fine-tune of it")
    if any(k.startswith(TEXT_PREFIX + "model.") for k in keys):
        return "sd2"
    return "sd1"


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors or .ckpt file (.ckpt read with weights_only=True)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise CheckpointError(f"{path}: unsupported file type {path.suffix!r}; use .safetensors or .ckpt")
    return read_tensor_file(path, CheckpointError, "checkpoint")


def _open_tensors(path: str | os.PathLike) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """Like read_state_dict, but a .safetensors file's tensors are read one at a time, when used."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        tensors = LazyTensors(path, CheckpointError)
        return tensors, tensors.metadata
    return read_state_dict(path)


class Component(Mapping):
    """The tensors of one model in a checkpoint (keys under `prefix`, with the prefix cut), read through `state`."""

    def __init__(self, state: Mapping[str, torch.Tensor], prefix: str, keys):
        self._state, self._prefix = state, prefix
        self._keys = {k[len(prefix) :] for k in keys if k.startswith(prefix)}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._state[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def without(self, prefixes: tuple[str, ...]) -> "Component":
        """The same tensors less those whose key starts with one of `prefixes`."""
        return Component(self._state, self._prefix, [self._prefix + k for k in self._keys if not k.startswith(prefixes)])

    def converted(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in `dtype`, read from a lazily read file without a file-dtype copy of its own."""
        if isinstance(self._state, LazyTensors):
            return self._state.read(self._prefix + key, dtype)
        return self[key].to(dtype)


def _count_indices(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _transformer_depth(sd: dict[str, torch.Tensor], depths: list[int]) -> int | tuple[int, ...]:
    """One int when every transformer has the middle block's depth (SD1/SD2), else one per level (SDXL)."""
    middle = _count_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if all(d in (0, middle) for d in depths):
        return middle
    if depths[-1] != middle:
        raise CheckpointError(f"unsupported UNet: middle transformer depth {middle} differs from the last level's {depths[-1]}")
    return tuple(depths)


def infer_unet_config(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> UNetConfig:
    """Levels, channels, attention placement and depth from the input blocks (ldm numbering)."""
    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    widths, depths, res_blocks, levels_res = [], [], 0, []
    for n in range(1, _count_indices(sd, r"input_blocks\.(\d+)\.")):
        if f"input_blocks.{n}.0.op.weight" in sd:  # a downsampler closes a level
            levels_res.append(res_blocks)
            res_blocks = 0
            continue
        if res_blocks == 0:
            widths.append(sd[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0])
            depths.append(_count_indices(sd, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\."))
        res_blocks += 1
    levels_res.append(res_blocks)
    if len(set(levels_res)) != 1:
        raise CheckpointError(f"unsupported UNet: levels have different numbers of res blocks {levels_res}")
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    uses_head_dim = context_dim in (1024, 2048)  # SD2 and SDXL: 64-channel heads (num_head_channels)
    return UNetConfig(
        in_channels=in_channels,
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        num_res_blocks=levels_res[0],
        attention_levels=tuple(d > 0 for d in depths),
        context_dim=context_dim,
        num_heads=int(meta.get("lib_lora.unet_num_heads", 8)),
        head_dim=64 if uses_head_dim and "lib_lora.unet_num_heads" not in meta else None,
        transformer_depth=_transformer_depth(sd, depths),
        use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].ndim == 2,
        adm_in_channels=sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else 0,
    )


def infer_vae_config(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> VAEConfig:
    channels = sd["encoder.conv_in.weight"].shape[0]
    levels = _count_indices(sd, r"encoder\.down\.(\d+)\.")
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        z_channels=sd["post_quant_conv.weight"].shape[0],
        channels=channels,
        channel_mult=tuple(w // channels for w in widths),
        num_res_blocks=_count_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        norm_groups=int((meta or {}).get("lib_lora.vae_norm_groups", 32)),
    )


def infer_text_config(sd: dict[str, torch.Tensor], meta: dict[str, str], heads_key: str = "lib_lora.text_num_heads") -> TextConfig:
    prefix = "transformer.text_model."
    vocab, width = sd[prefix + "embeddings.token_embedding.weight"].shape
    return TextConfig(
        vocab_size=vocab,
        max_positions=sd[prefix + "embeddings.position_embedding.weight"].shape[0],
        width=width,
        layers=_count_indices(sd, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
        heads=int(meta.get(heads_key, max(1, width // 64))),
        mlp_width=sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
    )


def infer_open_clip_config(sd: dict[str, torch.Tensor], meta: dict[str, str], heads_key: str) -> OpenClipConfig:
    vocab, width = sd["model.token_embedding.weight"].shape
    return OpenClipConfig(
        vocab_size=vocab,
        max_positions=sd["model.positional_embedding"].shape[0],
        width=width,
        layers=_count_indices(sd, r"model\.transformer\.resblocks\.(\d+)\."),
        heads=int(meta.get(heads_key, max(1, width // 64))),
        mlp_width=sd["model.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=sd["model.text_projection"].shape[1],
    )


# Per architecture: (file prefix, model class, config reader, metadata key of its head count) per text encoder.
TEXT_ENCODERS = {
    "sd1": [(TEXT_PREFIX, TextEncoder, infer_text_config, "lib_lora.text_num_heads")],
    "sd2": [(TEXT_PREFIX, OpenClipTextEncoder, infer_open_clip_config, "lib_lora.text_num_heads")],
    "sdxl": [
        (SDXL_TEXT_PREFIXES[0], TextEncoder, infer_text_config, "lib_lora.text_num_heads"),
        (SDXL_TEXT_PREFIXES[1], OpenClipTextEncoder, infer_open_clip_config, "lib_lora.text_2_num_heads"),
    ],
}
DEFAULT_LATENT_SCALE = {"sd1": SD_LATENT_SCALE, "sd2": SD_LATENT_SCALE, "sdxl": SDXL_LATENT_SCALE}
ARCH_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # how messages and cards name each architecture


def _check_format(path, state: dict[str, torch.Tensor], arch: str) -> None:
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), *((p, "text encoder") for p in text_prefixes(arch))):
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{path}: no {what} weights (no keys starting with {prefix!r}); not an {ARCH_NAMES[arch]} checkpoint")
    in_channels = _shape(state, UNET_PREFIX + "input_blocks.0.0.weight", 1, default=4)
    latent_channels = _shape(state, VAE_PREFIX + "post_quant_conv.weight", 0, default=4)  # SD's 4; the tiny base may have more
    if in_channels != latent_channels:
        raise CheckpointError(f"{path}: its UNet takes {in_channels} input channels (an inpainting or instruct-pix2pix "
                              f"model); LoRA training needs a plain text-to-image model ({latent_channels} channels, as its VAE's latents)")


def _shape(state: Mapping[str, torch.Tensor], key: str, axis: int, default: int) -> int:
    return state[key].shape[axis] if key in state else default


def _parameterization(state: Mapping[str, torch.Tensor], meta: dict[str, str]) -> str | None:
    """What the file says: our own key, the `v_pred` marker key, or modelspec's prediction type; None if silent."""
    if "lib_lora.parameterization" in meta:
        return meta["lib_lora.parameterization"]
    if "v_pred" in state or meta.get("modelspec.prediction_type") == "v":
        return "v"
    return "eps" if "modelspec.prediction_type" in meta else None


@torch.no_grad()
def sd2_predicts_v(unet: UNetModel) -> bool:
    """The webui's test for an SD2 file that does not say (`is_using_v_parameterization_for_sd2`): at t = 999
    on a flat input a v-model's output sits far below its input, an eps-model's does not."""
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, device=param.device, dtype=param.dtype)
    return (unet(x, torch.tensor([999], device=param.device), context) - x).float().mean().item() < -1


def _build(path, module_cls, config, sd: Component, prefix: str, dtype, **kwargs):
    """Construct on the meta device (no wasted init) and take the file's tensors, all keys accounted for.

    Each tensor is read and converted to `dtype` on its own, so only one file-dtype copy exists at a time.
    """
    with torch.device("meta"):
        model = module_cls(config, **kwargs)
    expected = set(model.state_dict())
    missing, unknown = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unknown:
        lines = [f"{path}: the {prefix[:-1]} weights do not match the architecture read from the file ({config})."]
        lines += [f"  missing: {prefix}{k}" for k in missing[:20]] + (["  ..."] if len(missing) > 20 else [])
        lines += [f"  unknown: {prefix}{k}" for k in unknown[:20]] + (["  ..."] if len(unknown) > 20 else [])
        raise CheckpointError("\n".join(lines))
    tensors = {}
    for k, p in model.state_dict().items():
        tensor = sd.converted(k, dtype)
        if tensor.shape != p.shape:
            raise CheckpointError(f"{path}: {prefix}{k} has shape {tuple(tensor.shape)}, expected {tuple(p.shape)}")
        tensors[k] = tensor
    model.load_state_dict(tensors, assign=True)
    return model.eval().requires_grad_(False)


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", parameterization: str | None = None,
                    vae_decoder: bool = True) -> Checkpoint:
    """Load an SD1/SD2/SDXL checkpoint (.safetensors or .ckpt) into frozen, eval-mode models.

    `parameterization` ("eps" or "v") overrides what the file says, as kohya's `--v_parameterization`.
    `vae_decoder=False` leaves the VAE's decoder unread, for a run that draws no images (SD1.5: 190 MiB in fp32).
    """
    state, meta = _open_tensors(path)
    try:
        arch = detect_architecture(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _check_format(path, state, arch)
    prefixes = (UNET_PREFIX, VAE_PREFIX, *text_prefixes(arch))
    leftovers = sorted(k for k in state if not k.startswith(prefixes) and not IGNORED_KEY.match(k))
    if leftovers:
        raise CheckpointError(f"{path}: unknown keys outside the UNet, VAE and text encoders of an {ARCH_NAMES[arch]} "
                              f"checkpoint: {', '.join(leftovers[:20])}")
    kept = [k for k in state if not IGNORED_KEY.match(k)]
    unet_sd, vae_sd = Component(state, UNET_PREFIX, kept), Component(state, VAE_PREFIX, kept)
    text_sds = [(Component(state, prefix, kept), prefix, cls, infer, heads_key) for prefix, cls, infer, heads_key in TEXT_ENCODERS[arch]]
    try:
        unet_config, vae_config = infer_unet_config(unet_sd, meta), infer_vae_config(vae_sd, meta)
        text_configs = [infer(sd, meta, heads_key) for sd, _, _, infer, heads_key in text_sds]
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r} needed to read the {ARCH_NAMES[arch]} architecture") from e
    texts = [_build(path, cls, config, sd, prefix, dtype).to(device) for (sd, prefix, cls, _, _), config in zip(text_sds, text_configs)]
    unet = _build(path, UNetModel, unet_config, unet_sd, UNET_PREFIX, dtype).to(device)
    parameterization = parameterization or _parameterization(state, meta)
    if parameterization is None:  # SD2 files in the wild (768-v) rarely say; SD1 and SDXL default to eps
        parameterization = "v" if arch == "sd2" and sd2_predicts_v(unet) else "eps"
    return Checkpoint(
        unet=unet,
        vae=_build_vae(path, vae_sd, vae_config, meta, arch, dtype, vae_decoder).to(device),
        text_encoder=texts[0],
        text_encoder_2=texts[1] if len(texts) > 1 else None,
        parameterization=parameterization,
        metadata=meta,
        arch=arch,
    )


def _build_vae(path, vae_sd: Component, config: VAEConfig, meta: dict[str, str], arch: str, dtype, decoder: bool) -> AutoencoderKL:
    scale = float(meta.get("lib_lora.scale_factor", DEFAULT_LATENT_SCALE[arch]))
    return _build(path, AutoencoderKL, config, vae_sd if decoder else vae_sd.without(DECODER_PREFIXES), VAE_PREFIX, dtype,
                  scale_factor=scale, decoder=decoder)


def load_vae_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> AutoencoderKL:
    """The checkpoint's VAE without its decoder, and nothing else read: for a host that released its encoder
    once every latent was cached (StandaloneHost.release_vae_encoder) and is asked to encode again."""
    state, meta = _open_tensors(path)
    arch = detect_architecture(state)
    vae_sd = Component(state, VAE_PREFIX, [k for k in state if k.startswith(VAE_PREFIX)])
    return _build_vae(path, vae_sd, infer_vae_config(vae_sd, meta), meta, arch, dtype, decoder=False).to(device)


def checkpoint_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """The `lib_lora.*` keys needed to rebuild what shapes cannot tell."""
    meta = {
        "lib_lora.unet_num_heads": str(ckpt.unet.config.num_heads),
        "lib_lora.text_num_heads": str(ckpt.text_encoder.config.heads),
        "lib_lora.scale_factor": str(ckpt.vae.scale_factor),
        "lib_lora.vae_norm_groups": str(ckpt.vae.config.norm_groups),
        "lib_lora.parameterization": ckpt.parameterization,
    }
    if ckpt.text_encoder_2 is not None:
        meta["lib_lora.text_2_num_heads"] = str(ckpt.text_encoder_2.config.heads)
    return meta


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike, dtype: torch.dtype | None = None, extra_metadata=None) -> None:
    """Write an ldm/sgm-layout .safetensors atomically (temp file + rename)."""
    state = {}
    for prefix, model in ckpt.components():
        for k, v in model.state_dict().items():
            state[prefix + k] = (v.to(dtype) if dtype else v).contiguous()
    meta = {**checkpoint_metadata(ckpt), **(extra_metadata or {})}
    write_safetensors(path, state, meta)
