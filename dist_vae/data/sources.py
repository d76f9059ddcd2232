"""Readers of raw image datasets: each yields (key, encoded bytes) in a fixed, sorted key order.

The LSUN reader opens its LMDB lazily in whichever process reads, never in a parent that will fork:
an LMDB environment inherited across fork is undefined behaviour (and the cause of the stalls seen
with readers that open it in `__init__`). Its key list, slow to enumerate for millions of entries, is
cached in a directory the caller chooses (the shard output), never in the current directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import lmdb
from PIL import Image

from dist_vae.errors import DataError
from dist_vae.files import write_text_atomic

# Every file name Pillow has a decoder for (what is listed is what is read), less its stubs that
# identify a format but cannot decode it (BUFR, GRIB, HDF5, WMF/EMF) and video (MPEG).
_STUBS = {".bufr", ".grib", ".h5", ".hdf", ".wmf", ".emf", ".mpeg", ".mpg"}
IMAGE_SUFFIXES = {
    ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and ext not in _STUBS
} | {".mpo"}
LMDB_MAGIC = 0xBEEFC0DE


class SourceError(DataError):
    """A dataset path or specification that cannot be read; the message names it."""


class SkipImage(Exception):
    """A value that is not a usable image: a short reason (counted in the manifest) and its detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def sniff_format(data: bytes) -> str | None:
    """'webp', 'jpeg', 'png' or 'tiff' from the magic bytes, None for anything else.

    LSUN's own readme says JPEG while its LMDBs hold WebP, so the bytes, not the source, decide.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):  # little- and big-endian TIFF (16- and 32-bit greys, scans)
        return "tiff"
    return None


def _os_reason(exc: OSError) -> str:
    """A short manifest reason for an OS error: 'permission denied', 'input/output error', ..."""
    return (exc.strerror or type(exc).__name__).lower()


def check_lmdb_file(path: Path) -> int:
    """The entry count of the LMDB file `path` (data.mdb), read from its meta pages with struct and
    checked BEFORE anything maps it: a file shorter than its header claims (a partial copy) would be
    a bus error on first touch of a missing page. SourceError names the file and what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(2 * 65536)
    except OSError as exc:
        raise SourceError(f"LMDB file {path} cannot be read: {exc.strerror}") from exc
    metas = []
    if len(head) >= 152 and struct.unpack_from("<I", head, 16)[0] == LMDB_MAGIC:
        page = struct.unpack_from("<I", head, 40)[0]  # the free DB's md_pad holds the page size
        for offset in (0, page):
            if (
                page >= 152
                and len(head) >= offset + 152
                and struct.unpack_from("<I", head, offset + 16)[0] == LMDB_MAGIC
            ):
                last, txnid = struct.unpack_from("<QQ", head, offset + 136)
                metas.append((txnid, last, struct.unpack_from("<Q", head, offset + 120)[0], page))
    if not metas:
        raise SourceError(
            f"{path} is not an LMDB file ({size} bytes, no LMDB header): expected an LMDB environment "
            "such as LSUN's *_lmdb directories"
        )
    _, last, entries, page = max(metas)
    claimed = (last + 1) * page
    if size < claimed:
        raise SourceError(
            f"LMDB file {path} is truncated: {size} bytes, but its header claims {claimed} "
            f"({last + 1} pages of {page} bytes); copy it again in full"
        )
    return entries


class LmdbSource:
    """An LSUN-style LMDB (one category): text keys (LSUN: 40 hex digits), encoded image values."""

    def __init__(self, path: str | Path, cache_dir: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"LMDB {self.path} not found: expected a directory holding data.mdb")
        if not self.path.is_dir():
            raise SourceError(
                f"{self.path} is not an LMDB: expected a directory holding data.mdb, found a file"
            )
        if not (self.path / "data.mdb").is_file():
            raise SourceError(f"{self.path} is not an LMDB: it holds no data.mdb")
        if check_lmdb_file(self.path / "data.mdb") == 0:
            raise SourceError(f"LMDB {self.path} holds no images (0 entries)")
        self.cache_dir = Path(cache_dir)
        self._env: lmdb.Environment | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None, "_pid": -1}

    def _open(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            self._env = lmdb.open(
                str(self.path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=1
            )
            self._pid = os.getpid()
        return self._env

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None

    def _cache_file(self) -> Path:
        stat = (self.path / "data.mdb").stat()
        ident = f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return self.cache_dir / f"lmdb-keys-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.txt"

    def keys(self) -> list[str]:
        """All keys, sorted; read once from the LMDB, then from the cache file."""
        cache = self._cache_file()
        if cache.is_file():
            return cache.read_text().split()
        try:
            with self._open().begin() as txn:
                raw = list(txn.cursor().iternext(keys=True, values=False))
        except lmdb.Error as exc:
            raise SourceError(f"LMDB {self.path} cannot be read: {exc}") from exc
        finally:
            self.close()
        try:
            keys = [k.decode("utf-8") for k in raw]
        except UnicodeDecodeError as exc:
            raise SourceError(f"LMDB {self.path} has a key that is not UTF-8: {exc}") from exc
        if any(not k or k.split() != [k] for k in keys):
            raise SourceError(f"LMDB {self.path} has a key that is empty or holds whitespace")
        write_text_atomic(cache, "".join(k + "\n" for k in keys))
        return keys

    def read(self, key: str) -> bytes:
        try:
            with self._open().begin(buffers=False) as txn:
                value = txn.get(key.encode("utf-8"))
        except lmdb.Error as exc:
            raise SourceError(f"LMDB {self.path} cannot be read at key {key!r}: {exc}") from exc
        if value is None:
            raise SourceError(f"LMDB {self.path} has no key {key!r}")
        return value

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        for key in self.keys():
            yield key, self.read(key)


class FolderSource:
    """Every image file below a directory, recursively; the key is the path relative to it.

    A symlink with an image name that leads nowhere (broken, or a loop) is a key too, so that it is
    listed in the manifest's skipped values rather than left out unseen. Symlinked directories are not
    entered (pathlib's rglob), so a directory loop cannot recurse. A file that cannot be read (permission,
    I/O error) is skipped with the OS error as its reason.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise SourceError(f"image folder {self.path} not found or not a directory")

    def keys(self) -> list[str]:
        keys = sorted(
            p.relative_to(self.path).as_posix()
            for p in self.path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or (p.is_symlink() and not p.exists()))
        )
        if not keys:
            raise SourceError(
                f"image folder {self.path} holds no image files (none named with any of the "
                f"{len(IMAGE_SUFFIXES)} suffixes Pillow reads, such as .jpg .png .webp .gif .bmp .tiff)"
            )
        return keys

    def read(self, key: str) -> bytes:
        path = self.path / key
        try:
            return path.read_bytes()
        except OSError as exc:
            if path.is_symlink() and exc.errno in (errno.ELOOP, errno.ENOENT):
                reason = "symlink loop" if exc.errno == errno.ELOOP else "broken symlink"
                raise SkipImage(reason, f"{key} -> {os.readlink(path)}: {exc.strerror}") from exc
            raise SkipImage(_os_reason(exc), f"{key}: {exc}") from exc

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        for key in self.keys():
            yield key, self.read(key)
