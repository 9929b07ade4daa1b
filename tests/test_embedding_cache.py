"""The embedding cache shared by training and evaluation: concurrent writers, killed and failed writes, damaged files.

Run as a script (`python tests/test_embedding_cache.py FOLDER NAME ROUNDS`) it is one writer of the concurrency test.
"""

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import encoders
from data import UsageError, document_text
from embedding_cache import INDEX_FILE, VECTORS_FILE, EmbeddingCache, count_cached, text_hash

ROOT = Path(__file__).resolve().parent.parent
DIM = 384


def vectors_of(texts: list[str]) -> np.ndarray:
    """What a solo run stores for each text: a vector fixed by the text alone, so any mix-up of rows shows."""
    return np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:16], 16)).standard_normal(DIM)
                     for t in texts]).astype(np.float32)


def round_texts(name: str, r: int) -> list[str]:
    """Round r of a writer: 20 texts every writer adds (overlap) and 20 of its own (disjoint)."""
    return [f"shared text {r}.{i}" for i in range(20)] + [f"{name} text {r}.{i}" for i in range(20)]


def writer(folder: str, name: str, rounds: int) -> None:
    """One process of the concurrency test: each round is a run that loads, adds what is missing, saves, reads back."""
    for r in range(rounds):
        cache = EmbeddingCache(folder)
        cache.load()
        texts = round_texts(name, r)
        missing = [t for t in texts if {"text": t} not in cache]
        cache.add([{"text": t} for t in missing], vectors_of(missing))
        cache.save()
        got = np.stack([cache.get_vector({"text": t}) for t in texts])
        if not np.array_equal(got, vectors_of(texts)):
            sys.exit(f"{name}, round {r}: vectors read back differ from a solo run's")


class CountingEncoder:
    """Stands in for the sentence model in storage tests: the synthetic vectors, and a record of what it encoded."""

    def __init__(self):
        self.encoded = []

    def encode(self, texts, **kwargs):
        self.encoded += texts
        return vectors_of(texts)


class Killed(BaseException):
    """A kill at that instant: nothing after it runs except `finally` blocks."""


def loaded(folder) -> EmbeddingCache:
    cache = EmbeddingCache(folder)
    cache.load()
    return cache


def texts_of(cache: EmbeddingCache) -> dict:
    return {key: np.array(cache.vectors[row]) for key, row in cache.rows.items()}


def test_two_processes_writing_one_cache_each_get_what_a_solo_run_gets(tmp_path):
    folder, rounds = tmp_path / "cache", 40
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, str(folder), name, str(rounds)], env=env, stderr=subprocess.PIPE, text=True)
             for name in ("first", "second")]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    cache = loaded(folder)
    texts = list(dict.fromkeys(t for r in range(rounds) for name in ("first", "second") for t in round_texts(name, r)))
    assert len(cache) == len(texts) == rounds * 60  # nothing lost, nothing stored twice
    assert np.array_equal(np.stack([cache.get_vector({"text": t}) for t in texts]), vectors_of(texts))


def test_a_save_killed_between_vectors_and_index_loses_only_that_save(tmp_path, monkeypatch, capsys):
    folder, old, new = tmp_path / "cache", [f"old {i}" for i in range(30)], [f"new {i}" for i in range(10)]
    encoders.embed_texts(CountingEncoder(), old, folder)
    real_replace, replaced = os.replace, []

    def replace_then_die(src, dst):
        replaced.append(dst)
        if len(replaced) == 2:
            raise Killed  # the new vectors file is in place, its index is not
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(Killed):
        encoders.embed_texts(CountingEncoder(), old + new, folder)
    monkeypatch.undo()
    assert len(np.load(folder / VECTORS_FILE)) == 40  # the vectors really were written ahead of their index
    (folder / f"{INDEX_FILE}.99999.tmp").write_text('{"hashes": [')  # what a SIGKILL (no `finally`) leaves behind
    capsys.readouterr()

    assert set(loaded(folder).rows) == {text_hash({"text": t}) for t in old}
    encoder = CountingEncoder()
    embeddings = encoders.embed_texts(encoder, old + new, folder)
    assert encoder.encoded == new  # only what the killed save lost is encoded again
    assert np.array_equal(embeddings, vectors_of(old + new))
    assert "warning" not in capsys.readouterr().err
    assert not list(folder.glob("*.tmp"))
    assert len(np.load(folder / VECTORS_FILE)) == 40


@pytest.mark.parametrize("damage", ["empty index", "garbled index", "vectors cut short", "vectors missing",
                                    "index names more rows than the vectors hold", "dimensions disagree"])
