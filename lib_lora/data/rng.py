"""Seeded randomness from either a `random.Random` or a `numpy.random.Generator`.

The dataset layer never touches process-wide random state (kohya seeds the global `random`
module, which breaks a second run in the same webui process); every draw goes through the
generator the caller passes in.
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar, Union

import numpy as np

Rng = Union[random.Random, np.random.Generator]
T = TypeVar("T")


def rand_float(rng: Rng) -> float:
    """A float in [0, 1)."""
    return float(rng.random())


def rand_int(rng: Rng, low: int, high: int) -> int:
    """An int in [low, high], both ends included (like `random.randint`)."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def shuffled(rng: Rng, items: Sequence[T]) -> list[T]:
    """A shuffled copy of `items`; the input is left as it was."""
    if isinstance(rng, np.random.Generator):
        return [items[i] for i in rng.permutation(len(items))]
    out = list(items)
    rng.shuffle(out)
    return out
