"""CLIP tokenizer ids (checked against open_clip's SimpleTokenizer) and webui v1.10.1 prompt chunking."""
import importlib.util

import pytest
import torch

from lib_lora.models import tokenizer as tk
from lib_lora.models.tokenizer import BOS, EOS, apply_emphasis, get_tokenizer, parse_prompt_attention
from lib_lora.models.tokenizer import tokenize_batch, tokenize_prompt

CAT = 2368  # "cat</w>"
DOG = 1929  # "dog</w>"
COMMA = 267  # ",</w>"

KNOWN_IDS = [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("Hello,   World! It's 2024", [3306, 267, 1002, 256, 585, 568, 273, 271, 273, 275]),
    ("masterpiece, best quality, 1girl", [12066, 267, 949, 3027, 267, 272, 1611]),
    ("don't I'LL we'd", [847, 713, 328, 1342, 649, 1896]),
    ("naïve café ² 😀", [1097, 35689, 563, 15304, 41175, 7334]),
    ("<|startoftext|>foo<|endoftext|>", [BOS, 23435, EOS]),
    (" \t\n", []),
]


def words(*counts_and_words):
    """A prompt of repeated single-token words, e.g. words((70, "cat"), (1, ","), (10, "dog"))."""
    return " ".join(" ".join([word] * count) for count, word in counts_and_words)


def text_tokens(chunk):
    """The ids between BOS and the first EOS of one 77-id chunk."""
    ids = chunk.tolist()
    return ids[1 : ids.index(EOS)]


@pytest.mark.parametrize("text, ids", KNOWN_IDS)
def test_known_ids(text, ids):
    assert get_tokenizer().encode(text) == ids


def test_vocab_and_specials():
    tokenizer = get_tokenizer()
    assert len(tokenizer.vocab) == tk.VOCAB_SIZE
    assert tokenizer.encode("cat dog ,") == [CAT, DOG, COMMA]
    assert get_tokenizer() is tokenizer


@pytest.mark.parametrize(
    "text, decoded",
    [
        ("a photo of a cat", "a photo of a cat"),
        ("naïve café ² 😀 日本語", "naïve café ² 😀 日本語"),
        ("Hello, World! It's (x:1.2)", "hello , world ! it 's ( x : 1 . 2 )"),  # every pre-token ends a word
    ],
)
def test_decode_round_trip(text, decoded):
    tokenizer = get_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == decoded
    assert tokenizer.encode(decoded) == tokenizer.encode(text)


@pytest.mark.skipif(tk.regex is None, reason="compares against the regex package")
def test_stdlib_pretoken_pattern_matches_regex():
    text = tk.clean_text("Ⅻ ²³ naïve 日本語 x1y22 it's ÀB_c-d 😀!! ٣٤ ǅ")
    assert tk._pretoken_pattern(False).findall(text) == tk._pretoken_pattern(True).findall(text)


def test_missing_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        tk.ClipTokenizer()


def test_chunk_layout():
    chunks = tokenize_prompt("a photo of a cat")
    assert chunks.tokens.shape == chunks.weights.shape == (1, 77)
    assert chunks.tokens.dtype == torch.long and chunks.weights.dtype == torch.float32
    assert chunks.tokens[0].tolist() == [BOS, 320, 1125, 539, 320, CAT] + [EOS] * 71
    assert torch.equal(chunks.weights, torch.ones(1, 77))


