"""Every method of the registry (methods.py) against a reference written here from its definition: numpy bits and
popcounts, levels -> reconstruction values, numpy PCA, a brute-force float ranking, and faiss's own index and search.
Bytes are checked against what faiss really stores and against faiss's code sizes. The registry is iterated, never
listed: a new registry line is tested without editing this file.

Data: seeded unit vectors with a common direction and decaying spread (as sentence embeddings have), small enough that
every method fits in well under a second (OPQ with fewer iterations); the last test runs the real commands."""

import functools
import math
import re
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

import methods
from checkpoints import checkpoint_path, load_method, save_checkpoint
from data import UsageError
from encoders import DEFAULT_MODEL
from fitting import fit_side_by_side

pytestmark = pytest.mark.usefixtures("faiss_one_thread")

N_FIT, N_DOCS, N_QUERIES = 1100, 224, 5  # 1,100: 10-bit PQ fits 1,024 centroids; 224 documents: whole 32-vector
# blocks, so fast-scan's padded array is its codes
DIMS = (64, 256)


@functools.cache
def vectors(d: int) -> SimpleNamespace:
    """Seeded unit vectors at dimension d: fitting texts, documents, queries."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal((N_FIT + N_DOCS + N_QUERIES, d)) * np.geomspace(1, 0.1, d) + 0.3 * rng.standard_normal(d)
    x = methods.normalise(x)
    return SimpleNamespace(fit=x[:N_FIT], docs=x[N_FIT : N_FIT + N_DOCS], queries=x[N_FIT + N_DOCS :])


def quicker_fits(method) -> None:
    """OPQ's rotation in 2 iterations rather than 20 (5 s at d = 256), residual quantisation with a beam of 1 and 2
    k-means iterations (17 s down to 2 at d = 256): these tests need their codes, not their quality."""
    index = getattr(method, "faiss_index", None)
    if index is not None and hasattr(inner := methods.FaissCodes.inner(index), "rq"):
        inner.rq.max_beam_size, inner.rq.cp.niter = 1, 2
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = 2


def trained_state(method, seed: int) -> None:
    """Load what training could leave in a learned threshold method: thresholds near the values, a random rotation, and
    (more than two levels) increasing reconstruction values, so its codes are neither sign bits nor an identity."""
    rng, state = np.random.default_rng(seed), method.state()
    state["thresholds"] = np.sort(rng.normal(0.0, 0.05, state["thresholds"].shape), axis=1).astype(np.float32)
    if state["recon"].shape[1] > 2:
        state["recon"] = np.sort(rng.normal(0.0, 0.1, state["recon"].shape), axis=1).astype(np.float32)
    if "rotation" in state:
        state["rotation"] = np.linalg.qr(rng.standard_normal(state["rotation"].shape))[0].astype(np.float32)
    method.load_state(state, Path("<trained in the test>"))


@functools.cache
def fitted(name: str, d: int):
    """A registry method at d as the evaluation gets it: fitted on the fitting vectors, or with a trained-like state."""
    method = methods.make_method(name, d)
    quicker_fits(method)
    if methods.METHODS[name].fitted_on == "texts" or isinstance(method, methods.FaissCodes):  # learned codebooks: k-means'
        method.fit(vectors(d).fit)
    elif methods.METHODS[name].fitted_on == "training":
        trained_state(method, seed=d)
    return method


def reranker(mode: str, d: int):
    """The method a re-ranking row re-ranks with, as the registry's mode table names it (None for other modes)."""
    return fitted(methods.MODES[mode].reranker, d) if methods.MODES[mode].reranker else None


def built(name: str, d: int, mode: str, rerank_k: int = methods.RERANK_K) -> methods.MethodIndex:
    """The evaluation's search backend for one row, with the documents added."""
    index = methods.MethodIndex(fitted(name, d), mode, rerank_k, reranker(mode, d))
    index.add_documents(vectors(d).docs, [str(i) for i in range(N_DOCS)])
    return index


def search_all(name: str, d: int, mode: str, rerank_k: int = methods.RERANK_K):
    """Scores and ids of every document, best first, through the evaluation's backend."""
    return built(name, d, mode, rerank_k).search(vectors(d).queries, N_DOCS)


