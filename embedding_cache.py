"""An append-only embedding cache (prompt + text -> float vector) that several processes can share, and that a crash
cannot break.

Why not one big file: the cache before this one held every new vector in memory and rewrote one .npy at each save,
keyed by sha256(text). An interrupted encoding kept nothing, a corpus of millions of texts sat in memory twice, and a
model that puts a query or document prompt before the text could confuse the vectors made with different prompts.
Here each `append()` writes a shard at once, vectors stay memory-mapped, and the key hashes the prompt actually
applied along with the text (`cache_key`). A folder holds the vectors of one model.

Format: a shard is `<time>-<pid>-<random>.vectors.npy` (float32, shape (n, dim)) and `<same>.keys` (n raw 32-byte keys,
row i's key at bytes 32i..32i+32). Writers write the vectors file, fsync, rename it into place, then do the same for
the keys file: the keys file is the commit marker, and readers read only shards whose keys file exists.
Why it is safe: nothing on disk is ever rewritten, and names are unique, so concurrent writers need no lock and cannot
lose each other's rows; a writer killed at any instant leaves only `.tmp` files or a vectors file without keys, both
ignored (and deletable when no process is writing). A key in several shards (two writers raced) is read from the
oldest. A damaged shard is skipped with one warning line; its texts are simply encoded again. The old cache's files
(`embeddings.npy`, `embeddings.json`) have other names, so an old folder reads as empty.
"""

import hashlib
import os
import secrets
import sys
import time
from contextlib import suppress
from pathlib import Path

import numpy as np

from data import UsageError, write_atomic

KEY_BYTES = 32
KEYS, VECTORS = ".keys", ".vectors.npy"  # a shard's two files: <name>.keys commits <name>.vectors.npy
ROW_BITS = 32  # the index packs (shard, row) into one int64 as shard << ROW_BITS | row


def cache_key(prompt: str, text: str) -> bytes:
    """The 32-byte key of `text` encoded after `prompt` ("" for none): sha256 of the prompt's length, the prompt and
    the text, so vectors made with different prompts never share a key, and no key equals an old sha256(text) one."""
    prompt_bytes = prompt.encode()
    return hashlib.sha256(len(prompt_bytes).to_bytes(8, "little") + prompt_bytes + text.encode()).digest()


class DamagedShard(Exception):
    """A shard whose files do not make a shard; the message says why."""


