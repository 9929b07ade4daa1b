"""Every method of the registry (methods.py) against a reference written here from its definition: numpy bits and
popcounts, the asymmetric score from the float margins, numpy PCA, scalar-quantisation steps from the fitting texts'
ranges, and faiss's own search over the checkpoint's index. Real embeddings: the SciFact slice with copied documents
(exact ties), the real fitting texts, and the checkpoints the real training command wrote (conftest `fitted`)."""

import shutil

import faiss
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import methods
import quantization_modules as qm
from data import UsageError
from encoders import DEFAULT_MODEL

DIM = 384
BINARY = ["stage1_zero", "lsh384", "pca288_sign", "stage1_trained", "stage1_rotated", "stage2_trained"]
# bytes each row stores per document, from the definitions: 4 B per float, 2 per cast, 1 per int8 dimension, half per
# int4, 1 per PQ sub-quantiser, RaBitQ's 1 bit per dimension plus 2 float32 factors, 1 bit per binary code bit
STORED_BYTES = {
    "float": 1536, "float16": 768, "bfloat16": 768, "int8": 384, "int8+asym": 384, "int4": 192, "int4+asym": 192,
    "pca192": 768, "pca96": 384, "pq48": 48, "opq48": 48, "pq24": 24, "rabitq": 56, "rabitq+qb4": 56,
    **{m + s: b + extra for m, b in [("stage1_zero", 48), ("lsh384", 48), ("pca288_sign", 36), ("stage1_trained", 48),
                                      ("stage1_rotated", 48), ("stage2_trained", 36)]
       for s, extra in [("", 0), ("+rescore", 1536), ("+rescore_int8", 384), ("+asym", 0)]},
}
pytestmark = pytest.mark.usefixtures("faiss_one_thread")
BITS = {"float": 12288, "float16": 6144, "bfloat16": 6144, "int8": 3072, "int4": 1536, "pca192": 6144, "pca96": 3072,
        "pq48": 384, "opq48": 384, "pq24": 192, "rabitq": 448, "stage1_zero": 384, "lsh384": 384, "pca288_sign": 288,
        "stage1_trained": 384, "stage1_rotated": 384, "stage2_trained": 288}


@pytest.fixture(scope="module")
def real(task_embeddings):
    return task_embeddings


def load(name, fitted):
    return methods.load_method(name, DIM, DEFAULT_MODEL, fitted.checkpoints, "transfer")[0]


def checkpoint(name, fitted) -> dict[str, np.ndarray]:
    """The raw tensors of a method's checkpoint, read without methods.py or quantization_modules.py."""
    return load_file(str(qm.checkpoint_path(fitted.checkpoints, DEFAULT_MODEL, methods.make_method(name, DIM).checkpoint)))


def search_all(method, mode, docs, queries, top_k=None):
    """Scores and ids of every document (or the top_k), best first, through the evaluation's mteb backend."""
    index = methods.MethodIndex(method, mode)
    index.add_documents(docs, [str(i) for i in range(len(docs))])
    scores, ids = index.search(queries, top_k or len(docs))
    return np.array(scores), np.array(ids)


def assert_ranks_by(expected: np.ndarray, scores: np.ndarray, ids: np.ndarray, atol: float) -> None:
    """A returned ranking is the ranking by `expected` (queries x documents): every document once, each returned score
    the expected one, and the expected scores in the returned order as high as the best possible order's (ties free)."""
    assert ids.shape[1] == expected.shape[1] and (np.sort(ids, axis=1) == np.arange(expected.shape[1])).all()
    along = np.take_along_axis(expected, ids, axis=1)
    np.testing.assert_allclose(scores, along, atol=atol)
    np.testing.assert_allclose(along, -np.sort(-expected, axis=1), atol=atol)


