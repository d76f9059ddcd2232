"""Build webdataset tar shards + manifest.json from LSUN (LMDB), an image folder or the demo data.

    python tools/make_shards.py --source lmdb:/data/lsun/bedroom_train_lmdb --out shards/bedroom256 \
        --resolution 256 --workers 16

One make_shards at a time per --out (a lease file, OUT/.lease.json); Ctrl-C stops it with the
finished shards kept (exit 130), and the same command finishes the job. N machines build one output
together with `--part I/N` each (I = 0 .. N-1), then one `--finish N` with the same options writes
the manifest (cluster/make_shards.sh runs them as a Slurm array job and a dependent job).
"""

from __future__ import annotations

import os
import signal
import sys

from dist_vae.errors import ExitCode  # the standard library only: loads before the handler is needed


def _interrupted_early(signum: int, frame: object) -> None:  # Ctrl-C while the imports below run
    print("make_shards.py: interrupted before it started; nothing was written", file=sys.stderr)
    os._exit(ExitCode.INTERRUPTED)


signal.signal(signal.SIGINT, _interrupted_early)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

from dist_vae.data.encode import MAX_PIXELS  # noqa: E402
from dist_vae.data.output import MANIFEST  # noqa: E402
from dist_vae.data.parts import finish, parse_count, parse_part, part_file, published  # noqa: E402
from dist_vae.data.shards import FORMATS, PROGRESS_DIR, ShardSettings, build_shards  # noqa: E402
from dist_vae.data.storage import NoSuchObject, Store, is_url  # noqa: E402
from dist_vae.errors import DataError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", required=True, help="lmdb:PATH | folder:PATH | demo[:N] | scenes:N[:SEED]"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (shards, manifest.json, .cache/), or an s3:// gs:// az:// URL to upload to",
    )
    parser.add_argument(
        "--stage",
        default=None,
        help="with a URL --out: the local directory the shards are built in before their upload "
        "(default: $TMPDIR/dist-vae-make-shards/<hash of the URL>); kept, so a rerun resumes",
    )
    parser.add_argument("--resolution", type=int, required=True, help="side of the square output images")
    parser.add_argument("--shard-size", type=int, default=1000, help="source keys per shard")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of keys sent to val")
    parser.add_argument("--format", choices=FORMATS, default="webp", help="image encoding in the shards")
    parser.add_argument("--quality", type=int, default=95, help="WebP/JPEG quality; 100 = lossless WebP")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N keys (sorted)")
    parser.add_argument(
        "--min-size",
        type=int,
        default=None,
        help="skip images whose shorter side is below this (default: a quarter of --resolution)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"skip images of more pixels (width x height) than this, unread (default: {MAX_PIXELS:,})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    step = parser.add_mutually_exclusive_group()
    step.add_argument(
        "--part",
        metavar="I/N",
        help="build only part I of N (I = 0 .. N-1) of the shards; the output is finished by --finish N",
    )
    step.add_argument(
        "--finish",
        metavar="N",
        help="write the manifest of the output its N parts built (the same options as the parts)",
    )
    return parser.parse_args(argv)


def upload(local: Path, shards: list[dict], store: Store, last: str) -> None:
    """Each of `shards` (records of the build in `local`) and its index that `store` lacks (or holds
    at another size), then the file `last` (the manifest, or a part's record): an output without a
    manifest is an unfinished one, and a part without its record an unfinished part."""
    for shard in shards:
        names = [(shard["name"], shard["bytes"])]
        if "index" in shard:
            names.append((shard["index"]["name"], shard["index"]["bytes"]))
        for name, size in names:
            try:
                if store.head(name)[0] == size:
                    continue
            except NoSuchObject:
                pass
            store.write(name, local / name)
    store.write(last, (local / last).read_bytes())


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    try:
        settings = ShardSettings(
            source=args.source,
            resolution=args.resolution,
            format=args.format,
            quality=args.quality,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            limit=args.limit,
            min_size=args.min_size,
            max_pixels=args.max_pixels,
        )
        local = args.out
        if is_url(args.out):
            if args.out.startswith(("http://", "https://")):
                raise DataError(
                    f"--out {args.out}: https:// shard sets are read-only; use s3://, gs:// or az://"
                )
            local = args.stage or os.path.join(
                tempfile.gettempdir(),
                "dist-vae-make-shards",
                hashlib.sha256(args.out.encode()).hexdigest()[:16],
            )
        part = parse_part(args.part) if args.part is not None else None
        if args.finish is not None:
            manifest = finish(asdict(settings), args.out, parse_count(args.finish), _say)
        elif part is not None:
            return _build_part(args, settings, local, part)
        else:
            manifest = build_shards(settings, local, workers=args.workers, progress=not args.no_progress)
            if is_url(args.out):
                shards = [s for split in manifest["splits"].values() for s in split["shards"]]
                upload(Path(local), shards, Store(args.out), MANIFEST)
    except DataError as exc:  # a source, setting or output directory that cannot be used
        print(f"make_shards.py: error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    except OSError as exc:  # a full or read-only disk, an unreadable LMDB page: the finished shards stay
        print(f"make_shards.py: error: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this line short
        done = len(list((Path(local) / PROGRESS_DIR).glob("*.tar.json")))
        print(
            f"make_shards.py: interrupted; {done} finished shards kept in {args.out}: run the same "
            "command to finish",
            file=sys.stderr,
        )
        return ExitCode.INTERRUPTED
    splits, notes = manifest["splits"], manifest["notes"]
    print(
        f"{args.out}: train {splits['train']['count']} images in {len(splits['train']['shards'])} shards, "
        f"val {splits['val']['count']} in {len(splits['val']['shards'])}, "
        f"skipped {manifest['skipped']['count']} {manifest['skipped']['reasons']}"
        + (f", notes {notes['kinds']} (see manifest.json)" if notes["count"] else "")
    )
    return ExitCode.SUCCESS


def _build_part(args: argparse.Namespace, settings: ShardSettings, local: str, part: tuple[int, int]) -> int:
    """Part I of N: its shards (uploaded, with a URL --out), then its record; nothing once finished."""
    finished = published(Store(args.out), asdict(settings)) if is_url(args.out) else None
    built = finished or build_shards(
        settings, local, workers=args.workers, progress=not args.no_progress, part=part
    )
    if "records" not in built:
        print(f"{args.out}: already finished (its manifest is in place): nothing to do for part {args.part}")
        return ExitCode.SUCCESS
    if is_url(args.out):
        upload(Path(local), built["records"], Store(args.out), part_file(part))
    print(_part_line(args.out, part, built))
    return ExitCode.SUCCESS


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _part_line(out: str, part: tuple[int, int], record: dict) -> str:
    """'OUT: part 1/3: 4 of 12 shards (train-000004 .. train-000007), 3980 images, skipped 2; ...'."""
    names = [r["name"].removesuffix(".tar") for r in record["records"]]
    skipped = sum(len(r["skipped"]) for r in record["records"])
    where = f" ({names[0]} .. {names[-1]})" if names else ""
    return (
        f"{out}: part {part[0]}/{part[1]}: {len(names)} of {len(record['shards'])} shards{where}, "
        f"{sum(r['count'] for r in record['records'])} images, skipped {skipped}; "
        f"once every part is done, --finish {part[1]} writes the manifest"
    )


if __name__ == "__main__":
    sys.exit(main())