def rows(dims=DIMS) -> list:
    return [pytest.param(name, d, mode, id=f"{name}-{d}-{mode}") for d in dims for name in methods.METHODS
            for mode in methods.modes_of(name, d)]


def assert_ranks_by(expected: np.ndarray, scores: np.ndarray, ids: np.ndarray, atol: float) -> None:
    """A returned ranking is the ranking by `expected` (queries x documents): every document once, each returned score
    the expected one, and the expected scores in the returned order as high as the best possible order's (ties free)."""
    assert ids.shape == expected.shape and (np.sort(ids, axis=1) == np.arange(expected.shape[1])).all()
    along = np.take_along_axis(expected, ids, axis=1)
    np.testing.assert_allclose(scores, along, atol=atol, rtol=0)
    np.testing.assert_allclose(along, -np.sort(-expected, axis=1), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# references, from the definitions


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_pca(fit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, top-k eigenvectors as columns) of the fitting vectors' covariance, in float64."""
    fit = fit.astype(np.float64)
    mean = fit.mean(axis=0)
    values, vectors_ = np.linalg.eigh(np.cov(fit - mean, rowvar=False))
    return mean, vectors_[:, np.argsort(values)[::-1][:k]]


def fresh_faiss(method) -> faiss.Index:
    """A faiss index read straight from the method's state (what its checkpoint holds)."""
    return faiss.deserialize_index(method.state()["faiss_index"])


def threshold_values(method, x: np.ndarray) -> np.ndarray:
    """What a threshold method's thresholds compare, in float64: x through the faiss transform's own matrix and bias
    (PCA, LSH) or its first dimensions, then through the learned rotation in its state."""
    state, values = method.state(), x.astype(np.float64)
    transform = method.transform
    if transform is not None:
        matrix = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
        bias = faiss.vector_to_array(transform.b) if transform.have_bias else 0.0
        values = values @ matrix.T.astype(np.float64) + bias
    values = values[:, : state["thresholds"].shape[0]]
    return values @ state["rotation"].T.astype(np.float64) if "rotation" in state else values


def threshold_levels(method, x: np.ndarray) -> np.ndarray:
    """Each value's level: how many of its dimension's thresholds it is strictly above."""
    thresholds = method.state()["thresholds"].astype(np.float64)
    return (threshold_values(method, x)[:, :, None] > thresholds[None]).sum(axis=2)


def threshold_bits(method, x: np.ndarray, pairs: bool) -> np.ndarray:
    """Thermometer bits (level l of k: l ones, then k - 1 - l zeros, k - 1 the dimension's finite thresholds: a
    hybrid's dimensions differ); Stage 2: the second half's pairs OR-ed into one bit."""
    levels = threshold_levels(method, x)
    if pairs:
        half, on = levels.shape[1] // 2, levels > 0
        return np.concatenate([on[:, :half], on[:, half::2] | on[:, half + 1 :: 2]], axis=1)
    widths = np.isfinite(method.state()["thresholds"]).sum(axis=1)
    return np.concatenate([levels[:, [j]] > np.arange(w) for j, w in enumerate(widths)], axis=1)


def hamming_distances(query_bits: np.ndarray, doc_bits: np.ndarray) -> np.ndarray:
    """popcount(query xor document) over the packed codes, with numpy."""
    xor = np.bitwise_xor(np.packbits(query_bits, axis=1)[:, None], np.packbits(doc_bits, axis=1)[None])
    return np.unpackbits(xor, axis=2).sum(axis=2).astype(np.int64)


def threshold_asym_scores(method, x_docs: np.ndarray, queries: np.ndarray, pairs: bool) -> np.ndarray:
    """Float query values . decoded documents: each level's reconstruction value (recon[dimension, level]); Stage 2:
    the larger value of each pair against the +-1 bits."""
    values = threshold_values(method, queries)
    if pairs:
        half = values.shape[1] // 2
        values = np.concatenate([values[:, :half], np.maximum(values[:, half::2], values[:, half + 1 :: 2])], axis=1)
        return values @ np.where(threshold_bits(method, x_docs, True), 1.0, -1.0).T
    levels, recon = threshold_levels(method, x_docs), method.state()["recon"].astype(np.float64)
    return values @ recon[np.arange(recon.shape[0])[None], levels].T


def faiss_array_bytes(stored: dict) -> int:
    """Bytes in the arrays a built row keeps, read from faiss's own storage (not from code_size)."""
    total = 0
    for part in stored.values():
        if isinstance(part, np.ndarray):
            total += part.nbytes
        elif isinstance(part, faiss.IndexBinaryFlat):
            total += faiss.vector_to_array(part.xb).nbytes
        elif isinstance(part, faiss.Index):
            inner = faiss.downcast_index(part.index if isinstance(part, faiss.IndexPreTransform) else part)
            fast_scan = isinstance(inner, faiss.IndexFastScan)  # codes in 32-vector blocks, an AlignedTable
            total += inner.codes.size() if fast_scan else faiss.vector_to_array(inner.codes).nbytes
    return total


# ---------------------------------------------------------------------------------------------------------------
# bytes and applicability


def first_of_each_family(d: int) -> list[str]:
    return list({methods.family_of(name, d): name for name in reversed(methods.METHODS)}.values())


@pytest.mark.parametrize("name, d", [(n, d) for d in DIMS for n in methods.METHODS]
                         + [(n, 384) for n in first_of_each_family(384)])
def test_each_row_stores_the_bytes_it_declares(name, d):
    assert methods.applies(name, d) is None
    settings = methods.settings(name, d)
    for mode in methods.modes_of(name, d):
        stored = built(name, d, mode).stored
        declared = methods.row_bytes(name, d, mode)
        assert methods.stored_bytes(stored) == declared * N_DOCS, mode
        assert faiss_array_bytes(stored) == declared * N_DOCS, mode  # what faiss's arrays really hold
        if methods.METHODS[name].family is methods.FaissCodes:
            assert declared == faiss.index_factory(d, settings.spec, faiss.METRIC_INNER_PRODUCT).sa_code_size()


def test_applies_says_why_a_method_cannot_be_built_at_a_dimension():
    reasons = {name: methods.applies(name, 6) for name in methods.METHODS}
    for name, reason in reasons.items():
        if reason is None:
            methods.make_method(name, 6)
        else:
            with pytest.raises(UsageError, match=re.escape(reason)):
                methods.make_method(name, 6)
    pairs = [name for name in methods.METHODS if methods.METHODS[name].family is methods.Stage2Codes]
    assert pairs and all("divisible by 4" in reasons[name] for name in pairs)  # Stage 2's pairs of halves: 6 / 2 is odd


# ---------------------------------------------------------------------------------------------------------------
# threshold codes: levels, thermometer bits, packing, Lloyd-Max


@pytest.mark.parametrize("levels", [3, 4])
def test_hamming_distance_of_thermometer_codes_is_the_l1_distance_of_levels(levels):
    rng = np.random.default_rng(levels)
    method = methods.ThresholdCodes("q", 24, methods.ThresholdSettings(levels, "quantile"))
    method.fit(rng.standard_normal((500, 24)).astype(np.float32))
    x = rng.standard_normal((60, 24)).astype(np.float32)
    bits = np.unpackbits(method.encode(x), axis=1)[:, : 24 * (levels - 1)]
    hamming = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    level = (x[:, :, None] > method.state()["thresholds"][None]).sum(axis=2)
    assert set(np.unique(level)) == set(range(levels))
    assert np.array_equal(hamming, np.abs(level[:, None, :] - level[None, :, :]).sum(axis=2))


@pytest.mark.parametrize("levels", [2, 3, 4, 16])
def test_quantile_thresholds_are_the_fitting_values_quantiles(levels):
    x = np.random.default_rng(levels).standard_normal((300, 10)).astype(np.float32)
    method = methods.ThresholdCodes("q", 10, methods.ThresholdSettings(levels, "quantile"))
    method.fit(x)
    expected = np.quantile(x, np.arange(1, levels) / levels, axis=0).T
    np.testing.assert_allclose(method.state()["thresholds"], expected, rtol=0, atol=1e-6)


def test_registry_quantile_thresholds_are_quantiles_of_the_compared_values():
    d = DIMS[0]
    quantile = [n for n in methods.METHODS if getattr(methods.settings(n, d), "thresholds", None) == "quantile"]
    for name in quantile:
        method = fitted(name, d)
        k = method.state()["thresholds"].shape[1] + 1
        expected = np.quantile(threshold_values(method, vectors(d).fit), np.arange(1, k) / k, axis=0).T
        np.testing.assert_allclose(method.state()["thresholds"], expected, rtol=0, atol=1e-5, err_msg=name)


def test_two_levels_at_zero_are_sentence_transformers_ubinary_sign_bits():
    x = np.random.default_rng(0).standard_normal((50, 37)).astype(np.float32)
    x[::3, ::4] = 0.0  # on the threshold: 0 is not > 0
    sign = methods.ThresholdCodes("sign", 37, methods.ThresholdSettings())
    assert np.array_equal(sign.encode(x), quantize_embeddings(x, precision="ubinary"))


def test_a_value_exactly_on_a_threshold_is_below_it():
    rng = np.random.default_rng(1)
    method = methods.ThresholdCodes("q", 8, methods.ThresholdSettings(4, "quantile"))
    method.fit(rng.standard_normal((400, 8)).astype(np.float32))
    thresholds = method.state()["thresholds"]
    x = np.repeat(rng.standard_normal((1, 8)).astype(np.float32), 3, axis=0)
    for t in range(3):
        x[t] = thresholds[:, t]  # row t: every dimension on its threshold t
    levels = np.unpackbits(method.encode(x), axis=1)[:, :24].reshape(3, 8, 3).sum(axis=2)
    assert (levels == np.arange(3)[:, None]).all()  # on threshold t: above t of them, not t + 1


def per_byte(levels: int) -> int:
    """How many base-`levels` digits fit in a byte: the largest p with levels ** p <= 256."""
    p = 0
    while levels ** (p + 1) <= 256:
        p += 1
    return p


@pytest.mark.parametrize("levels", [2, 3, 4, 16, 256])
@pytest.mark.parametrize("m", [1, 5, 7, 13, 64, 67])
def test_pack_levels_round_trips_in_the_fewest_bytes(levels, m):
    codes = np.random.default_rng(m).integers(0, levels, (40, m)).astype(np.uint8)
    codes[0] = levels - 1  # the largest level everywhere: a byte still holds it
    packed = methods.pack_levels(codes, levels)
    assert packed.dtype == np.uint8 and packed.shape == (40, math.ceil(m / per_byte(levels)))
    assert np.array_equal(methods.unpack_levels(packed, levels, m), codes)


def test_lloyd_max_puts_two_levels_between_two_clusters_at_their_means():
    low = np.array([-1.2, -1.0, -0.8] * 100)  # 300 values, mean -1.0: the median starts inside this cluster
    high = np.array([1.5, 2.0, 2.5] * 40)  # 120 values, mean 2.0
    v = np.concatenate([low, high])[:, None].astype(np.float32)
    thresholds = methods.lloyd_max(v, 2)
    assert thresholds.shape == (1, 1) and low.max() < thresholds[0, 0] < high.min()
    np.testing.assert_allclose(thresholds[0, 0], 0.5, atol=1e-6)  # the fixed point: halfway between the two means
    np.testing.assert_allclose(methods.bin_means(v, thresholds), [[-1.0, 2.0]], atol=1e-6)


LLOYD_MAX_GAUSSIAN_4 = (-1.5104, -0.4528, 0.4528, 1.5104)  # the 4-level Lloyd-Max quantiser of N(0, 1) (Max, 1960)


@pytest.mark.parametrize("d", [384, 768])
def test_sq2b_is_lloyd_max_for_coordinates_of_variance_one_over_d(d):
    """faiss's SQtqmse2 (sq2b) fits nothing: its levels are N(0, 1)'s 4-level Lloyd-Max levels divided by sqrt(d),
    the quantiser of a random unit vector's coordinates, whatever it is fitted on. On such vectors its decoded error is
    lloyd2b's (levels fitted per dimension) within 2%; on coordinates of another variance it is not."""
    x = methods.normalise(np.random.default_rng(d).standard_normal((4000, d)))
    sq2b, lloyd2b = (methods.make_method(name, d) for name in ("sq2b", "lloyd2b"))
    sq2b.fit(100 * x)  # nothing to learn: the levels do not move
    lloyd2b.fit(x)
    decoded = sq2b.decode(sq2b.encode(x))
    np.testing.assert_allclose(np.unique(decoded[:, :8].round(5)), np.array(LLOYD_MAX_GAUSSIAN_4) / np.sqrt(d), atol=2e-5)
    error = {name: ((m.decode(m.encode(x)) - x) ** 2).sum() for name, m in (("sq2b", sq2b), ("lloyd2b", lloyd2b))}
    assert error["lloyd2b"] <= error["sq2b"] < 1.02 * error["lloyd2b"]
    assert ((sq2b.decode(sq2b.encode(2 * x)) - 2 * x) ** 2).sum() > 2 * 4 * error["lloyd2b"]  # not scaled to the data


# ---------------------------------------------------------------------------------------------------------------
# rankings from the definitions


@pytest.mark.parametrize("name, d, mode", rows(dims=(64,)))
def test_every_row_ranks_as_its_definition(name, d, mode):
    method, data = fitted(name, d), vectors(d)
    docs, queries = data.docs, data.queries
    scores, ids = search_all(name, d, mode)
    if isinstance(method, methods.ThresholdCodes):
        pairs = isinstance(method, methods.Stage2Codes)
        doc_bits, query_bits = threshold_bits(method, docs, pairs), threshold_bits(method, queries, pairs)
        distances = hamming_distances(query_bits, doc_bits)
        if mode == "hamming":
            assert np.array_equal(method.encode(docs), np.packbits(doc_bits, axis=1))  # the stored codes
            assert_ranks_by(doc_bits.shape[1] - 2.0 * distances, scores, ids, atol=0)
        elif mode == "asym":
            assert_ranks_by(threshold_asym_scores(method, docs, queries, pairs), scores, ids, atol=1e-4)
        elif mode in ("rerank", "rerank_int8"):
            int8 = fresh_faiss(fitted("int8", d))  # the int8 documents, decoded by faiss
            decoded = unit(docs) if mode == "rerank" else int8.sa_decode(int8.sa_encode(docs))
            assert_reranks_the_hamming_head(queries @ decoded.T, distances, scores, ids, methods.RERANK_K)
        else:
            pytest.fail(f"no reference for {mode} of threshold codes")
    elif isinstance(method, methods.FaissCodes):
        index = fresh_faiss(method)
        index.add(docs)
        q = index.sa_decode(index.sa_encode(queries)) if mode == "sym" else queries
        params = faiss.RaBitQSearchParameters(qb=int(mode[2:])) if mode.startswith("qb") else None
        if isinstance(index, faiss.IndexRaBitQFastScan):
            index.qb, params = int(mode[2:]), None  # its query bits are a setting
        want_scores, want_ids = index.search(q, N_DOCS, params=params)
        assert np.array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-6, rtol=0)
        inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
        if not isinstance(inner, (faiss.IndexFastScan, faiss.IndexRaBitQ)):  # those estimate; the others are exact
            assert_ranks_by(q @ index.sa_decode(index.sa_encode(docs)).T, scores, ids, atol=1e-4)
    elif isinstance(method, methods.PCA):
        mean, top = numpy_pca(data.fit, methods.settings(name, d).k)
        assert_ranks_by(unit((queries - mean) @ top) @ unit((docs - mean) @ top).T, scores, ids, atol=2e-3)
    elif type(method) is methods.Float:
        assert_ranks_by(unit(queries) @ unit(docs).T, scores, ids, atol=1e-5)
    else:
        pytest.fail(f"no reference for family {type(method).__name__}")


