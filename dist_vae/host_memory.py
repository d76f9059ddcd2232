"""Host memory of training on the CPU: large tensors go to the OS and back, not to glibc's heap.

glibc serves a request below its mmap threshold from the heap, and raises that threshold (up to
32 MiB) whenever a larger block is freed. Activation maps of a few MiB then come from the heap, and
the holes they leave when freed stay in the process: one PixelVAE step at 256 px peaked at 5.2 GiB
of RSS for 3.8 GiB of live tensors. With the threshold fixed, every block above it is mapped on its
own and unmapped when freed, and the same step peaked at 3.7 GiB (tools/bench/memory.py). The price
is a page fault per page of each such block, which is small next to the arithmetic done on it.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20


def return_large_blocks_to_os(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process. False where the C library
    is not glibc (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
