"""Host memory of training on the CPU: large tensors go to the OS and back, not to glibc's heap.

glibc serves a request below its mmap threshold from the heap, and raises that threshold (up to
32 MiB) whenever a larger block is freed. Activation maps of a few MiB then come from the heap, and
the holes they leave when freed stay in the process: one PixelVAE step at 256 px peaked at 5.2 GiB
of RSS for 3.8 GiB of live tensors. With the threshold fixed at 4 MiB, every larger block is mapped
on its own and unmapped when freed, and the same step peaked at 3.9 GiB (tools/bench/memory.py).
A 1 MiB threshold (3.7 GiB) made the debug model's step twice as slow from page faults: its maps
are a few MiB, and they stay in the heap at 4 MiB.
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
