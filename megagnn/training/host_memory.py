"""Host allocator settings for training on CPUs.

A conservative-force step allocates and frees the same large activations every step
(tens to hundreds of MB each for tensor-product models). glibc serves blocks above its mmap
threshold with fresh mmaps and returns them to the OS on free, so every step faults in
every page of them again: for IrrepNet at 100k parameters on a 256-atom batch, six steps
faulted 3.1 M pages. Keeping freed memory in the heap (no mmap for large blocks, no
trimming) makes the next step reuse it: 0.55 M faults, and the step ran 1.9x faster there;
small models lose nothing. The price is that the process keeps its peak
heap until it exits, which a training run reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest glibc takes: never trim in practice
# the same setting for a child process that is not megagnn (benchmark baselines)
ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse. Does nothing (returns False)
    without glibc, under another preloaded allocator, or when the environment already sets
    glibc's malloc options (``MALLOC_*_``, ``GLIBC_TUNABLES``): those choices stand."""
    if any(k in os.environ for k in (*_USER_SETTINGS, "GLIBC_TUNABLES")):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """The opposite choice, for a process that streams tensors one at a time (checkpoint
    conversion): glibc serves every allocation of ``threshold`` bytes or more with its own
    mmap and gives it back to the system when freed. By default its threshold rises to the
    size of the largest block freed, after which tensors of that size come from a heap that
    keeps freed memory, and a tensor-by-tensor stream grows by a few tensors' worth. No-op
    off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass
