"""The methods: every way to store an embedding and search it, and the registry `METHODS` that declares them.

A registry entry is a declaration, read without building anything: its family (the class that builds it), its
settings as a function of the embedding dimension d, what it is fitted on (nothing, the fitting texts, or training by
quantization_modules.py) and whether it is learned. A family is a small class with one protocol, which the
evaluation, the training command, `load_encoder` and the benchmark use without knowing which family it is:

    modes(settings)             search modes, mode -> row-name suffix; the first is the method's own search
    row_bytes(d, mode, ...)     bytes per document a row of that mode stores and reads (static: nothing is built)
    describe(d, ...)            what it is at dimension d ("PQ48 x 8 bits"), for the report
    applies(d, ...)             None, or why it cannot be used at dimension d (the row is skipped with that line)
    fit(x) / state() / load_state(tensors, path)    for methods fitted on texts or trained
    encode(x, mode) -> codes, decode(codes, mode)   what it stores per vector, and the floats it stands for
    store(codes, mode) -> stored                    what a row keeps, from the documents' codes (faiss index or array)
    build(docs, mode, rescorer) -> stored           the same from float documents (+ the re-ranking store)
    search(stored, queries, top_k, mode, rescore_k) -> (scores, ids), best first

Search modes, one name per computation (and what sentence-transformers and faiss call it):
    exact         float query . float document (faiss IndexFlatIP)
    sym           the query coded and decoded too, then . the decoded document
    asym          float query . decoded document: faiss's asymmetric distance computation (ADC); for binary codes it
                  is sentence-transformers' `semantic_search_faiss(rescore=True)` applied to every document
    hamming       Hamming distance between the query's and the document's bit codes (faiss IndexBinaryFlat);
                  sentence-transformers' `semantic_search_faiss(precision="ubinary")` without rescoring
    rerank        the Hamming top-k re-ranked by float query . float document (the float documents are kept too);
                  Qdrant and Elastic call it rescoring with oversampling
    rerank_int8   the same with int8 documents (1 byte per dimension kept beside the bits)
    qbN           RaBitQ with the query in N bits (faiss RaBitQSearchParameters(qb=N)); qb0: float query

Add a method with an existing family: one line in METHODS, e.g.

    "pq32": Entry(FaissCodes, lambda d: faiss_codes(f"PQ{divisor(d, d // 12)}np", divisor(d, d // 12), "pq"), "texts"),

then `python quantization_modules.py --methods pq32` fits it and the evaluation, the report and bench_search.py run
it. A new family is one class with the protocol above.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from data import UsageError

RESCORE_K = 50  # first-stage candidates re-ranked in the +rerank rows
RERANK_DEPTHS = (10, 20, 50, 100, 200)  # the depths the evaluation's depth table and bench_search.py try
KEEPS_FLOAT = {"rerank"}  # modes that keep the float documents beside the codes
SEARCH = ("hamming", "asym", "rerank", "rerank_int8")  # the modes of bit codes, the first their own search
LSH_SEED = 0


@contextlib.contextmanager
def one_faiss_thread():
    """faiss on one OpenMP thread, for fits and seeded matrices: the same result on every machine. The thread count
    changes floating-point sums, and k-means follows them (an OPQ fitted on the same texts moved by 2.6 points)."""
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


def divisor(d: int, target: int, step: int = 1) -> int:
    """The divisor of d closest to `target` among multiples of `step` (the smaller on a tie): PQ's sub-quantiser count
    at any dimension; 0 when there is none (the method then does not apply)."""
    return min((m for m in range(step, d + 1, step) if d % m == 0), key=lambda m: (abs(m - target), m), default=0)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Bool bits (n, b) -> uint8 codes (n, ceil(b / 8)), as np.packbits lays them out and faiss binary indexes take."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=1)


def levels_per_byte(levels: int) -> int:
    """How many values of `levels` levels one byte holds in base `levels`: 8 for 2, 5 for 3, 4 for 4, 2 for 16."""
    return int(np.floor(np.log(256) / np.log(levels) + 1e-9))


def pack_levels(codes: np.ndarray, levels: int) -> np.ndarray:
    """Per-dimension levels (n, m) in 0..levels-1 -> bytes (n, ceil(m / per byte)), each byte a base-`levels` number."""
    per = levels_per_byte(levels)
    n, m = codes.shape
    padded = np.zeros((n, -(-m // per) * per), np.uint16)
    padded[:, :m] = codes
    weights = (levels ** np.arange(per)).astype(np.uint16)
    return (padded.reshape(n, -1, per) * weights).sum(axis=2).astype(np.uint8)


def unpack_levels(packed: np.ndarray, levels: int, m: int) -> np.ndarray:
    """The inverse of pack_levels: bytes (n, b) -> levels (n, m), uint8."""
    per = levels_per_byte(levels)
    digits = (packed[:, :, None].astype(np.uint16) // (levels ** np.arange(per)).astype(np.uint16)) % levels
    return digits.reshape(len(packed), -1)[:, :m].astype(np.uint8)


def best_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row, best first; ties by the smaller column, as faiss and pytrec_eval order them."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    order = np.lexsort((part, -np.take_along_axis(scores, part, 1)), axis=1)
    ids = np.take_along_axis(part, order, 1)
    return np.take_along_axis(scores, ids, 1), ids


def rerank_search(binary_index, docs, queries: np.ndarray, query_codes: np.ndarray, k: int, top: int):
    """Hamming top-k from `binary_index`, re-ranked by float query . document. Returns (scores, ids), each (q, top).

    `docs`: a function from an id array (q, k) to the documents' float rows (q, k, dim): the float documents, or the
    decoded int8 codes. For top > k, the Hamming ranks k+1..top follow in Hamming order, scored below every re-ranked
    document, so metrics at cut-offs above k see the binary search's list rather than a truncated one."""
    _, candidates = binary_index.search(query_codes, max(k, top))
    head = candidates[:, :k]
    scores = (docs(head) @ queries[:, :, None])[:, :, 0]  # gather k rows per query, small matmul
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(head, order, 1)
    if top > k:
        tail = scores[:, -1:] - 1 - np.arange(top - k, dtype=scores.dtype)  # strictly below the head, in Hamming order
        scores, ids = np.concatenate([scores, tail], axis=1), np.concatenate([ids, candidates[:, k:top]], axis=1)
    return scores, ids


def transform_bytes(transform) -> np.ndarray:
    """A faiss VectorTransform as a uint8 array, for a checkpoint."""
    writer = faiss.VectorIOWriter()
    faiss.write_VectorTransform(transform, writer)
    return faiss.vector_to_array(writer.data)


def read_transform(array: np.ndarray, path: Path, d_in: int, d_out: int):
    """A faiss VectorTransform from a checkpoint, refusing one of other dimensions or with non-finite values."""
    try:
        reader = faiss.VectorIOReader()
        faiss.copy_array_to_vector(np.ascontiguousarray(array, dtype=np.uint8), reader.data)
        transform = faiss.read_VectorTransform(reader)
    except RuntimeError as e:
        raise UsageError(f"{path} does not hold a faiss transform ({str(e).splitlines()[0]})") from None
    if (transform.d_in, transform.d_out) != (d_in, d_out) or not transform.is_trained:
        raise UsageError(f"{path} holds a transform {transform.d_in} -> {transform.d_out}, not a trained {d_in} -> {d_out}")
    if not np.isfinite(transform.apply(np.eye(d_in, dtype=np.float32))).all():
        raise UsageError(f"{path}: the transform gives non-finite values")
    return transform


def require(tensors: dict, names: list[str], path: Path) -> None:
    if missing := [n for n in names if n not in tensors]:
        raise UsageError(f"{path} lacks {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------------------------
# the families, from the simplest


class Float:
    """float32 embeddings, exact cosine: unit rows in faiss IndexFlatIP."""

    def __init__(self, dim: int):
        self.dim = dim

    @staticmethod
    def modes(**settings) -> dict[str, str]:
        return {"exact": ""}

    @staticmethod
    def row_bytes(d: int, mode: str, **settings) -> int:
        return 4 * d

    @staticmethod
    def describe(d: int, **settings) -> str:
        return f"{d} x float32"

    @staticmethod
    def label(**settings) -> str:
        """The family's name in the report and the plot's colours."""
        return "float"

    @staticmethod
    def bits_per_dimension(d: int, **settings) -> float:
        """Bits of the stored code per embedding dimension (the report groups rows by it)."""
        return 32.0

    @staticmethod
    def applies(d: int, **settings) -> str | None:
        return None

    def fit(self, x: np.ndarray) -> None:
        """Learn from the fitting texts' float embeddings (methods fitted on texts)."""

    def state(self) -> dict[str, np.ndarray]:
        """What fit learned, as arrays for a safetensors checkpoint."""
        return {}

    def load_state(self, tensors: dict[str, np.ndarray], path: Path) -> None:
        """Restore what fit learned; refuse (UsageError naming `path`) what cannot be it."""

    def encode(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        """What the method stores per vector in `mode` (default: its own search's)."""
        return normalise(x)

    def decode(self, codes: np.ndarray, mode: str | None = None) -> np.ndarray:
        """The float vectors the codes stand for (what an asymmetric search compares the float query with)."""
        return np.asarray(codes, dtype=np.float32)

    def store(self, codes: np.ndarray, mode: str | None = None) -> dict:
        """What a row keeps, from the documents' codes: here a faiss index over them."""
        index = faiss.IndexFlatIP(codes.shape[1])
        index.add(np.ascontiguousarray(codes, dtype=np.float32))
        return {"index": index}

    def build(self, docs: np.ndarray, mode: str, rescorer=None) -> dict:
        """What a row of `mode` keeps for the documents (`rescorer`: the int8 method of rerank_int8 rows)."""
        return self.store(self.encode(docs, mode), mode)

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str, rescore_k: int = RESCORE_K):
        return stored["index"].search(self.encode(queries), top_k)


class PCA(Float):
    """float32 projection on the top `k` principal components of the fitting texts (faiss PCAMatrix), cosine."""

    def __init__(self, dim: int, k: int):
        super().__init__(dim)
        self.transform = faiss.PCAMatrix(dim, k)

    @staticmethod
    def row_bytes(d: int, mode: str, k: int) -> int:
        return 4 * k

    @staticmethod
    def describe(d: int, k: int) -> str:
        return f"top {k} of {d} principal components x float32"

    @staticmethod
    def label(k: int) -> str:
        return "pca"

    @staticmethod
    def bits_per_dimension(d: int, k: int) -> float:
        return 32.0 * k / d

    @staticmethod
    def applies(d: int, k: int) -> str | None:
        return None if 0 < k <= d else f"{k} components from {d} dimensions"

    def fit(self, x: np.ndarray) -> None:
        with one_faiss_thread():
            self.transform.train(np.ascontiguousarray(x, dtype=np.float32))

    def state(self) -> dict[str, np.ndarray]:
        return {"faiss_transform": transform_bytes(self.transform)}

    def load_state(self, tensors: dict, path: Path) -> None:
        require(tensors, ["faiss_transform"], path)
        self.transform = read_transform(tensors["faiss_transform"], path, self.dim, self.transform.d_out)

    def encode(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        return normalise(self.transform.apply(np.ascontiguousarray(x, dtype=np.float32)))


class FaissCodes(Float):
    """Documents stored as the codes of a faiss index made by `index_factory(spec)`: casts (SQfp16, SQbf16), scalar
    quantisation with per-dimension ranges fitted on the fitting texts (SQ8, SQ4), product quantisation (PQ, OPQ),
    RaBitQ (1 to 9 bits per dimension plus per-vector factors). `code_bytes`: what faiss stores per vector (a test
    checks it against faiss's code_size)."""

    def __init__(self, dim: int, spec: str, code_bytes: int, kind: str, modes: dict):
        super().__init__(dim)
        self.spec, self.kind, self.search_modes = spec, kind, modes
        self.faiss_index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        inner = self.inner(self.faiss_index)
        if isinstance(inner, faiss.IndexPQ):  # polysemous training only renumbers centroids (for Hamming filtering,
            inner.do_polysemous_training = False  # unused here): ~2.5 s per sub-quantiser, the same search
            inner.pq.cp.min_points_per_centroid = 1  # only silences a warning per sub-quantiser (10-bit codes on 22k
            #                                          texts); the training command prints how many texts it fits on

    @staticmethod
    def inner(index):
        return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index

    @staticmethod
    def modes(spec: str, code_bytes: int, kind: str, modes: dict) -> dict[str, str]:
        return modes

    @staticmethod
    def row_bytes(d: int, mode: str, spec: str, code_bytes: int, kind: str, modes: dict) -> int:
        return code_bytes

    @staticmethod
    def describe(d: int, spec: str, code_bytes: int, kind: str, modes: dict) -> str:
        return f"faiss {spec}"

    @staticmethod
    def label(spec: str, code_bytes: int, kind: str, modes: dict) -> str:
        return kind

    @staticmethod
    def bits_per_dimension(d: int, spec: str, code_bytes: int, kind: str, modes: dict) -> float:
        return 8.0 * code_bytes / d

    @staticmethod
    def applies(d: int, spec: str, code_bytes: int, kind: str, modes: dict) -> str | None:
        return None if code_bytes > 0 else f"no sub-quantiser count of {spec} divides {d}"

    def fit(self, x: np.ndarray) -> None:
        if self.spec.startswith("OPQ") and len(x) < self.dim:  # faiss 1.15 crashes the process (seen at d = 1,024)
            raise RuntimeError(f"failed: OPQ needs at least {self.dim:,} fitting texts, one per dimension")
        with one_faiss_thread():
            self.faiss_index.train(np.ascontiguousarray(x, dtype=np.float32))

    def state(self) -> dict[str, np.ndarray]:
        return {"faiss_index": faiss.serialize_index(self.faiss_index)}  # trained, holds no vectors

    def load_state(self, tensors: dict, path: Path) -> None:
        require(tensors, ["faiss_index"], path)
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(tensors["faiss_index"], dtype=np.uint8))
        except RuntimeError as e:
            raise UsageError(f"{path} does not hold a faiss index ({str(e).splitlines()[0]})") from None
        if index.d != self.dim or index.sa_code_size() != self.faiss_index.sa_code_size() or not index.is_trained:
            raise UsageError(f"{path} holds a faiss index of dimension {index.d} and {index.sa_code_size()} bytes, "
                             f"not a trained {self.spec} of dimension {self.dim}")
        probe = index.sa_decode(index.sa_encode(np.eye(self.dim, dtype=np.float32)))
        if self.kind == "pq":  # the probe's codes may miss a bad centroid: decode every centroid of every sub-quantiser
            probe = index.sa_decode(np.repeat(np.arange(256, dtype=np.uint8)[:, None], index.sa_code_size(), axis=1))
        if not np.isfinite(probe).all():
            raise UsageError(f"{path}: the faiss index decodes to non-finite values")
        self.faiss_index = index

    def encode(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        return self.faiss_index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))

    def decode(self, codes: np.ndarray, mode: str | None = None) -> np.ndarray:
        return self.faiss_index.sa_decode(np.ascontiguousarray(codes))

    def store(self, codes: np.ndarray, mode: str | None = None) -> dict:
        index = faiss.deserialize_index(faiss.serialize_index(self.faiss_index))
        inner = self.inner(index)
        inner.add_sa_codes(np.ascontiguousarray(codes))  # OPQ: the codes are the inner PQ's, after the rotation
        index.ntotal = inner.ntotal  # (fast-scan indexes take float vectors only: build adds the documents)
        return {"index": index}

    def build(self, docs: np.ndarray, mode: str, rescorer=None) -> dict:
        index = faiss.deserialize_index(faiss.serialize_index(self.faiss_index))  # a copy of the trained, empty index
        index.add(np.ascontiguousarray(docs, dtype=np.float32))  # stores the codes encode() gives (fast-scan too)
        return {"index": index}

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str, rescore_k: int = RESCORE_K):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if mode == "sym":
            queries = self.decode(self.encode(queries))
        params = faiss.RaBitQSearchParameters(qb=int(mode[2:])) if mode.startswith("qb") else None
        return stored["index"].search(queries, top_k, params=params)


