"""Keep glibc malloc from handing large tensor buffers back to the kernel between training steps.

A CPU training step allocates and frees the same multi-megabyte buffers (attention scores, MLP activations,
vocabulary logits) hundreds of times. glibc serves each one above its mmap threshold with a fresh mmap and
returns it with munmap, and trims the heap top back to the kernel, so every step page-faults those buffers in
again. Raising the mmap threshold to its maximum and the trim threshold far above it keeps freed buffers
in the heap for reuse, which is what Intel's PyTorch CPU guides get from jemalloc/tcmalloc. Measured on the
bundled model (docs/train-performance.md). The cost: memory the step freed stays with the process until it
exits, so RSS stays at the step's peak instead of dropping between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes (2 GiB)
_TOP_PAD = 256 * 1024 * 1024


def keep_freed_buffers() -> dict:
    """Tune glibc malloc for a training process. Returns what was done (goes into train/metrics.json)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {"malloc": "unchanged", "reason": f"not glibc ({platform.system()} {platform.libc_ver()[0] or '?'})"}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = {"mmap_threshold": _MMAP_THRESHOLD_MAX, "trim_threshold": _TRIM_THRESHOLD, "top_pad": _TOP_PAD}
    codes = {"mmap_threshold": _M_MMAP_THRESHOLD, "trim_threshold": _M_TRIM_THRESHOLD, "top_pad": _M_TOP_PAD}
    refused = [name for name, value in settings.items() if libc.mallopt(codes[name], ctypes.c_int(value)) != 1]
    if refused:
        raise RuntimeError(f"glibc mallopt refused {refused}")
    return {"malloc": "glibc: freed buffers kept for reuse", **settings}