def binary_definition(name, fitted, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bits, margins) of `x` for a binary method, from its definition and its checkpoint's raw tensors: values are the
    embedding (LSH, PCA: through the faiss transform's matrix and bias; stage1_rotated: R x); margin = value - threshold;
    Stage 2's second half in pairs (d, d+1): the larger margin of the two. A bit is margin > 0."""
    method = methods.make_method(name, DIM)
    tensors = checkpoint(name, fitted) if method.fitted_on != "nothing" else {}
    transform = method.transform
    if "faiss_transform" in tensors:
        transform = methods.load_transform({"faiss_transform": torch.from_numpy(tensors["faiss_transform"])}, "", DIM,
                                           transform.d_out)
    values = x.astype(np.float64)
    if transform is not None:
        matrix = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
        bias = faiss.vector_to_array(transform.b) if transform.have_bias else 0.0
        values = values @ matrix.T + bias
    if "rotation" in tensors:
        values = values @ tensors["rotation"].T.astype(np.float64)
    margins = values - tensors.get("thresholds", np.zeros(values.shape[1]))
    if name == "stage2_trained":
        half = DIM // 2
        margins = np.concatenate([margins[:, :half], np.maximum(margins[:, half::2], margins[:, half + 1::2])], axis=1)
    return margins > 0, margins


@pytest.mark.parametrize("name", BINARY)
def test_hamming_rows_score_bits_minus_twice_the_popcount(name, fitted, real):
    method = load(name, fitted)
    doc_bits, _ = binary_definition(name, fitted, real["docs"])
    query_bits, _ = binary_definition(name, fitted, real["queries"])
    assert np.array_equal(method.encode(real["docs"]), np.packbits(doc_bits, axis=1))  # the stored codes
    distance = (query_bits[:, None, :] != doc_bits[None, :, :]).sum(axis=2)
    scores, ids = search_all(method, "hamming", real["docs"], real["queries"])
    assert_ranks_by(doc_bits.shape[1] - 2.0 * distance, scores, ids, atol=0)
    if doc_bits.shape[1] == DIM and name != "stage1_zero":  # not sign bits: the thresholds, rotation or transform count
        assert not np.array_equal(doc_bits, real["docs"] > 0)


@pytest.mark.parametrize("name", BINARY)
def test_asym_rows_rank_by_the_float_margins_against_the_signed_codes(name, fitted, real):
    method = load(name, fitted)
    doc_bits, _ = binary_definition(name, fitted, real["docs"])
    _, query_margins = binary_definition(name, fitted, real["queries"])
    expected = query_margins @ np.where(doc_bits, 1.0, -1.0).T
    scores, ids = search_all(method, "asym", real["docs"], real["queries"])
    assert_ranks_by(expected, scores, ids, atol=1e-4)


@pytest.mark.parametrize("name", ["stage1_zero", "stage2_trained"])
def test_rescoring_reranks_the_hamming_head_by_float_and_keeps_the_hamming_tail(name, fitted, real):
    method = load(name, fitted)
    docs, queries = real["docs"], real["queries"]
    float_scores = queries @ docs.T
    method.rescore_k = len(docs)  # every document re-ranked: the float ranking
    scores, ids = search_all(method, "rescore", docs, queries)
    assert_ranks_by(float_scores, scores, ids, atol=1e-5)

    method.rescore_k = 20
    _, hamming_ids = search_all(method, "hamming", docs, queries, top_k=100)
    scores, ids = search_all(method, "rescore", docs, queries, top_k=100)
    assert ids.shape == (len(queries), 100)
    for q in range(len(queries)):
        assert set(ids[q, :20]) == set(hamming_ids[q, :20])  # the head: Hamming's top 20 ...
        head_scores = float_scores[q, ids[q, :20]]
        np.testing.assert_allclose(scores[q, :20], head_scores, atol=1e-5)  # ... by float score, best first
        assert (np.diff(head_scores) <= 1e-6).all()
        assert list(ids[q, 20:]) == list(hamming_ids[q, 20:])  # the tail in Hamming order, below the head
        assert scores[q, 20:].max() < scores[q, :20].min()


def test_rescore_int8_scores_the_head_by_the_decoded_int8_documents(fitted, real):
    method = methods.load_method("stage1_zero", DIM, DEFAULT_MODEL, fitted.checkpoints, "transfer", ["rescore_int8"])[0]
    docs, queries = real["docs"], real["queries"]
    int8 = load("int8", fitted)  # its round trip is checked below
    method.rescore_k = len(docs)
    scores, ids = search_all(method, "rescore_int8", docs, queries)
    assert_ranks_by(queries @ int8.decode(int8.encode(docs)).T, scores, ids, atol=1e-5)
    assert index_bytes(method, "rescore_int8", docs) == 48 + 384


def index_bytes(method, mode, docs) -> int:
    index = methods.MethodIndex(method, mode)
    index.add_documents(docs, [str(i) for i in range(len(docs))])
    return index.bytes_per_vector


@pytest.mark.parametrize("name, levels", [("int8", 255), ("int4", 15)])
def test_int8_and_int4_round_trips_stay_within_half_a_step_of_the_calibration_range(name, levels, fitted, real):
    method = load(name, fitted)
    low, high = real["fitting"].min(axis=0), real["fitting"].max(axis=0)  # the fitting texts' range per dimension
    step = (high - low) / levels
    x = np.concatenate([real["docs"], real["queries"], [low - 0.1, high + 0.1]])  # the last two: outside the range
    codes = method.encode(x)
    assert codes.shape == (len(x), DIM if name == "int8" else DIM // 2)  # 8 or 4 bits per dimension
    error = np.abs(method.decode(codes) - np.clip(x, low, high))
    assert (error <= step / 2 + 1e-6).all(), (error / step).max()
    assert (error[:-2] > step / 100).mean() > 0.5  # it does quantise: most values move
    # the codes span the range: the fitting texts' smallest value per dimension is code 0, the largest the last code
    assert (method.encode(low[None]) == 0).all() and (method.encode(high[None]) == 255).all()


@pytest.mark.parametrize("name, mode", [("int8", "sym"), ("int8", "asym"), ("int4", "sym"), ("int4", "asym"),
                                        ("float16", "sym"), ("bfloat16", "sym")])
def test_scalar_and_cast_rows_rank_by_the_decoded_documents(name, mode, fitted, real):
    """asym: float query . decoded document; sym: the query coded and decoded too."""
    method = load(name, fitted)
    docs, queries = real["docs"], real["queries"]
    if name in ("float16", "bfloat16"):  # round to nearest, 11 or 8 significant bits; faiss rounds exact ties away
        cast = lambda x: torch.from_numpy(x).to(getattr(torch, name)).float().numpy()  # noqa: E731  (ties to even)
        decoded = method.decode(method.encode(docs))
        half_ulp = np.maximum(np.abs(docs) * 2.0 ** (-11 if name == "float16" else -8), 2.0**-25)
        assert (np.abs(decoded - docs) <= half_ulp).all() and (decoded == cast(docs)).mean() > 0.999
        assert (decoded != docs).mean() > 0.9  # it does round
    else:
        cast = lambda x: method.decode(method.encode(x))  # noqa: E731  (its step is checked in the test above)
    decoded_queries = cast(queries) if mode == "sym" else queries
    scores, ids = search_all(method, mode, docs, queries)
    assert_ranks_by(decoded_queries @ cast(docs).T, scores, ids, atol=2e-4)


@pytest.mark.parametrize("name, mode", [("pq48", "asym"), ("opq48", "asym"), ("pq24", "asym"), ("rabitq", "qb0"),
                                        ("rabitq", "qb4")])
def test_pq_and_rabitq_rankings_equal_faiss_own_search_over_the_checkpoints_index(name, mode, fitted, real):
    method = load(name, fitted)
    docs, queries = real["docs"], real["queries"]
    index = faiss.deserialize_index(checkpoint(name, fitted)["faiss_index"])  # straight from the file
    index.add(docs)
    params = faiss.RaBitQSearchParameters(qb=int(mode[2:])) if name == "rabitq" else None
    want_scores, want_ids = index.search(queries, len(docs), params=params)
    scores, ids = search_all(method, mode, docs, queries)
    assert np.array_equal(ids, want_ids) and np.allclose(scores, want_scores, atol=1e-6)
    if name != "rabitq":  # PQ's search is exact over its reconstructions: float query . decoded document
        assert_ranks_by(queries @ index.sa_decode(index.sa_encode(docs)).T, scores, ids, atol=1e-4)
    if mode == "qb4":  # the mode reaches faiss: a 4-bit query scores otherwise than a float one
        assert not np.allclose(scores, search_all(method, "qb0", docs, queries)[0], atol=1e-4)


@pytest.mark.parametrize("name, k", [("pca192", 192), ("pca96", 96)])
def test_pca_rows_rank_by_cosine_in_the_fitting_texts_principal_components(name, k, fitted, real):
    fitting = real["fitting"].astype(np.float64)
    mean = fitting.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(fitting - mean, rowvar=False))
    top = vectors[:, np.argsort(values)[::-1][:k]]  # signs do not matter to a cosine

    def project(x):
        y = (x - mean) @ top
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    scores, ids = search_all(load(name, fitted), "exact", real["docs"], real["queries"])
    assert_ranks_by(project(real["queries"]) @ project(real["docs"]).T, scores, ids, atol=2e-3)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_bytes_per_vector_is_the_size_of_what_each_row_stores(name, fitted, real):
    method = methods.load_method(name, DIM, DEFAULT_MODEL, fitted.checkpoints, "transfer")[0]
    assert method.bits_per_vector == BITS.get(name, BITS["float"])
    docs = real["docs"]
    for row, mode in methods.rows_of(name, method).items():
        index = methods.MethodIndex(method, mode)
        index.add_documents(docs, real["doc_ids"])
        stored = 0
        for part in index.stored.values():  # the arrays faiss keeps, read from faiss itself
            if isinstance(part, np.ndarray):
                stored += part.nbytes
            elif isinstance(part, faiss.IndexBinaryFlat):
                stored += faiss.vector_to_array(part.xb).nbytes
            else:
                inner = faiss.downcast_index(part.index) if isinstance(part, faiss.IndexPreTransform) else part
                stored += faiss.vector_to_array(inner.codes).nbytes
        assert index.bytes_per_vector == stored / len(docs) == STORED_BYTES.get(row, STORED_BYTES["float"]), row


def test_registry_names_modes_and_rows():
    with pytest.raises(UsageError, match=r"unknown method 'pq64'; the registry has: float, float_adapted, float16"):
        methods.make_method("pq64", DIM)
    method = methods.make_method("stage1_zero", DIM)
    assert methods.rows_of("stage1_zero", method, ["asym"]) == {"stage1_zero": "hamming", "stage1_zero+asym": "asym"}
    assert methods.rows_of("stage1_zero", method, []) == {"stage1_zero": "hamming"}  # the first mode always runs
    assert list(methods.rows_of("stage1_zero", method)) == ["stage1_zero", "stage1_zero+rescore", "stage1_zero+rescore_int8",
                                                            "stage1_zero+asym"]
    assert set(methods.LEARNED) == {"stage1_trained", "stage1_rotated", "stage2_trained"}
    fitted_on = {name: methods.make_method(name, DIM).fitted_on for name in methods.METHODS}
    assert {n for n, f in fitted_on.items() if f == "nothing"} == {"float", "float_adapted", "float16", "bfloat16",
                                                                   "stage1_zero", "lsh384"}
    assert {n for n, f in fitted_on.items() if f == "training"} == set(methods.LEARNED)


def test_lsh_is_the_same_seeded_rotation_every_time(real):
    first, second = methods.make_method("lsh384", DIM), methods.make_method("lsh384", DIM)
    assert np.array_equal(first.encode(real["docs"]), second.encode(real["docs"]))
    matrix = faiss.vector_to_array(first.transform.A).reshape(DIM, DIM)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(DIM), atol=1e-5)  # a rotation: cosines unchanged


