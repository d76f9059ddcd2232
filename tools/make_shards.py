"""Build webdataset tar shards from LSUN, an image folder or the demo data: `dist-vae shards` as a
script; the code and its options are in
dist_vae/commands/make_shards.py (`python tools/make_shards.py --help`).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_vae.commands.make_shards import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
