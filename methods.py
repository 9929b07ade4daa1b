"""The methods: every way to store an embedding and search it, each declared once, and the registry of them.

A method is a small class with four jobs: `fit` (learn from the protocol's fitting texts, if it needs to), `encode`
(what it stores per vector), `build` (documents -> what its search keeps) and `search` (float queries -> top-k scores
and ids). METHODS maps a name to one of them; each search mode of a method is a row of the table (`stage1_zero`,
`stage1_zero+asym`, ...). Every index is faiss's. Families, from the simplest: float, casts and scalar quantisation,
PCA, product quantisation, RaBitQ, then binary codes (sign bits, sign bits after a random rotation or PCA, and the
learned thresholds of quantization_modules.py).

Add a method: a class (or an existing one with new arguments) and one line in METHODS, e.g.

    "pq32": lambda dim: FaissCodes(dim, "PQ32np", "pq"),

then `python quantization_modules.py --methods pq32` fits it and `python evaluate_quantization_mteb.py --methods
pq32 ...` evaluates it.
"""

import contextlib
from pathlib import Path

import faiss
import numpy as np
import torch

from data import UsageError
from quantization_modules import (
    QuantizationModuleStage1,
    QuantizationModuleStage1Rotated,
    QuantizationModuleStage2,
    checkpoint_path,
    load_checkpoint,
    load_quantizer,
    to_signed,
)

RESCORE_K = 50  # first-stage candidates re-ranked in the +rescore and +rescore_int8 rows
LSH_SEED = 0
PROBE_DIM = 384  # a dimension to read a method's declaration (fitted_on, modes) before any model is loaded


@contextlib.contextmanager
def one_faiss_thread():
    """faiss on one OpenMP thread, for fits and seeded matrices: the same result on every machine. The thread count
    changes floating-point sums, and k-means follows them: OPQ48 fitted on the same texts keeps 93.4% of float with
    one thread and 96.0% with two (README, "Which compression should I use?")."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows (float32), so that an inner product is the model's cosine similarity."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pack_codes(bits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bool bits (n, b) -> uint8 codes (n, ceil(b / 8)), as np.packbits lays them out and faiss binary indexes take."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=1)


def build_binary_index(codes: np.ndarray) -> faiss.IndexBinaryFlat:
    """Exact Hamming search over packed codes. Padding bits are 0 in every code, so distances are unchanged."""
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    return index


def rescore_search(binary_index, float_docs, float_queries: np.ndarray, query_codes: np.ndarray, k: int, top: int):
    """Hamming top-k from `binary_index`, re-ranked by float query . document. Returns (scores, ids), each (q, top).

    `float_docs`: the float documents, or a function from an id array (q, k) to their rows (q, k, dim), e.g. decoded
    int8 codes. For top > k, the Hamming ranks k+1..top follow in Hamming order, scored below every re-ranked
    document, so metrics at cut-offs above k see the binary search's list rather than a truncated one."""
    _, candidates = binary_index.search(query_codes, max(k, top))
    head = candidates[:, :k]
    rows = float_docs[head] if isinstance(float_docs, np.ndarray) else float_docs(head)
    scores = (rows @ float_queries[:, :, None])[:, :, 0]  # gather k rows per query, small matmul
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(head, order, 1)
    if top > k:
        tail = scores[:, -1:] - 1 - np.arange(top - k, dtype=scores.dtype)  # strictly below the head, in Hamming order
        scores, ids = np.concatenate([scores, tail], axis=1), np.concatenate([ids, candidates[:, k:top]], axis=1)
    return scores, ids


def stored_bytes(stored: dict) -> int:
    """Bytes a built method keeps for its documents: faiss codes (factors included) plus any arrays beside them."""
    total = 0
    for part in stored.values():
        if isinstance(part, np.ndarray):
            total += part.nbytes
        elif isinstance(part, faiss.IndexBinary):
            total += part.code_size * part.ntotal
        else:
            total += part.sa_code_size() * part.ntotal
    return total


# ---------------------------------------------------------------------------------------------------------------
# the families


