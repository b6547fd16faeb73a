"""A trainable LoRA/LoCon/LoHa/LoKr network over a UNet and a text encoder (kohya `networks/lora.py`
LoRANetwork; LyCORIS's kohya wrapper `lycoris/kohya.py` for LoHa, LoKr and DoRA).

Each adapter is registered under its kohya name, so `state_dict()` has exactly the file's keys
(`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`; `.hada_w1_a`...; `.lokr_w1`...;
`.dora_scale`; pivotal tuning's token vectors under `bundle_emb.<token>...`) and `load_state_dict`
resumes from a file. The adapters hook the host layers
(`apply_to`/`remove`, or `with network:`); the host models' parameters, names and state dicts never
change, so this works on the webui's model too.
"""

from collections.abc import Collection, Iterator, Sequence

import torch
from torch import nn

from ..models.open_clip_text import FusedSlice
from .base import AdapterModule
from .blocks import TEXT_BLOCK, check_train_blocks, keeps, make_block_dims
from .embeddings import BUNDLE_PREFIX, BundledEmbedding, TrainableEmbeddings
from .errors import NetworkConfigError
from .loha import LoHaModule
from .lokr import LoKrModule
from .lora import LoRAModule
from .naming import block_id
from .targets import Target, TextModel, as_text_models, num_res_blocks_of, text_targets, unet_targets, uses_ldm_names

ALGOS = ("lora", "loha", "lokr")


