"""A shard output directory between runs: who writes it, what it already holds, what is left over.

One make_shards at a time writes an output: `held` takes its lease (dist_vae.lease, OUT/.lease.json),
refuses a second writer naming the holder, and takes over a gone holder's lease with one line. The
parts of an output built in parts (parts.py) hold one lease each, OUT/.lease-part-I-of-N.json: they
do not refuse each other, but a second copy of one part is refused, and so are parts while a whole
build or the final step holds the output, and the other way round. A
finished output is its manifest (`finished_manifest`); an unfinished one is `.progress/` (the
settings and key list it was started with, one record per finished shard). A re-run with other
settings is refused naming the keys that differ; a rebuild removes shards its manifest does not list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dist_vae.data.index import index_name
from dist_vae.data.keylist import key_digest
from dist_vae.data.storage import join
from dist_vae.errors import DataError
from dist_vae.files import file_sha256, write_text_atomic
from dist_vae.lease import Lease, LeaseHeld, describe

MANIFEST = "manifest.json"
MANIFEST_VERSION = 4  # 4: every Pillow format, ICC, max_pixels, notes; 3: min_size, source_keys
PROGRESS_DIR = ".progress"
LEASE = ".lease.json"
PART_LEASE = re.compile(r"\.lease-part-\d+-of-\d+\.json")
SHARD_FILE = re.compile(r"(train|val)-\d{6}\.(tar|idx\.json)")


class ShardError(DataError):
    """An output directory or setting that cannot be used; the message says which and why."""


def json_text(obj: Any) -> str:
    """The one serialisation of the manifest and the records: byte-identical wherever it is written."""
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json_text(obj))


def lease_name(part: tuple[int, int] | None) -> str:
    return LEASE if part is None else f".lease-part-{part[0]}-of-{part[1]}.json"


@contextmanager
def held(
    out: Path, say: Callable[[str], None], part: tuple[int, int] | None = None
) -> Iterator[Callable[[], None]]:
    """Hold `out`'s lease (or part I of N's) for the block, which gets `check` to call once the output
    is known to be its own and then between shards: the first call says the take-over line (if any),
    and every call raises a ShardError when another process took the lease meanwhile (this one looked
    gone: silent for longer than the lease timeout), so that two writers never go on together."""
    out.mkdir(parents=True, exist_ok=True)
    what = "make_shards" if part is None else f"make_shards --part {part[0]}/{part[1]}"
    lease = Lease(out / lease_name(part), owner=what)
    try:
        lease.acquire()
    except LeaseHeld as exc:
        raise ShardError(f"{exc}; a second {what} on one --out is refused") from exc
    try:
        _refuse_other_kind(out, part)
    except ShardError:
        lease.release()
        raise
    taken = [f"{out}: taking over the output from {lease.taken_over} (gone)"] if lease.taken_over else []

    def check() -> None:
        while taken:
            say(taken.pop())
        if not lease.still_held():
            raise ShardError(
                f"{out}: another make_shards took this output over (this one was silent for longer than "
                f"{lease.timeout:.0f} s, or its lease file could not be renewed); stopped so that two do "
                "not write it: run the same command again once the other has finished"
            )

    try:
        yield check
    finally:
        lease.release()


def _refuse_other_kind(out: Path, part: tuple[int, int] | None) -> None:
    """Parts, and a whole build or final step, of one output never run together. Each looks for the
    other kind only after taking its own lease, so of two starting together at least one sees the other."""
    others = [LEASE] if part is not None else [p.name for p in out.iterdir() if PART_LEASE.fullmatch(p.name)]
    for name in others:
        holder = Lease(out / name, owner="a check").live_holder()
        if holder is not None:
            raise ShardError(
                f"{out} is in use by {describe(holder) if holder else 'an unreadable lease'} (lease "
                f"{out / name}); the parts of an output and a whole build or --finish of it do not run "
                "together: wait for it to finish"
            )


def finished_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if it was made with `settings` and every shard it lists is in place."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["splits"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{path} is not a shard manifest ({exc}): remove it to rebuild {out}") from exc
    before = manifest.get("settings") or {}
    old = manifest.get("version") != MANIFEST_VERSION  # an older make_shards: older rules, fewer settings
    compared = {k: settings.get(k) for k in before} if old else settings  # settings it had, only
    if before != compared:
        raise ShardError(
            f"{out} already holds shards made with settings that differ ({differences(before, compared)}): "
            f"write to a new --out, or delete {out} to rebuild it with these"
        )
    if old:
        return None  # the same settings under older image rules: rebuilt in place, old shards pruned
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for entry in (shard, shard["index"]):
                f = out / entry["name"]
                if not f.is_file() or f.stat().st_size != entry["bytes"]:
                    return None
    return manifest


def differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    """'resolution: 16 -> 32, format: 'webp' -> 'png'': the settings that changed, in a stable order."""
    changed = [k for k in [*before, *(k for k in now if k not in before)] if before.get(k) != now.get(k)]
    return ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)


def claim_progress(out: Path, settings: dict[str, Any], keys: list[str]) -> None:
    """Mark `.progress/` as the work of these settings on this key list. An unfinished run with other
    settings is refused, and so is one whose source changed since: its finished shards hold other keys."""
    path, keys_file = out / PROGRESS_DIR / "settings.json", out / PROGRESS_DIR / "source_keys.json"
    if path.is_file() and (before := json.loads(path.read_text())) != settings:
        diff = differences(before, settings)
        raise ShardError(
            f"{out} holds an unfinished run with settings that differ ({diff}): "
            f"finish it with those settings, write to a new --out, or delete {out} to start again"
        )
    digest = key_digest(keys)
    if keys_file.is_file() and (before := json.loads(keys_file.read_text())) != digest:
        raise ShardError(
            f"{out} holds an unfinished run from {before['count']} source keys of {settings['source']}, now "
            f"{digest['count']}: its finished shards hold other keys, so restore the source to finish it, "
            f"or delete {out} to start again"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)
    write_json(keys_file, digest)


def done_record(out: Path, name: str) -> dict[str, Any] | None:
    """The record of a shard a previous run finished, if its file still matches it."""
    progress = out / PROGRESS_DIR / f"{name}.json"
    shard = out / name
    if not (progress.is_file() and shard.is_file()):
        return None
    record = json.loads(progress.read_text())
    index = out / index_name(name)
    if record["bytes"] != shard.stat().st_size or record["sha256"] != file_sha256(shard):
        return None
    if not index.is_file() or record.get("index", {}).get("sha256") != file_sha256(index):
        return None
    return record


def usable(out: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest, or a ShardError when it holds no image at all (training would find nothing)."""
    if sum(split["count"] for split in manifest["splits"].values()) == 0:
        skipped = manifest["skipped"]
        raise ShardError(
            f"{out}: none of the {manifest['source_keys']['count']} source images of {manifest['source']} "
            f"could be used ({skipped['reasons']}); the reason for each is in {join(out, MANIFEST)}"
        )
    return manifest


def prune(out: Path, listed: set[str]) -> None:
    """Remove shards and indexes of an earlier output in the same place that `listed` does not name."""
    for old in out.iterdir():
        if SHARD_FILE.fullmatch(old.name) and old.name not in listed:
            old.unlink()
