"""The store under both teacher caches: a dir of fixed-size files, one row of each per stored item.

A cache dir holds

- ``manifest.json``: what the cache was made from (its fingerprint) and its shapes, written whole or
  not at all (``write_manifest``);
- the data files of the cache's layout (``fastmt.cache.teachers``: a row per training example;
  ``fastmt.cache.topk``: a row per block of tokens), float32 or int32, zeros until filled, sparse
  where the filesystem allows, memory-mapped (the OS keeps hot pages in memory);
- ``filled.bin``: one byte per row, stored or not, set after the row's data and checksums;
- ``sums.bin``: a CRC-32 per row and data file, written with the data and checked on every read. A
  row whose bytes changed on disk since (a crash mid-write, a disk error, another program) is read as
  missing, so the teachers compute it again, with one warning per file.

A dir made from other inputs (any fingerprint field or shape differs from the manifest) is rebuilt,
with one warning naming what differs; one whose files do not have their sizes (truncated, lost) is
rebuilt, with one warning naming them. Otherwise it is reused as far as it was filled: an interrupted
first pass leaves rows that later runs read, and the rest are stored as they are computed. Making,
checking or rebuilding a dir happens under ``DIR.lock`` beside it (``creation_lock``), so runs may
open and fill one cache at the same time: a row two runs both store ends with one run's bytes and
the checksum of those bytes, or is found out and recomputed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np

log = logging.getLogger("fastmt")

MANIFEST = "manifest.json"
FILLED = "filled.bin"
SUMS = "sums.bin"


def file_size(path: Path) -> int | None:
    """Bytes in ``path``; None when it is not there."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: str | Path) -> str:
    """Every file of a dir by relative path, size and modification time (not its bytes: teachers are
    gigabytes, and a re-trained teacher is a rewritten file)."""
    root = Path(path).resolve()
    h = hashlib.sha256(str(root).encode())
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_dir(fp: dict) -> Path:
    """``--cache-teachers auto``: one dir per fingerprint under ``$FASTMT_CACHE`` (default
    ``~/.cache/fastmt``), in ``teachers/``."""
    base = Path(os.environ.get("FASTMT_CACHE") or Path.home() / ".cache" / "fastmt") / "teachers"
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return base / key



def cache_dir(flag: str, fp: dict) -> Path:
    """Where ``--cache-teachers FLAG`` puts a cache of fingerprint ``fp``: a dir, or ``auto``
    (:func:`default_dir`)."""
    return default_dir(fp) if flag == "auto" else Path(flag)


