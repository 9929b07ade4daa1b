"""The append-only embedding cache: round trip, prompts in the key, concurrent writers, killed writers, damaged shards,
a full disk.

Run as a script it is a child process of these tests:
`python tests/test_embedding_cache.py writer FOLDER NAME ROUNDS` is one of the concurrent writers;
`python tests/test_embedding_cache.py appender FOLDER KILL_AT` appends 10-key shards until it is killed (by the test, or
by itself with SIGKILL at its KILL_AT-th os.replace when KILL_AT > 0), printing how many shards it has committed.
"""

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import count
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs without conftest.py, and as a child script

from data import UsageError  # noqa: E402
from embedding_cache import EmbeddingCache, cache_key, count_cached  # noqa: E402

DIM = 16


def vectors_of(keys: list[bytes], dim: int = DIM) -> np.ndarray:
    """What a solo writer stores for each key: a vector fixed by the key alone, so any mix-up of rows shows."""
    return np.stack([np.random.default_rng(int.from_bytes(k[:8], "little")).standard_normal(dim, np.float32)
                     for k in keys]) if keys else np.zeros((0, dim), np.float32)


def keys_of(texts, prompt: str = "") -> list[bytes]:
    return [cache_key(prompt, t) for t in texts]


def loaded(folder) -> EmbeddingCache:
    cache = EmbeddingCache(folder)
    cache.load()
    return cache


def round_keys(name: str, r: int) -> list[bytes]:
    """Round r of a writer: 15 keys every writer appends (overlap) and 15 of its own (disjoint)."""
    return keys_of([f"shared {r}.{i}" for i in range(15)] + [f"{name} {r}.{i}" for i in range(15)])


def writer(folder: str, name: str, rounds: int) -> None:
    """One concurrent writer: a fresh load every other round (a new run), the same object in between (a long run)."""
    deadline = time.monotonic() + 60
    while not Path(folder + ".go").exists() and time.monotonic() < deadline:  # start together, to really overlap
        time.sleep(0.005)
    for r in range(rounds):
        if r % 2 == 0:
            cache = loaded(folder)
        keys = round_keys(name, r)
        todo = [keys[i] for i in cache.missing(keys)]
        cache.append(todo, vectors_of(todo))
        if not np.array_equal(cache.get(keys), vectors_of(keys)):
            sys.exit(f"{name}, round {r}: vectors read back differ from a solo writer's")


def shard_keys(s: int) -> list[bytes]:
    return keys_of([f"shard {s} text {i}" for i in range(10)])


def appender(folder: str, kill_at: int) -> None:
    """Append shard after shard; with kill_at, die by SIGKILL (no cleanup runs) at that os.replace call."""
    if kill_at:
        real_replace, calls = os.replace, count(1)
        kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
        os.replace = lambda src, dst: kill() if next(calls) == kill_at else real_replace(src, dst)
    cache = EmbeddingCache(folder)
    for s in count():
        cache.append(shard_keys(s), vectors_of(shard_keys(s)))
        print(s + 1, flush=True)


