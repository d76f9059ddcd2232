"""Memory and throughput planner: `dist-vae plan` as a script; the code and its options are in
dist_vae/commands/plan_memory.py (`python tools/plan_memory.py --help`).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_vae.commands.plan_memory import (
    Activations,
    activations,
    largest_batch,
    main,
    parse_bytes,
    peak_step_bytes,
)

__all__ = ["Activations", "activations", "largest_batch", "main", "parse_bytes", "peak_step_bytes"]

if __name__ == "__main__":
    sys.exit(main())