def assert_reranks_the_hamming_head(float_scores, distances, scores, ids, k):
    """The first k: a Hamming top-k (no document outside is nearer), ordered and scored by float; the rest in Hamming
    order, scored below every re-ranked document."""
    assert (np.sort(ids, axis=1) == np.arange(ids.shape[1])).all()
    for q in range(len(ids)):
        head, tail = ids[q, :k], ids[q, k:]
        assert distances[q, head].max() <= distances[q, tail].min()
        np.testing.assert_allclose(scores[q, :k], float_scores[q, head], atol=1e-5, rtol=0)
        assert (np.diff(float_scores[q, head]) <= 1e-6).all()
        assert (np.diff(distances[q, tail]) >= 0).all()
        assert scores[q, k:].max() < scores[q, :k].min()


def test_pca_transforms_are_the_fitting_vectors_principal_components():
    d = DIMS[0]
    for name in methods.METHODS:
        state = fitted(name, d).state()
        if "faiss_transform" not in state:
            continue
        reader = faiss.VectorIOReader()
        faiss.copy_array_to_vector(state["faiss_transform"], reader.data)
        transform = faiss.read_VectorTransform(reader)
        matrix = faiss.vector_to_array(transform.A).reshape(transform.d_out, d)
        mean, top = numpy_pca(vectors(d).fit, transform.d_out)
        np.testing.assert_allclose(np.abs(matrix @ top), np.eye(transform.d_out), atol=2e-3, err_msg=name)  # signs free
        np.testing.assert_allclose(faiss.vector_to_array(transform.b), -matrix @ mean, atol=1e-4, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# rerank depth, seeds and threads


@pytest.mark.parametrize("name", [n for n in methods.METHODS if "rerank" in methods.modes_of(n, 64)])
def test_the_rerank_depth_reaches_the_search(name):
    d = 64
    _, hamming = search_all(name, d, "hamming")
    _, one = search_all(name, d, "rerank", rerank_k=1)
    _, fifty = search_all(name, d, "rerank", rerank_k=50)
    assert np.array_equal(one[:, 0], hamming[:, 0]) and np.array_equal(one, hamming)  # one re-ranked: Hamming's list
    assert not np.array_equal(one[:, 1:], fifty[:, 1:])
    scores, ids = search_all(name, d, "rerank", rerank_k=N_DOCS)
    assert_ranks_by(vectors(d).queries @ vectors(d).docs.T, scores, ids, atol=1e-5)  # all re-ranked: exact float


def test_lsh_is_the_same_seeded_rotation_every_time():
    d = 128  # from d = 128, faiss's QR moves with the thread count (by 6e-7 here) unless pinned to one
    lsh = [n for n in methods.METHODS if getattr(methods.settings(n, d), "transform", None) == "lsh"]
    assert lsh
    for name in lsh:
        faiss.omp_set_num_threads(2)  # the thread count must not move the rotation either (restored by the fixture)
        first = methods.make_method(name, d)
        faiss.omp_set_num_threads(1)
        second = methods.make_method(name, d)
        matrix = faiss.vector_to_array(first.transform.A)
        assert np.array_equal(matrix, faiss.vector_to_array(second.transform.A))
        assert np.array_equal(first.encode(vectors(d).docs), second.encode(vectors(d).docs))
        matrix = matrix.reshape(first.transform.d_out, d)
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(len(matrix)), atol=1e-5)  # a rotation: cosines kept


