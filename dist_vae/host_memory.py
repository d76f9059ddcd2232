"""Host memory of training on the CPU: large tensors go to the OS and back, not to glibc's heap.

glibc serves a request below its mmap threshold from the heap, and raises that threshold (up to
32 MiB) whenever a larger block is freed. Activation maps of a few MiB then come from the heap, and
the holes they leave when freed stay in the process, so its RSS grows well past its live tensors.
With the threshold fixed at 4 MiB, every larger block is mapped on its own and unmapped when freed
(tools/bench/memory.py measures both). A lower threshold would map the small models' maps of a few
MiB too, and page faults would slow their steps.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
THRESHOLD = 4 << 20


def return_large_blocks_to_os(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes and its trim threshold at twice that, for this
    process. False where the C library is not glibc (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # Fixing one threshold stops glibc adapting the other: keep the heap's top unless 2x the
    # threshold is free there, so blocks under the threshold do not fault in again and again.
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold))
