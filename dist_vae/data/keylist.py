"""The source's key list as a manifest records it, so that a re-run can tell its source changed.

Shards hold hash-ordered runs of the whole key list, so one key added or gone moves the boundaries of
most shards: a finished output is current only for the exact list it was cut from. The manifest keeps
that list's count and sha256 (after --limit); a re-run compares them and, when they differ, names what
changed from the keys the output holds (per-sample indexes plus skipped values).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def key_digest(keys: list[str]) -> dict[str, Any]:
    """{count, sha256 of the keys one per line}: small enough for the manifest at any dataset size."""
    listing = "".join(k + "\n" for k in keys).encode()
    return {"count": len(keys), "sha256": hashlib.sha256(listing).hexdigest()}


def source_change(out: Path, manifest: dict[str, Any], keys: list[str]) -> str | None:
    """None if `keys` are the ones `out` was made from; else one line: before/now, what to do."""
    if manifest["source_keys"] == key_digest(keys):
        return None
    before = {s["key"] for s in manifest["skipped"]["items"]}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            before.update(r[0] for r in json.loads((out / shard["index"]["name"]).read_text())["samples"])
    added, gone = sorted(set(keys) - before), sorted(before - set(keys))

    def example(names: list[str]) -> str:
        return f" (e.g. {names[0]!r})" if names else ""

    return (
        f"{out} holds shards of {manifest['source_keys']['count']} source keys of {manifest['source']}, "
        f"now {len(keys)}: {len(added)} added{example(added)}, {len(gone)} gone{example(gone)}; shards are "
        f"cut from the whole key list, so write to a new --out, or delete {out} to remake it"
    )
