"""One shard output built by N processes together: `make_shards --part I/N`, then `--finish N`.

Shard boundaries come from the whole key list (jobs.py), never from N: part I of N builds the shards
`share(len(shards), I, N)` of that list (the project's one rank-split rule) exactly as a single
process would, and once all of them are written, its part record `.progress/part-I-of-N.json`: its
shards' records (skipped keys and notes included), the settings, the source's key digest and every
shard's name. The final step reads the N records (from the output directory, or from the store for
an `s3://` output, where each part uploads its record after its shards), refuses in one line while
one is missing, and writes the manifest from the records exactly as a single process does: the
output is byte-identical to a single process's, and an output without a manifest is unfinished.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_vae.data.index import index_name
from dist_vae.data.jobs import ShardJob
from dist_vae.data.manifest import make_manifest
from dist_vae.data.output import (
    MANIFEST,
    PROGRESS_DIR,
    ShardError,
    differences,
    finished_manifest,
    held,
    json_text,
    prune,
    usable,
    write_json,
)
from dist_vae.data.storage import NoSuchObject, Store, is_url, join

_PART = re.compile(r"(\d+)/(\d+)")


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N), with 0 <= I < N; a ShardError (one line) for anything else."""
    match = _PART.fullmatch(text.strip())
    if match is None or not int(match.group(1)) < int(match.group(2)):
        raise ShardError(
            f"--part {text}: expected I/N with 0 <= I < N (parts count from 0: --part 0/4 to 3/4)"
        )
    return int(match.group(1)), int(match.group(2))


def parse_count(text: str) -> int:
    """`--finish N`: the number of parts, N >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise ShardError(f"--finish {text}: expected the number of parts N >= 1 (the N of --part I/N)")
    return int(text)


def part_file(part: tuple[int, int]) -> str:
    """The part record's name inside the output: `.progress/part-I-of-N.json`."""
    return f"{PROGRESS_DIR}/part-{part[0]}-of-{part[1]}.json"


def part_jobs(jobs: list[ShardJob], part: tuple[int, int]) -> list[ShardJob]:
    """The shards part I of N builds."""
    from dist_vae.distributed import share  # loads accelerate: only for a part

    return [jobs[k] for k in share(len(jobs), *part)]


def part_names(jobs: list[ShardJob]) -> set[str]:
    """The files in the output (and in `.progress/`) that belong to these shards alone."""
    return {n for job in jobs for n in (job.name, index_name(job.name), f"{job.name}.json")}


def part_record(
    part: tuple[int, int],
    settings: dict[str, Any],
    source_keys: dict[str, Any],
    jobs: list[ShardJob],
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "part": list(part),
        "settings": settings,
        "source_keys": source_keys,
        "shards": [job.name for job in jobs],
        "records": records,
    }


def published(store: Store, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest in the store if there is one, made with `settings` (other settings: ShardError)."""
    try:
        manifest = json.loads(store.read(MANIFEST))
    except NoSuchObject:
        return None
    if manifest.get("settings") != settings:
        raise ShardError(
            f"{store.url} already holds shards made with settings that differ "
            f"({differences(manifest.get('settings') or {}, settings)}): write to a new --out"
        )
    return manifest


def finish(settings: dict[str, Any], out: str, count: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Write the manifest of the output `out` built by `count` parts; returns it. Finishing a
    finished output again changes nothing (it only removes part records left behind)."""
    files = [part_file((i, count)) for i in range(count)]
    if is_url(out):
        store = Store(out)
        manifest = published(store, settings)
        if manifest is None:
            records, source_keys, _ = _gather(settings, out, count, lambda n: _fetch(store, n))
            manifest = make_manifest(records, settings, source_keys)
            store.write(MANIFEST, json_text(manifest).encode())
        for name in files:
            store.delete(name)
        return usable(out, manifest)
    local = Path(out)
    if not local.is_dir():
        raise ShardError(f"--out {out}: no such directory: run the parts (--part I/{count}) first")
    manifest = finished_manifest(local, settings)
    if manifest is not None:
        shutil.rmtree(local / PROGRESS_DIR, ignore_errors=True)
        return usable(local, manifest)
    with held(local, say) as check:
        check()
        records, source_keys, owner = _gather(settings, out, count, lambda n: _local(local / n))
        _check_files(local, records, owner, count)
        for stale in local.glob("*.tmp-*"):  # every part is done: a temporary left is a killed writer's
            stale.unlink()
        manifest = make_manifest(records, settings, source_keys)
        write_json(local / MANIFEST, manifest)
        shutil.rmtree(local / PROGRESS_DIR)
        prune(local, {n for r in records for n in (r["name"], r["index"]["name"])})
    return usable(local, manifest)


def _check_files(local: Path, records: list[dict[str, Any]], owner: dict[str, int], count: int) -> None:
    """Every shard and index the parts recorded is in place at its recorded size (a cheap check: the
    part that wrote them hashed them)."""
    for record in records:
        for entry in (record, record["index"]):
            path, part = local / entry["name"], f"{owner[record['name']]}/{count}"
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise ShardError(
                    f"{path} is missing or not the size part {part} recorded ({entry['bytes']} bytes): "
                    f"run --part {part} again (it redoes only what is missing), then --finish {count}"
                )


def _fetch(store: Store, name: str) -> bytes | None:
    try:
        return store.read(name)
    except NoSuchObject:
        return None


def _local(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _gather(
    settings: dict[str, Any], out: str, count: int, read: Callable[[str], bytes | None]
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int]]:
    """(every shard's record in shard order, the source's key digest, the part of each shard) from the
    N part records; a ShardError naming the parts that have not finished, or that were made otherwise."""
    parts = {i: read(part_file((i, count))) for i in range(count)}
    missing = [i for i, data in parts.items() if data is None]
    if missing:
        raise ShardError(
            f"{out}: part(s) {', '.join(f'{i}/{count}' for i in missing)} not finished (no "
            f"{join(out, part_file((missing[0], count)))}): run make_shards --part I/{count} with the "
            f"same options for each, then --finish {count} again"
        )
    loaded = {i: json.loads(data) for i, data in parts.items() if data is not None}
    first = loaded[0]
    for i, record in loaded.items():
        if record["settings"] != settings:
            raise ShardError(
                f"{out}: part {i}/{count} was made with other settings "
                f"({differences(record['settings'], settings)}): --finish takes the parts' options"
            )
        if (record["source_keys"], record["shards"]) != (first["source_keys"], first["shards"]):
            raise ShardError(
                f"{out}: parts 0/{count} and {i}/{count} were cut from different source key lists "
                f"({first['source_keys']['count']} and {record['source_keys']['count']} keys): "
                "run every part again from the same source"
            )
    by_name = {r["name"]: r for record in loaded.values() for r in record["records"]}
    owner = {r["name"]: i for i, record in loaded.items() for r in record["records"]}
    lacking = [name for name in first["shards"] if name not in by_name]
    if lacking:
        raise ShardError(
            f"{out}: no part of {count} recorded {len(lacking)} shard(s) (e.g. {lacking[0]}): "
            f"were the parts run with another N than {count}?"
        )
    return [by_name[name] for name in first["shards"]], first["source_keys"], owner