@contextmanager
def creation_lock(path: Path) -> Iterator[None]:
    """Making, checking or rebuilding a cache dir, one process at a time (``DIR.lock`` beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_manifest(path: Path, manifest: dict) -> None:
    """Whole or not at all: another run may read it at any time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict:
    """The manifest at ``path``; empty when it cannot be read or is not a JSON object (then every
    field differs, and the dir is rebuilt)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _damaged_file(name: str, size: int | None, want: int) -> str:
    return f"{name} (missing)" if size is None else f"{name} ({size} bytes, not {want})"


class CacheStore:
    """``rows`` rows of teacher outputs in the files of one dir (see the module docstring).

    A cache built on it says what a row holds: ``SUMMED``, its data files in the order of their
    columns in ``sums.bin``, and ``_row_views``, one row's bytes in each; ``LABEL`` and ``WHAT`` say
    how its lines name it and the fields of its manifest. It opens its dir with ``reusable`` and
    ``make_dir`` under ``creation_lock``, checks rows with ``_stored`` before reading them and calls
    ``_commit`` once a put has written them."""

    LABEL: ClassVar[str]  # how log lines name the cache
    SUMMED: ClassVar[tuple[str, ...]]  # the data files, in the order of their checksum columns
    WHAT: ClassVar[dict[str, str]]  # manifest field -> how a rebuild names it (the field's own name otherwise)
    FLUSH_EVERY: ClassVar[int | None] = None  # puts between flushes of the data (None: when full, and at flush())

    def __init__(self, path: Path, manifest: dict, rows: int):
        self.path, self.manifest, self.rows = Path(path), manifest, int(rows)
        self.filled = np.memmap(self.path / FILLED, dtype=np.uint8, mode="r+", shape=(self.rows,))
        self.sums = np.memmap(self.path / SUMS, dtype=np.uint32, mode="r+", shape=(self.rows, len(self.SUMMED)))
        self.count = int(self.filled.sum())
        self.bad: dict[str, set[int]] = {}  # data file -> rows found changed on disk
        self.verify_s = 0.0  # time spent checking checksums
        self._unflushed = 0

    # -- the dir -------------------------------------------------------------------------------

    @classmethod
    def bookkeeping(cls, rows: int) -> dict[str, int]:
        """The sizes of ``filled.bin`` and ``sums.bin`` for ``rows`` rows."""
        return {FILLED: int(rows), SUMS: 4 * len(cls.SUMMED) * int(rows)}

    @classmethod
    def reusable(cls, path: Path, manifest: dict, sizes: dict[str, int]) -> dict | None:
        """With ``creation_lock(path)`` held: the manifest stored in ``path`` when the dir there was
        made from the inputs and shapes of ``manifest`` (every field of it equal) and each file of
        ``sizes`` has its size; the cache there is then reused, as far as it was filled. Otherwise
        None, once the dir there, if any, is removed with one warning naming the fields that differ,
        or else the damaged files (and what ``_damaged_manifest`` finds missing from the manifest)."""
        mpath = path / MANIFEST
        if not mpath.exists():
            return None
        old = read_manifest(mpath)
        changed = [cls.WHAT.get(key, key) for key, v in manifest.items() if old.get(key) != v]
        if changed:
            log.warning("%s %s was made for other inputs (%s differ): rebuilding it", cls.LABEL, path,
                        ", ".join(changed))
        else:
            damaged = [_damaged_file(name, file_size(path / name), size) for name, size in sizes.items()
                       if file_size(path / name) != size]
            damaged += cls._damaged_manifest(old)
            if not damaged:
                return old
            log.warning("%s %s is damaged (%s): rebuilding it", cls.LABEL, path, ", ".join(damaged))
        shutil.rmtree(path)
        return None

    @classmethod
    def _damaged_manifest(cls, stored: dict) -> list[str]:
        """What a stored manifest whose fields all match still lacks for this cache (a cache's own
        check; nothing here)."""
        return []

    @staticmethod
    def make_dir(path: Path, sizes: dict[str, int], manifest: dict) -> None:
        """A new cache dir at ``path``: each file of ``sizes`` zeros of its size, then ``manifest``."""
        path.mkdir(parents=True, exist_ok=True)
        for name, size in sizes.items():
            with open(path / name, "wb") as f:
                f.truncate(size)  # zeros; sparse where the filesystem allows
        write_manifest(path / MANIFEST, manifest)

    def save_manifest(self) -> None:
        write_manifest(self.path / MANIFEST, self.manifest)

    # -- rows ----------------------------------------------------------------------------------

    def _row_views(self, row: int) -> tuple:
        """Row ``row``'s bytes in each file of ``SUMMED`` (views, not copies; None: a file this cache
        does not use)."""
        raise NotImplementedError

    def _data_files(self) -> list[np.memmap]:
        """The memory maps of the data files, flushed before the flags."""
        raise NotImplementedError

    def _warn_changed(self, name: str, row: int) -> None:
        """Say, once per file, that ``name`` was found changed on disk at row ``row``."""
        raise NotImplementedError

    def _crc(self, row: int) -> np.ndarray:
        """The checksums of one row, a column per file of ``SUMMED`` (0 for a file not used)."""
        return np.array([zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B")) if x is not None else 0
                         for x in self._row_views(row)], dtype=np.uint32)

    @property
    def complete(self) -> bool:
        return self.count == self.rows

    def _stored(self, rows: np.ndarray) -> bool:
        """Whether every one of ``rows`` is stored with the bytes its checksums were taken of."""
        return bool(self.filled[rows].all()) and self._verified(rows)

    def _verified(self, rows: np.ndarray) -> bool:
        """Whether every row's bytes still match its checksums; the ones that do not are marked not
        stored (the caller recomputes and stores them), with one warning per file."""
        start = time.perf_counter()
        ok = True
        for i in (int(x) for x in rows):
            wrong = np.flatnonzero(self._crc(i) != self.sums[i])
            if len(wrong):
                ok = False
                self.filled[i] = 0
                self.count -= 1
                for j in wrong:
                    name = self.SUMMED[j]
                    if name not in self.bad:
                        self._warn_changed(name, i)
                    self.bad.setdefault(name, set()).add(i)
        self.verify_s += time.perf_counter() - start
        return ok

    def _commit(self, rows: np.ndarray) -> int:
        """Once a put has written ``rows`` into every data file: their checksums, then their flags
        (a flag never points at unwritten data); how many of them are new to the cache."""
        for i in rows:
            self.sums[i] = self._crc(int(i))
        new = int((self.filled[rows] == 0).sum())
        self._unflushed += 1
        if new:
            self.count += new
            if self.complete or (self.FLUSH_EVERY is not None and self._unflushed >= self.FLUSH_EVERY):
                self.flush()
            self.filled[rows] = 1
            if self.complete:
                self.filled.flush()
        return new

    def flush(self) -> None:
        """Data and checksums to disk, then the flags."""
        for x in (self.sums, *self._data_files()):
            x.flush()
        self.filled.flush()
        self._unflushed = 0
