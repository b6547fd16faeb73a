"""Token embeddings learnt with a LoRA (pivotal tuning) and bundled in its file, as the webui reads them.

File keys (webui 1.10 `extensions-builtin/Lora/networks.py` load_network, lora-format.md §7.8): one
text encoder (SD1, SD2) `bundle_emb.<token>.string_to_param.*` [n_vectors, width]; SDXL
`bundle_emb.<token>.clip_l` [n, 768] and `bundle_emb.<token>.clip_g` [n, 1280]. The webui splits a key
at its first dot: `bundle_emb` matches no layer (so it is skipped as a LoRA module), and the rest
splits at the next dot into the token and the vector's name, which
`textual_inversion.create_embedding_from_data` reads as a textual-inversion embedding (or, with
clip_l and clip_g, an SDXL one); it is registered under the token's name while the LoRA is in the
prompt. A token therefore has no dot in it.

`TrainableEmbeddings` holds the vectors as parameters named after those keys, so a `LoraNetwork`'s
state dict is the file. New vectors start as the webui's "Create embedding" starts them: the init
word's token embeddings (at most n of its tokens), vector i taken from token i·k//n.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models.conditioning import token_embedding_of
from ..models.tokenizer import get_tokenizer
from .errors import LoraFormatError, NetworkConfigError

BUNDLE_PREFIX = "bundle_emb"
SINGLE_KEY = "string_to_param"  # + ".*": the textual-inversion .pt layout the webui reads
SDXL_KEYS = ("clip_l", "clip_g")
DEFAULT_INIT_WORD = "*"  # the webui's "Create embedding" default


@dataclass(frozen=True)
class BundledEmbedding:
    """One token's vectors: one [n_vectors, width] tensor per text encoder (SDXL: CLIP-L, then bigG)."""

    name: str
    vectors: tuple[torch.Tensor, ...]

    @property
    def n_vectors(self) -> int:
        return self.vectors[0].shape[0]


def embedding_keys(name: str, n_encoders: int) -> tuple[str, ...]:
    """The file keys of a token's vectors, in text-encoder order."""
    if n_encoders == 1:
        return (f"{BUNDLE_PREFIX}.{name}.{SINGLE_KEY}.*",)
    return tuple(f"{BUNDLE_PREFIX}.{name}.{key}" for key in SDXL_KEYS)


def check_token_name(name: str) -> None:
    """A token is a file-key part and a prompt word: not empty, no dot, no surrounding spaces."""
    if not name or "." in name or name != name.strip():
        raise NetworkConfigError(f"embedding token {name!r}: must be a non-empty word without dots or surrounding spaces "
                                 f"(the webui splits bundle_emb.<token>.<vector> at dots)")


def is_bundle_key(key: str) -> bool:
    return key.startswith(BUNDLE_PREFIX + ".")


