"""PNG grids from a trained run: `dist-vae sample` as a script; the code and its options are in
dist_vae/commands/sample.py (`python tools/sample.py --help`).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_vae.commands.sample import chain_starts, draw, main

__all__ = ["chain_starts", "draw", "main"]

if __name__ == "__main__":
    sys.exit(main())
