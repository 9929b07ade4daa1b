"""The search benchmark: its summary, its Hamming search against a direct popcount, rescoring against exact search,
and its command line. Real code at small N; no timing asserts (times depend on the machine)."""

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

import bench_search as bs
import methods
import quantization_modules as qm
from quantization_modules import QuantizationModuleStage1, QuantizationModuleStage2, UsageError

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"n", "float_single_ms", "binary_single_ms", "float_batch_s", "binary_batch_s", "rescore_single_ms",
        "float_bytes", "binary_bytes"}
OPTIONAL_KEYS = {"stage2_single_ms", "stage2_batch_s", "stage2_bytes", "rescore_batch_s"} | {
    f"{key}_{timing}_layout" for key in ("float", "binary", "stage2", "rescore") for timing in ("single", "batch")}


def unit_vectors(n, seed, dim=384):
    return bs.random_unit_vectors(n, dim, np.random.default_rng(seed))


def test_run_reports_every_key_with_bytes_per_vector():
    result = bs.run(n=2000, queries=20, single=5)
    assert KEYS <= set(result) <= KEYS | OPTIONAL_KEYS
    assert result["n"] == 2000
    assert (result["float_bytes"], result["binary_bytes"], result["stage2_bytes"]) == (1536, 48, 36)
    times = [v for k, v in result.items() if k.endswith(("_ms", "_s"))]
    assert len(times) == 8 and all(t > 0 for t in times)
    assert {v for k, v in result.items() if k.endswith("_layout")} <= {"1 index", "2 shards"}
    one_index = bs.run(n=2000, queries=20, single=5, shards=1)
    assert {v for k, v in one_index.items() if k.endswith("_layout")} == {"1 index"}


def test_codes_are_the_quantisers_bits_packed():
    x = unit_vectors(300, seed=1)
    stage1, stage2 = bs.encode(QuantizationModuleStage1(384), x), bs.encode(QuantizationModuleStage2(384), x)
    assert stage1.dtype == np.uint8 and stage1.shape == (300, 48) and stage2.shape == (300, 36)
    np.testing.assert_array_equal(stage1, methods.pack_codes(x > 0))  # zero thresholds: sign bits


def test_binary_index_hamming_equals_direct_popcount():
    docs, queries = unit_vectors(500, seed=2), unit_vectors(8, seed=3)
    d, q = methods.pack_codes(docs > 0), methods.pack_codes(queries > 0)
    distances, ids = methods.build_binary_index(d).search(q, 10)
    popcount = np.unpackbits(q[:, None, :] ^ d[None, :, :], axis=2).sum(axis=2, dtype=np.int64)
    np.testing.assert_array_equal(distances, np.sort(popcount, axis=1)[:, :10])
    np.testing.assert_array_equal(np.take_along_axis(popcount, ids, 1), distances)  # ids point at those codes


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_layout_finds_what_one_index_finds(shards):
    docs, queries = unit_vectors(1000, seed=7), unit_vectors(8, seed=8)
    flat = bs.float_index(docs)
    flat_shards = bs.sharded(faiss.IndexShards, bs.float_index, docs, shards)
    np.testing.assert_array_equal(flat_shards.search(queries, 10)[1], flat.search(queries, 10)[1])
    codes, query_codes = methods.pack_codes(docs > 0), methods.pack_codes(queries > 0)
    binary = methods.build_binary_index(codes).search(query_codes, 10)
    binary_shards = bs.sharded(faiss.IndexBinaryShards, methods.build_binary_index, codes, shards)
    assert binary_shards.ntotal == 1000
    distances, ids = binary_shards.search(query_codes, 10)
    np.testing.assert_array_equal(distances, binary[0])  # ties may come back in another order; distances may not
    popcount = np.unpackbits(query_codes[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2, dtype=np.int64)
    np.testing.assert_array_equal(np.take_along_axis(popcount, ids, 1), distances)  # global ids, not shard-local


def test_rescoring_every_document_equals_exact_float_search():
    docs, queries = unit_vectors(500, seed=4), unit_vectors(8, seed=5)
    flat = faiss.IndexFlatIP(384)
    flat.add(docs)
    exact_scores, exact_ids = flat.search(queries, 10)
    stage1 = QuantizationModuleStage1(384)
    index = methods.build_binary_index(bs.encode(stage1, docs))
    scores, ids = methods.rescore_search(index, docs, queries, bs.encode(stage1, queries), k=len(docs), top=10)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)


def test_rescoring_a_head_keeps_the_rest_of_the_hamming_list():
    docs, queries = unit_vectors(500, seed=4), unit_vectors(8, seed=5)
    stage1 = QuantizationModuleStage1(384)
    index, query_codes = methods.build_binary_index(bs.encode(stage1, docs)), bs.encode(stage1, queries)
    _, hamming_ids = index.search(query_codes, 100)
    scores, ids = methods.rescore_search(index, docs, queries, query_codes, k=20, top=100)
    assert ids.shape == scores.shape == (8, 100)
    np.testing.assert_array_equal(ids[:, 20:], hamming_ids[:, 20:])  # ranks 21..100: the Hamming list
    head_scores = np.einsum("qd,qkd->qk", queries, docs[hamming_ids[:, :20]])
    np.testing.assert_allclose(scores[:, :20], -np.sort(-head_scores, axis=1), rtol=1e-5, atol=1e-6)  # the head: float order
    assert set(ids[0, :20]) == set(hamming_ids[0, :20])
    assert (np.diff(scores, axis=1) <= 0).all() and (np.diff(scores[:, 19:], axis=1) < 0).all()  # one ranking, ties only in the head


def test_embeddings_file_is_used_and_checked(tmp_path):
    path = tmp_path / "emb.npy"
    np.save(path, 3 * unit_vectors(100, seed=6))  # not unit length: the benchmark normalises rows
    docs, queries = bs.load_data(100, 384, 7, seed=0, embeddings=path)
    assert docs.dtype == np.float32 and docs.shape == (100, 384) and queries.shape == (7, 384)
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, rtol=1e-5)
    assert bs.run(n=50, queries=5, single=2, embeddings=path)["n"] == 50
    with pytest.raises(UsageError, match="more than the 100 rows"):
        bs.load_data(101, 384, 7, seed=0, embeddings=path)
    with pytest.raises(UsageError, match="shape"):
        bs.load_data(100, 768, 7, seed=0, embeddings=path)
    np.savez(tmp_path / "emb.npz", x=unit_vectors(100, seed=6))
    with pytest.raises(UsageError, match="an .npz archive"):
        bs.load_data(100, 384, 7, seed=0, embeddings=tmp_path / "emb.npz")


def bench(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench_search.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_command_line_ends_with_one_json_line():
    proc = bench("--n", "2000", "--queries", "20", "--single", "5")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result) and result["n"] == 2000
    assert "| float32 IndexFlatIP" in proc.stdout


@pytest.mark.parametrize("args", [["--n", "5"], ["--dim", "386", "--n", "100"], ["--rescore-k", "5", "--n", "100"],
                                  ["--n", "100", "--embeddings", "no/such/file.npy"],
                                  ["--n", "100", "--shards", "0"], ["--n", "abc"]])
def test_bad_input_is_one_error_line(args):
    proc = bench(*args)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
