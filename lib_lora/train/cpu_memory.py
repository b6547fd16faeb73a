"""Keep freed memory in the process while training on a CPU (glibc's malloc, i.e. Linux).

glibc hands large freed blocks straight back to the OS: blocks above its mmap threshold (at most
32 MiB by its own dynamic rule) are unmapped on free, and a heap top above its trim threshold is cut
off. A training step frees its activations and allocates them again on the next step, so each step
then faults every page of them back in: about 600,000 minor page faults per step for SD1.5 at 256 px,
a fifth of the step's time on 2 cores (trainer step about 2.55 s before, 2.07 s after).
Raising both thresholds lets malloc reuse the memory instead. The cost is that the process keeps its
peak memory: the CLI exits after its run, and a host that goes on (the webui) gives it back with
`give_back_freed_memory` when its training session closes.
"""

import ctypes
import functools
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap: every activation of SD at 512-1024 px
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest it allows
# Where glibc's dynamic rule settles in a process that frees big blocks (malloc.c: DEFAULT_MMAP_THRESHOLD_MAX
# on 64-bit, trim = 2 x mmap). A mallopt call turns that rule off for good, so this is the closest restore.
SETTLED_MMAP_THRESHOLD = 32 << 20
SETTLED_TRIM_THRESHOLD = 2 * SETTLED_MMAP_THRESHOLD


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None on other systems and libcs (musl has no mallopt or malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _set_thresholds(libc: ctypes.CDLL, mmap_threshold: int, trim_threshold: int) -> bool:
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


_keeping = False  # keep_freed_memory is in force


def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks rather than return them to the OS; False where there is no glibc."""
    global _keeping
    libc = _glibc()
    _keeping = libc is not None and _set_thresholds(libc, MMAP_THRESHOLD, TRIM_THRESHOLD)
    return _keeping


ONE_OFF_MMAP_THRESHOLD = 4 << 20  # blocks from 4 MiB up: a VAE encode's activations (32 MiB each at 256 px)


@contextmanager
def one_off_allocations() -> Iterator[None]:
    """While training keeps freed memory: big blocks allocated inside are mapped apart and given back on
    free, instead of being cut from the heap the steps reuse. For work done once per image (a VAE encode
    while latents are cached): SD1.5 at 256 px, 8 images, peak RSS 5.32 -> 5.23 GiB and no growth after
    the heap settles, for about 5% more time per encode (bench/cli_run.py; bench/RESULTS.md)."""
    libc = _glibc() if _keeping else None
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, ONE_OFF_MMAP_THRESHOLD):
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def give_back_freed_memory() -> bool:
    """Undo `keep_freed_memory` in a process that goes on after training, and return the free pages now.

    Without this the webui held its training peak (about 1 GiB more after an SDXL run) until it exited.
    The run's reference cycles are collected first, so their blocks are free when the heap is trimmed.
    """
    global _keeping
    libc = _glibc()
    if libc is None:
        return False
    _keeping = False
    gc.collect()
    _set_thresholds(libc, SETTLED_MMAP_THRESHOLD, SETTLED_TRIM_THRESHOLD)
    return bool(libc.malloc_trim(0))
