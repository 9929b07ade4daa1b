"""The search benchmark: its summary, each method's search against an independent reference (direct popcount, brute
force over faiss's own reconstructions, faiss.IndexShards), bytes as faiss stores them, the timing protocol, and its
command line. Real code at small N; no timing asserts (times depend on the machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

import bench_search as bs
import methods
from data import UsageError
from quantization_modules import QuantizationModuleStage1, QuantizationModuleStage2

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"n", "bandwidth_gbs", "float_floor_ms", "binary_floor_ms"} | {
    f"{key}_{what}" for key in ("float", "binary", "stage2", "rescore")
    for what in ("single_ms", "single_layout", "batch_s", "batch_layout")} | {
    f"{key}_bytes" for key in ("float", "binary", "stage2")}
CONFIGS = {bs.config_name(shards, threads) for shards in (1, 2) for threads in (1, bs.THREADS)}
EXACT = ["int8", "int4", "pq"]  # faiss scores the float query against the decoded codes: brute force must agree
APPROXIMATE = ["pq_fastscan", "rabitq", "rabitq_fastscan"]  # quantised query or look-up tables: scores approximate


def unit_vectors(n, seed, dim=384):
    return bs.random_unit_vectors(n, dim, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def corpus():
    """Documents, and queries that are documents 0..19 plus a little noise (each has a planted nearest neighbour)."""
    docs = unit_vectors(3200, seed=11)  # a multiple of 32: fast-scan indexes store whole blocks of 32 codes
    noise = 0.02 * np.random.default_rng(12).standard_normal((20, 384), dtype=np.float32)
    return docs, bs.normalise_rows(docs[:20] + noise)


@pytest.fixture(scope="module")
def trained(corpus):
    docs, _ = corpus
    return {key: bs.trained_family(key, docs, np.random.default_rng(0)) for key in bs.FAMILIES}


def test_run_reports_the_json_keys_and_best_configurations(monkeypatch):
    monkeypatch.setattr(bs, "BANDWIDTH_BYTES", 2**24)
    result = bs.run(n=2000, queries=20, single=3, shards=2)
    assert set(result) == KEYS and result["n"] == 2000
    assert (result["float_bytes"], result["binary_bytes"], result["stage2_bytes"]) == (1536, 48, 36)
    assert all(result[k] > 0 for k in KEYS if k.endswith(("_ms", "_s", "_gbs")))
    assert {v for k, v in result.items() if k.endswith("_layout")} <= CONFIGS
    floor = 2000 * np.array([1536, 48]) / (result["bandwidth_gbs"] * 1e9) * 1000
    np.testing.assert_allclose([result["float_floor_ms"], result["binary_floor_ms"]], floor, rtol=1e-9)
    one_index = bs.run(n=2000, queries=20, single=3, shards=1)
    assert {v for k, v in one_index.items() if k.endswith("_layout")} <= {c for c in CONFIGS if "index" in c}


def test_bytes_per_vector_are_what_faiss_stores(corpus, trained):
    docs, queries = corpus
    rows = {m["key"]: m for m in bs.build_methods(docs, queries, 50, 1, np.random.default_rng(0))}
    n = len(docs)
    assert [(rows[k]["bytes"], rows[k]["reads"]) for k in ("float", "binary", "stage2", "rescore", "rescore_int8")] == [
        (1536, n * 1536), (48, n * 48), (36, n * 36), (48 + 1536, n * 48 + 50 * 1536), (48 + 384, n * 48 + 50 * 384)]
    for key in bs.FAMILIES:
        index = bs.filled(trained[key], docs)
        stored = faiss.vector_to_array(index.codes).nbytes  # the codes faiss keeps, per-vector factors included
        assert rows[key]["bytes"] == index.code_size == index.sa_code_size() == stored // n, key
    assert rows["rabitq"]["bytes"] == rows["rabitq_fastscan"]["bytes"] == 48 + 8  # 1 bit per dimension + factors
    assert (rows["int8"]["bytes"], rows["int4"]["bytes"], rows["pq"]["bytes"], rows["pq_fastscan"]["bytes"]) == (
        384, 192, 48, 48)


def test_every_method_in_every_layout_searches_what_it_names(corpus, trained):
    docs, queries = corpus
    stage1, stage2 = QuantizationModuleStage1(384), QuantizationModuleStage2(384)
    binary = methods.build_binary_index(bs.encode(stage1, docs))
    int8_rows = bs.decoded_rows(trained["int8"], trained["int8"].sa_encode(docs))
    expected = {  # each method built directly, one index
        "float": bs.float_index(docs).search(queries, 10),
        "binary": binary.search(bs.encode(stage1, queries), 10),
        "stage2": methods.build_binary_index(bs.encode(stage2, docs)).search(bs.encode(stage2, queries), 10),
        "rescore": methods.rescore_search(binary, docs, queries, bs.encode(stage1, queries), 50, 10),
        "rescore_int8": methods.rescore_search(binary, int8_rows, queries, bs.encode(stage1, queries), 50, 10),
    } | {key: bs.filled(trained[key], docs).search(queries, 10) for key in bs.FAMILIES}
    built = bs.build_methods(docs, queries, 50, 2, np.random.default_rng(0))
    assert [m["key"] for m in built] == list(expected)
    for m in built:
        for shards, search in m["search"].items():
            distances, ids = search(slice(0, len(queries)))
            np.testing.assert_allclose(distances, expected[m["key"]][0], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{m['key']}, {shards} shard(s)")
            assert (ids[:, 0] == np.arange(len(queries))).mean() >= 0.9, m["key"]  # the planted neighbour


def brute_force_on_reconstructions(index, docs, queries, top=10):
    scores = queries @ index.sa_decode(index.sa_encode(docs)).T
    return scores, np.argsort(-scores, axis=1, kind="stable")[:, :top]


@pytest.mark.parametrize("key", EXACT)
def test_exact_families_equal_brute_force_on_their_reconstructions(corpus, trained, key):
    docs, queries = corpus
    distances, ids = bs.filled(trained[key], docs).search(queries, 10)
    scores, reference = brute_force_on_reconstructions(trained[key], docs, queries)
    np.testing.assert_allclose(distances, np.take_along_axis(scores, reference, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(scores, ids, 1), distances, rtol=1e-4, atol=1e-5)  # ids are those


@pytest.mark.parametrize("key", APPROXIMATE)
def test_approximate_families_find_what_their_reconstructions_rank_first(corpus, trained, key):
    docs, queries = corpus
    _, ids = bs.filled(trained[key], docs).search(queries, 10)
    _, reference = brute_force_on_reconstructions(trained[key], docs, queries)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.95  # the planted neighbour
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, reference)])
    assert overlap >= 0.5, overlap  # a wrong metric, query or training scores near 0.0 (random codes: 0.003)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("key", ["float", "binary", "int8", "pq_fastscan", "rabitq_fastscan"])
def test_shards_find_what_faiss_index_shards_and_one_index_find(corpus, trained, key, threads):
    docs, queries = corpus
    if key == "binary":
        rows, queries, build, reference = methods.pack_codes(docs > 0), methods.pack_codes(queries > 0), \
            methods.build_binary_index, faiss.IndexBinaryShards(384, True, True)
    else:
        build = bs.float_index if key == "float" else lambda part: bs.filled(trained[key], part)
        rows, reference = docs, faiss.IndexShards(384, True, True)
    parts = [build(part) for part in np.array_split(rows, 2)]
    for part in parts:
        reference.add_shard(part)
    faiss.omp_set_num_threads(threads)
    try:
        distances, ids = bs.Shards(parts).search(queries, 10)
    finally:
        faiss.omp_set_num_threads(bs.THREADS)
    expected, _ = reference.search(queries, 10)
    np.testing.assert_allclose(distances, expected, rtol=1e-6)  # ties may come back in another order; scores may not
    np.testing.assert_allclose(distances, build(rows).search(queries, 10)[0], rtol=1e-5, atol=1e-6)  # as one index
    first = len(np.array_split(rows, 2)[0])
    own = [part.search(queries, 10) for part in parts]  # each shard's own top-10, in its local ids
    for q, (row_distances, row_ids) in enumerate(zip(distances, ids)):
        for distance, i in zip(row_distances, row_ids):  # every merged result is its shard's, at a global id
            shard, local = int(i >= first), i - first * int(i >= first)
            hit = own[shard][1][q] == local
            assert hit.any() and np.isclose(own[shard][0][q][hit][0], distance, rtol=1e-6)
    assert ids.max() >= first


def test_shards_search_with_the_callers_thread_count():
    seen = []

    class Part:  # records the OpenMP thread count its search runs with
        ntotal = 5

        def search(self, x, k):
            seen.append(faiss.omp_get_max_threads())
            return np.zeros((len(x), k), np.float32), np.zeros((len(x), k), np.int64)

    shards = bs.Shards([Part(), Part(), Part()])
    for threads in (1, 2, 1):
        faiss.omp_set_num_threads(threads)
        shards.search(np.zeros((1, 4), np.float32), 3)
        assert seen[-3:] == [threads] * 3  # faiss.IndexShards' workers would keep OpenMP's default
    faiss.omp_set_num_threads(bs.THREADS)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = [thread.submit(os.sched_getaffinity, 0).result() for thread in shards.threads]
    assert pinned == [{cpus[1 % len(cpus)]}, {cpus[2 % len(cpus)]}]  # shard j's thread on the j-th CPU
    assert os.sched_getaffinity(0) == set(cpus)  # the caller (shard 0) is not pinned


def test_int8_rescoring_of_every_document_equals_brute_force_on_decoded_int8(corpus, trained):
    docs, queries = corpus
    codes = trained["int8"].sa_encode(docs)
    stage1 = QuantizationModuleStage1(384)
    index = methods.build_binary_index(bs.encode(stage1, docs))
    scores, ids = methods.rescore_search(index, bs.decoded_rows(trained["int8"], codes), queries,
                                         bs.encode(stage1, queries), k=len(docs), top=10)
    reference = queries @ trained["int8"].sa_decode(codes).T
    np.testing.assert_allclose(scores, -np.sort(-reference, axis=1)[:, :10], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(reference, ids, 1), scores, rtol=1e-5, atol=1e-6)


def test_one_query_calls_take_turns_with_their_thread_count():
    calls = []

    def search(name):
        return lambda rows: calls.append((name, rows.start, rows.stop, faiss.omp_get_max_threads()))

    timings = bs.time_searches([(search("a"), 1), (search("b"), 2)], single=2, batch_sizes=[7, 3])
    assert calls == [("a", 0, 1, 1), ("b", 0, 1, 2),  # warm-up
                     ("a", 0, 1, 1), ("b", 0, 1, 2), ("a", 1, 2, 1), ("b", 1, 2, 2),  # query i on each, then i + 1
                     ("a", 0, 7, 1), ("b", 0, 3, 2)]  # the batches
    assert len(timings) == 2 and all(ms > 0 and s > 0 for ms, s in timings)


def test_bandwidth_is_measured_per_thread_count():
    assert 0 < bs.read_bandwidth(1, 2**24, 2) < 1e4
    assert 0 < bs.read_bandwidth(2, 2**24, 2) < 1e4


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


def test_rescoring_every_document_equals_exact_float_search():
    docs, queries = unit_vectors(500, seed=4), unit_vectors(8, seed=5)
    exact_scores, exact_ids = bs.float_index(docs).search(queries, 10)
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
    np.testing.assert_allclose(scores[:, :20], -np.sort(-head_scores, axis=1), rtol=1e-5, atol=1e-6)  # float order
    assert set(ids[0, :20]) == set(hamming_ids[0, :20])
    assert (np.diff(scores, axis=1) <= 0).all() and (np.diff(scores[:, 19:], axis=1) < 0).all()  # one ranking


def test_embeddings_file_is_used_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "BANDWIDTH_BYTES", 2**24)
    path = tmp_path / "emb.npy"
    np.save(path, 3 * unit_vectors(300, seed=6))  # not unit length: the benchmark normalises rows
    docs, queries = bs.load_data(300, 384, 7, seed=0, embeddings=path)
    assert docs.dtype == np.float32 and docs.shape == (300, 384) and queries.shape == (7, 384)
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, rtol=1e-5)
    assert bs.run(n=280, queries=5, single=2, embeddings=path)["n"] == 280
    with pytest.raises(UsageError, match="more than the 300 rows"):
        bs.load_data(301, 384, 7, seed=0, embeddings=path)
    with pytest.raises(UsageError, match="shape"):
        bs.load_data(300, 768, 7, seed=0, embeddings=path)
    np.savez(tmp_path / "emb.npz", x=unit_vectors(100, seed=6))
    with pytest.raises(UsageError, match="an .npz archive"):
        bs.load_data(100, 384, 7, seed=0, embeddings=tmp_path / "emb.npz")


def bench(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench_search.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_command_line_ends_with_one_json_line():
    proc = bench("--n", "2000", "--queries", "20", "--single", "3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == KEYS and result["n"] == 2000
    for name in ("float32 IndexFlatIP", "int8 IndexScalarQuantizer", "PQ 4-bit IndexPQFastScan",
                 "RaBitQ IndexRaBitQFastScan", "stage1 top-50 + int8 rescore"):
        assert f"| {name}" in proc.stdout


@pytest.mark.parametrize("args", [["--n", "100"], ["--dim", "386", "--n", "300"], ["--dim", "388", "--n", "300"],
                                  ["--rescore-k", "5", "--n", "300"], ["--n", "300", "--embeddings", "no/such.npy"],
                                  ["--n", "300", "--shards", "0"], ["--n", "300", "--shards", "31"], ["--n", "abc"]])
def test_bad_input_is_one_error_line(args):
    proc = bench(*args)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_a_small_n_without_rescore_k_names_n_not_the_default_rescore_k():
    """`--n 15` alone: the one thing wrong is --n; the default --rescore-k (50 > 15) is not the user's to fix."""
    with pytest.raises(SystemExit) as exit_info:
        bs.main(["--n", "15"])
    assert exit_info.value.code == "error: --n must be at least 256 (PQ trains 256 centroids on the documents), got 15"