class Float:
    """float32 embeddings, exact cosine: unit rows in faiss IndexFlatIP."""

    family, fitted_on, modes = "float", "nothing", {"exact": ""}  # fitted_on: nothing, texts (fit) or training
    name = "float"  # set by make_method

    def __init__(self, dim: int):
        self.dim = dim

    @property
    def bits_per_vector(self) -> int:
        return 32 * self.dim

    @property
    def checkpoint(self) -> str:
        """The checkpoint file's stem under checkpoints/<model-slug>/[in-domain/] (methods that are fitted)."""
        return self.name

    def fit(self, x: np.ndarray) -> None:
        """Learn from the fitting texts' float embeddings (methods with fitted_on == "texts")."""

    def state(self) -> dict[str, torch.Tensor]:
        """What fit learned, as tensors for a safetensors checkpoint."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Restore what fit learned; refuse (UsageError naming `path`) what cannot be it."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        """What the method stores for each float vector, one row each."""
        return normalise(x)

    def index_codes(self, codes: np.ndarray) -> dict:
        """A searchable index over what encode returned for the documents."""
        index = faiss.IndexFlatIP(codes.shape[1])
        index.add(np.ascontiguousarray(codes, dtype=np.float32))
        return {"index": index}

    def build(self, docs: np.ndarray, mode: str) -> dict:
        """Everything the search keeps for the documents in `mode`."""
        return self.index_codes(self.encode(docs))

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) of each float query, best first."""
        return stored["index"].search(normalise(queries), top_k)


