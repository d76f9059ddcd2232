"""Raw dataset -> webdataset tar shards + manifest.json.

The output depends only on the source and the settings, never on the worker count or on how often
the job was interrupted: the train/val split comes from a hash of each key, the samples are ordered
by that hash and cut into shards of `shard_size` keys (jobs.py), images are squared and encoded
alone (encode.py), and tar headers carry fixed metadata. So a killed run started again redoes only
the shards that were not finished, and a finished output is left untouched. Each shard is written
under a temporary name and renamed when complete (dist_vae.files), then its per-sample index
`NAME.idx.json` (key, member, offset, size, sha256 per image: the stream checks each image alone);
its record (count, bytes, sha256, index, skipped keys, notes) goes to `.progress/` until the manifest
(manifest.py) gathers them all. One process writes an output at a time, under its lease, or N parts
each their share of the shards (parts.py); what an earlier run left there (a manifest, `.progress/`,
old shards) is judged by output.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import sys
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dist_vae.data.demo import DEFAULT_DEMO_SIZE, ensure_demo_lmdb
from dist_vae.data.encode import MAX_PIXELS, encode, square_image
from dist_vae.data.index import index_document, index_name, index_tar
from dist_vae.data.jobs import ShardJob, sample_name, shard_jobs
from dist_vae.data.keylist import key_digest, source_change
from dist_vae.data.manifest import make_manifest
from dist_vae.data.output import (
    MANIFEST,
    PROGRESS_DIR,
    ShardError,
    claim_progress,
    done_record,
    finished_manifest,
    held,
    prune,
    usable,
    write_json,
)
from dist_vae.data.parts import part_file, part_jobs, part_names, part_record
from dist_vae.data.scenes import SceneSource, parse_scene_spec
from dist_vae.data.sources import FolderSource, LmdbSource, SkipImage, SourceError
from dist_vae.errors import DataError
from dist_vae.files import atomic_path, file_sha256, write_bytes_atomic

FORMATS = ("webp", "png", "jpg")
CACHE_DIR = ".cache"

Source = LmdbSource | FolderSource | SceneSource


@dataclass(frozen=True)
class ShardSettings:
    """Everything that decides the bytes of the output."""

    source: str
    resolution: int
    format: str = "webp"
    quality: int = 95
    shard_size: int = 1000
    val_fraction: float = 0.01
    limit: int | None = None
    min_size: int | None = None  # shorter sides below it are skipped; None: a quarter of the resolution
    max_pixels: int = MAX_PIXELS  # larger images (width x height) are skipped before decoding

    def __post_init__(self) -> None:
        if self.min_size is None:  # resolved here, so the manifest records the value used
            object.__setattr__(self, "min_size", max(1, self.resolution // 4))
        checks = [
            (self.resolution >= 1, f"resolution must be >= 1, got {self.resolution}"),
            (self.format in FORMATS, f"format must be one of {list(FORMATS)}, got {self.format!r}"),
            (1 <= self.quality <= 100, f"quality must be in [1, 100], got {self.quality}"),
            (self.shard_size >= 1, f"shard size must be >= 1, got {self.shard_size}"),
            (0.0 <= self.val_fraction <= 1.0, f"val fraction must be in [0, 1], got {self.val_fraction}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.min_size >= 1, f"min size must be >= 1, got {self.min_size}"),
            (self.max_pixels >= 1, f"max pixels must be >= 1, got {self.max_pixels}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ShardError(message)


def open_source(spec: str, out: str | Path, resolution: int) -> Source:
    """`lmdb:PATH`, `folder:PATH`, `demo[:N]` (an LSUN-format LMDB built under OUT/.cache) or
    `scenes:N[:SEED]` (procedural bedrooms drawn at `resolution`, their factors in each JSON)."""
    kind, _, arg = spec.partition(":")
    cache = Path(out) / CACHE_DIR
    if kind == "lmdb" and arg:
        return LmdbSource(arg, cache)
    if kind == "folder" and arg:
        return FolderSource(arg)
    if kind == "demo":
        if arg and not (arg.isdigit() and int(arg) >= 1):
            raise SourceError(f"bad --source {spec!r}: the demo size N in demo:N must be a positive integer")
        return LmdbSource(ensure_demo_lmdb(cache, int(arg) if arg else DEFAULT_DEMO_SIZE), cache)
    if kind == "scenes":
        return SceneSource(*parse_scene_spec(arg), resolution)
    raise SourceError(f"bad --source {spec!r}: expected lmdb:PATH, folder:PATH, demo[:N] or scenes:N[:SEED]")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(source: Source, job: ShardJob, settings: ShardSettings, out: Path) -> dict[str, Any]:
    """Write one shard (temporary name, then rename), then its index, and return its record."""
    final = out / job.name
    skipped, notes = [], []
    with atomic_path(final) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key in job.keys:
                try:
                    img, said = square_image(
                        source.read(key), settings.resolution, settings.min_size, settings.max_pixels
                    )
                except SkipImage as exc:
                    skipped.append({"key": key, "reason": exc.reason, "detail": exc.detail})
                    continue
                notes += [{"key": key, "note": kind, "detail": detail} for kind, detail in said]
                stem = sample_name(key)
                _add_member(tar, f"{stem}.{settings.format}", encode(img, settings.format, settings.quality))
                meta = {
                    "key": key,
                    **({"factors": source.factors(key)} if isinstance(source, SceneSource) else {}),
                }
                _add_member(tar, f"{stem}.json", json.dumps(meta, sort_keys=True).encode())
        index = index_document(job.name, index_tar(tmp, hashes=True))
    write_bytes_atomic(out / index_name(job.name), index)
    record = {
        "name": job.name,
        "count": len(job.keys) - len(skipped),
        "bytes": final.stat().st_size,
        "sha256": file_sha256(final),
        "index": {
            "name": index_name(job.name),
            "bytes": len(index),
            "sha256": hashlib.sha256(index).hexdigest(),
        },
    }
    write_json(out / PROGRESS_DIR / f"{job.name}.json", {**record, "skipped": skipped, "notes": notes})
    return record


_worker_state: dict[str, Any] = {}


def _init_worker(source: Source, settings: ShardSettings, out: Path) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _worker_state.update(source=source, settings=settings, out=out)


def _run_job(job: ShardJob) -> tuple[int, dict[str, Any]]:
    s = _worker_state
    return len(job.keys), write_shard(s["source"], job, s["settings"], s["out"])


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def build_shards(
    settings: ShardSettings,
    out: str | Path,
    workers: int = 1,
    progress: bool = True,
    say: Callable[[str], None] = _say,
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Make (or finish) the shards of `settings.source` in `out`; returns the manifest. With `part`
    (I, N): only part I of N's shards, and returns its part record (parts.py), or the manifest when
    the output is already finished.

    One process at a time writes `out` (its lease, OUT/.lease.json; a part's, OUT/.lease-part-I-of-N.json);
    a second is refused with a ShardError naming the holder, and a gone holder's lease is taken over
    with one line to `say`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a directory")
    finished = finished_manifest(out, asdict(settings))
    if finished is not None:  # nothing to write: no lease needed
        source, keys = _source_keys(settings, out)
        change = source_change(out, finished, keys)
        if change is not None:
            raise ShardError(change)
        return usable(out, finished)
    created = not out.exists()
    try:
        with held(out, say, part) as check:
            source, keys = _source_keys(settings, out)  # the demo source writes under OUT/.cache
            built = _build(source, keys, settings, out, workers, progress, check, part)
            return built if part is not None else usable(out, built)
    except DataError:
        if created and not any(out.iterdir()):
            out.rmdir()  # a refused source leaves no empty output behind
        raise


def _source_keys(settings: ShardSettings, out: Path) -> tuple[Source, list[str]]:
    source = open_source(settings.source, out, settings.resolution)
    keys = source.keys()
    return source, keys[: settings.limit] if settings.limit is not None else keys


def _build(
    source: Source,
    keys: list[str],
    settings: ShardSettings,
    out: Path,
    workers: int,
    progress: bool,
    check: Callable[[], None],
    part: tuple[int, int] | None,
) -> dict[str, Any]:
    """The build proper, under the lease (`check` between shards): the temporaries left in `out` are a
    gone owner's, all of them for a whole build, a part's own for a part (the others may be writing)."""
    jobs = shard_jobs(keys, settings.val_fraction, settings.shard_size)
    mine = jobs if part is None else part_jobs(jobs, part)
    claim_progress(out, asdict(settings), keys)
    check()
    owned = None if part is None else {*part_names(mine), Path(part_file(part)).name}
    for stale in [*out.glob("*.tmp-*"), *(out / PROGRESS_DIR).glob("*.tmp-*")]:
        if owned is None or stale.name[1:].split(".tmp-")[0] in owned:
            stale.unlink()
    pending = [job for job in mine if done_record(out, job.name) is None]
    bar = tqdm(
        total=sum(len(j.keys) for j in mine),
        initial=sum(len(j.keys) for j in mine) - sum(len(j.keys) for j in pending),
        unit="img",
        disable=not progress,
    )
    with bar:
        if workers <= 1 or len(pending) <= 1:
            for job in pending:
                write_shard(source, job, settings, out)
                bar.update(len(job.keys))
                check()
        else:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # workers are born ignoring Ctrl-C
            try:
                pool = Pool(min(workers, len(pending)), _init_worker, (source, settings, out))
            finally:
                signal.signal(signal.SIGINT, previous)
            with pool:
                for n, _ in pool.imap_unordered(_run_job, pending):
                    bar.update(n)
                    check()
    records = [json.loads((out / PROGRESS_DIR / f"{job.name}.json").read_text()) for job in mine]
    if part is not None:
        record = part_record(part, asdict(settings), key_digest(keys), jobs, records)
        write_json(out / part_file(part), record)
        return record
    manifest = make_manifest(records, asdict(settings), key_digest(keys))
    write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / PROGRESS_DIR)
    prune(out, {name for job in jobs for name in (job.name, index_name(job.name))})
    return manifest
