"""CLIP byte-level BPE tokenizer and the webui's prompt chunking for SD1.

The tokenizer is OpenAI CLIP's (`simple_tokenizer.py`), re-implemented over the merges file that ships with
open_clip_torch. Chunking and attention weights follow A1111 webui v1.10.1: `modules/prompt_parser.py`
(`parse_prompt_attention`), `modules/sd_hijack_clip.py` (`tokenize_line`, `empty_chunk`, `forward`) and
`modules/sd_emphasis.py` (`EmphasisOriginal`). Textual-inversion embeddings (given by name and vector count)
are found and laid out as the webui's `tokenize_line` does: their place in a chunk is held by id-0 tokens and
recorded as an `EmbeddingFix`, where the conditioning puts the vectors (`EmbeddingsWithFixes`).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import importlib.util
import math
import pathlib
import re
import sys
import unicodedata

import torch

try:  # optional: CLIP repairs mojibake with it; plain text tokenizes the same without it
    import ftfy
except ImportError:
    ftfy = None
try:  # optional: it gives `\p{L}`/`\p{N}`, which `_unicode_class` spells out for `re` otherwise
    import regex
except ImportError:
    regex = None

VOCAB_SIZE = 49408
BOS = 49406  # <|startoftext|>, the webui's id_start
EOS = 49407  # <|endoftext|>, the webui's id_end; SD1 also pads with it (id_pad == id_end)
CHUNK_LENGTH = 75  # prompt tokens per chunk; each chunk is BOS + 75 + EOS = 77 ids
COMMA_PADDING_BACKTRACK = 20  # default of the webui option `comma_padding_backtrack`
EMPHASIS_ROUND = 1.1  # `(text)` multiplies by this, `[text]` by its inverse

_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # the vocab is 256 bytes, 256 bytes + </w>, merges, 2 specials
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def merges_path() -> pathlib.Path:
    """The merges file inside the installed open_clip package, found without importing it (its
    `__init__` pulls in torchvision, which may be broken or slow to import)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The CLIP tokenizer reads its merges file from open_clip: pip install open_clip_torch")
    path = pathlib.Path(spec.submodule_search_locations[0]) / _MERGES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --force-reinstall open_clip_torch")
    return path


def clean_text(text: str) -> str:
    """CLIP's `basic_clean` + `whitespace_clean` + lowercase: ftfy repair when installed, HTML entities
    unescaped twice (CLIP does, for doubly escaped captions), whitespace runs collapsed to one space."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> character map, so BPE never sees whitespace or control characters:
    printable Latin-1 bytes map to themselves, the other 68 to chr(256 + n). Dict order is the vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def _unicode_class(category_prefix: str) -> str:
    """Body of a stdlib `re` character class matching every code point whose Unicode category starts with
    `category_prefix` ("L" letters, "N" numbers): `re` has no `\\p{L}`/`\\p{N}`."""
    ranges: list[list[int]] = []
    for code in range(sys.maxunicode + 1):
        if not unicodedata.category(chr(code)).startswith(category_prefix):
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "".join(f"\\U{first:08x}-\\U{last:08x}" for first, last in ranges)


def _pretoken_pattern(use_regex_package: bool) -> re.Pattern:
    """CLIP's pre-token split: special tokens, English contractions, letter runs, single digits, and runs of
    anything else but whitespace. With `regex` the classes are `\\p{L}`/`\\p{N}`; without, built for `re`."""
    module = regex if use_regex_package else re
    letters = r"\p{L}" if use_regex_package else _unicode_class("L")
    numbers = r"\p{N}" if use_regex_package else _unicode_class("N")
    specials = "|".join(re.escape(s) for s in _SPECIALS)
    contractions = r"'s|'t|'re|'ve|'m|'ll|'d"
    pattern = rf"{specials}|{contractions}|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+"
    return module.compile(pattern, module.IGNORECASE)


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """Replaces each non-overlapping occurrence of `pair` in `word`, left to right, by its concatenation."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