class ThresholdCodes(Float):
    """Each dimension (after an optional transform) cut into `levels` levels by levels - 1 thresholds; the level is
    the number of thresholds the value is above (strictly: a value on a threshold is below it, as sentence-
    transformers' `> 0`). Two levels with zero thresholds are sign bits.

    Stored for Hamming search as thermometer codes (level l of k: k - 1 bits, l of them set, so the Hamming distance is
    the L1 distance between levels), packed with np.packbits; for asym as packed levels (base k, `pack_levels`),
    searched by faiss's ADC: each code byte indexes a table of its dimensions' reconstruction values, which is a
    product quantiser's codebook (`adc_index`). `pairs` (2 levels only, Stage 2): the first half of the dimensions one
    bit each, the second half in pairs (a, a+1) OR-ed into one bit.

    transform: None, "lsh" (faiss's seeded random rotation to `out` dimensions), "pca" (the top `out` principal
    components of the fitting texts) or "first" (the first `out` dimensions). thresholds: "zero", "quantile" (at the
    i/k quantiles of the fitting texts), "lloyd" (1-D k-means per dimension, Lloyd-Max) or "learned" (trained by
    quantization_modules.py, with a learned rotation if `rotation`). decode: the level's reconstruction value; for two
    levels +-1 (the Hamming geometry), for more the mean of the fitting texts in that level.

    groups: a hybrid allocation, ((count, levels), ...): the first `count` dimensions get that many levels, the next
    group the next ones (after PCA: the most variant components get the most levels). A dimension with fewer levels
    than the most has its unused thresholds at +inf (no value is above them)."""

    def __init__(self, dim: int, levels: int = 2, thresholds: str = "zero", transform: str | None = None,
                 out: int | None = None, pairs: bool = False, rotation: bool = False, search: tuple = SEARCH,
                 groups: tuple | None = None):
        super().__init__(dim)
        self.groups = level_groups(dim, levels, out, groups)
        self.levels, self.out = max(k for _, k in self.groups), sum(c for c, _ in self.groups)
        self.kind, self.pairs, self.rotation, self.search_modes = thresholds, pairs, rotation, search
        self.transform = {None: lambda: None, "first": lambda: None, "pca": lambda: faiss.PCAMatrix(dim, self.out),
                          "lsh": lambda: random_rotation(dim, self.out)}[transform]()
        self.counts = np.concatenate([np.full(c, k) for c, k in self.groups])  # levels per dimension
        self.thresholds = np.where(self.used_thresholds, 0.0, np.inf).astype(np.float32)
        self.recon = np.where(np.arange(self.levels) < self.counts[:, None],  # until fitted: the thermometer code's
                              2 * np.arange(self.levels) - (self.counts[:, None] - 1), 0).astype(np.float32)  # +-1 bits summed
        self.matrix = np.eye(self.out, dtype=np.float32) if rotation else None  # the learned rotation

    @staticmethod
    def modes(search: tuple = SEARCH, **settings) -> dict[str, str]:
        return {mode: "" if i == 0 else f"+{mode}" for i, mode in enumerate(search)}

    @staticmethod
    def code_bits(d: int, levels: int = 2, out: int | None = None, pairs: bool = False, groups: tuple | None = None,
                  **settings) -> int:
        out = out or d
        return out // 2 + out // 4 if pairs else sum(c * (k - 1) for c, k in level_groups(d, levels, out, groups))

    @staticmethod
    def row_bytes(d: int, mode: str, levels: int = 2, out: int | None = None, pairs: bool = False,
                  groups: tuple | None = None, **settings) -> int:
        if mode == "asym" and not pairs:
            return sum(-(-c // levels_per_byte(k)) for c, k in level_groups(d, levels, out, groups))
        code = -(-ThresholdCodes.code_bits(d, levels, out, pairs, groups) // 8)
        return code + {"rerank": 4 * d, "rerank_int8": d}.get(mode, 0)

    @staticmethod
    def describe(d: int, levels: int = 2, thresholds: str = "zero", transform: str | None = None,
                 out: int | None = None, pairs: bool = False, rotation: bool = False, search: tuple = SEARCH,
                 groups: tuple | None = None) -> str:
        groups = level_groups(d, levels, out, groups)
        out = sum(c for c, _ in groups)
        what = {None: f"{d} dimensions", "pca": f"top {out} of {d} principal components",
                "lsh": f"random rotation {d} -> {out}", "first": f"first {out} of {d} dimensions"}[transform]
        bits = ThresholdCodes.code_bits(d, levels, out, pairs, groups)
        if len(groups) > 1:
            per = ThresholdCodes.bits_per_dimension(d, levels, out, pairs, groups)
            how = " + ".join(f"{c} x {k}" for c, k in groups) + f" levels ({per:.4g} bits per dimension), {bits}-bit thermometer code"
        elif levels == 2:
            how = ("Stage 2 pairs, " if pairs else "") + f"{bits} bits"
        elif search[0] == "asym":
            how = f"{levels} levels ({np.log2(levels):.3g} bits) per dimension"
        else:
            how = f"{levels} levels, {bits}-bit thermometer code"
        return f"{what}, {thresholds} thresholds{' after a learned rotation' if rotation else ''}, {how}"

    @staticmethod
    def label(levels: int = 2, groups: tuple | None = None, **settings) -> str:
        return "binary" if levels == 2 and not groups else "multi-level"

    @staticmethod
    def bits_per_dimension(d: int, levels: int = 2, out: int | None = None, pairs: bool = False,
                           groups: tuple | None = None, **settings) -> float:
        """Information bits (log2 of the levels) per embedding dimension: 1 for sign bits, 0.75 for Stage 2 or 288 of
        384 PCA components, 1.5 for three levels (rounded: log2 3 = 1.58), 2 for four."""
        per = lambda k: {2: 1.0, 3: 1.5}.get(k, float(np.log2(k)))  # noqa: E731
        total = sum(c * per(k) for c, k in level_groups(d, levels, out, groups))
        return round((0.75 if pairs else 1.0) * total / d, 3)

    @staticmethod
    def applies(d: int, levels: int = 2, out: int | None = None, pairs: bool = False, transform: str | None = None,
                groups: tuple | None = None, **settings) -> str | None:
        out = sum(c for c, _ in level_groups(d, levels, out, groups))
        if pairs and out % 4:
            return f"Stage 2 pairs need a dimension divisible by 4, not {out}"
        if transform in ("pca", "first") and not 0 < out <= d:
            return f"{out} components from {d} dimensions"
        return None

    @property
    def code_bits_per_vector(self) -> int:
        return self.code_bits(self.dim, self.levels, self.out, self.pairs, self.groups)

    @property
    def used_thresholds(self) -> np.ndarray:
        """(out, levels - 1) bool: the thresholds each dimension has (k - 1 for k levels); the others are +inf."""
        return np.arange(self.levels - 1) < self.counts[:, None] - 1

    def spans(self) -> list[tuple[int, slice, slice]]:
        """Each group: its levels, its dimensions, and its bytes in the packed-levels (asym) code."""
        spans, first_dim, first_byte = [], 0, 0
        for count, k in self.groups:
            nbytes = -(-count // levels_per_byte(k))
            spans.append((k, slice(first_dim, first_dim + count), slice(first_byte, first_byte + nbytes)))
            first_dim, first_byte = first_dim + count, first_byte + nbytes
        return spans

    def values(self, x: np.ndarray) -> np.ndarray:
        """What the thresholds compare: the embedding, or its transform (and learned rotation)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        x = self.transform.apply(x) if self.transform is not None else x[:, : self.out]
        return x @ self.matrix.T if self.matrix is not None else x

    def fit(self, x: np.ndarray) -> None:
        """The transform (PCA), then thresholds and reconstruction values per dimension from the fitting texts, a
        group of dimensions at a time."""
        if isinstance(self.transform, faiss.PCAMatrix):
            with one_faiss_thread():
                self.transform.train(np.ascontiguousarray(x, dtype=np.float32))
        v = self.values(x)
        for k, dims, _ in self.spans():
            if self.kind == "quantile":
                self.thresholds[dims, : k - 1] = np.quantile(v[:, dims], np.arange(1, k) / k, axis=0).T
            elif self.kind == "lloyd":
                self.thresholds[dims, : k - 1] = lloyd_max(v[:, dims], k)
            if self.levels > 2:
                self.recon[dims, :k] = bin_means(v[:, dims], self.thresholds[dims, : k - 1])

    def state(self) -> dict[str, np.ndarray]:
        state = {"thresholds": self.thresholds, "recon": self.recon}
        if self.transform is not None and isinstance(self.transform, faiss.PCAMatrix):
            state["faiss_transform"] = transform_bytes(self.transform)
        if self.matrix is not None:
            state["rotation"] = self.matrix
        return state

    def load_state(self, tensors: dict, path: Path) -> None:
        require(tensors, ["thresholds", "recon"] + (["rotation"] if self.rotation else []), path)
        want = {"thresholds": (self.out, self.levels - 1), "recon": (self.out, self.levels), "rotation": (self.out, self.out)}
        for name, array in tensors.items():
            if name in want and tuple(array.shape) != want[name]:
                raise UsageError(f"{path}: {name} has shape {tuple(array.shape)}, not {want[name]}")
        used = {"thresholds": self.used_thresholds,  # the others are +inf
                "recon": np.arange(self.levels) < self.counts[:, None], "rotation": np.ones((self.out, self.out), bool)}
        for name, array in tensors.items():
            if name in want and not np.isfinite(array[used[name]]).all():
                raise UsageError(f"{path}: {name} holds {int((~np.isfinite(array[used[name]])).sum())} non-finite values")
        if not (tensors["thresholds"][~used["thresholds"]] == np.inf).all():
            raise UsageError(f"{path}: a threshold beyond a dimension's {self.groups} levels is not +inf")
        if self.rotation:
            error = np.abs(tensors["rotation"] @ tensors["rotation"].T - np.eye(self.out)).max()
            if error > 1e-3:
                raise UsageError(f"{path}: the rotation is not orthogonal (|R R^T - I| reaches {error:.3g})")
            self.matrix = np.asarray(tensors["rotation"], np.float32)
        if isinstance(self.transform, faiss.PCAMatrix):
            require(tensors, ["faiss_transform"], path)
            self.transform = read_transform(tensors["faiss_transform"], path, self.dim, self.out)
        self.thresholds = np.sort(np.asarray(tensors["thresholds"], np.float32), axis=1)
        self.recon = np.asarray(tensors["recon"], np.float32)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Per-dimension levels (n, out), uint8: how many thresholds each value is strictly above."""
        return levels_of(self.values(x), self.thresholds)

    def bits(self, x: np.ndarray) -> np.ndarray:
        """The bit code (n, code_bits): thermometer bits per dimension (k - 1 for k levels); Stage 2 pairs OR-ed."""
        levels = self.quantize(x)
        if self.pairs:
            half = self.out // 2
            return np.concatenate([levels[:, :half], levels[:, half::2] | levels[:, half + 1 :: 2]], axis=1).astype(bool)
        return (levels[:, :, None] > np.arange(self.levels - 1))[:, self.used_thresholds]

    def packs_levels(self, mode: str | None) -> bool:
        """Whether `mode` stores packed levels (asym, and a method searched by asym only) rather than bit codes."""
        return (mode or self.search_modes[0]) == "asym" and not self.pairs

    def encode(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        """Packed levels for asym rows (a group at a time), packed bit codes (np.packbits) for the others."""
        if not self.packs_levels(mode):
            return pack_bits(self.bits(x))
        levels = self.quantize(x)
        return np.concatenate([pack_levels(levels[:, dims], k) for k, dims, _ in self.spans()], axis=1)

    def decode(self, codes: np.ndarray, mode: str | None = None) -> np.ndarray:
        """Codes -> each level's reconstruction value (n, out); a Stage 2 code's bits as +-1 (n, code bits)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if self.packs_levels(mode):
            levels = np.concatenate([unpack_levels(codes[:, nbytes], k, dims.stop - dims.start)
                                     for k, dims, nbytes in self.spans()], axis=1)
        else:
            bits = np.unpackbits(codes, axis=1)[:, : self.code_bits_per_vector]
            if self.pairs:
                return 2 * bits.astype(np.float32) - 1
            levels = np.add.reduceat(bits, np.cumsum(self.counts - 1) - (self.counts - 1), axis=1)
        return np.take_along_axis(self.recon[None], levels[:, :, None].astype(np.int64), 2)[:, :, 0]

    def adc_layout(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Where each value of the asym search lies in the code: its byte (a group's packed levels, or Stage 2's
        packed bits), its place in that byte, and the most values a byte holds."""
        if self.pairs:
            bits = np.arange(self.code_bits_per_vector)
            return bits // 8, bits % 8, 8
        spans = [(np.arange(dims.stop - dims.start), levels_per_byte(k), nbytes.start) for k, dims, nbytes in self.spans()]
        return (np.concatenate([first + i // per for i, per, first in spans]), np.concatenate([i % per for i, per, _ in spans]),
                max(per for _, per, _ in spans))

    def adc_index(self, codes: np.ndarray):
        """A faiss IndexPQ holding the codes, one sub-quantiser per code byte, whose 256 centroids are what each byte
        value decodes to in that byte's values (zero-padded to the widest byte): its inner-product search is the float
        query . decoded document (asym), computed with faiss's lookup tables."""
        byte, place, width = self.adc_layout()
        nbytes = int(byte[-1]) + 1
        every_value = self.decode(np.repeat(np.arange(256, dtype=np.uint8)[:, None], nbytes, axis=1), "asym")
        centroids = np.zeros((nbytes, 256, width), np.float32)
        centroids[byte, :, place] = every_value.T
        index = faiss.IndexPQ(nbytes * width, nbytes, 8, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(centroids.ravel(), index.pq.centroids)
        index.is_trained = True
        index.add_sa_codes(np.ascontiguousarray(codes))
        return index

    def query_values(self, x: np.ndarray) -> np.ndarray:
        """The float query in the code's space: its values, with each Stage 2 pair's larger value."""
        v = self.values(x)
        if self.pairs:
            half = self.out // 2
            v = np.concatenate([v[:, :half], np.maximum(v[:, half::2], v[:, half + 1 :: 2])], axis=1)
        return v

    def store(self, codes: np.ndarray, mode: str | None = None) -> dict:
        if (mode or self.search_modes[0]) == "asym":
            return {"index": self.adc_index(codes)}
        index = faiss.IndexBinaryFlat(codes.shape[1] * 8)  # padding bits are 0 in every code: distances unchanged
        index.add(np.ascontiguousarray(codes))
        return {"index": index}

    def build(self, docs: np.ndarray, mode: str, rescorer=None) -> dict:
        stored = self.store(self.encode(docs, mode), mode)
        if mode == "rerank":
            stored["float"] = np.ascontiguousarray(docs, dtype=np.float32)
        if mode == "rerank_int8":
            stored["int8"] = rescorer.encode(docs)
            stored["rescorer"] = rescorer
        return stored

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str, rescore_k: int = RESCORE_K):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        index = stored["index"]
        top_k = min(top_k, index.ntotal)
        if mode == "asym":
            byte, place, width = self.adc_layout()
            values = np.zeros((len(queries), index.d), np.float32)  # the query laid out as the codebook's bytes
            values[:, byte * width + place] = self.query_values(queries)
            return index.search(values, top_k)
        if mode == "hamming":
            distances, ids = index.search(self.encode(queries, mode), top_k)
            return self.code_bits_per_vector - 2 * distances, ids
        if mode == "rerank":
            docs = lambda ids: stored["float"][ids]  # noqa: E731
        else:
            docs = lambda ids: stored["rescorer"].decode(stored["int8"][ids.ravel()]).reshape(*ids.shape, -1)  # noqa: E731
        return rerank_search(index, docs, queries, self.encode(queries, mode), min(rescore_k, index.ntotal), top_k)


def level_groups(d: int, levels: int = 2, out: int | None = None, groups: tuple | None = None) -> tuple:
    """A threshold method's ((count, levels), ...) groups of dimensions, in order: `groups` without empty ones, or all
    `out` (default d) dimensions at `levels`."""
    return tuple((c, k) for c, k in groups if c > 0) if groups else ((out or d, levels),)


def levels_of(v: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of each dimension's (sorted) thresholds each value is strictly above: (n, dims) uint8, filled a column
    at a time (no int64 temporaries: at 1M documents they were 4x the float matrix)."""
    levels = np.empty(v.shape, np.uint8)
    for j, t in enumerate(thresholds):
        levels[:, j] = np.searchsorted(t, v[:, j], side="left")
    return levels


def lloyd_max(v: np.ndarray, levels: int, iterations: int = 30) -> np.ndarray:
    """Lloyd-Max thresholds per dimension (1-D k-means, started at the quantiles): (dims, levels - 1), float32."""
    thresholds = np.quantile(v, np.arange(1, levels) / levels, axis=0).T.astype(np.float32)
    for _ in range(iterations):
        means = bin_means(v, thresholds)
        thresholds = np.sort((means[:, 1:] + means[:, :-1]) / 2, axis=1)
    return thresholds.astype(np.float32)


def bin_means(v: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The mean value of each level of each dimension (dims, levels); an empty level takes the middle of its
    thresholds (or its one threshold)."""
    levels, bins = thresholds.shape[1] + 1, levels_of(v, thresholds)
    edges = np.concatenate([thresholds[:, :1], thresholds, thresholds[:, -1:]], axis=1)
    means = (edges[:, 1:] + edges[:, :-1]) / 2
    for j in range(v.shape[1]):
        count = np.bincount(bins[:, j], minlength=levels)
        total = np.bincount(bins[:, j], weights=v[:, j], minlength=levels)
        means[j] = np.where(count > 0, total / np.maximum(count, 1), means[j])
    return means.astype(np.float32)


def random_rotation(d_in: int, d_out: int):
    """faiss's seeded random rotation (LSH's projection): the same matrix on every machine."""
    transform = faiss.RandomRotationMatrix(d_in, d_out)
    with one_faiss_thread():  # also 0.03 s rather than 3.7 s when two OpenMP threads share two busy cores
        transform.init(LSH_SEED)
    return transform


# ---------------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Entry:
    """A registry entry. `settings(d)`: the family's construction settings at dimension d. `fitted_on`: "nothing",
    "texts" (fitted by the training command on the protocol's fitting texts) or "training" (trained by it: `quantizer`
    names the quantization_modules.py class, trained with `loss_weights` = (similarity, InfoNCE) at learning rate `lr`). `learned`: its
    thresholds are learned (the report compares it with the best training-free row)."""

    family: type
    settings: Callable[[int], dict] = lambda d: {}
    fitted_on: str = "nothing"
    learned: bool = False
    quantizer: str | None = None
    loss_weights: tuple[float, float] = (1.0, 0.0)
    lr: float | None = None  # the training's learning rate, if not quantization_modules.LR (chosen on validation)
    protocols: tuple[str, ...] = ("transfer", "in-domain")
    notes: dict = field(default_factory=dict)


def faiss_codes(spec: str, code_bytes: int, kind: str, modes: dict | None = None) -> dict:
    return dict(spec=spec, code_bytes=code_bytes, kind=kind, modes=modes or {"asym": ""})


CAST, SYM_ASYM, ASYM = {"sym": ""}, {"sym": "", "asym": "+asym"}, ("asym",)
RABITQ = {"qb0": "", "qb4": "+qb4"}

METHODS = {  # name -> declaration; the report's order within equal bytes
    "float": Entry(Float),
    "float_adapted": Entry(Float, protocols=("in-domain",)),  # the in-domain reference: thresholds and rotations leave
    #                                                            every cosine unchanged, so it is the float model
    "float16": Entry(FaissCodes, lambda d: faiss_codes("SQfp16", 2 * d, "cast", CAST)),
    "bfloat16": Entry(FaissCodes, lambda d: faiss_codes("SQbf16", 2 * d, "cast", CAST)),
    "int8": Entry(FaissCodes, lambda d: faiss_codes("SQ8", d, "scalar", SYM_ASYM), "texts"),
    "int4": Entry(FaissCodes, lambda d: faiss_codes("SQ4", -(-d // 2), "scalar", SYM_ASYM), "texts"),
    "pca_half": Entry(PCA, lambda d: dict(k=d // 2), "texts"),
    "pca_quarter": Entry(PCA, lambda d: dict(k=d // 4), "texts"),
    # product quantisation: 8-bit codes, sub-quantiser counts that divide d (np: no polysemous training, unused here)
    "pq0.5b": Entry(FaissCodes, lambda d: faiss_codes(f"PQ{divisor(d, d // 16)}np", divisor(d, d // 16), "pq"), "texts"),
    "pq1b": Entry(FaissCodes, lambda d: faiss_codes(f"PQ{divisor(d, d // 8)}np", divisor(d, d // 8), "pq"), "texts"),
    "opq1b": Entry(FaissCodes, lambda d: faiss_codes(f"OPQ{divisor(d, d // 8)},PQ{divisor(d, d // 8)}np",
                                                     divisor(d, d // 8), "pq"), "texts"),
    "pq1.33b": Entry(FaissCodes, lambda d: faiss_codes(f"PQ{divisor(d, d // 6)}np", divisor(d, d // 6), "pq"), "texts"),
    "pq1.67b": Entry(FaissCodes, lambda d: faiss_codes(f"PQ{divisor(d, d // 6)}x10np", -(-divisor(d, d // 6) * 10 // 8), "pq"),
                     "texts"),  # 10-bit codes: 1,024 centroids per sub-quantiser
    "pq2b": Entry(FaissCodes, lambda d: faiss_codes(f"PQ{divisor(d, d // 4)}np", divisor(d, d // 4), "pq"), "texts"),
    "opq2b": Entry(FaissCodes, lambda d: faiss_codes(f"OPQ{divisor(d, d // 4)},PQ{divisor(d, d // 4)}np",
                                                     divisor(d, d // 4), "pq"), "texts"),
    "pq2b_fastscan": Entry(FaissCodes, lambda d: faiss_codes(f"PQ{divisor(d, d // 2, 2)}x4fs",
                                                             divisor(d, d // 2, 2) // 2, "pq"), "texts"),  # 4-bit codes
    "sq2b": Entry(FaissCodes, lambda d: faiss_codes("SQtqmse2", -(-d // 4), "scalar", SYM_ASYM), "texts"),
    # RaBitQ: 1 bit per dimension plus 8 bytes of factors; more bits per dimension plus 20 bytes
    "rabitq": Entry(FaissCodes, lambda d: faiss_codes("RaBitQ", -(-d // 8) + 8, "rabitq", RABITQ), "texts"),
    "rabitq2b": Entry(FaissCodes, lambda d: faiss_codes("RaBitQ2", -(-d // 4) + 20, "rabitq", {"qb8": ""}), "texts"),
    "rabitq4b": Entry(FaissCodes, lambda d: faiss_codes("RaBitQ4", -(-d // 2) + 20, "rabitq", {"qb8": ""}), "texts"),
    #          (multi-bit: the query in 8 bits gave the float query's (qb0) per-query nDCG@10 exactly on both tasks,
    #           in less time; faiss's float-query path is slow: results/<MiniLM>/experiments/rabitq-query-bits.md)
    # binary codes: sign bits, after a random rotation or PCA, learned thresholds (quantization_modules.py)
    "stage1_zero": Entry(ThresholdCodes),
    "lsh": Entry(ThresholdCodes, lambda d: dict(transform="lsh")),
    "pca_sign0.75b": Entry(ThresholdCodes, lambda d: dict(transform="pca", out=d * 3 // 4), "texts"),
    "stage1_trained": Entry(ThresholdCodes, lambda d: dict(thresholds="learned"), "training", learned=True,
                            quantizer="QuantizationModuleStage1"),
    "stage1_rotated": Entry(ThresholdCodes, lambda d: dict(thresholds="learned", rotation=True), "training",
                            learned=True, quantizer="QuantizationModuleStage1Rotated", loss_weights=(1.0, 1.0)),
    "stage2_trained": Entry(ThresholdCodes, lambda d: dict(thresholds="learned", pairs=True), "training", learned=True,
                            quantizer="QuantizationModuleStage2"),
    # multi-level codes: 3 levels (1.5 bits) or 4 levels (2 bits) per dimension; thresholds at quantiles, Lloyd-Max
    # or learned (Stage 1 at more bits)
    "quantile1.5b": Entry(ThresholdCodes, lambda d: dict(levels=3, thresholds="quantile"), "texts"),
    "lloyd1.5b": Entry(ThresholdCodes, lambda d: dict(levels=3, thresholds="lloyd"), "texts"),
    "learned1.5b": Entry(ThresholdCodes, lambda d: dict(levels=3, thresholds="learned"), "training", learned=True,
                         quantizer="QuantizationModuleMultiLevel", lr=1e-4),
    "quantile2b": Entry(ThresholdCodes, lambda d: dict(levels=4, thresholds="quantile"), "texts"),
    "lloyd2b": Entry(ThresholdCodes, lambda d: dict(levels=4, thresholds="lloyd"), "texts"),
    "learned2b": Entry(ThresholdCodes, lambda d: dict(levels=4, thresholds="learned"), "training", learned=True,
                       quantizer="QuantizationModuleMultiLevel", lr=1e-4),
    # a hybrid allocation (QAMA's quarters): the top principal components get the most levels, 2, 1.5 and 1 bits for
    # the first three quarters of d, 1 bit for half of the last quarter (0.5 per dimension; QAMA merges its pairs
    # with a learned layer): 1.25 bits per dimension of information, 1.625 in thermometer bits (QAMA counts those)
    "hybrid1.25b": Entry(ThresholdCodes, lambda d: dict(transform="pca", thresholds="lloyd",
                                                         groups=((d // 4, 4), (d // 4, 3), (d // 4, 2), (d // 8, 2))), "texts"),
    # truncation x quantisation: the top principal components (or the first dimensions, for Matryoshka models), each
    # cut into Lloyd-Max levels, searched with the float query (bytes: the packed levels)
    "pca0.5x2b": Entry(ThresholdCodes, lambda d: dict(transform="pca", out=d // 2, levels=4, thresholds="lloyd", search=ASYM), "texts"),
    "pca0.33x4b": Entry(ThresholdCodes, lambda d: dict(transform="pca", out=d // 3, levels=16, thresholds="lloyd", search=ASYM), "texts"),
    "pca0.67x2b": Entry(ThresholdCodes, lambda d: dict(transform="pca", out=2 * d // 3, levels=4, thresholds="lloyd", search=ASYM), "texts"),
    "pca0.5x4b": Entry(ThresholdCodes, lambda d: dict(transform="pca", out=d // 2, levels=16, thresholds="lloyd", search=ASYM), "texts"),
    "pca0.25x8b": Entry(ThresholdCodes, lambda d: dict(transform="pca", out=d // 4, levels=256, thresholds="lloyd", search=ASYM), "texts"),
    "first0.5x2b": Entry(ThresholdCodes, lambda d: dict(transform="first", out=d // 2, levels=4, thresholds="lloyd", search=ASYM), "texts"),
    "first0.5x4b": Entry(ThresholdCodes, lambda d: dict(transform="first", out=d // 2, levels=16, thresholds="lloyd", search=ASYM), "texts"),
}


def entry(name: str) -> Entry:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; the registry has: {', '.join(METHODS)}")
    return METHODS[name]


def modes_of(name: str, d: int) -> dict[str, str]:
    """A method's search modes at dimension d: mode -> row-name suffix, its own search first."""
    e = entry(name)
    return e.family.modes(**e.settings(d))


def row_bytes(name: str, d: int, mode: str) -> int:
    e = entry(name)
    return e.family.row_bytes(d, mode, **e.settings(d))


def describe(name: str, d: int) -> str:
    e = entry(name)
    return e.family.describe(d, **e.settings(d))


def family_of(name: str, d: int) -> str:
    e = entry(name)
    return e.family.label(**e.settings(d))


def bits_per_dimension(name: str, d: int) -> float:
    e = entry(name)
    return e.family.bits_per_dimension(d, **e.settings(d))


def applies(name: str, d: int) -> str | None:
    """None, or why the method cannot be used at dimension d."""
    e = entry(name)
    return e.family.applies(d, **e.settings(d))


def make_method(name: str, dim: int):
    """A fresh, unfitted method of the registry at dimension `dim`."""
    e = entry(name)
    if reason := applies(name, dim):
        raise UsageError(f"{name} does not apply at dimension {dim}: {reason}")
    method = e.family(dim, **e.settings(dim))
    method.name = name
    return method


def rows_of(name: str, d: int, modes=None) -> dict[str, str]:
    """The table rows of a method: row name -> mode. Its first mode always runs; others if in `modes` (None: all)."""
    all_modes = modes_of(name, d)
    first = next(iter(all_modes))
    return {name + suffix: mode for mode, suffix in all_modes.items() if mode == first or modes is None or mode in modes}


class MethodIndex:
    """An mteb search backend (add_documents / search / clear) for one row: it receives the shared encoder's float
    embeddings and stores and searches them as its method does, in its mode. `rescore_k` and `rescorer` (the int8
    method, for rerank_int8) are the row's settings. Validation in training ranks through it too."""

    def __init__(self, method, mode: str, rescore_k: int = RESCORE_K, rescorer=None):
        self.method, self.mode, self.rescore_k, self.rescorer = method, mode, rescore_k, rescorer
        self.stored, self.n_documents = None, 0

    def add_documents(self, embeddings, idxs: list[str] | None = None) -> None:
        docs = np.asarray(embeddings, dtype=np.float32)
        self.stored, self.n_documents = self.method.build(docs, self.mode, self.rescorer), len(docs)

    def search(self, embeddings, top_k: int, similarity_fn=None, top_ranked=None, query_idx_to_id=None):
        top_k = min(top_k, self.n_documents)  # faiss pads a short list with id -1, which mteb reads as the last document
        scores, ids = self.method.search(self.stored, np.asarray(embeddings, dtype=np.float32), top_k, self.mode,
                                         self.rescore_k)
        return np.asarray(scores), np.asarray(ids)

    def clear(self) -> None:
        self.stored = None


def stored_bytes(stored: dict) -> int:
    """Bytes a built row keeps for its documents: faiss codes (factors included) plus the arrays beside them. The
    tests compare it with the declared row_bytes."""
    total = 0
    for part in stored.values():
        if isinstance(part, np.ndarray):
            total += part.nbytes
        elif isinstance(part, faiss.IndexBinary):
            total += part.code_size * part.ntotal
        elif isinstance(part, faiss.Index):
            total += part.sa_code_size() * part.ntotal
    return total


def rank(method, mode: str, docs: np.ndarray, queries: np.ndarray, doc_ids: list, query_ids: list,
         top: int = 1000, rescore_k: int = RESCORE_K, rescorer=None) -> dict[str, dict[str, float]]:
    """{query id: {document id: score}} of a row's top documents (mteb's retrieval depth is 1,000): the same index and
    search the evaluation's rows use, so validation chooses on the ranking that is reported."""
    index = MethodIndex(method, mode, rescore_k, rescorer)
    index.add_documents(docs, doc_ids)
    scores, ids = index.search(queries, min(top, len(doc_ids)))
    return {q: {doc_ids[j]: float(s) for j, s in zip(row_ids, row_scores)}
            for q, row_ids, row_scores in zip(query_ids, ids, scores)}