def test_a_damaged_cache_is_rebuilt_with_one_warning_line(tmp_path, capsys, damage):
    folder, texts = tmp_path / "cache", [f"text {i}" for i in range(12)]
    encoders.embed_texts(CountingEncoder(), texts, folder)
    index, vectors = folder / INDEX_FILE, folder / VECTORS_FILE
    if damage == "empty index":
        index.write_text("")
    elif damage == "garbled index":
        index.write_text(index.read_text()[:100])
    elif damage == "vectors cut short":
        os.truncate(vectors, vectors.stat().st_size // 2)
    elif damage == "vectors missing":
        vectors.unlink()
    elif damage == "index names more rows than the vectors hold":
        np.save(vectors, vectors_of(texts[:5]))
    else:
        index.write_text(index.read_text().replace(f'"dim": {DIM}', '"dim": 7'))
    capsys.readouterr()

    encoder = CountingEncoder()
    embeddings = encoders.embed_texts(encoder, texts, folder)
    warning = capsys.readouterr().err.strip()
    assert len(warning.splitlines()) == 1 and str(folder) in warning and "rebuilding" in warning, warning
    assert encoder.encoded == texts and np.array_equal(embeddings, vectors_of(texts))
    assert len(loaded(folder)) == len(texts) and capsys.readouterr().err == ""  # rebuilt: whole again, no warning


@pytest.mark.parametrize("failing_file", [1, 2])  # the vectors file, the index
def test_a_full_disk_is_one_error_line_and_leaves_the_cache_as_it_was(tmp_path, monkeypatch, failing_file):
    folder, old, new = tmp_path / "cache", [f"old {i}" for i in range(8)], [f"new {i}" for i in range(4)]
    encoders.embed_texts(CountingEncoder(), old, folder)
    before = texts_of(loaded(folder))
    real_fsync, synced = os.fsync, []

    def fsync_on_a_full_disk(fd):
        synced.append(fd)
        if len(synced) == failing_file:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    with pytest.raises(UsageError) as error:
        encoders.embed_texts(CountingEncoder(), old + new, folder)
    monkeypatch.undo()
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and "No space left on device" in message
    assert not list(folder.glob("*.tmp"))
    after = texts_of(loaded(folder))
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


def test_an_unwritable_folder_and_a_wrong_dimension_are_one_error_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UsageError, match="cannot write the embedding cache .*a_file"):
        encoders.embed_texts(CountingEncoder(), ["a text"], tmp_path / "a_file" / "cache")

    folder = tmp_path / "cache"
    encoders.embed_texts(CountingEncoder(), ["a text"], folder)
    with pytest.raises(UsageError, match=f"{folder} holds {DIM}-dimensional vectors, not 8"):
        loaded(folder).add([{"text": "another"}], np.zeros((1, 8)))
    stale = EmbeddingCache(folder)  # loaded while empty, saved after another process filled the folder
    stale.add([{"text": "another"}], np.zeros((1, 8)))
    with pytest.raises(UsageError, match=f"{folder} holds {DIM}-dimensional vectors, not 8"):
        stale.save()


def test_count_cached_counts_distinct_texts_in_any_folder(tmp_path):
    encoders.embed_texts(CountingEncoder(), ["a", "b"], tmp_path / "one")
    encoders.embed_texts(CountingEncoder(), ["b", "c"], tmp_path / "two")
    assert count_cached(["a", "a", "c", "d"], tmp_path / "one", tmp_path / "two", tmp_path / "absent") == 2
    assert count_cached(["a"], tmp_path / "absent") == 0


def test_through_mteb_each_text_is_encoded_once_and_training_reads_the_evaluations_cache(tmp_path, model):
    import mteb
    from datasets import Dataset
    from mteb._create_dataloaders import create_dataloader
    from mteb.models.cache_wrappers import CachedEmbeddingWrapper
    from mteb.models.cache_wrappers.cache_backend_protocol import CacheBackendProtocol
    from mteb.types import PromptType

    class MustNotEncode:
        mteb_model_meta = None

        def encode(self, *args, **kwargs):
            raise AssertionError("a cached text was encoded again")

    assert isinstance(EmbeddingCache(tmp_path), CacheBackendProtocol)
    task = mteb.get_task("SciFact")
    docs = {"d1": ("Tides", "Ocean tides are caused by the moon."), "d2": ("", "Yeast makes bread rise."),
            "d3": ("Insulin", "Insulin lowers blood sugar.")}
    corpus = Dataset.from_dict({"id": list(docs), "title": [t for t, _ in docs.values()], "text": [x for _, x in docs.values()]})
    encode = lambda encoder: CachedEmbeddingWrapper(encoder, tmp_path / "cache", cache_backend=EmbeddingCache).encode(  # noqa: E731
        create_dataloader(corpus, task_metadata=task.metadata, prompt_type=PromptType.document),
        task_metadata=task.metadata, hf_split="test", hf_subset="default", prompt_type=PromptType.document)
    first = encode(mteb.models.SentenceTransformerEncoderWrapper(model))
    assert np.array_equal(encode(MustNotEncode()), first)  # a rerun reads every vector back, bit for bit
    texts = [document_text({"title": t, "text": x}) for t, x in docs.values()]  # as training builds them
    assert count_cached(texts, tmp_path / "cache" / "SciFact" / "document") == 3
    training = encoders.embed_texts(None, texts, tmp_path / "training", also=[tmp_path / "cache" / "SciFact" / "document"])
    assert np.array_equal(training, first)


if __name__ == "__main__":
    writer(sys.argv[1], sys.argv[2], int(sys.argv[3]))