def _check_vector(key: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2 or tensor.shape[0] < 1:
        raise LoraFormatError(f"{key}: a bundled embedding is [n_vectors, width], has shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise LoraFormatError(f"{key}: holds NaN or infinite values")


def _embedding(name: str, parts: dict[str, tuple[str, torch.Tensor]]) -> BundledEmbedding:
    """`parts`: vector name (after the token) -> (full key, tensor); the webui's two layouts, nothing else."""
    singles = [p for p in parts if p.split(".")[0] == SINGLE_KEY]
    if singles and len(parts) == 1 and singles[0] != SINGLE_KEY:
        keys = [parts[singles[0]]]
    elif set(parts) == set(SDXL_KEYS):
        keys = [parts[k] for k in SDXL_KEYS]
    else:
        first = parts[sorted(parts)[0]][0]
        raise LoraFormatError(f"{first}: bundled embedding {name!r} has vectors {sorted(parts)}; the webui reads "
                              f"{SINGLE_KEY}.* alone or clip_l with clip_g")
    for key, tensor in keys:
        _check_vector(key, tensor)
    if len({t.shape[0] for _, t in keys}) != 1:
        raise LoraFormatError(f"{keys[0][0]}: clip_l and clip_g of {name!r} hold different numbers of vectors")
    return BundledEmbedding(name, tuple(t for _, t in keys))


def embeddings_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, BundledEmbedding]:
    """The bundled embeddings among a file's tensors (`bundle_emb.` keys), each validated; by token."""
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key in sorted(k for k in tensors if is_bundle_key(k)):
        name, dot, part = key[len(BUNDLE_PREFIX) + 1 :].partition(".")
        if not dot or not name or not part:
            raise LoraFormatError(f"{key}: not a bundled embedding key ({BUNDLE_PREFIX}.<token>.<vector>)")
        grouped.setdefault(name, {})[part] = (key, tensors[key])
    return {name: _embedding(name, parts) for name, parts in grouped.items()}


def embedding_tensors(embeddings: Iterable[BundledEmbedding]) -> dict[str, torch.Tensor]:
    """The file keys and tensors of bundled embeddings."""
    return {key: vec for e in embeddings for key, vec in zip(embedding_keys(e.name, len(e.vectors)), e.vectors)}


def widths_of(text_encoders: Sequence[nn.Module]) -> tuple[int, ...]:
    """Token-embedding width of each text encoder."""
    return tuple(_embedding_weight(encoder).shape[1] for encoder in text_encoders)


def vectors_for_model(embeddings: Iterable[BundledEmbedding], widths: Sequence[int], source: str = "") -> dict[str, tuple[torch.Tensor, ...]]:
    """Token -> vectors, checked against the model's encoder widths (the webui skips an embedding of another
    shape; we refuse it, as we refuse a LoRA module for another model). The first of a token wins, as the webui's."""
    found: dict[str, tuple[torch.Tensor, ...]] = {}
    for e in embeddings:
        shape = tuple(v.shape[1] for v in e.vectors)
        if shape != tuple(widths):
            raise LoraFormatError(f"{source}{': ' if source else ''}bundled embedding {e.name!r} has widths {list(shape)}; this model's "
                                  f"text encoders take {list(widths)} (an embedding for another model type)")
        found.setdefault(e.name, e.vectors)
    return found


def _embedding_weight(encoder: nn.Module) -> torch.Tensor:
    layer = token_embedding_of(encoder)
    return getattr(layer, "wrapped", layer).weight  # the webui wraps it (EmbeddingsWithFixes)


def initial_embeddings(text_encoders: Sequence[nn.Module], names: Sequence[str], init_word: str = DEFAULT_INIT_WORD,
                       n_vectors: int = 1, device: torch.device | str | None = None) -> list[BundledEmbedding]:
    """A new embedding per token, as the webui's `create_embedding`: the init word's first n token embeddings,
    vector i = token i·k//n of the k found; fp32."""
    if n_vectors < 1:
        raise NetworkConfigError(f"num_vectors_per_token must be at least 1, got {n_vectors}")
    ids = get_tokenizer().encode(init_word or DEFAULT_INIT_WORD)[:n_vectors]
    if not ids:
        raise NetworkConfigError(f"init_word {init_word!r} gives no token; use a word such as the class of the concept")
    vectors = []
    for encoder in text_encoders:
        weight = _embedding_weight(encoder)
        embedded = weight.detach()[torch.tensor(ids, device=weight.device)].float()  # [k, width]
        rows = [i * len(ids) // n_vectors for i in range(n_vectors)]
        vectors.append(embedded[rows].to(device or weight.device))  # [n, width]
    for name in names:
        check_token_name(name)
    return [BundledEmbedding(name, tuple(v.clone() for v in vectors)) for name in names]


class _TokenVectors(nn.Module):
    """One token's trainable vectors, named as their file keys: `string_to_param.*`, or `clip_l` and `clip_g`."""

    def __init__(self, vectors: Sequence[torch.Tensor]):
        super().__init__()
        if len(vectors) == 1:
            self.string_to_param = nn.Module()
            self.string_to_param.register_parameter("*", nn.Parameter(vectors[0].detach().float().clone()))
        elif len(vectors) == len(SDXL_KEYS):
            for key, vec in zip(SDXL_KEYS, vectors):
                self.register_parameter(key, nn.Parameter(vec.detach().float().clone()))
        else:
            raise NetworkConfigError(f"an embedding has one vector tensor per text encoder (1 or 2), got {len(vectors)}")

    def vectors(self) -> tuple[torch.Tensor, ...]:
        if hasattr(self, SINGLE_KEY):
            return (self.string_to_param._parameters["*"],)
        return tuple(self._parameters[key] for key in SDXL_KEYS)


class TrainableEmbeddings(nn.Module):
    """The pivotal-tuning vectors of a network, one child per token (its state dict keys: `<token>.string_to_param.*`...)."""

    def __init__(self, embeddings: Sequence[BundledEmbedding]):
        super().__init__()
        for e in embeddings:
            check_token_name(e.name)
            if e.name in self._modules:
                raise NetworkConfigError(f"embedding token {e.name!r} is given twice")
            # not add_module: a token may be spelt like an nn.Module attribute ("half", "train")
            self._modules[e.name] = _TokenVectors(e.vectors)

    def names(self) -> list[str]:
        return list(self._modules)

    def vectors(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Token -> its live parameters, one per text encoder (what the conditioning puts in the prompt)."""
        return {name: module.vectors() for name, module in self._modules.items()}

    def as_bundled(self) -> list[BundledEmbedding]:
        return [BundledEmbedding(name, tuple(v.detach() for v in vectors)) for name, vectors in self.vectors().items()]
