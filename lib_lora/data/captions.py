"""Per-step caption: trigger words, tag shuffle with kept tokens, caption and tag dropout.

Follows kohya-ss/sd-scripts `BaseDataset.process_caption` (library/train_util.py): the whole-caption
dropout is drawn first; tags are the comma-separated parts, stripped; the first `keep_tokens` stay in
place, the rest are shuffled, then each is dropped with `tag_dropout_rate`; the result is joined
with ", ". Randomness comes only from the `rng` passed in.
"""
from __future__ import annotations

import re

from .rng import Rng, rand_float, shuffled

SEPARATOR = ","
JOINER = ", "


def split_tags(text: str) -> list[str]:
    """The non-empty, stripped comma-separated tags of `text`."""
    return [tag.strip() for tag in text.split(SEPARATOR) if tag.strip()]


def build_caption(
    caption: str,
    *,
    trigger_words: str = "",
    shuffle: bool = False,
    keep_tokens: int = 0,
    caption_dropout_rate: float = 0.0,
    tag_dropout_rate: float = 0.0,
    rng: Rng,
) -> str:
    """The caption one training step sees.

    Trigger words (comma-separated) go in front and are never shuffled or dropped; a caption tag equal
    to a trigger word is not repeated, and a trigger the caption already uses inside a longer tag (a
    sentence caption like "a zkz star") is not added, so training sees the caption as it is prompted.
    `keep_tokens` counts from the front of the caption including the trigger words (as in kohya,
    where the trigger is usually the first tag and keep_tokens=1), and at least all trigger words
    are kept. Only the first line of `caption` is used, as kohya does.
    Caption dropout empties everything, trigger words included (kohya drops its prefix too).
    """
    _check_rate("caption_dropout_rate", caption_dropout_rate)
    _check_rate("tag_dropout_rate", tag_dropout_rate)
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be 0 or more, got {keep_tokens}")
    if caption_dropout_rate > 0 and rand_float(rng) < caption_dropout_rate:
        return ""
    lines = caption.splitlines()
    caption_tags = split_tags(lines[0] if lines else "")
    triggers = [t for t in split_tags(trigger_words) if not any(tag != t and _has_words(tag, t) for tag in caption_tags)]
    tags = triggers + [tag for tag in caption_tags if tag not in triggers]
    kept_count = max(keep_tokens, len(triggers))
    kept, flexible = tags[:kept_count], tags[kept_count:]
    if shuffle:
        flexible = shuffled(rng, flexible)
    if tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rand_float(rng) >= tag_dropout_rate]
    return JOINER.join(kept + flexible)


def _has_words(tag: str, words: str) -> bool:
    """Whether `words` occur in `tag` as whole words (case-insensitive, as CLIP lowercases)."""
    return re.search(rf"(?<!\w){re.escape(words.lower())}(?!\w)", tag.lower()) is not None


def _check_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {rate}")


def without_words(caption: str, words: str) -> str:
    """`caption` with each of the comma-separated `words` taken out wherever it stands as whole words
    (case-insensitive); tags left empty are dropped: "zkz, a zkz purple circle" -> "a purple circle"."""
    tags = split_tags(caption)
    for word in split_tags(words):
        pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
        tags = [" ".join(pattern.sub(" ", tag).split()) for tag in tags]
    return JOINER.join(tag for tag in tags if tag)
