"""glibc's allocator, told what this project's memory pattern needs: keep freed memory through the
training steps (`tune_malloc`), hand it back after the tokenizer's threads are done with it
(`release_freed_memory`). Both do nothing, and say so by returning False, where the C library is
not glibc. Nothing here imports torch: the token store uses it too.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

# mallopt(3) parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def glibc() -> Any | None:
    """The C library's handle when it is glibc (it has malloc_trim and mallopt), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves blocks over a dynamic threshold (at most 32 MiB) with mmap and returns
    them on free, and trims the heap once 128 KiB at its top are free. A training step frees the
    same tens of MiB of activations, logits and gradients every micro-step, so each step faulted in
    fresh zeroed pages again: ~140k minor faults per seed-recipe step. With the thresholds raised,
    a step reuses the pages of the one before (~5k faults).
    """
    libc = glibc()
    return libc is not None and all(libc.mallopt(parameter, value) == 1 for parameter, value in (
        (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))


def release_freed_memory() -> bool:
    """Hand memory freed by the tokenizer's threads back to the kernel (glibc's malloc_trim).

    Each Rust thread allocates from its own glibc arena, and glibc returns an arena's free pages
    only when asked, so without this the peak of tokenizer training stays resident under the
    store build that follows.
    """
    libc = glibc()
    return libc is not None and bool(libc.malloc_trim(0))