class FaissCodes(Float):
    """Documents stored as the codes of a faiss index made by `index_factory(spec)`: casts (SQfp16, SQbf16), scalar
    quantisation with per-dimension ranges fitted on the fitting texts (SQ8, SQ4), product quantisation (PQ, OPQ),
    RaBitQ (1 bit per dimension plus its per-vector factors). Modes: asym, the float query against the decoded
    documents (faiss's asymmetric distance); sym, the query coded and decoded too; qbN, RaBitQ's query in N bits
    (qb0: float)."""

    def __init__(self, dim: int, spec: str, family: str, modes: dict = None, fitted_on: str = "texts"):
        super().__init__(dim)
        self.spec, self.family, self.fitted_on = spec, family, fitted_on
        self.modes = modes or {"asym": ""}
        self.index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        pq = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexPreTransform) else self.index
        if isinstance(pq, faiss.IndexPQ):  # polysemous training only renumbers centroids (for Hamming filtering, unused
            pq.do_polysemous_training = False  # here): ~2.5 s per sub-quantiser whatever the data, the same search

    @property
    def bits_per_vector(self) -> int:
        return 8 * self.index.sa_code_size()

    def fit(self, x: np.ndarray) -> None:
        with one_faiss_thread():
            self.index.train(np.ascontiguousarray(x, dtype=np.float32))

    def state(self) -> dict[str, torch.Tensor]:
        return {"faiss_index": torch.from_numpy(faiss.serialize_index(self.index))}  # trained, holds no vectors

    def load_state(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        try:
            index = faiss.deserialize_index(tensors["faiss_index"].numpy())
        except (KeyError, RuntimeError) as e:
            raise UsageError(f"{path} does not hold a faiss index ({str(e).splitlines()[0]})") from None
        if index.d != self.dim or index.sa_code_size() != self.index.sa_code_size() or not index.is_trained:
            raise UsageError(f"{path} holds a faiss index of dimension {index.d} and {index.sa_code_size()} bytes, "
                             f"not a trained {self.spec} of dimension {self.dim}")
        probe = index.sa_decode(index.sa_encode(np.eye(self.dim, dtype=np.float32)))
        if self.family == "pq":  # the probe's codes may miss a bad centroid: decode every centroid of every sub-quantiser
            probe = index.sa_decode(np.repeat(np.arange(256, dtype=np.uint8)[:, None], index.sa_code_size(), axis=1))
        if not np.isfinite(probe).all():
            raise UsageError(f"{path}: the faiss index decodes to non-finite values")
        self.index = index

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(codes)

    def index_codes(self, codes: np.ndarray) -> dict:
        index = faiss.clone_index(self.index)
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
        inner.add_sa_codes(np.ascontiguousarray(codes))  # OPQ: the codes are the inner PQ's, after the rotation
        index.ntotal = inner.ntotal
        return {"index": index}

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if mode == "sym":
            queries = self.decode(self.encode(queries))
        params = faiss.RaBitQSearchParameters(qb=int(mode[2:])) if mode.startswith("qb") else None
        return stored["index"].search(queries, top_k, params=params)


class FittedTransform:
    """A method whose fitted part is a faiss VectorTransform in `self.transform` (PCA, a rotation): fit, save, load."""

    def fit(self, x: np.ndarray) -> None:
        with one_faiss_thread():
            self.transform.train(np.ascontiguousarray(x, dtype=np.float32))

    def state(self) -> dict[str, torch.Tensor]:
        writer = faiss.VectorIOWriter()  # the transform as bytes in a tensor, for a safetensors checkpoint
        faiss.write_VectorTransform(self.transform, writer)
        return {"faiss_transform": torch.from_numpy(faiss.vector_to_array(writer.data))}

    def load_state(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        self.transform = load_transform(tensors, path, self.dim, self.transform.d_out)


def load_transform(tensors: dict, path: Path, d_in: int, d_out: int):
    """A faiss VectorTransform from a checkpoint, refusing one of other dimensions or with non-finite values."""
    try:
        reader = faiss.VectorIOReader()
        faiss.copy_array_to_vector(tensors["faiss_transform"].numpy(), reader.data)
        transform = faiss.read_VectorTransform(reader)
    except (KeyError, RuntimeError) as e:
        raise UsageError(f"{path} does not hold a faiss transform ({str(e).splitlines()[0]})") from None
    if (transform.d_in, transform.d_out) != (d_in, d_out) or not transform.is_trained:
        raise UsageError(f"{path} holds a transform {transform.d_in} -> {transform.d_out}, not a trained {d_in} -> {d_out}")
    if not np.isfinite(transform.apply(np.eye(d_in, dtype=np.float32))).all():
        raise UsageError(f"{path}: the transform gives non-finite values")
    return transform


class PCA(FittedTransform, Float):
    """float32 projection on the top `k` principal components of the fitting texts (faiss PCAMatrix), cosine."""

    family, fitted_on = "pca", "texts"

    def __init__(self, dim: int, k: int):
        super().__init__(dim)
        self.transform = faiss.PCAMatrix(dim, k)

    @property
    def bits_per_vector(self) -> int:
        return 32 * self.transform.d_out

    def encode(self, x: np.ndarray) -> np.ndarray:
        return normalise(self.transform.apply(np.ascontiguousarray(x, dtype=np.float32)))

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
        return stored["index"].search(self.encode(queries), top_k)


class BinaryCodes(FittedTransform, Float):
    """Bits from a quantiser (quantization_modules.py), after an optional faiss transform (a random rotation, PCA),
    packed with np.packbits and searched by exact Hamming distance in faiss IndexBinaryFlat. Modes:
      hamming:      score = bits - 2 * Hamming distance (the dot product of ±1 codes);
      rescore:      the Hamming top-k re-ranked by float query . float document (the float documents are kept);
      rescore_int8: the same with the int8 method's documents (its codes are kept, 1 byte per dimension);
      asym:         the query's float margins (value - threshold; per Stage 2 pair, the larger) . the document's ±1
                    code; no float document is kept.
    """

    family = "binary"
    modes = {"hamming": "", "rescore": "+rescore", "rescore_int8": "+rescore_int8", "asym": "+asym"}

    def __init__(self, dim: int, quantizer: QuantizationModuleStage1, transform=None, fitted_on: str = "nothing"):
        super().__init__(dim)
        self.quantizer, self.transform, self.fitted_on = quantizer.eval(), transform, fitted_on
        self.rescore_k = RESCORE_K
        self.int8 = None  # the int8 method, for rescore_int8: set by load_method

    @property
    def bits_per_vector(self) -> int:
        return self.quantizer.bits_per_vector

    def values(self, x: np.ndarray) -> torch.Tensor:
        """What the thresholds compare: the embedding, or its transform."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return torch.from_numpy(self.transform.apply(x) if self.transform is not None else x)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return pack_codes(self.quantizer.quantize(self.values(x)))

    def index_codes(self, codes: np.ndarray) -> dict:
        return {"index": build_binary_index(np.ascontiguousarray(codes))}

    def build(self, docs: np.ndarray, mode: str) -> dict:
        stored = self.index_codes(self.encode(docs))
        if mode == "rescore":
            stored["float"] = np.ascontiguousarray(docs, dtype=np.float32)
        if mode == "rescore_int8":
            if self.int8 is None:
                raise UsageError(f"{self.name}+rescore_int8 needs the int8 method (load_method sets it)")
            stored["int8"] = self.int8.encode(docs)
        return stored

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
        index, queries = stored["index"], np.ascontiguousarray(queries, dtype=np.float32)
        top_k = min(top_k, index.ntotal)
        if mode == "hamming":
            distances, ids = index.search(self.encode(queries), top_k)
            return self.bits_per_vector - 2 * distances, ids
        if mode == "asym":
            codes = np.unpackbits(faiss.vector_to_array(index.xb).reshape(index.ntotal, index.code_size), axis=1)
            signed = to_signed(torch.from_numpy(codes[:, : self.bits_per_vector]))
            scores, ids = torch.topk(self.quantizer.margins(self.values(queries)) @ signed.T, top_k, dim=1)
            return scores.numpy(), ids.numpy()
        if mode == "rescore":
            rows = stored["float"]
        else:
            rows = lambda ids: self.int8.decode(stored["int8"][ids.ravel()]).reshape(*ids.shape, -1)  # noqa: E731
        return rescore_search(index, rows, queries, self.encode(queries), min(self.rescore_k, index.ntotal), top_k)


class TrainedCodes(BinaryCodes):
    """Binary codes of a quantiser trained by quantization_modules.py, read from its checkpoint. `loss_weights`:
    (similarity_preservation_loss, info_nce_loss) weights of its training (chosen on validation, README)."""

    fitted_on = "training"

    def __init__(self, dim: int, quantizer_class: type, loss_weights: tuple[float, float]):
        super().__init__(dim, quantizer_class(dim), fitted_on="training")
        self.quantizer_class, self.loss_weights = quantizer_class, loss_weights

    @property
    def checkpoint(self) -> str:
        return self.quantizer_class.method  # stage1, stage2, stage1_rotated

    def load_state(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        raise NotImplementedError("trained quantisers are read by load_quantizer")  # load_method does it


CAST, SYM_ASYM = {"sym": ""}, {"sym": "", "asym": "+asym"}

METHODS = {  # name -> the method for an embedding dimension; the report's order within equal bytes
    "float": Float,
    "float_adapted": Float,  # in-domain only: the float model through the learned transform (thresholds and rotations
    #                          leave every cosine unchanged, so it is the float model); the in-domain reference
    "float16": lambda d: FaissCodes(d, "SQfp16", "cast", CAST, fitted_on="nothing"),
    "bfloat16": lambda d: FaissCodes(d, "SQbf16", "cast", CAST, fitted_on="nothing"),
    "int8": lambda d: FaissCodes(d, "SQ8", "scalar", SYM_ASYM),
    "int4": lambda d: FaissCodes(d, "SQ4", "scalar", SYM_ASYM),
    "pca192": lambda d: PCA(d, 192),
    "pca96": lambda d: PCA(d, 96),
    "pq48": lambda d: FaissCodes(d, "PQ48np", "pq"),  # np: no polysemous training (40x the fitting time, unused here)
    "opq48": lambda d: FaissCodes(d, "OPQ48,PQ48np", "pq"),
    "pq24": lambda d: FaissCodes(d, "PQ24np", "pq"),
    "rabitq": lambda d: FaissCodes(d, "RaBitQ", "rabitq", {"qb0": "", "qb4": "+qb4"}),
    "stage1_zero": lambda d: BinaryCodes(d, QuantizationModuleStage1(d)),
    "lsh384": lambda d: BinaryCodes(d, QuantizationModuleStage1(384), random_rotation(d, 384)),
    "pca288_sign": lambda d: BinaryCodes(d, QuantizationModuleStage1(288), faiss.PCAMatrix(d, 288), fitted_on="texts"),
    "stage1_trained": lambda d: TrainedCodes(d, QuantizationModuleStage1, loss_weights=(1.0, 0.0)),
    "stage1_rotated": lambda d: TrainedCodes(d, QuantizationModuleStage1Rotated, loss_weights=(1.0, 1.0)),
    "stage2_trained": lambda d: TrainedCodes(d, QuantizationModuleStage2, loss_weights=(1.0, 0.0)),
}
LEARNED = [name for name in METHODS if name.endswith(("_trained", "_rotated"))]  # the learned-threshold methods


def random_rotation(d_in: int, d_out: int):
    """faiss's seeded random rotation (LSH's projection): the same matrix on every machine."""
    transform = faiss.RandomRotationMatrix(d_in, d_out)
    with one_faiss_thread():  # also 0.03 s rather than 3.7 s when two OpenMP threads share two busy cores
        transform.init(LSH_SEED)
    return transform


def make_method(name: str, dim: int) -> Float:
    """A fresh, unfitted method of the registry."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; the registry has: {', '.join(METHODS)}")
    method = METHODS[name](dim)
    method.name = name
    return method