class ClipTokenizer:
    """OpenAI CLIP's byte-level BPE (49408 ids). Building it reads 48894 merges, so share one instance
    through `get_tokenizer()`; `encode` caches the BPE of every pre-token it has seen."""

    def __init__(self, merges_file: pathlib.Path | None = None):
        with gzip.open(merges_file or merges_path(), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : 1 + _N_MERGES]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        byte_chars = list(self.byte_encoder.values())
        self.vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), *_SPECIALS]
        assert len(self.vocab) == VOCAB_SIZE, f"merges file gave {len(self.vocab)} ids"
        self.encoder = {piece: i for i, piece in enumerate(self.vocab)}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.pattern = _pretoken_pattern(regex is not None)
        self.comma = self.encoder[",</w>"]
        self.cache = {special: special for special in _SPECIALS}

    def bpe(self, token: str) -> str:
        """Merges a pre-token's characters, lowest merge rank first, into space-separated vocab pieces;
        the last character carries the end-of-word marker `</w>`."""
        if token in self.cache:
            return self.cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self.merge_ranks.get(pair, math.inf))
            if best not in self.merge_ranks:
                break
            word = _merge_pair(word, best)
        self.cache[token] = result = " ".join(word)
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ids = []
        for pretoken in self.pattern.findall(clean_text(text)):
            chars = "".join(self.byte_encoder[b] for b in pretoken.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(chars).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`: word ends become spaces (the trailing one dropped), invalid UTF-8 becomes U+FFFD."""
        chars = "".join(self.vocab[i] for i in ids)
        text = bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").rstrip(" ")


@functools.cache
def get_tokenizer() -> ClipTokenizer:
    """The process-wide tokenizer, built on first use; it is read-only apart from its BPE cache."""
    return ClipTokenizer()


@dataclasses.dataclass
class Span:
    """A run of prompt text with one attention weight; `is_break` marks a BREAK keyword (empty text)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


# webui's re_attention, with a stricter number so that "(a:1.2.3)" stays text instead of crashing float().
_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]? |                                 # escaped bracket or backslash; a lone backslash vanishes
    \( | \[ |
    :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\) |           # ":1.3)" closes a round bracket with an explicit weight
    \) | \] |
    [^\\()\[\]:]+ |
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _split_breaks(text: str) -> list[Span]:
    """Plain text cut at each BREAK keyword, with a break marker between the pieces."""
    first, *rest = _BREAK.split(text)
    spans = [Span(first)]
    for piece in rest:
        spans += [Span("", is_break=True), Span(piece)]
    return spans


def _merge_equal_weights(spans: list[Span]) -> list[Span]:
    """Joins neighbouring text spans of equal weight, as the webui does; break markers stay apart."""
    merged = [spans[0]]
    for span in spans[1:]:
        last = merged[-1]
        if not span.is_break and not last.is_break and span.weight == last.weight:
            last.text += span.text
        else:
            merged.append(span)
    return merged


def parse_prompt_attention(prompt: str) -> list[Span]:
    """The webui's attention syntax: `(a)` x1.1, `[a]` x(1/1.1), `(a:1.3)` x1.3, nesting multiplies,
    `\\(` `\\)` `\\[` `\\]` `\\\\` are literals, unclosed brackets apply to the end, unmatched closers are text."""
    spans: list[Span] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for span in spans[start:]:
            if not span.is_break:  # a weighted BREAK marker would be read as the word "BREAK"
                span.weight *= factor

    for match in _ATTENTION.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            spans.append(Span(token[1:]))
        elif token in ("(", "["):
            (round_open if token == "(" else square_open).append(len(spans))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), EMPHASIS_ROUND)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), 1 / EMPHASIS_ROUND)
        else:
            spans.extend(_split_breaks(token))
    for start in round_open:
        scale_from(start, EMPHASIS_ROUND)
    for start in square_open:
        scale_from(start, 1 / EMPHASIS_ROUND)
    return _merge_equal_weights(spans or [Span("")])


@dataclasses.dataclass(frozen=True)
class EmbeddingFix:
    """Where an embedding's vectors go: row of the [rows, 77] token ids, first position (after BOS), its name."""

    row: int
    position: int
    name: str


class EmbeddingLookup:
    """Embedding names as token-id sequences, longest first per first id (webui `EmbeddingDatabase.ids_lookup`)."""

    def __init__(self, vectors_by_name: dict[str, int], tokenizer: ClipTokenizer):
        self.by_first_id: dict[int, list[tuple[list[int], str, int]]] = {}
        for name, count in vectors_by_name.items():
            ids = tokenizer.encode(name)
            if ids:
                self.by_first_id.setdefault(ids[0], []).append((ids, name, count))
        for matches in self.by_first_id.values():
            matches.sort(key=lambda match: len(match[0]), reverse=True)

    def at(self, ids: list[int], position: int) -> tuple[str, int, int] | None:
        """(name, vector count, ids it spans) of the embedding starting at `position`, or None."""
        for name_ids, name, count in self.by_first_id.get(ids[position], ()):
            if ids[position : position + len(name_ids)] == name_ids:
                return name, count, len(name_ids)
        return None


class _Chunker:
    """The state of webui's `tokenize_line`: the chunk being filled, its last comma, the finished chunks."""

    def __init__(self, comma: int, backtrack: int):
        self.comma, self.backtrack = comma, backtrack
        self.chunk_tokens: list[list[int]] = []
        self.chunk_weights: list[list[float]] = []
        self.chunk_fixes: list[list[tuple[int, str]]] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, str]] = []  # (offset in tokens, embedding name) of this chunk
        self.last_comma = -1

    def _prepare(self, token: int) -> None:
        """Before placing `token`: note a comma, or close a full chunk (after its last comma when that is near the end)."""
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif self._comma_near_full_end():
            self._close_after_comma()
        if len(self.tokens) == CHUNK_LENGTH:
            self.close()

    def add(self, token: int, weight: float) -> None:
        """Appends a token, first closing a full chunk."""
        self._prepare(token)
        self.tokens.append(token)
        self.weights.append(weight)

    def add_embedding(self, first_token: int, name: str, count: int, weight: float) -> None:
        """`count` id-0 placeholders for an embedding, in a new chunk if they do not fit this one (webui)."""
        self._prepare(first_token)
        if len(self.tokens) + count > CHUNK_LENGTH:
            self.close()
        self.fixes.append((len(self.tokens), name))
        self.tokens += [0] * count
        self.weights += [weight] * count

    def _comma_near_full_end(self) -> bool:
        near = self.last_comma != -1 and len(self.tokens) - self.last_comma <= self.backtrack
        return self.backtrack != 0 and len(self.tokens) == CHUNK_LENGTH and near

    def _close_after_comma(self) -> None:
        """Closes the chunk just after its last comma and starts the next one with the tokens that followed
        (an embedding's fix stays with the closed chunk, as in the webui)."""
        cut = self.last_comma + 1
        tail_tokens, tail_weights = self.tokens[cut:], self.weights[cut:]
        del self.tokens[cut:], self.weights[cut:]
        self.close()
        self.tokens, self.weights = tail_tokens, tail_weights

    def close(self) -> None:
        """Finishes the current chunk as BOS + tokens + EOS padding (SD1 pads with EOS), weight 1 outside the text."""
        pad = CHUNK_LENGTH - len(self.tokens)
        self.chunk_tokens.append([BOS, *self.tokens, *[EOS] * pad, EOS])
        self.chunk_weights.append([1.0, *self.weights, *[1.0] * pad, 1.0])
        self.chunk_fixes.append(self.fixes)
        self.tokens, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def finish(self) -> None:
        """Closes the last chunk if it holds text, or if there is none at all (an empty prompt is one chunk)."""
        if self.tokens or not self.chunk_tokens:
            self.close()


@dataclasses.dataclass
class PromptChunks:
    """Token ids and per-token weights, [n_chunks, 77] for one prompt or [batch, n_chunks, 77] for a batch;
    `fixes` place embeddings by row of the ids flattened to [rows, 77] (for a batch, row = b·n_chunks + chunk)."""

    tokens: torch.LongTensor
    weights: torch.FloatTensor
    fixes: tuple[EmbeddingFix, ...] = ()


def _add_span(chunker: _Chunker, ids: list[int], weight: float, lookup: EmbeddingLookup | None) -> None:
    """One attention span's ids; where an embedding's name starts, its placeholders instead of the name's ids."""
    position = 0
    while position < len(ids):
        found = lookup.at(ids, position) if lookup else None
        if found is None:
            chunker.add(ids[position], weight)
            position += 1
            continue
        name, count, length = found
        chunker.add_embedding(ids[position], name, count, weight)
        position += length


def tokenize_prompt(
    prompt: str, tokenizer: ClipTokenizer | None = None, comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
    embeddings: dict[str, int] | None = None,
) -> PromptChunks:
    """One prompt as webui SD1 chunks of 77 ids (`tokenize_line`); each attention span is encoded on its own.
    `embeddings` (name -> vector count) are the textual-inversion embeddings the prompt may name."""
    tokenizer = tokenizer or get_tokenizer()
    lookup = EmbeddingLookup(embeddings, tokenizer) if embeddings else None
    chunker = _Chunker(tokenizer.comma, comma_padding_backtrack)
    for span in parse_prompt_attention(prompt):
        if span.is_break:
            chunker.close()
            continue
        _add_span(chunker, tokenizer.encode(span.text), span.weight, lookup)
    chunker.finish()
    tokens = torch.tensor(chunker.chunk_tokens, dtype=torch.long)  # [n_chunks, 77]
    weights = torch.tensor(chunker.chunk_weights, dtype=torch.float32)  # [n_chunks, 77]
    fixes = tuple(EmbeddingFix(row, offset + 1, name) for row, chunk in enumerate(chunker.chunk_fixes) for offset, name in chunk)
    return PromptChunks(tokens=tokens, weights=weights, fixes=fixes)


def _pad_chunks(chunks: PromptChunks, n_chunks: int) -> PromptChunks:
    """Appends webui `empty_chunk`s ([BOS, EOS x 76], weights 1) up to `n_chunks`."""
    missing = n_chunks - chunks.tokens.shape[0]
    empty = torch.tensor([BOS] + [EOS] * (CHUNK_LENGTH + 1), dtype=torch.long).expand(missing, -1)
    tokens = torch.cat([chunks.tokens, empty])  # [n_chunks, 77]
    weights = torch.cat([chunks.weights, torch.ones(missing, CHUNK_LENGTH + 2)])  # [n_chunks, 77]
    return PromptChunks(tokens=tokens, weights=weights, fixes=chunks.fixes)


def tokenize_batch(prompts: list[str], tokenizer: ClipTokenizer | None = None, embeddings: dict[str, int] | None = None) -> PromptChunks:
    """Several prompts padded with empty chunks to the longest one's chunk count, as webui's `forward`
    does, so they encode as one batch: tokens and weights [batch, n_chunks, 77]."""
    if not prompts:
        raise ValueError("tokenize_batch needs at least one prompt")
    per_prompt = [tokenize_prompt(prompt, tokenizer, embeddings=embeddings) for prompt in prompts]
    n_chunks = max(chunks.tokens.shape[0] for chunks in per_prompt)
    padded = [_pad_chunks(chunks, n_chunks) for chunks in per_prompt]
    fixes = tuple(dataclasses.replace(fix, row=b * n_chunks + fix.row) for b, chunks in enumerate(padded) for fix in chunks.fixes)
    return PromptChunks(
        tokens=torch.stack([chunks.tokens for chunks in padded]),
        weights=torch.stack([chunks.weights for chunks in padded]),
        fixes=fixes,
    )


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """webui "Original" emphasis (`sd_emphasis.EmphasisOriginal`): each token's hidden state z [B, 77, D]
    times its weight [B, 77], then the whole result rescaled so its mean (one scalar over all of z, as in
    the webui) equals the mean before. In float32 like the webui, since a half-precision mean would rescale
    even all-ones weights; returned in z's dtype."""
    if bool((weights == 1).all()):
        return z  # nothing to re-weight; also spares a 0/0 when z's mean is exactly zero (untrained norms)
    z32 = z.float()  # [B, 77, D]
    original_mean = z32.mean()
    weighted = z32 * weights.to(z32)[..., None]  # [B, 77, D]
    return (weighted * (original_mean / weighted.mean())).to(z.dtype)