@pytest.mark.parametrize("n_tokens, n_chunks", [(1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_count(n_tokens, n_chunks):
    chunks = tokenize_prompt(words((n_tokens, "cat")))
    assert chunks.tokens.shape == (n_chunks, 77)
    assert sum(len(text_tokens(chunk)) for chunk in chunks.tokens) == n_tokens
    assert (chunks.tokens[:, 0] == BOS).all() and (chunks.tokens[:, -1] == EOS).all()


def test_empty_prompt_is_one_empty_chunk():
    chunks = tokenize_prompt("")
    assert chunks.tokens.tolist() == [[BOS] + [EOS] * 76]
    assert torch.equal(chunks.weights, torch.ones(1, 77))


def test_comma_backtrack_moves_tail_to_next_chunk():
    chunks = tokenize_prompt(words((70, "cat"), (1, ","), (10, "dog")))
    assert text_tokens(chunks.tokens[0]) == [CAT] * 70 + [COMMA]
    assert text_tokens(chunks.tokens[1]) == [DOG] * 10


@pytest.mark.parametrize(
    "prompt, backtrack",
    [(words((70, "cat"), (1, ","), (10, "dog")), 0), (words((40, "cat"), (1, ","), (40, "dog")), 20)],
    ids=["backtrack disabled", "comma too far back"],
)
def test_no_backtrack_cuts_at_75(prompt, backtrack):
    chunks = tokenize_prompt(prompt, comma_padding_backtrack=backtrack)
    assert len(text_tokens(chunks.tokens[0])) == 75


def test_break_starts_new_chunk():
    chunks = tokenize_prompt("cat BREAK dog")
    assert [text_tokens(chunk) for chunk in chunks.tokens] == [[CAT], [DOG]]
    assert tokenize_prompt("(cat BREAK dog)").tokens.shape[0] == 2
    assert tokenize_prompt("cat BREAK").tokens.shape[0] == 1  # webui closes only non-empty last chunks


def test_weighted_tokens():
    chunks = tokenize_prompt("(cat:1.2) dog [cat] ((dog))")
    assert text_tokens(chunks.tokens[0]) == [CAT, DOG, CAT, DOG]
    expected = torch.tensor([1.0, 1.2, 1.0, 1 / 1.1, 1.1 * 1.1] + [1.0] * 72)
    torch.testing.assert_close(chunks.weights[0], expected)


@pytest.mark.parametrize(
    "prompt, spans",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)],
        ),
        ("cat) dog]", [("cat) dog]", 1.0)]),
        ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ],
)
def test_parse_prompt_attention(prompt, spans):
    parsed = parse_prompt_attention(prompt)
    assert [span.text for span in parsed] == [text for text, _ in spans]
    assert [span.weight for span in parsed] == pytest.approx([weight for _, weight in spans])


@pytest.mark.parametrize("prompt", ["(cat", "cat)", "[[cat", "cat]]", "((cat:1.2", "(a:.)", ":", "\\", "[(])"])
def test_unbalanced_brackets_do_not_crash(prompt):
    chunks = tokenize_prompt(prompt)
    assert chunks.tokens.shape == (1, 77)


def test_batch_pads_with_empty_chunks():
    batch = tokenize_batch(["cat", words((80, "dog"))])
    assert batch.tokens.shape == batch.weights.shape == (2, 2, 77)
    assert batch.tokens[0, 1].tolist() == [BOS] + [EOS] * 76
    assert torch.equal(batch.weights[0, 1], torch.ones(77))
    assert torch.equal(batch.tokens[1], tokenize_prompt(words((80, "dog"))).tokens)


def test_batch_rejects_no_prompts():
    with pytest.raises(ValueError, match="at least one prompt"):
        tokenize_batch([])


def test_apply_emphasis_keeps_mean_and_scales_tokens():
    z = torch.randn(2, 77, 8) + 0.5  # [B, 77, D], mean kept away from zero
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    out = apply_emphasis(z, weights)
    torch.testing.assert_close(out.mean(), z.mean())
    ratio = (out / z)[0, :, 0]  # every token is scaled by weight * one shared factor
    torch.testing.assert_close(ratio[3] / ratio[4], torch.tensor(1.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_emphasis_all_ones_is_identity(dtype):
    z = torch.randn(2, 77, 8).to(dtype)
    out = apply_emphasis(z, torch.ones(2, 77))
    assert out.dtype == dtype and torch.equal(out, z)
