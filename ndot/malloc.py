"""The C heap of a CPU run: glibc's malloc made to keep what one time step frees for the next.

A step allocates and frees the same activations again and again. glibc hands a block over its mmap
threshold back to the kernel when it is freed, and trims the top of its heap once more than the trim
threshold lies free there; both start at 128 KiB and rise only with the largest mmap'd block freed
so far (to its size and twice that), to 32 MiB and 64 MiB at most. Under a network whose activations stay
smaller (small_cnn: 1 MiB a layer at batch 32) they stay low, and every step faults its memory back in
from the kernel, zero-filled, page by page: some 4,000 page faults a digits batch of 32 (21,000 at 128),
a sixth of its CPU time.
"""
from __future__ import annotations

import ctypes
import os

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The thresholds glibc's own adjustment ends at on a 64-bit machine.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def _glibc() -> bool:
    """Whether this process's C library is glibc (Linux, not musl)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (macOS, musl)
        return False


def keep_freed_memory() -> None:
    """Set glibc's mmap and trim thresholds where its adjustment would end, for the whole process: the heap
    keeps up to 64 MiB free for reuse instead of returning it to the kernel. Elsewhere it does nothing."""
    if _glibc():
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
