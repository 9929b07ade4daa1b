"""An embedding cache (text -> float vector) that several processes can share, and that a crash cannot break.

mteb's NumpyCache numbers new rows from the index it loaded and writes its files in place: two runs on one folder
overwrite each other's rows, and a write cut short (a kill, a full disk) leaves a folder every later run fails on.
`EmbeddingCache` implements the same public interface (mteb's `CacheBackendProtocol`), so it plugs into
`CachedEmbeddingWrapper(model, path, cache_backend=EmbeddingCache)`, and differs where that matters:
- `save()` holds an exclusive lock on the folder while it re-reads what is on disk, appends only its new rows and
  writes: rows are never renumbered, so every other process's rows survive;
- each file is written to a temporary file and renamed into place, vectors before index, so the index only names
  rows that are on disk (after a save stopped between the two renames the vectors file holds extra rows; they are
  ignored and overwritten by the next save);
- `load()` checks that index and vectors agree; a folder that does not is rebuilt (one warning line), never a traceback.
Its files have names of their own, so an old NumpyCache folder is never misread (its texts are encoded again).
Every save rewrites the folder's vectors file: fine for caches of a few hundred MB, as here (8 MB for SciFact).
"""

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data import UsageError

VECTORS_FILE = "embeddings.npy"  # float32 rows in numpy's .npy format, whose header holds shape and dtype
INDEX_FILE = "embeddings.json"  # {"dtype", "dim", "hashes"}: hashes[i] is the key of row i
LOCK_FILE = "embeddings.lock"  # never deleted, so every process locks the same file
DTYPE = "float32"


class DamagedCache(Exception):
    """The files on disk do not make a cache; the message says what is wrong."""


def text_hash(item: dict) -> str:
    """The key of an item: sha256 of its text, the hash mteb's own caches use for text."""
    if "text" not in item:
        raise TypeError(f"EmbeddingCache stores text items only, got keys {sorted(item)}")
    return hashlib.sha256(item["text"].encode()).hexdigest()