def test_a_checkpoint_of_another_method_under_its_name_is_refused(fitted, tmp_path):
    folder = tmp_path / "checkpoints"
    source = qm.checkpoint_path(fitted.checkpoints, DEFAULT_MODEL, "pq48")
    for name in ("pq24", "pca96"):
        target = qm.checkpoint_path(folder, DEFAULT_MODEL, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        with pytest.raises(UsageError, match=f"holds a pq48 checkpoint, not {name}"):
            methods.load_method(name, DIM, DEFAULT_MODEL, folder, "transfer")


def test_fits_and_seeded_rotations_come_out_the_same_whatever_faiss_thread_count():
    """faiss's QR (OPQ's starting rotation, LSH's rotation) changes in its last bits with the OpenMP thread count, and
    OPQ's k-means carries that into another codebook; methods pin fits to one thread so a checkpoint is the same on
    every machine. Without the pin, these differ (OPQ's start by up to 6e-7, LSH's rotation by 1e-6)."""
    from conftest import quick_opq

    x = np.random.default_rng(0).standard_normal((2000, 384)).astype(np.float32)
    fitted = []
    for threads in (2, 1):
        faiss.omp_set_num_threads(threads)
        try:
            opq, rotation = quick_opq(384), methods.random_rotation(384, 384)  # held: faiss frees A with it
            opq.fit(x)
            fitted.append((faiss.serialize_index(opq.index).tobytes(), faiss.vector_to_array(rotation.A).tobytes()))
        finally:
            faiss.omp_set_num_threads(1)
    assert fitted[0][1] == fitted[1][1], "LSH rotation"
    assert fitted[0][0] == fitted[1][0], "OPQ codebooks"