class EmbeddingCache:
    """One folder of shards. `load()` reads it; `missing`, `get` and `append` then work on keys from `cache_key`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.dim: int | None = None
        self._keys = np.empty(0, f"S{KEY_BYTES}")  # every cached key, sorted: lookups are one np.searchsorted
        self._where = np.empty(0, np.int64)  # _where[i]: the shard and row of _keys[i]
        self._shards: list[np.ndarray] = []  # read-only memory maps of the shards' vectors
        self._seen: set[str] = set()  # shard names read or skipped

    def load(self) -> None:
        """Read every committed shard of the folder (missing folder: empty); vectors are memory-mapped, not read."""
        self.__init__(self.directory)  # start over: shards may have been deleted since
        self._read_new_shards()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: bytes) -> bool:
        return bool(self._find(_as_array([key]))[0][0])

    def missing(self, keys: list[bytes]) -> list[int]:
        """Positions in `keys` whose key is not cached."""
        return np.flatnonzero(~self._find(_as_array(keys))[0]).tolist()

    def get(self, keys: list[bytes]) -> np.ndarray:
        """The vectors of `keys`, (len(keys), dim) float32, in a new array; reads only those rows from disk."""
        found, pos = self._find(_as_array(keys))
        if not found.all():
            raise KeyError(f"{np.sum(~found)} of {len(keys)} keys are not in the embedding cache {self.directory}")
        out = np.empty((len(keys), self.dim or 0), np.float32)
        where = self._where[pos]
        order = np.argsort(where)  # by shard, then row: each shard is read in one forward pass
        shard_of = where[order] >> ROW_BITS
        for part in np.split(order, np.flatnonzero(np.diff(shard_of)) + 1) if len(order) else []:
            out[part] = self._shards[where[part[0]] >> ROW_BITS][where[part] & ((1 << ROW_BITS) - 1)]
        return out

    def append(self, keys: list[bytes], vectors) -> None:
        """Write the vectors of keys not yet cached (by this or another process) as one new shard, durable when this
        returns and visible to this object. A dimension other than the cache's, a full disk or an unwritable folder
        is one UsageError line; the folder's earlier shards are never touched."""
        vectors, key_array = np.asarray(vectors, np.float32), _as_array(keys)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"{len(keys)} keys need a ({len(keys)}, dim) array of vectors, not {vectors.shape}")
        self._read_new_shards()  # another process may have cached some of them, or set the dimension
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise UsageError(f"embedding cache {self.directory} holds {self.dim}-dimensional vectors, not "
                             f"{vectors.shape[1]}: delete {self.directory} or use another --cache-dir")
        rows = np.sort(np.unique(key_array, return_index=True)[1])  # the first of keys repeated in `keys`
        rows = rows[~self._find(key_array[rows])[0]]
        if not len(rows):
            return
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"  # unique, and sorts oldest first
        self._write_shard(name, key_array[rows].tobytes(), np.ascontiguousarray(vectors[rows]))
        self._seen.add(name)
        self.dim = vectors.shape[1]
        self._index(key_array[rows], self._add_vectors(np.load(self.directory / (name + VECTORS), mmap_mode="r")))

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whether each key is cached, and its position in the sorted index."""
        pos = np.searchsorted(self._keys, keys)
        found = pos < len(self._keys)
        found[found] = self._keys[pos[found]] == keys[found]
        return found, pos

    def _add_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Keep a shard's memory-mapped vectors; returns where its rows are, as the index stores it."""
        self._shards.append(vectors)
        return ((len(self._shards) - 1) << ROW_BITS) + np.arange(len(vectors))

    def _read_new_shards(self) -> None:
        """Add the committed shards not read yet, oldest first; a key already indexed keeps its first vector."""
        try:
            names = sorted(n[: -len(KEYS)] for n in os.listdir(self.directory) if n.endswith(KEYS))
        except (FileNotFoundError, NotADirectoryError):  # no folder yet: nothing cached
            return
        except OSError as e:
            raise UsageError(f"cannot read the embedding cache {self.directory}: {e.strerror or e}") from None
        keys, where = [], []
        for name in (n for n in names if n not in self._seen):
            self._seen.add(name)
            try:
                shard_keys, vectors = self._read_shard(name)
            except DamagedShard as e:
                print(f"warning: embedding cache {self.directory}: skipping damaged shard {name} ({e})",
                      file=sys.stderr)
                continue
            keys.append(shard_keys)
            where.append(self._add_vectors(vectors))
        if keys:
            self._index(np.concatenate(keys), np.concatenate(where))

    def _read_shard(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A shard's keys and memory-mapped vectors, as many rows as it has keys; DamagedShard if they do not fit."""
        try:
            raw = (self.directory / (name + KEYS)).read_bytes()
        except OSError as e:
            raise DamagedShard(f"keys unreadable: {e.strerror or e}") from None
        if not raw or len(raw) % KEY_BYTES:
            raise DamagedShard(f"keys file of {len(raw)} bytes, not a positive multiple of {KEY_BYTES}")
        try:
            vectors = np.load(self.directory / (name + VECTORS), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # missing, cut short or garbled
            why = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__  # numpy's first sentence
            raise DamagedShard(f"vectors unreadable: {why}") from None
        n = len(raw) // KEY_BYTES
        if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) < n:
            raise DamagedShard(f"{n} keys but {vectors.dtype} vectors of shape {vectors.shape}")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise DamagedShard(f"dimension {vectors.shape[1]}, not {self.dim} like the others")
        self.dim = vectors.shape[1]
        return np.frombuffer(raw, f"S{KEY_BYTES}"), vectors[:n]

    def _index(self, keys: np.ndarray, where: np.ndarray) -> None:
        """Merge entries into the sorted index; the first of equal keys wins, and keys already indexed stay."""
        order = np.argsort(keys, kind="stable")
        keys, where = keys[order], where[order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        if not first.all():
            keys, where = keys[first], where[first]
        if len(self._keys):
            found, pos = self._find(keys)
            keys = np.insert(self._keys, pos[~found], keys[~found])
            where = np.insert(self._where, pos[~found], where[~found])
        self._keys, self._where = keys, where

    def _write_shard(self, name: str, keys: bytes, vectors: np.ndarray) -> None:
        """Vectors, then keys, each written whole by data.write_atomic; a failure (a full disk, Ctrl-C) between the
        two removes the vectors file, so nothing half-written stays behind."""
        vectors_path, keys_path = self.directory / (name + VECTORS), self.directory / (name + KEYS)
        try:
            write_atomic(vectors_path, lambda f: np.save(f, vectors))
            write_atomic(keys_path, keys)
        except BaseException:
            if not keys_path.exists():
                with suppress(OSError):
                    vectors_path.unlink(missing_ok=True)
            raise


def _as_array(keys: list[bytes]) -> np.ndarray:
    """Keys as one numpy array of 32-byte strings (fixed-length strings compare like the raw bytes they hold)."""
    joined = b"".join(keys)
    if len(joined) != KEY_BYTES * len(keys):
        raise ValueError(f"cache keys are {KEY_BYTES}-byte digests from cache_key()")
    return np.frombuffer(joined, f"S{KEY_BYTES}")


def count_cached(keys: list[bytes], directory: str | Path) -> int:
    """How many distinct keys of `keys` the folder already holds: for an "N cached, M to encode" line."""
    cache = EmbeddingCache(directory)
    cache.load()
    return int(cache._find(np.unique(_as_array(keys)))[0].sum())
