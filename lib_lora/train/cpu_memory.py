"""Keep freed memory in the process while training on a CPU (glibc's malloc, i.e. Linux).

glibc hands large freed blocks straight back to the OS: blocks above its mmap threshold (at most
32 MiB by its own dynamic rule) are unmapped on free, and a heap top above its trim threshold is cut
off. A training step frees its activations and allocates them again on the next step, so each step
then faults every page of them back in: about 600,000 minor page faults per step for SD1.5 at 256 px,
a fifth of the step's time on 2 cores (trainer step about 2.55 s before, 2.07 s after).
Raising both thresholds lets malloc reuse the memory instead. The cost is that the process keeps its
peak memory until it exits, which a CPU training run reaches anyway at its first step.
"""

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap: every activation of SD at 512-1024 px
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest it allows


def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks rather than return them to the OS; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs: no such library or no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
