"""CPU time the hypervisor gave to other guests while a benchmark ran (Linux /proc/stat "steal").

On a shared VM a neighbour's load shows up here and not in our own CPU time, so a benchmark prints
it beside its ratios: a ratio taken while several percent of the CPU was stolen is noise-prone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_STAT = Path("/proc/stat")


def _steal_seconds() -> float | None:
    """Seconds stolen from all CPUs since boot; None where the kernel does not report it."""
    try:
        fields = _STAT.read_text().splitlines()[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


class StealMeter:
    """Share of the machine's CPU time stolen between construction and `percent()`."""

    def __init__(self) -> None:
        self.start, self.stolen = time.perf_counter(), _steal_seconds()

    def percent(self) -> float | None:
        now = _steal_seconds()
        if now is None or self.stolen is None:
            return None
        capacity = (time.perf_counter() - self.start) * (os.cpu_count() or 1)
        return 100 * (now - self.stolen) / capacity

    def line(self) -> str:
        share = self.percent()
        stolen = "not reported here" if share is None else f"{share:.1f}% of all cores' time"
        return f"CPU time stolen by the hypervisor during the run: {stolen}"