@pytest.mark.parametrize("mode", ["qb8", "qb4"])
def test_rabitq_fast_scan_ranks_as_rabitq_with_the_same_query_bits(mode):
    """rabitq_fastscan stores rabitq's codes and scans them with 4-bit lookup tables: the same top 10 as rabitq's own
    search with the same query bits, scores within 0.01."""
    d = 64
    (want_scores, want_ids), (scores, ids) = (search_all(name, d, mode) for name in ("rabitq", "rabitq_fastscan"))
    assert np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(want_ids, ids)]) >= 0.95
    np.testing.assert_allclose(scores[:, :10], want_scores[:, :10], atol=0.01)


@pytest.mark.parametrize("name", ["pq1b", "pca_half", "lloyd2b", "opq1b"])
def test_fits_are_the_same_whatever_the_faiss_thread_count(name):
    """PCA's covariance and OPQ's rotation change in their last bits with the OpenMP thread count (measured here
    without the pin: both differ); methods fit on one thread so a checkpoint is the same on every machine."""
    states = []
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)  # restored to one by the fixture
        method = methods.make_method(name, 64)
        method.fit(vectors(64).fit)
        states.append({k: v.tobytes() for k, v in method.state().items()})
    assert states[0] == states[1]


def test_fits_side_by_side_are_the_fits_one_after_another():
    """The evaluation and the training command fit methods on two threads at once (fitting.fit_side_by_side); each
    method's state is the one a fit alone on one thread gives, whatever its thread's OpenMP default, and the results
    come back in the order asked."""
    names = ["opq1b", "pca_half", "pq1b", "lloyd2b", "opq1b"]

    def state(name, threads):
        faiss.omp_set_num_threads(threads)  # this thread's default (restored to one by the fixture); a fit pins one
        method = methods.make_method(name, 64)
        method.fit(vectors(64).fit)
        return {k: v.tobytes() for k, v in method.state().items()}

    alone = [state(name, 1) for name in names]
    assert fit_side_by_side(lambda name: state(name, 2), names, threads=2) == alone


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: round trips and refusals


