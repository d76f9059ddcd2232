"""A shard output's manifest.json, made from the records of its shards.

One function makes it, whether one process built every shard or N parts each built their share
(parts.py): the manifest depends only on the records, the settings and the source's key list, so an
output built in parts is byte-identical to one built whole.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from dist_vae.data.encode import RESIZE_RULE
from dist_vae.data.jobs import SPLIT_RULE
from dist_vae.data.output import MANIFEST_VERSION


def make_manifest(
    records: list[dict[str, Any]], settings: dict[str, Any], source_keys: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of the shards whose `records` (as write_shard returns them, with `skipped` and
    `notes`, in shard order: train, then val) are given; the records' lists are moved to the top."""
    records = [dict(r) for r in records]
    skipped = sorted((s for r in records for s in r.pop("skipped")), key=lambda s: s["key"])
    notes = sorted((n for r in records for n in r.pop("notes", [])), key=lambda n: (n["key"], n["note"]))
    splits = {}
    for split in ("train", "val"):
        shards = [r for r in records if r["name"].startswith(f"{split}-")]
        splits[split] = {
            "count": sum(r["count"] for r in shards),
            "bytes": sum(r["bytes"] for r in shards),
            "shards": shards,
        }
    fmt = settings["format"]
    return {
        "version": MANIFEST_VERSION,
        "settings": settings,
        "resolution": settings["resolution"],
        "format": fmt,
        "source": settings["source"],
        "source_keys": source_keys,
        "split_rule": SPLIT_RULE,
        "resize": RESIZE_RULE,
        "layout": f"KEY.{fmt} + KEY.json ({{'key': source key, 'factors' of scenes}}); "
        "KEY = sha256(key)[:40]; "
        "NAME.idx.json beside NAME.tar: [key, member, offset, size, sha256] per image",
        "splits": splits,
        "skipped": {
            "count": len(skipped),
            "reasons": dict(sorted(Counter(s["reason"] for s in skipped).items())),
            "items": skipped,
        },
        "notes": {
            "count": len(notes),
            "kinds": dict(sorted(Counter(n["note"] for n in notes).items())),
            "items": notes,
        },
    }