class LoraNetwork(nn.Module):
    """The adapters of one training run; text-encoder modules first, then UNet, as kohya orders them."""

    def __init__(self, text_modules: list[AdapterModule], unet_modules: list[AdapterModule], network_args: dict[str, str],
                 network_module: str = "networks.lora", embeddings: Sequence[BundledEmbedding] = ()):
        super().__init__()
        for module in [*text_modules, *unet_modules]:
            if module.lora_name in self._modules:
                raise NetworkConfigError(f"two layers map to the same kohya name {module.lora_name!r}")
            self.add_module(module.lora_name, module)
        if embeddings:
            self.add_module(BUNDLE_PREFIX, TrainableEmbeddings(embeddings))
        self._text_names = [m.lora_name for m in text_modules]
        self._unet_names = [m.lora_name for m in unet_modules]
        self._network_args = dict(network_args)
        self.network_module = network_module  # kohya's `--network_module`, for ss_network_module
        self._multiplier = 1.0

    @property
    def embeddings(self) -> TrainableEmbeddings | None:
        """The pivotal-tuning token vectors, if this network learns any."""
        return self._modules.get(BUNDLE_PREFIX)

    def embedding_vectors(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Token -> its live vectors, one per text encoder; empty without pivotal tuning."""
        return {} if self.embeddings is None else self.embeddings.vectors()

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [] if self.embeddings is None else list(self.embeddings.parameters())

    @property
    def multiplier(self) -> float:
        """Strength of every adapter (the `s` of W x + s·(α/r)·up(down(x))); 1.0 while training."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for module in self.adapters():
            module.multiplier = self._multiplier

    def adapters(self) -> Iterator[AdapterModule]:
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


def _check_args(algo, network_dim, network_alpha, conv_dim, conv_alpha, dropout, rank_dropout, module_dropout, dora_wd,
                lokr_factor) -> None:
    if algo not in ALGOS:
        raise NetworkConfigError(f"algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    if (algo != "lora" or dora_wd) and (dropout or rank_dropout):
        raise NetworkConfigError(f"dropout and rank_dropout act on LoRA's hidden ranks: not with {'DoRA' if dora_wd else algo}, "
                                 f"whose forward is weight-based (use module_dropout)")
    if lokr_factor != -1 and lokr_factor < 2:
        raise NetworkConfigError(f"lokr_factor must be -1 (balanced) or at least 2, got {lokr_factor!r}")
    for name, value in (("network_dim", network_dim), ("conv_dim", conv_dim)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise NetworkConfigError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("network_alpha", network_alpha), ("conv_alpha", conv_alpha)):
        if value is not None and value < 0:
            raise NetworkConfigError(f"{name} must be >= 0 (0 means alpha = rank), got {value!r}")
    for name, value in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
        if not 0.0 <= value < 1.0:
            raise NetworkConfigError(f"{name} must be in [0, 1), got {value!r}")


def network_module_and_args(algo, conv_dim, conv_alpha, rank_dropout, module_dropout, dora_wd=False,
                            lokr_factor=-1, block_args: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """kohya's `--network_module` and the `--network_args` pairs that rebuild this network (lora-format.md §8.1).

    Plain LoRA/LoCon is kohya's `networks.lora`; LoHa, LoKr and anything with DoRA is LyCORIS's
    `lycoris.kohya` with `algo` (`lora` without 3×3 convs, on LyCORIS's `attn-mlp` preset; `locon`
    with them), `factor`, `dora_wd` and `wd_on_output` (False: our input-axis DoRA) as LyCORIS reads them.
    `block_args` (`block_dims`... as kohya spells them, and our `train_blocks`, `cross_attention_only`,
    which kohya's create_network ignores) are added as given. Network dim/alpha/dropout have their own ss_ keys.
    """
    args = {}
    lycoris = algo != "lora" or dora_wd
    if lycoris:
        args["algo"] = algo if algo != "lora" else ("locon" if conv_dim is not None else "lora")
        if conv_dim is None:
            args["preset"] = "attn-mlp"
    if conv_dim is not None:
        args |= {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}
    if algo == "lokr":
        args["factor"] = str(lokr_factor)
    if lycoris:
        args["dora_wd"] = str(bool(dora_wd))
    if dora_wd:
        args["wd_on_output"] = "False"
    if rank_dropout:
        args["rank_dropout"] = str(rank_dropout)
    if module_dropout:
        args["module_dropout"] = str(module_dropout)
    args |= block_args or {}
    return ("lycoris.kohya" if lycoris else "networks.lora"), args


def make_network(
    unet: nn.Module | None,
    text_encoder: nn.Module | Sequence[TextModel] | None,
    *,
    algo: str = "lora",
    network_dim: int = 4,
    network_alpha: float = 1.0,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    dora_wd: bool = False,
    lokr_factor: int = -1,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    block_dims: Sequence[int] | None = None,
    block_alphas: Sequence[float] | None = None,
    conv_block_dims: Sequence[int] | None = None,
    conv_block_alphas: Sequence[float] | None = None,
    train_blocks: Collection[str] | None = None,
    cross_attention_only: bool = False,
    embeddings: Sequence[BundledEmbedding] = (),
    device: torch.device | str | None = None,
) -> LoraNetwork:
    """A fresh network with kohya's defaults and targets: `algo` lora (LoRA, or LoCon with conv_dim), loha or lokr.

    `text_encoder` is SD1's encoder module, or the host's `TextModel` list (SD2, SDXL's two encoders).
    Linear and 1×1-conv layers get rank `network_dim`/`network_alpha`; 3×3 convs (only with conv_dim:
    kohya's LoCon targets, which LyCORIS's `full` preset also has) get `conv_dim`/`conv_alpha` (default 1,
    as kohya). `lokr_factor` splits LoKr's dimensions (LyCORIS `factor`). `dora_wd` adds DoRA's magnitude
    to every adapter but those on OpenCLIP's fused q/k/v (see `_wants_dora`). `block_dims`... give the
    UNet's ranks per block as kohya's network args do (blocks.py; conv_block_dims also brings in the 3×3
    convs); `train_blocks` (LoRA-Block-Weight names, BASE = the text encoders) and `cross_attention_only`
    (the UNet's attn2 layers) choose the layers; `embeddings` are token vectors learnt with the adapters
    (pivotal tuning). `device` defaults to each host layer's device; adapters are fp32 whatever the
    host's dtype. Not yet applied: call `apply_to()` or use `with`.
    """
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    _check_args(algo, network_dim, network_alpha, conv_dim, conv_alpha, dropout, rank_dropout, module_dropout, dora_wd, lokr_factor)
    chosen = None if train_blocks is None else frozenset(train_blocks)
    text_models = as_text_models(text_encoder)
    use_unet = unet is not None and train_unet and (chosen is None or bool(chosen - {TEXT_BLOCK}))
    use_text = bool(text_models) and train_text_encoder and (chosen is None or TEXT_BLOCK in chosen)
    if not (use_unet or use_text or embeddings):
        raise NetworkConfigError("nothing to train: no UNet (or train_unet=False) and no text encoder (or train_text_encoder=False)")
    blocks = make_block_dims(uses_ldm_names(unet), network_dim, network_alpha, conv_dim, conv_alpha, block_dims=block_dims,
                             block_alphas=block_alphas, conv_block_dims=conv_block_dims,
                             conv_block_alphas=conv_block_alphas) if unet is not None else None
    if use_unet and chosen is not None:
        check_train_blocks(chosen, unet_blocks(unet))
    options = {"module_dropout": module_dropout, "device": device}
    options |= {"dropout": dropout, "rank_dropout": rank_dropout} if algo == "lora" else {}
    options |= {"factor": lokr_factor} if algo == "lokr" else {}
    module_class = {"lora": LoRAModule, "loha": LoHaModule, "lokr": LoKrModule}[algo]

    def rank_alpha(target: Target) -> tuple[int, float] | None:
        if target.component == "unet" and blocks is not None:
            return blocks.rank_alpha(target)
        return (conv_dim, conv_alpha) if target.kind == "conv" else (network_dim, network_alpha)

    def build(targets: list[Target]) -> list[AdapterModule]:
        ranks = [(t, rank_alpha(t)) for t in targets]
        return [module_class.for_layer(t.name, t.layer, ra[0], ra[1], dora_wd=dora_wd and _wants_dora(t), **options)
                for t, ra in ranks if ra is not None and ra[0] > 0]

    text = build(text_targets(text_models)) if use_text else []
    include_conv = conv_dim is not None or (blocks is not None and blocks.conv_dims is not None)
    unet_modules = build([t for t in unet_targets(unet, include_conv, num_res_blocks_of(unet))
                          if keeps(t, chosen, cross_attention_only)]) if use_unet else []
    if not (text or unet_modules or embeddings):
        raise NetworkConfigError("nothing to train: the chosen blocks, cross_attention_only and block_dims leave no layer an adapter")
    block_args = _block_args(block_dims, block_alphas, conv_block_dims, conv_block_alphas, train_blocks, cross_attention_only)
    module, args = network_module_and_args(algo, conv_dim, conv_alpha, rank_dropout, module_dropout, dora_wd, lokr_factor, block_args)
    return LoraNetwork(text, unet_modules, args, module, embeddings)


def unet_blocks(unet: nn.Module) -> set[str]:
    """The LoRA-Block-Weight blocks a UNet has (IN00.., M00, OUT00..), from its module paths."""
    return {block for path, _ in unet.named_modules() if (block := block_id(path)) is not None}


def _block_args(block_dims, block_alphas, conv_block_dims, conv_block_alphas, train_blocks, cross_attention_only) -> dict[str, str]:
    """kohya's spellings of the block options for ss_network_args (values comma-joined, as given on kohya's command line)."""
    args = {name: ",".join(str(v) for v in values) for name, values in (
        ("block_dims", block_dims), ("block_alphas", block_alphas), ("conv_block_dims", conv_block_dims),
        ("conv_block_alphas", conv_block_alphas), ("train_blocks", train_blocks)) if values is not None}
    if cross_attention_only:
        args["cross_attention_only"] = "True"
    return args


def _wants_dora(target: Target) -> bool:
    """Every adapter takes DoRA's magnitude but those on OpenCLIP's q/k/v (SD2, SDXL's second encoder).

    The webui 1.10.1 applies q/k/v adapters of an `nn.MultiheadAttention` with the whole fused
    in_proj [3d, d] as their base weight; a DoRA norm of [d, d] + [3d, d] fails there, and the webui
    then skips that attention layer entirely. Plain adapters on those three apply everywhere.
    """
    return not isinstance(target.layer, FusedSlice)