def load_method(name: str, dim: int, model_name: str, checkpoints: Path, protocol: str, modes=None) -> tuple[Float, dict]:
    """A registry method with what it learned: from its checkpoint when it is fitted or trained. Returns (method,
    checkpoint metadata or {}). `modes`: the modes that will run (rescore_int8 also loads the int8 method)."""
    method, meta = make_method(name, dim), {}
    path = checkpoint_path(checkpoints, model_name, method.checkpoint, protocol)
    if method.fitted_on == "training":
        method.quantizer, meta = load_quantizer(path, model_name, dim, method.quantizer_class, protocol, name)
    elif method.fitted_on == "texts":
        tensors, meta = load_checkpoint(path, model_name, dim, protocol, name)
        method.load_state(tensors, path)
    if isinstance(method, BinaryCodes) and "rescore_int8" in (method.modes if modes is None else modes):
        method.int8 = load_method("int8", dim, model_name, checkpoints, protocol)[0]
    return method, meta


def rows_of(name: str, method: Float, modes=None) -> dict[str, str]:
    """The table rows of a method: row name -> mode. Its first mode always runs; others if in `modes` (None: all)."""
    first = next(iter(method.modes))
    return {name + suffix: mode for mode, suffix in method.modes.items() if mode == first or modes is None or mode in modes}


