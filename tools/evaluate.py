"""Evaluate a trained run over a whole split: `dist-vae evaluate` as a script; the code and its options are in
dist_vae/commands/evaluate.py (`python tools/evaluate.py --help`).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_vae.commands.evaluate import fuzziness, main, result_name, sample_quality, sharpness

__all__ = ["fuzziness", "main", "result_name", "sample_quality", "sharpness"]

if __name__ == "__main__":
    sys.exit(main())