def child(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def write_shard(folder: Path, name: str, keys: bytes, vectors) -> None:
    """A shard written by hand, as damage would leave it: the vectors (an array, or raw bytes), then the keys."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(vectors, bytes):
        (folder / f"{name}.vectors.npy").write_bytes(vectors)
    else:
        np.save(folder / f"{name}.vectors.npy", vectors)
    (folder / f"{name}.keys").write_bytes(keys)


def test_a_fresh_load_returns_the_vectors_in_the_asked_order_and_says_what_is_missing(tmp_path):
    folder = tmp_path / "cache"
    keys = keys_of(f"text {i}" for i in range(40)) + [bytes(32), bytes(31) + b"\x01"]  # digests may end in zero bytes
    writing = EmbeddingCache(folder)
    writing.load()
    writing.append(keys[:25], vectors_of(keys[:25]))
    writing.append(keys[20:], vectors_of(keys[20:]))  # 20..24 are cached already: skipped
    writing.append(keys[:5], vectors_of(keys[:5]))  # all cached: no shard
    assert len(list(folder.glob("*.keys"))) == 2 and len(writing) == len(keys)

    cache = loaded(folder)
    order = np.random.default_rng(0).permutation(len(keys))
    asked = [keys[i] for i in order] + [keys[3]]
    got = cache.get(asked)
    assert got.dtype == np.float32 and np.array_equal(got, vectors_of(asked))
    got[:] = 0  # a new array, not a view of the files
    assert np.array_equal(cache.get(asked), vectors_of(asked))
    assert len(cache) == len(keys) and cache.dim == DIM and keys[7] in cache

    absent = keys_of(["absent 1", "absent 2"])
    assert cache.missing([keys[0], absent[0], keys[1], absent[1]]) == [1, 3]
    with pytest.raises(KeyError, match="2 of 3 keys"):
        cache.get([absent[0], keys[0], absent[1]])
    assert count_cached([keys[0], keys[0], keys[30], absent[0]], folder) == 2
    assert count_cached(keys, tmp_path / "absent") == 0


def test_the_prompt_is_part_of_the_key_and_an_old_cache_reads_as_empty(tmp_path, capsys):
    folder, texts = tmp_path / "cache", ["what causes tides?", "insulin lowers blood sugar"]
    old = np.random.default_rng(0).standard_normal((2, DIM)).astype(np.float32)  # as the old cache wrote its folder
    folder.mkdir()
    np.save(folder / "embeddings.npy", old)
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    (folder / "embeddings.json").write_text(json.dumps({"dtype": "float32", "dim": DIM, "hashes": hashes}))

    cache = loaded(folder)
    assert len(cache) == 0 and cache.dim is None and count_cached(keys_of(texts), folder) == 0
    assert capsys.readouterr().err == ""  # not even a warning: the old files are simply not the cache's
    assert not {k.hex() for k in keys_of(texts) + keys_of(texts, "query: ")} & set(hashes)

    query_keys, document_keys = keys_of(texts, "query: "), keys_of(texts)
    assert not set(query_keys) & set(document_keys)
    cache.append(query_keys, vectors_of(query_keys))
    assert cache.missing(document_keys) == [0, 1]
    cache.append(document_keys, vectors_of(document_keys))
    fresh = loaded(folder)
    assert len(fresh) == 4
    assert np.array_equal(fresh.get(query_keys), vectors_of(query_keys))
    assert np.array_equal(fresh.get(document_keys), vectors_of(document_keys))
    assert np.array_equal(np.load(folder / "embeddings.npy"), old)  # the old files are left alone


def test_three_processes_appending_at_once_lose_nothing_and_mix_nothing(tmp_path):
    folder, names, rounds = tmp_path / "cache", ["first", "second", "third"], 12
    procs = [child("writer", folder, name, rounds) for name in names]
    (tmp_path / "cache.go").touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    keys = list(dict.fromkeys(k for r in range(rounds) for name in names for k in round_keys(name, r)))
    cache = loaded(folder)
    assert len(cache) == len(keys) == rounds * 60
    assert np.array_equal(cache.get(keys), vectors_of(keys))


def test_a_writer_killed_at_random_keeps_every_shard_it_committed(tmp_path, capsys):
    folder = tmp_path / "cache"
    proc, committed = child("appender", folder, 0), 0
    try:
        while committed < 5:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            committed = int(line)
    finally:
        proc.kill()  # SIGKILL, wherever it is in its next append
        proc.wait(timeout=30)
    cache = loaded(folder)
    shards = len(cache) // 10
    assert shards >= committed and len(cache) == shards * 10
    keys = [k for s in range(shards) for k in shard_keys(s)]
    assert np.array_equal(cache.get(keys), vectors_of(keys))

    (folder / "1-1-1.keys.tmp").write_bytes(b"\x01" * 33)  # what a writer killed before its renames leaves
    (folder / "1-1-1.vectors.npy.tmp").write_bytes(b"\x93NUMPY garbage")
    np.save(folder / "2-2-2.vectors.npy", vectors_of(shard_keys(999)))  # killed between its two renames
    again = loaded(folder)
    assert len(again) == len(cache) and np.array_equal(again.get(keys), vectors_of(keys))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kill_at", [5, 6])  # shard 3's os.replace of its vectors file, of its keys file
def test_a_writer_killed_inside_an_append_leaves_no_damage(tmp_path, capsys, kill_at):
    folder = tmp_path / "cache"
    proc = child("appender", folder, kill_at)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and out.split() == ["1", "2"], err
    committed = {p.name.replace(".keys", suffix) for p in folder.glob("*.keys") for suffix in (".keys", ".vectors.npy")}
    assert len(committed) == 4 and set(os.listdir(folder)) - committed  # it did leave a file behind
    cache = loaded(folder)
    keys = shard_keys(0) + shard_keys(1)
    assert len(cache) == 20 and np.array_equal(cache.get(keys), vectors_of(keys))
    assert capsys.readouterr().err == ""
    cache.append(shard_keys(2), vectors_of(shard_keys(2)))  # the texts the kill lost are simply encoded again
    assert np.array_equal(loaded(folder).get(shard_keys(2)), vectors_of(shard_keys(2)))


def test_each_damaged_shard_is_skipped_with_one_warning_line(tmp_path, capsys):
    folder = tmp_path / "cache"
    good, *damaged = [keys_of([f"shard {s} text {i}" for i in range(4)]) for s in range(7)]
    loaded(folder).append(good, vectors_of(good))  # the oldest shard: its dimension is the cache's
    write_shard(folder, "9-keys-cut", b"".join(damaged[0])[:-5], vectors_of(damaged[0]))
    write_shard(folder, "9-vectors-cut", b"".join(damaged[1]), next(folder.glob("0*.vectors.npy")).read_bytes()[:150])
    write_shard(folder, "9-vectors-garbage", b"".join(damaged[2]), b"not a numpy file at all")
    write_shard(folder, "9-other-dimension", b"".join(damaged[3]), vectors_of(damaged[3], DIM + 1))
    write_shard(folder, "9-fewer-rows", b"".join(damaged[4]), vectors_of(damaged[4][:3]))
    write_shard(folder, "9-float64", b"".join(damaged[5]), vectors_of(damaged[5]).astype(np.float64))
    capsys.readouterr()

    cache = loaded(folder)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 6 and all(w.startswith(f"warning: embedding cache {folder}: skipping damaged shard 9-")
                                      for w in warnings), warnings
    assert len(cache) == 4 and cache.dim == DIM and np.array_equal(cache.get(good), vectors_of(good))
    lost = [k for keys in damaged for k in keys]
    assert cache.missing(lost) == list(range(len(lost)))
    cache.append(lost, vectors_of(lost))  # encoded again, into a shard of its own
    assert np.array_equal(loaded(folder).get(good + lost), vectors_of(good + lost))


@pytest.mark.parametrize("failing_fsync", [1, 3])  # the vectors file, the keys file
def test_a_full_disk_is_one_error_line_and_leaves_the_folder_as_it_was(tmp_path, monkeypatch, failing_fsync):
    folder, old, new = tmp_path / "cache", keys_of(f"old {i}" for i in range(8)), keys_of(f"new {i}" for i in range(4))
    cache = loaded(folder)
    cache.append(old, vectors_of(old))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_fsync, calls = os.fsync, count(1)

    def fsync_on_a_full_disk(fd):
        if next(calls) == failing_fsync:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    with pytest.raises(UsageError) as error:
        cache.append(new, vectors_of(new))
    monkeypatch.undo()
    assert re.fullmatch(rf"cannot write {folder}/\S+\.(vectors\.npy|keys) \(No space left on device\)", str(error.value))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no .tmp, no orphan vectors file
    assert cache.missing(new) == [0, 1, 2, 3] and np.array_equal(loaded(folder).get(old), vectors_of(old))

    (tmp_path / "a_file").write_text("")
    unwritable = tmp_path / "a_file" / "cache"
    with pytest.raises(UsageError) as error:
        loaded(unwritable).append(new, vectors_of(new))
    assert str(error.value).startswith(f"cannot write {unwritable}/") and str(error.value).endswith("(Not a directory)")


def test_a_different_dimension_is_one_error_line(tmp_path):
    folder, keys = tmp_path / "cache", keys_of(["a", "b"])
    stale = loaded(folder)  # loaded while empty, appends after another process set the dimension
    loaded(folder).append(keys[:1], vectors_of(keys[:1]))
    for cache in (loaded(folder), stale):
        with pytest.raises(UsageError) as error:
            cache.append(keys[1:], np.zeros((1, 8)))
        assert str(error.value) == (f"embedding cache {folder} holds {DIM}-dimensional vectors, not 8: "
                                    f"delete {folder} or use another --cache-dir")
    assert len(list(folder.glob("*.keys"))) == 1


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        appender(sys.argv[2], int(sys.argv[3]))