def write(folder: Path, name: str, d: int, state: dict) -> Path:
    path = checkpoint_path(folder, DEFAULT_MODEL, name)
    save_checkpoint(path, state, {"base_model": DEFAULT_MODEL, "method": name, "dimension": str(d), "protocol": "transfer"})
    return path


@pytest.mark.parametrize("name", [n for n in methods.METHODS if methods.METHODS[n].fitted_on != "nothing"])
def test_a_saved_state_loads_to_the_same_codes_and_search(name, tmp_path):
    d, data = 64, vectors(64)
    method = fitted(name, d)
    write(tmp_path, name, d, method.state())
    loaded = load_method(name, d, DEFAULT_MODEL, tmp_path, "transfer")[0]
    assert np.array_equal(loaded.encode(data.docs), method.encode(data.docs))
    for mode in methods.modes_of(name, d):
        index = methods.MethodIndex(loaded, mode, reranker=reranker(mode, d))
        index.add_documents(data.docs)
        for got, want in zip(index.search(data.queries, N_DOCS), search_all(name, d, mode)):
            assert np.array_equal(got, want), mode


def refusal(path: Path, load) -> str:
    with pytest.raises(UsageError) as refused:
        load()
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    return message


def with_nan(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flat[3] = np.nan
    return array


def with_value_at(array: np.ndarray, where: tuple, value: float) -> np.ndarray:
    array = array.copy()
    array[where] = value
    return array


def test_load_state_refuses_what_cannot_be_the_method(tmp_path):
    d, data = 64, vectors(64)
    load = lambda name: lambda: load_method(name, d, DEFAULT_MODEL, tmp_path, "transfer")  # noqa: E731

    state = fitted("quantile2b", d).state()
    path = write(tmp_path, "quantile2b", d, state | {"thresholds": state["thresholds"][:-1]})
    assert "thresholds has shape (63, 3), not (64, 3)" in refusal(path, load("quantile2b"))
    path = write(tmp_path, "quantile2b", d, state | {"recon": state["recon"][:, :2]})
    assert "recon has shape (64, 2), not (64, 4)" in refusal(path, load("quantile2b"))
    path = write(tmp_path, "quantile2b", d, state | {"thresholds": with_nan(state["thresholds"])})
    assert "non-finite" in refusal(path, load("quantile2b"))  # checkpoints.py refuses it first; load_state too:
    for key in ("thresholds", "recon"):
        bad, method = state | {key: with_nan(state[key])}, methods.make_method("quantile2b", d)
        assert f"{key} holds 1 non-finite values" in refusal(path, lambda: method.load_state(bad, path))  # noqa: B023

    state = fitted("hybrid1.25b", d).state()  # a hybrid: +inf where a dimension has fewer levels, finite elsewhere
    assert np.isinf(state["thresholds"]).any()
    unused = np.argwhere(np.isinf(state["thresholds"]))[0]
    path = write(tmp_path, "hybrid1.25b", d, state | {"thresholds": with_value_at(state["thresholds"], tuple(unused), 0.5)})
    assert "is not +inf" in refusal(path, load("hybrid1.25b"))
    path = write(tmp_path, "hybrid1.25b", d, state | {"thresholds": with_value_at(state["thresholds"], (0, 0), np.inf)})
    assert "thresholds holds 1 non-finite values" in refusal(path, load("hybrid1.25b"))

    state = fitted("stage1_rotated", d).state()
    path = write(tmp_path, "stage1_rotated", d, state | {"rotation": 1.5 * state["rotation"]})
    assert "not orthogonal" in refusal(path, load("stage1_rotated"))

    code_size = fresh_faiss(fitted("pq1b", d)).sa_code_size()
    other = faiss.index_factory(2 * d, f"PQ{code_size}np", faiss.METRIC_INNER_PRODUCT)  # its code size, twice its d
    other.train(np.random.default_rng(0).standard_normal((N_FIT, 2 * d)).astype(np.float32))
    path = write(tmp_path, "pq1b", d, {"faiss_index": faiss.serialize_index(other)})
    assert "faiss index of dimension 128" in refusal(path, load("pq1b"))
    path = write(tmp_path, "pq1b", d, {"faiss_index": np.arange(100, dtype=np.uint8)})
    assert "does not hold a faiss index" in refusal(path, load("pq1b"))
    index = fresh_faiss(fitted("pq1b", d))
    faiss.copy_array_to_vector(with_nan(faiss.vector_to_array(index.pq.centroids)), index.pq.centroids)
    path = write(tmp_path, "pq1b", d, {"faiss_index": faiss.serialize_index(index)})  # bytes: only decoding shows it
    assert "decodes to non-finite values" in refusal(path, load("pq1b"))

    transform = faiss.PCAMatrix(d, d // 2)
    transform.train(data.fit)
    faiss.copy_array_to_vector(with_nan(faiss.vector_to_array(transform.A)), transform.A)
    path = write(tmp_path, "pca_half", d, {"faiss_transform": methods.transform_bytes(transform)})
    assert "non-finite" in refusal(path, load("pca_half"))
    path = write(tmp_path, "pca_half", d, fitted("pca_quarter", d).state())
    assert "holds a transform 64 -> 16, not a trained 64 -> 32" in refusal(path, load("pca_half"))


@pytest.mark.parametrize("d", [30, 385, 390])
def test_every_method_that_says_it_applies_builds_and_the_others_say_why(d):
    """applies() is the truth: a method it lets through is built without faiss refusing it (PQ sub-quantiser counts
    that divide d), and one it refuses names the reason (385 is odd: no even count for 4-bit fast scan)."""
    for name in methods.METHODS:
        reason = methods.applies(name, d)
        if reason is None:
            methods.make_method(name, d)
        else:
            assert str(d) in reason or "divisible" in reason, (name, reason)
    assert methods.applies("pq2b_fastscan", 385) is not None


@pytest.mark.parametrize("d", [384, 768])
def test_turboquants_mse_codes_assume_rotated_coordinates(d):
    """faiss's SQtqmse2 (sq2b) codes each coordinate with the 2-bit Lloyd-Max levels of N(0, 1/d): its error per unit
    vector is the same at 384 and 768 dimensions (the levels scale with the dimension). On unit vectors with unequal
    coordinate spreads and a common direction, as sentence embeddings have, it errs more than per-dimension Lloyd-Max
    (lloyd2b); after faiss's random rotation (RR, sq2b_rotated) the coordinates are near N(0, 1/d) and its error is
    the Gaussian 2-bit Lloyd-Max distortion, 0.1175 of the squared norm."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal((8000, d)) * np.geomspace(1, 0.2, d) + 0.3 * rng.standard_normal(d)
    x = methods.normalise(x)
    fit, test = x[:6000], x[6000:]

    def error(name):
        method = methods.make_method(name, d)
        method.fit(fit)
        mode = "asym" if "asym" in methods.modes_of(name, d) else None
        return float(((method.decode(method.encode(test, mode), mode) - test) ** 2).sum(1).mean())

    plain, rotated, lloyd = error("sq2b"), error("sq2b_rotated"), error("lloyd2b")
    assert abs(rotated - 0.1175) < 0.005 and plain > rotated + 0.02 and lloyd < rotated, (plain, rotated, lloyd)