class EmbeddingCache:
    """One folder of cached vectors; see the module docstring for why it is safe to share."""

    def __init__(self, directory: str | Path, **kwargs) -> None:
        self.directory = Path(directory)
        self.rows: dict[str, int] = {}  # key -> row of self.vectors, as on disk at the last load or save
        self.vectors: np.ndarray | None = None  # read-only memory map of the vectors file
        self.dim: int | None = None
        self.new: dict[str, np.ndarray] = {}  # added since the last save

    def add(self, items: list[dict], vectors) -> None:
        """Remember vectors for items; they reach the disk at `save()`."""
        if not len(items):
            return
        vectors = np.array(vectors, dtype=DTYPE)  # a copy: the caller may reuse its array
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
        self._check_dim(self.dim if self.dim is not None else next((len(v) for v in self.new.values()), None), vectors.shape[1])
        for item, vector in zip(items, vectors):
            key = text_hash(item)
            if key not in self.rows:
                self.new[key] = vector

    def get_vector(self, item: dict) -> np.ndarray | None:
        """The item's vector, or None: a hash and a dict lookup, as mteb asks once per text per row."""
        key = text_hash(item)
        if key in self.new:
            return self.new[key]
        row = self.rows.get(key)
        return None if row is None else self.vectors[row]

    def __contains__(self, item: dict) -> bool:
        key = text_hash(item)
        return key in self.new or key in self.rows

    def __len__(self) -> int:
        return len(self.rows) + len(self.new)

    def load(self) -> None:
        """Read the folder (missing: empty); a damaged one is treated as empty, with one warning line."""
        self.rows, self.vectors, self.dim = {}, None, None
        if not self.directory.is_dir():
            return
        try:
            with self._locked(fcntl.LOCK_SH):
                self.rows, self.vectors, self.dim = self._read()
        except DamagedCache as e:
            print(f"warning: embedding cache {self.directory} is damaged ({e}); rebuilding it", file=sys.stderr)

    def save(self) -> None:
        """Merge this process's new vectors into the folder under its lock; afterwards this object holds the
        merged folder, other processes' rows included. A write that fails (full disk, unwritable folder) is one
        UsageError line naming the folder, and the files stay as they were."""
        if not self.new:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._locked(fcntl.LOCK_EX):
                for stale in self.directory.glob("*.tmp"):  # left by a killed writer: only the lock holder makes them
                    stale.unlink()
                try:
                    rows, vectors, dim = self._read()
                except DamagedCache:  # load() has already said so
                    rows, vectors, dim = {}, None, None
                fresh = {key: v for key, v in self.new.items() if key not in rows}
                self._check_dim(dim, len(next(iter(self.new.values()))))
                if fresh:
                    merged = np.concatenate([vectors, np.stack(list(fresh.values()))]) if rows else np.stack(list(fresh.values()))
                    self._write(VECTORS_FILE, lambda f: np.save(f, merged))  # vectors first: the index never names a missing row
                    index = {"dtype": DTYPE, "dim": merged.shape[1], "hashes": [*rows, *fresh]}
                    self._write(INDEX_FILE, lambda f: f.write(json.dumps(index).encode()))
                self.rows, self.vectors, self.dim = self._read()
                self.new = {}
        except OSError as e:
            raise UsageError(f"cannot write the embedding cache {self.directory}: {e.strerror or e}") from None

    def close(self) -> None:
        """Drop the memory map; unsaved vectors are dropped too (mteb saves after every add)."""
        self.rows, self.vectors, self.new = {}, None, {}

    def _read(self) -> tuple[dict[str, int], np.ndarray | None, int | None]:
        """The folder as it is now: key -> row, the vectors (memory-mapped) and their dimension."""
        index_path, vectors_path = self.directory / INDEX_FILE, self.directory / VECTORS_FILE
        if not index_path.exists():
            return {}, None, None
        try:
            index = json.loads(index_path.read_text())
            hashes, dim = index["hashes"], index["dim"]
            vectors = np.load(vectors_path, mmap_mode="r")
            if index["dtype"] != DTYPE or vectors.dtype != np.dtype(DTYPE) or vectors.ndim != 2:
                raise DamagedCache(f"expected {DTYPE} rows, index says {index['dtype']}, vectors are {vectors.dtype} {vectors.shape}")
            if vectors.shape[1] != dim:
                raise DamagedCache(f"index says dimension {dim}, vectors have {vectors.shape[1]}")
            if len(vectors) < len(hashes) or len(set(hashes)) != len(hashes):
                raise DamagedCache(f"index names {len(hashes)} rows ({len(set(hashes))} distinct), vectors hold {len(vectors)}")
        except FileNotFoundError:
            raise DamagedCache(f"{VECTORS_FILE} is missing") from None
        except (OSError, ValueError, KeyError, TypeError) as e:  # a cut or garbled file
            raise DamagedCache(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
        return {key: row for row, key in enumerate(hashes)}, np.asarray(vectors[: len(hashes)]), dim

    def _write(self, name: str, write) -> None:
        """Write a file whole or not at all: a temporary file, flushed to disk, then renamed over the old one."""
        tmp = self.directory / f"{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # a full disk shows up here at the latest
            os.replace(tmp, self.directory / name)
        finally:
            tmp.unlink(missing_ok=True)

    def _check_dim(self, dim: int | None, new_dim: int) -> None:
        if dim is not None and new_dim != dim:
            raise UsageError(f"embedding cache {self.directory} holds {dim}-dimensional vectors, not {new_dim}: "
                             f"delete {self.directory} or use another --cache-dir")

    @contextmanager
    def _locked(self, mode: int):
        """flock on the folder's lock file; a reader that cannot create it reads unlocked (files are only ever replaced whole)."""
        try:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            if mode == fcntl.LOCK_EX:
                raise
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, mode)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # closing releases the lock


def count_cached(texts: list[str], *folders: str | Path) -> int:
    """How many distinct texts of `texts` are already in any of `folders`: for a "N to encode, M cached" line."""
    caches = [EmbeddingCache(folder) for folder in folders]
    for cache in caches:
        cache.load()
    return sum(any(key in cache.rows for cache in caches) for key in {text_hash({"text": t}) for t in texts})