def rank(method: Float, mode: str, docs: np.ndarray, queries: np.ndarray, doc_ids: list, query_ids: list,
         top_k: int = 1000) -> dict[str, dict[str, float]]:
    """{query id: {document id: score}} of a method's top-k (mteb's retrieval depth is 1,000): the same index and
    search that the evaluation's rows use, so validation chooses on the ranking that is reported."""
    index = MethodIndex(method, mode)
    index.add_documents(docs, doc_ids)
    scores, ids = index.search(queries, min(top_k, len(doc_ids)))
    return {q: {doc_ids[j]: s for j, s in zip(row_ids, row_scores)} for q, row_ids, row_scores in zip(query_ids, ids, scores)}


class MethodIndex:
    """An mteb search backend (add_documents / search / clear) for one row: it receives the shared encoder's float
    embeddings and stores and searches them as its method does. Validation in training ranks through it too."""

    def __init__(self, method: Float, mode: str):
        self.method, self.mode = method, mode
        self.stored, self.bytes_per_vector, self.n_documents = None, None, 0

    def add_documents(self, embeddings, idxs: list[str]) -> None:
        docs = np.asarray(embeddings, dtype=np.float32)
        self.stored, self.n_documents = self.method.build(docs, self.mode), len(docs)
        self.bytes_per_vector = stored_bytes(self.stored) // len(docs)

    def search(self, embeddings, top_k: int, similarity_fn=None, top_ranked=None, query_idx_to_id=None):
        top_k = min(top_k, self.n_documents)  # faiss pads a short list with id -1, which mteb reads as the last document
        scores, ids = self.method.search(self.stored, np.asarray(embeddings, dtype=np.float32), top_k, self.mode)
        return np.asarray(scores).tolist(), np.asarray(ids).tolist()

    def clear(self) -> None:
        self.stored = None
