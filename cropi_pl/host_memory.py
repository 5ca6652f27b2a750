"""Keep freed host memory in the process instead of handing it back to the kernel.

glibc's malloc returns large freed blocks to the kernel (``munmap``, heap trimming), and the next
tensor of that size page-faults its memory in again, zeroed, page by page. A CPU training step
or influence pass allocates and frees thousands of activation-sized tensors, so on this
project's 2-core VM the README's main command took 5.8M minor page faults; with freed memory
kept, 0.6M, 9% less wall time, and influence passes after the first ran 2.4-2.8 s instead of
3.2-4.3 s (``README.md``, "The README's main command"). Peak memory barely moves: what is kept
is what the process used before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

OPT_OUT = "CROPI_PL_KEEP_FREED_MEMORY"  # "0" leaves glibc's own settings
_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's largest on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # free heap top kept up to this (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks under 32 MiB from the heap and never trim it (up to 2 GiB of
    free top). Returns whether the settings took effect: False without glibc (macOS, musl) or
    with ``CROPI_PL_KEEP_FREED_MEMORY=0``."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
