"""Caption options: trigger words, shuffle with keep_tokens, caption and tag dropout; all seeded."""
import random

import numpy as np
import pytest

from lib_lora.data import build_caption
from lib_lora.data.captions import without_words

CAPTION = "1girl, red hair, smile, outdoors, blue sky, tree"


def build(seed=0, caption=CAPTION, **options):
    return build_caption(caption, rng=random.Random(seed), **options)


def test_plain_caption_is_normalised_first_line():
    assert build(caption="a,b ,, c\nignored") == "a, b, c"
    assert build(trigger_words="sks") == "sks, " + CAPTION


def test_shuffle_is_seeded_and_keeps_tokens():
    results = {build(seed, shuffle=True, keep_tokens=2) for seed in range(30)}
    assert len(results) > 5
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["1girl", "red hair"] and sorted(tags) == sorted(CAPTION.split(", "))
    assert build(7, shuffle=True) == build(7, shuffle=True)
    generator = build_caption(CAPTION, shuffle=True, rng=np.random.default_rng(5))
    assert generator == build_caption(CAPTION, shuffle=True, rng=np.random.default_rng(5))


def test_trigger_words_stay_first_and_count_as_kept():
    for seed in range(20):
        tags = build(seed, trigger_words="sks, mystyle", shuffle=True, tag_dropout_rate=0.5).split(", ")
        assert tags[:2] == ["sks", "mystyle"]
    # keep_tokens counts from the front including the trigger: keep 3 = both triggers + "1girl"
    for seed in range(20):
        assert build(seed, trigger_words="sks, mystyle", shuffle=True, keep_tokens=3).startswith("sks, mystyle, 1girl, ")
    assert build(caption="sks, 1girl", trigger_words="sks") == "sks, 1girl"  # not repeated


def test_a_trigger_inside_a_sentence_caption_is_not_added_again():
    """The demo's captions ("a red zkz star") are prompted as written; a prefix would shift every token."""
    assert build(caption="a red ZKZ star on the left", trigger_words="zkz") == "a red ZKZ star on the left"
    assert build(caption="a red zkzz star", trigger_words="zkz") == "zkz, a red zkzz star"  # whole words only
    assert build(caption="a zkz star, outdoors", trigger_words="zkz, mystyle") == "mystyle, a zkz star, outdoors"


def test_caption_dropout_at_zero_and_one():
    assert build(caption_dropout_rate=1.0, trigger_words="sks") == ""
    assert all(build(seed, caption_dropout_rate=0.0) == CAPTION for seed in range(10))
    dropped = sum(build(seed, caption_dropout_rate=0.5) == "" for seed in range(200))
    assert 60 < dropped < 140


def test_tag_dropout_at_zero_and_one_spares_kept_tags():
    assert build(tag_dropout_rate=0.0) == CAPTION
    assert build(tag_dropout_rate=1.0, keep_tokens=1) == "1girl"
    assert build(tag_dropout_rate=1.0, trigger_words="sks") == "sks"
    partial = [len(build(seed, tag_dropout_rate=0.5).split(", ")) for seed in range(50)]
    assert min(partial) < 6 and max(partial) > 1


@pytest.mark.parametrize("options", [{"caption_dropout_rate": 1.5}, {"tag_dropout_rate": -0.1}, {"keep_tokens": -1}])
def test_invalid_options(options):
    with pytest.raises(ValueError):
        build(**options)


@pytest.mark.parametrize("caption, words, expected", [
    ("a zkz purple circle", "zkz", "a purple circle"),
    ("zkz, a ZKZ star, on the left", "zkz", "a star, on the left"),
    ("zkzz, sks dog, zkz", "zkz, sks", "zkzz, dog"),  # whole words only
    ("zkz", "zkz", ""),
])
def test_class_prompts_leave_the_trigger_words_out(caption, words, expected):
    assert without_words(caption, words) == expected
