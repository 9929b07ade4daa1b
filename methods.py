"""The methods: every way to store an embedding and search it, and the registry `METHODS` that declares them.

Read top to bottom: the search modes (one table) -> helpers -> the families, from the simplest -> the registry ->
the search backend every command uses (MethodIndex).

A registry entry is a declaration, read without building anything: its family (the class that builds it), the
family's settings at embedding dimension d (one frozen dataclass per family), what it is fitted on (nothing, the
fitting texts, or training by quantization_modules.py, whose quantiser class it names). A family is a subclass of
`Family`, whose abstract methods are the protocol the evaluation, the training command, the report, `load_encoder`
and the benchmarks use without knowing which family it is: a family that leaves one out cannot be registered.

Add a method with an existing family: one line in METHODS, e.g. 2/3 of a bit per dimension by PQ (d/12
sub-quantisers of 8 bits: 32 B at d = 384, 64 B at d = 768):

    "pq0.67b": Entry(FaissCodes, lambda d: pq(d, d // 12), "texts"),

then `python quantization_modules.py --methods pq0.67b` fits it and the evaluation, the report and bench_search.py
run it. A new family is one subclass of Family (Float is the smallest) with its settings dataclass.
"""

import contextlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from data import UsageError

RERANK_K = 50  # first-stage candidates re-ranked in the +rerank and +rerank_int8 rows
RERANK_DEPTHS = (10, 20, 50, 100, 200)  # extra +rerank_int8@k rows of the evaluation's depth table; bench_search's depths
LSH_SEED = 0
OPQ_ITERATIONS = 20  # OPQ's alternations of rotation and PQ (faiss's default 50): MiniLM's opq2b scored the same at 20
#                      on validation and test in half the fit time (results/<MiniLM>/experiments/opq-iterations.md)


# ---------------------------------------------------------------------------------------------------------------
# search modes: what a row of each computes, and what it keeps beside the method's codes


@dataclass(frozen=True)
class Mode:
    """A search mode. `computes`: what a row of this mode scores; `terms`: the same in sentence-transformers' and
    faiss's words; `reranker`: the registry method whose stored documents re-rank the first stage's top k (kept beside
    the codes, its bytes counted in the row's); `query_bits`: RaBitQ's query bits (faiss RaBitQSearchParameters.qb);
    `marker`: the plot's."""

    computes: str
    terms: str
    marker: str
    reranker: str | None = None
    query_bits: int | None = None


MODES = {
    "exact": Mode("float query . float document", "precision='float32'; faiss IndexFlatIP", "o"),
    "sym": Mode("the query coded and decoded as the documents are, then . the decoded document",
                "faiss sa_decode of both", "v"),
    "asym": Mode("float query . decoded document", "faiss's asymmetric distance computation (ADC); for bit codes "
                 "semantic_search_faiss(rescore=True) over every document", "^"),
    "hamming": Mode("Hamming distance between the query's and the document's bit codes", "quantize_embeddings("
                    "precision='ubinary') + semantic_search_faiss without rescoring; faiss IndexBinaryFlat", "s"),
    "rerank": Mode("the Hamming top k re-ranked by float query . float document", "oversampling with rescoring "
                   "(Qdrant, Elastic)", "D", reranker="float"),
    "rerank_int8": Mode("the Hamming top k re-ranked by float query . int8 document", "the same with int8 documents "
                        "kept beside the bits", "d", reranker="int8"),
    "qb0": Mode("RaBitQ with the float query", "RaBitQSearchParameters(qb=0)", "o", query_bits=0),
    "qb4": Mode("RaBitQ with the query in 4 bits", "RaBitQSearchParameters(qb=4)", "P", query_bits=4),
    "qb8": Mode("RaBitQ with the query in 8 bits", "RaBitQSearchParameters(qb=8)", "X", query_bits=8),
}
MODE_NAMES = tuple(MODES)
DEPTH_MODE = "rerank_int8"  # the mode whose depth k the evaluation sweeps: its extra "<row>@k" rows
BIT_CODE_MODES = ("hamming", "asym", "rerank", "rerank_int8")  # threshold codes' modes, the first their own search
FittedOn = Literal["nothing", "texts", "training"]


# ---------------------------------------------------------------------------------------------------------------
# helpers


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


def random_rotation(d_in: int, d_out: int):
    """faiss's seeded random rotation (LSH's projection): the same matrix on every machine."""
    transform = faiss.RandomRotationMatrix(d_in, d_out)
    with one_faiss_thread():  # also 0.03 s rather than 3.7 s when two OpenMP threads share two busy cores
        transform.init(LSH_SEED)
    return transform


# ---------------------------------------------------------------------------------------------------------------
# the family protocol


class Family(ABC):
    """What every family gives. The static methods describe a method from its settings at dimension d without
    building it (the registry is read that way); the others run on a built method. A built method keeps its registry
    `name`, its dimension and its settings."""

    Settings: type  # the family's settings dataclass
    DESCRIBED_BY_EACH = ("code_bytes", "describe", "label", "information_bits", "applies")  # never inherited

    def __init_subclass__(cls, **kwargs):
        """A family declares its own description: a parent's (a subclass of Float inheriting "float" and 32 bits)
        would describe it wrongly without a word."""
        super().__init_subclass__(**kwargs)
        if missing := [name for name in cls.DESCRIBED_BY_EACH if name not in vars(cls)]:
            raise TypeError(f"family {cls.__name__} must declare its own {', '.join(missing)}")

    def __init__(self, name: str, dim: int, settings):
        if not isinstance(settings, self.Settings):
            raise TypeError(f"{name}: {type(self).__name__} takes {self.Settings.__name__}, not {type(settings).__name__}")
        self.name, self.dim, self.settings = name, dim, settings

    @staticmethod
    @abstractmethod
    def modes(s) -> tuple[str, ...]:
        """Its search modes (names of MODES), its own search first."""

    @staticmethod
    @abstractmethod
    def code_bytes(d: int, mode: str, s) -> int:
        """Bytes per document of the codes a row of `mode` stores (a re-ranking mode's documents are added by
        row_bytes)."""

    @staticmethod
    @abstractmethod
    def describe(d: int, s) -> str:
        """What it is at dimension d ("faiss PQ48np"), for the report."""

    @staticmethod
    @abstractmethod
    def label(s) -> str:
        """Its family's name in the report (the plot's colours)."""

    @staticmethod
    @abstractmethod
    def information_bits(d: int, s) -> float:
        """Bits of information per embedding dimension (log2 of a threshold code's levels; a vector code's bits): the
        report groups learned and training-free rows by it. Stored bits per dimension are 8 * row_bytes / d."""

    @staticmethod
    @abstractmethod
    def applies(d: int, s) -> str | None:
        """None, or why it cannot be used at dimension d (the row is skipped with that line)."""

    @abstractmethod
    def fit(self, x: np.ndarray) -> None:
        """Learn from the fitting texts' float embeddings (a method fitted on nothing learns nothing)."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """What fit or training learned, as arrays for a safetensors checkpoint."""

    @abstractmethod
    def load_state(self, tensors: dict[str, np.ndarray], path: Path) -> None:
        """Restore what fit learned; refuse (UsageError naming `path`) what cannot be it."""

    @abstractmethod
    def encode(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        """What it stores per vector in `mode` (default: its own search's)."""

    @abstractmethod
    def decode(self, codes: np.ndarray, mode: str | None = None) -> np.ndarray:
        """The float vectors the codes stand for (what an asymmetric search compares the float query with)."""

    @abstractmethod
    def store(self, codes: np.ndarray, mode: str | None = None) -> dict:
        """What a row keeps, from the documents' codes (a faiss index or arrays)."""

    @abstractmethod
    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str, rerank_k: int = RERANK_K):
        """(scores, ids) of the top_k documents per query, best first."""

    def build(self, docs: np.ndarray, mode: str, reranker=None) -> dict:
        """What a row of `mode` keeps for the float documents: the codes' store, and the re-ranker's documents."""
        stored = self.store(self.encode(docs, mode), mode)
        if reranker is not None:
            stored |= {"rerank": reranker.encode(docs), "reranker": reranker}
        return stored


# ---------------------------------------------------------------------------------------------------------------
# the families, from the simplest


@dataclass(frozen=True)
class FloatSettings:
    """Float has nothing to set."""


class Float(Family):
    """float32 embeddings, exact cosine: unit rows in faiss IndexFlatIP."""

    Settings = FloatSettings

    @staticmethod
    def modes(s) -> tuple[str, ...]:
        return ("exact",)

    @staticmethod
    def code_bytes(d: int, mode: str, s) -> int:
        return 4 * d

    @staticmethod
    def describe(d: int, s) -> str:
        return f"{d} x float32"

    @staticmethod
    def label(s) -> str:
        return "float"

    @staticmethod
    def information_bits(d: int, s) -> float:
        return 32.0

    @staticmethod
    def applies(d: int, s) -> str | None:
        return None

    def fit(self, x: np.ndarray) -> None:
        pass

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, tensors: dict, path: Path) -> None:
        pass

    def encode(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        return normalise(x)

    def decode(self, codes: np.ndarray, mode: str | None = None) -> np.ndarray:
        return np.asarray(codes, dtype=np.float32)

    def store(self, codes: np.ndarray, mode: str | None = None) -> dict:
        index = faiss.IndexFlatIP(codes.shape[1])
        index.add(np.ascontiguousarray(codes, dtype=np.float32))
        return {"index": index}

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str, rerank_k: int = RERANK_K):
        return stored["index"].search(self.encode(queries), top_k)


@dataclass(frozen=True)
class PCASettings:
    k: int  # principal components kept


class PCA(Float):
    """float32 projection on the top `k` principal components of the fitting texts (faiss PCAMatrix), cosine. Searched
    as Float searches its projections; every description its own."""

    Settings = PCASettings

    def __init__(self, name: str, dim: int, settings: PCASettings):
        super().__init__(name, dim, settings)
        self.transform = faiss.PCAMatrix(dim, settings.k)

    @staticmethod
    def code_bytes(d: int, mode: str, s: PCASettings) -> int:
        return 4 * s.k

    @staticmethod
    def describe(d: int, s: PCASettings) -> str:
        return f"top {s.k} of {d} principal components x float32"

    @staticmethod
    def label(s: PCASettings) -> str:
        return "pca"

    @staticmethod
    def information_bits(d: int, s: PCASettings) -> float:
        return 32.0 * s.k / d

    @staticmethod
    def applies(d: int, s: PCASettings) -> str | None:
        return None if 0 < s.k <= d else f"{s.k} components from {d} dimensions"

    def fit(self, x: np.ndarray) -> None:
        with one_faiss_thread():
            self.transform.train(np.ascontiguousarray(x, dtype=np.float32))

    def state(self) -> dict[str, np.ndarray]:
        return {"faiss_transform": transform_bytes(self.transform)}

    def load_state(self, tensors: dict, path: Path) -> None:
        require(tensors, ["faiss_transform"], path)
        self.transform = read_transform(tensors["faiss_transform"], path, self.dim, self.settings.k)

    def encode(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        return normalise(self.transform.apply(np.ascontiguousarray(x, dtype=np.float32)))


@dataclass(frozen=True)
class FaissSettings:
    """spec: faiss index_factory's; code_bytes: what faiss stores per vector (a test checks it against faiss's
    sa_code_size); label: the report's family; modes: its search modes, its own first."""

    spec: str
    code_bytes: int
    label: str
    modes: tuple[str, ...] = ("asym",)


def pq(d: int, m: int, bits: int = 8, opq: bool = False, fast_scan: bool = False) -> FaissSettings:
    """faiss product quantisation of d dimensions: the count of sub-quantisers that divides d nearest `m` (an even one
    for fast scan), `bits` per sub-quantiser code (np: no polysemous training, which only renumbers centroids for a
    Hamming filter unused here); OPQ's learned rotation first if `opq`. No count divides d: code_bytes 0."""
    m = divisor(d, m, 2 if fast_scan else 1)
    code = f"PQ{m}x{bits}fs" if fast_scan else f"PQ{m}" + ("" if bits == 8 else f"x{bits}") + "np"
    return FaissSettings(f"OPQ{m},{code}" if opq else code, -(-m * bits // 8), "pq")


def rq(d: int, bits_per_dim: float, fast_scan: bool = False) -> FaissSettings:
    """faiss residual quantisation of d dimensions at `bits_per_dim`: a sum of codewords, one from each of m codebooks
    of 256 (fast scan: 16) full-dimensional centroids, each codebook fitted on the residuals the ones before leave,
    codes chosen by beam search (faiss's default beam, 5). No norm code: the inner product of a float query with a sum
    of codewords is the sum of its look-ups (faiss ST_LUT_nonorm), and every row scores unit vectors by inner product."""
    bits = 4 if fast_scan else 8
    m = round(bits_per_dim * d / bits)
    return FaissSettings(f"RQ{m}x{bits}" + ("fs" if fast_scan else ""), -(-m * bits // 8), "additive")


class FaissCodes(Family):
    """Documents stored as the codes of a faiss index made by `index_factory(spec)`: casts (SQfp16, SQbf16), scalar
    quantisation with per-dimension ranges fitted on the fitting texts (SQ8, SQ4), product quantisation (PQ, OPQ),
    residual quantisation (RQ), RaBitQ (1 to 9 bits per dimension plus per-vector factors)."""

    Settings = FaissSettings

    def __init__(self, name: str, dim: int, settings: FaissSettings):
        super().__init__(name, dim, settings)
        self.faiss_index = faiss.index_factory(dim, settings.spec, faiss.METRIC_INNER_PRODUCT)
        if isinstance(self.faiss_index, faiss.IndexPreTransform):
            for i in range(self.faiss_index.chain.size()):
                if isinstance(transform := faiss.downcast_VectorTransform(self.faiss_index.chain.at(i)), faiss.OPQMatrix):
                    transform.niter = OPQ_ITERATIONS
        inner = self.inner(self.faiss_index)
        if isinstance(inner, faiss.IndexPQ) or hasattr(inner, "rq"):  # only silences a warning per k-means (10-bit
            #   PQ or residual quantisation's beam on 22k texts); the training command prints how many texts it fits on
            (inner.pq if isinstance(inner, faiss.IndexPQ) else inner.rq).cp.min_points_per_centroid = 1

    @staticmethod
    def inner(index):
        return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index

    @staticmethod
    def modes(s: FaissSettings) -> tuple[str, ...]:
        return s.modes

    @staticmethod
    def code_bytes(d: int, mode: str, s: FaissSettings) -> int:
        return s.code_bytes

    @staticmethod
    def describe(d: int, s: FaissSettings) -> str:
        return f"faiss {s.spec}" + (f" ({OPQ_ITERATIONS} iterations)" if s.spec.startswith("OPQ") else "")

    @staticmethod
    def label(s: FaissSettings) -> str:
        return s.label

    @staticmethod
    def information_bits(d: int, s: FaissSettings) -> float:
        return 8.0 * s.code_bytes / d

    @staticmethod
    def applies(d: int, s: FaissSettings) -> str | None:
        return None if s.code_bytes > 0 else f"no sub-quantiser count of {s.spec} divides {d}"

    def fit(self, x: np.ndarray) -> None:
        if self.settings.spec.startswith("OPQ") and len(x) < self.dim:  # faiss 1.15 crashes the process (seen at d = 1,024)
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
                             f"not a trained {self.settings.spec} of dimension {self.dim}")
        probe = index.sa_decode(index.sa_encode(np.eye(self.dim, dtype=np.float32)))
        if self.settings.label in ("pq", "additive"):  # the probe may miss a bad centroid: decode every one
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

    def build(self, docs: np.ndarray, mode: str, reranker=None) -> dict:
        index = faiss.deserialize_index(faiss.serialize_index(self.faiss_index))  # a copy of the trained, empty index
        index.add(np.ascontiguousarray(docs, dtype=np.float32))  # stores the codes encode() gives (fast-scan too)
        return {"index": index}

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str, rerank_k: int = RERANK_K):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if mode == "sym":
            queries = self.decode(self.encode(queries))
        bits, index, params = MODES[mode].query_bits, stored["index"], None
        if bits is not None and isinstance(self.inner(index), faiss.IndexRaBitQFastScan):
            self.inner(index).qb = bits  # fast scan takes the query's bits as a setting (1 to 8), not a parameter
        elif bits is not None:
            params = faiss.RaBitQSearchParameters(qb=bits)
        return index.search(queries, top_k, params=params)


@dataclass(frozen=True)
class ThresholdSettings:
    """levels: per dimension (2: bits); thresholds: "zero", "quantile" (the i/levels quantiles of the fitting texts),
    "lloyd" (Lloyd-Max: 1-D k-means per dimension) or "learned" (by quantization_modules.py); transform: None, "lsh"
    (faiss's seeded random rotation to `out` dimensions), "pca" (the top `out` principal components) or "first" (the
    first `out` dimensions); rotation: a learned rotation before the thresholds; modes: its search modes, its own
    first; groups: a hybrid allocation ((count, levels), ...), the first `count` dimensions at that many levels, the
    next group the next ones (after PCA, the most variant components get the most levels)."""

    levels: int = 2
    thresholds: str = "zero"
    transform: str | None = None
    out: int | None = None
    rotation: bool = False
    modes: tuple[str, ...] = BIT_CODE_MODES
    groups: tuple[tuple[int, int], ...] | None = None

    def level_groups(self, d: int) -> tuple[tuple[int, int], ...]:
        """((count, levels), ...) in order: `groups` without empty ones, or all `out` (default d) dimensions at `levels`."""
        return tuple((c, k) for c, k in self.groups if c > 0) if self.groups else ((self.out or d, self.levels),)

    def dims(self, d: int) -> int:
        """The dimensions the thresholds cut (after the transform)."""
        return sum(c for c, _ in self.level_groups(d))


class ThresholdCodes(Family):
    """Each dimension (after an optional transform) cut into levels by thresholds; the level is the number of
    thresholds the value is above (strictly: a value on a threshold is below it, as sentence-transformers' `> 0`). Two
    levels with zero thresholds are sign bits.

    Stored for Hamming search as thermometer codes (level l of k: k - 1 bits, l of them set, so the Hamming distance is
    the L1 distance between levels), packed with np.packbits; for asym as packed levels (base k, `pack_levels`),
    searched by faiss's ADC: each code byte indexes a table of its dimensions' reconstruction values, which is a
    product quantiser's codebook (`adc_index`). decode: the level's reconstruction value; for two levels +-1 (the
    Hamming geometry), for more the mean of the fitting texts in that level. A dimension with fewer levels than the
    most (a hybrid's) has its unused thresholds at +inf (no value is above them)."""

    Settings = ThresholdSettings

    def __init__(self, name: str, dim: int, settings: ThresholdSettings):
        super().__init__(name, dim, settings)
        s = settings
        self.groups = s.level_groups(dim)
        self.levels, self.out = max(k for _, k in self.groups), s.dims(dim)
        self.rule, self.search_modes = s.thresholds, s.modes
        self.transform = {None: lambda: None, "first": lambda: None, "pca": lambda: faiss.PCAMatrix(dim, self.out),
                          "lsh": lambda: random_rotation(dim, self.out)}[s.transform]()
        self.counts = np.concatenate([np.full(c, k) for c, k in self.groups])  # levels per dimension
        self.thresholds = np.where(self.used_thresholds, 0.0, np.inf).astype(np.float32)
        self.recon = np.where(np.arange(self.levels) < self.counts[:, None],  # until fitted: the thermometer code's
                              2 * np.arange(self.levels) - (self.counts[:, None] - 1), 0).astype(np.float32)  # +-1 bits summed
        self.matrix = np.eye(self.out, dtype=np.float32) if s.rotation else None  # the learned rotation

    @staticmethod
    def modes(s: ThresholdSettings) -> tuple[str, ...]:
        return s.modes

    @staticmethod
    def code_bits(d: int, s: ThresholdSettings) -> int:
        """Bits of the thermometer code: levels - 1 per dimension."""
        return sum(c * (k - 1) for c, k in s.level_groups(d))

    @staticmethod
    def code_bytes(d: int, mode: str, s: ThresholdSettings) -> int:
        if mode == "asym":
            return sum(-(-c // levels_per_byte(k)) for c, k in s.level_groups(d))
        return -(-ThresholdCodes.code_bits(d, s) // 8)

    @staticmethod
    def describe(d: int, s: ThresholdSettings) -> str:
        groups, out = s.level_groups(d), s.dims(d)
        what = {None: f"{d} dimensions", "pca": f"top {out} of {d} principal components",
                "lsh": f"random rotation {d} -> {out}", "first": f"first {out} of {d} dimensions"}[s.transform]
        bits = ThresholdCodes.code_bits(d, s)
        if len(groups) > 1:
            per = ThresholdCodes.information_bits(d, s)
            how = " + ".join(f"{c} x {k}" for c, k in groups) + f" levels ({per:.4g} bits per dimension), {bits}-bit thermometer code"
        elif s.levels == 2:
            how = f"{bits} bits"
        elif s.modes[0] == "asym":
            how = f"{s.levels} levels ({np.log2(s.levels):.3g} bits) per dimension"
        else:
            how = f"{s.levels} levels, {bits}-bit thermometer code"
        return f"{what}, {s.thresholds} thresholds{' after a learned rotation' if s.rotation else ''}, {how}"

    @staticmethod
    def label(s: ThresholdSettings) -> str:
        return "binary" if s.levels == 2 and not s.groups else "multi-level"

    @staticmethod
    def information_bits(d: int, s: ThresholdSettings) -> float:
        """log2 of the levels per embedding dimension: 1 for sign bits, 0.75 for 288 of 384 PCA components, 1.5 for
        three levels (rounded: log2 3 = 1.58), 2 for four."""
        per = lambda k: {2: 1.0, 3: 1.5}.get(k, float(np.log2(k)))  # noqa: E731
        return round(sum(c * per(k) for c, k in s.level_groups(d)) / d, 3)

    @staticmethod
    def applies(d: int, s: ThresholdSettings) -> str | None:
        out = s.dims(d)
        return f"{out} components from {d} dimensions" if s.transform in ("pca", "first") and not 0 < out <= d else None

    @property
    def code_bits_per_vector(self) -> int:
        return self.code_bits(self.dim, self.settings)

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
            if self.rule == "quantile":
                self.thresholds[dims, : k - 1] = np.quantile(v[:, dims], np.arange(1, k) / k, axis=0).T
            elif self.rule == "lloyd":
                self.thresholds[dims, : k - 1] = lloyd_max(v[:, dims], k)
            if self.levels > 2:
                self.recon[dims, :k] = bin_means(v[:, dims], self.thresholds[dims, : k - 1])

    def state(self) -> dict[str, np.ndarray]:
        state = {"thresholds": self.thresholds, "recon": self.recon}
        if isinstance(self.transform, faiss.PCAMatrix):
            state["faiss_transform"] = transform_bytes(self.transform)
        if self.matrix is not None:
            state["rotation"] = self.matrix
        return state

    def load_state(self, tensors: dict, path: Path) -> None:
        rotation = self.settings.rotation
        require(tensors, ["thresholds", "recon"] + (["rotation"] if rotation else []), path)
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
        if rotation:
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
        """The bit code (n, code_bits): thermometer bits per dimension (k - 1 for k levels)."""
        return (self.quantize(x)[:, :, None] > np.arange(self.levels - 1))[:, self.used_thresholds]

    def packs_levels(self, mode: str | None) -> bool:
        """Whether `mode` stores packed levels (asym, and a method searched by asym only) rather than bit codes."""
        return (mode or self.search_modes[0]) == "asym"

    def encode(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        """Packed levels for asym rows (a group at a time), packed bit codes (np.packbits) for the others."""
        if not self.packs_levels(mode):
            return pack_bits(self.bits(x))
        levels = self.quantize(x)
        return np.concatenate([pack_levels(levels[:, dims], k) for k, dims, _ in self.spans()], axis=1)

    def decode(self, codes: np.ndarray, mode: str | None = None) -> np.ndarray:
        """Codes -> each level's reconstruction value (n, out)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if self.packs_levels(mode):
            levels = np.concatenate([unpack_levels(codes[:, nbytes], k, dims.stop - dims.start)
                                     for k, dims, nbytes in self.spans()], axis=1)
        else:
            bits = np.unpackbits(codes, axis=1)[:, : self.code_bits_per_vector]
            levels = np.add.reduceat(bits, np.cumsum(self.counts - 1) - (self.counts - 1), axis=1)
        return np.take_along_axis(self.recon[None], levels[:, :, None].astype(np.int64), 2)[:, :, 0]

    def adc_layout(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Where each value of the asym search lies in the code: its byte (a group's packed levels), its place in that
        byte, and the most values a byte holds."""
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
        """The float query in the code's space (what asym multiplies the decoded documents with)."""
        return self.values(x)

    def store(self, codes: np.ndarray, mode: str | None = None) -> dict:
        if (mode or self.search_modes[0]) == "asym":
            return {"index": self.adc_index(codes)}
        index = faiss.IndexBinaryFlat(codes.shape[1] * 8)  # padding bits are 0 in every code: distances unchanged
        index.add(np.ascontiguousarray(codes))
        return {"index": index}

    def search(self, stored: dict, queries: np.ndarray, top_k: int, mode: str, rerank_k: int = RERANK_K):
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
        reranker, kept = stored["reranker"], stored["rerank"]  # a re-ranking mode: the Hamming top k re-scored
        docs = lambda ids: reranker.decode(kept[ids.ravel()]).reshape(*ids.shape, -1)  # noqa: E731
        return rerank_search(index, docs, queries, self.encode(queries, mode), min(rerank_k, index.ntotal), top_k)


class Stage2Codes(ThresholdCodes):
    """Stage 2 (two levels only): the first half of the dimensions one bit each, the second half in pairs (a, a+1),
    one bit per pair that is 0 only when both values are under their thresholds (OR). 384 dims -> 192 + 96 = 288 bits.
    Decoded as +-1 per bit; asym multiplies them with the query's values and each pair's larger value."""

    @staticmethod
    def code_bits(d: int, s: ThresholdSettings) -> int:
        out = s.dims(d)
        return out // 2 + out // 4

    @staticmethod
    def code_bytes(d: int, mode: str, s: ThresholdSettings) -> int:
        return -(-Stage2Codes.code_bits(d, s) // 8)  # asym reads the bits too

    @staticmethod
    def describe(d: int, s: ThresholdSettings) -> str:
        return f"{d} dimensions, {s.thresholds} thresholds, Stage 2 pairs, {Stage2Codes.code_bits(d, s)} bits"

    @staticmethod
    def label(s: ThresholdSettings) -> str:
        return "binary"

    @staticmethod
    def information_bits(d: int, s: ThresholdSettings) -> float:
        return round(0.75 * s.dims(d) / d, 3)

    @staticmethod
    def applies(d: int, s: ThresholdSettings) -> str | None:
        if s.levels != 2 or s.groups or s.transform:
            return "Stage 2 pairs bits of untransformed dimensions"
        return f"Stage 2 pairs need a dimension divisible by 4, not {s.dims(d)}" if s.dims(d) % 4 else None

    def bits(self, x: np.ndarray) -> np.ndarray:
        levels, half = self.quantize(x), self.out // 2
        return np.concatenate([levels[:, :half], levels[:, half::2] | levels[:, half + 1 :: 2]], axis=1).astype(bool)

    def packs_levels(self, mode: str | None) -> bool:
        return False

    def decode(self, codes: np.ndarray, mode: str | None = None) -> np.ndarray:
        bits = np.unpackbits(np.ascontiguousarray(codes, dtype=np.uint8), axis=1)[:, : self.code_bits_per_vector]
        return 2 * bits.astype(np.float32) - 1

    def adc_layout(self) -> tuple[np.ndarray, np.ndarray, int]:
        bits = np.arange(self.code_bits_per_vector)
        return bits // 8, bits % 8, 8

    def query_values(self, x: np.ndarray) -> np.ndarray:
        v, half = self.values(x), self.out // 2
        return np.concatenate([v[:, :half], np.maximum(v[:, half::2], v[:, half + 1 :: 2])], axis=1)


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


# ---------------------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Entry:
    """A registry entry. `settings(d)`: the family's settings dataclass at dimension d (None: the family's defaults).
    `fitted_on`: "nothing", "texts" (fitted by the training command on the protocol's fitting texts) or "training"
    (trained by it: `quantizer` names the quantization_modules.py class, trained with `loss_weights` = (similarity,
    InfoNCE) at learning rate `lr`, None for quantization_modules.LR). A trained method is a learned one: the report
    tests it against the training-free rows of its family, bits and mode. `slow_fit`: a fit of CPU minutes (additive
    quantisers), made by the training command only when named in its --methods; the evaluation does not fit it itself
    but names that command, as for an untrained learned method."""

    family: type[Family]
    settings: Callable[[int], object] | None = None
    fitted_on: FittedOn = "nothing"
    quantizer: str | None = None
    loss_weights: tuple[float, float] = (1.0, 0.0)
    lr: float | None = None
    protocols: tuple[str, ...] = ("transfer", "in-domain")
    slow_fit: bool = False

    def __post_init__(self):  # a wrong declaration fails at import, not in a report
        if inspect.isabstract(self.family):
            raise TypeError(f"{self.family.__name__} lacks {', '.join(sorted(self.family.__abstractmethods__))}")
        if (self.fitted_on == "training") != (self.quantizer is not None):
            raise TypeError("an entry is trained (fitted_on='training') exactly when it names a quantizer")

    @property
    def learned(self) -> bool:
        return self.fitted_on == "training"


CAST, SYM_ASYM = ("sym",), ("sym", "asym")
RABITQ = ("qb0", "qb4")
ASYM = ("asym",)
SLOW_FIT = {"slow_fit": True, "protocols": ("transfer",)}  # training-free: no in-domain row

METHODS = {  # name -> declaration; the report's order within equal bytes
    "float": Entry(Float),
    "float_adapted": Entry(Float, protocols=("in-domain",)),  # the in-domain reference: thresholds and rotations leave
    #                                                            every cosine unchanged, so it is the float model
    "float16": Entry(FaissCodes, lambda d: FaissSettings("SQfp16", 2 * d, "cast", CAST)),
    "bfloat16": Entry(FaissCodes, lambda d: FaissSettings("SQbf16", 2 * d, "cast", CAST)),
    "int8": Entry(FaissCodes, lambda d: FaissSettings("SQ8", d, "scalar", SYM_ASYM), "texts"),
    "int4": Entry(FaissCodes, lambda d: FaissSettings("SQ4", -(-d // 2), "scalar", SYM_ASYM), "texts"),
    "pca_half": Entry(PCA, lambda d: PCASettings(d // 2), "texts"),
    "pca_quarter": Entry(PCA, lambda d: PCASettings(d // 4), "texts"),
    # product quantisation, named by bits per dimension: 8-bit codes of d/16, d/8, d/6, d/4 dimensions
    "pq0.5b": Entry(FaissCodes, lambda d: pq(d, d // 16), "texts"),
    "pq1b": Entry(FaissCodes, lambda d: pq(d, d // 8), "texts"),
    "opq1b": Entry(FaissCodes, lambda d: pq(d, d // 8, opq=True), "texts"),
    "pq1.33b": Entry(FaissCodes, lambda d: pq(d, d // 6), "texts"),
    "pq1.67b": Entry(FaissCodes, lambda d: pq(d, d // 6, bits=10), "texts"),  # 1,024 centroids per sub-quantiser
    "pq2b": Entry(FaissCodes, lambda d: pq(d, d // 4), "texts"),
    "opq2b": Entry(FaissCodes, lambda d: pq(d, d // 4, opq=True), "texts"),
    "pq2b_fastscan": Entry(FaissCodes, lambda d: pq(d, d // 2, bits=4, fast_scan=True), "texts"),
    "sq2b": Entry(FaissCodes, lambda d: FaissSettings("SQtqmse2", -(-d // 4), "scalar", SYM_ASYM), "texts"),
    # TurboQuant as designed: faiss's seeded random rotation first, so every coordinate is near N(0, 1/d), the
    # distribution its levels are made for (sq2b codes the raw coordinates); tq2b: its inner-product form, 2 bits per
    # dimension plus 8 bytes (faiss SQtq2)
    "sq2b_rotated": Entry(FaissCodes, lambda d: FaissSettings("RR,SQtqmse2", -(-d // 4), "scalar", SYM_ASYM), "texts"),
    "tq2b": Entry(FaissCodes, lambda d: FaissSettings("RR,SQtq2", -(-d // 4) + 8, "scalar", SYM_ASYM), "texts"),
    # product quantisation learned for the frozen encoder (quantization_modules.LearnedPQ): pq1b's codebooks, started
    # from its k-means and trained with InfoNCE between the float query and the decoded positive (JPQ's loss), chosen
    # on validation (results/<MiniLM>/experiments/learned-pq.md); searched by faiss's ADC as pq1b is
    "learned_pq1b": Entry(FaissCodes, lambda d: pq(d, d // 8), "training", quantizer="LearnedPQ", loss_weights=(0.0, 1.0),
                          lr=1e-4),
    # residual quantisation (faiss's additive quantiser), 8-bit and 4-bit fast-scan codes; fitted on the texts like PQ,
    # each fit in CPU minutes (slow_fit). At 0.75 to 2 bits, and in product form, it lost to PQ on SciFact at every
    # budget: results/<MiniLM>/experiments/additive-quantisers.md
    "rq1b": Entry(FaissCodes, lambda d: rq(d, 1), "texts", **SLOW_FIT),
    "rq1b_fastscan": Entry(FaissCodes, lambda d: rq(d, 1, fast_scan=True), "texts", **SLOW_FIT),
    # RaBitQ: 1 bit per dimension plus 8 bytes of factors; more bits per dimension plus 20 bytes
    "rabitq": Entry(FaissCodes, lambda d: FaissSettings("RaBitQ", -(-d // 8) + 8, "rabitq", RABITQ), "texts"),
    "rabitq_fastscan": Entry(FaissCodes, lambda d: FaissSettings("RaBitQfs", -(-d // 8) + 8, "rabitq", ("qb8", "qb4")),
                             "texts"),  # rabitq's codes scanned in blocks of 32 with 4-bit lookup tables
    "rabitq2b": Entry(FaissCodes, lambda d: FaissSettings("RaBitQ2", -(-d // 4) + 20, "rabitq", ("qb8",)), "texts"),
    "rabitq4b": Entry(FaissCodes, lambda d: FaissSettings("RaBitQ4", -(-d // 2) + 20, "rabitq", ("qb8",)), "texts"),
    #          (multi-bit: the query in 8 bits gave the float query's (qb0) per-query nDCG@10 exactly on both tasks,
    #           in less time; faiss's float-query path is slow: results/<MiniLM>/experiments/rabitq-query-bits.md)
    # binary codes: sign bits, after a random rotation or PCA, learned thresholds (quantization_modules.py)
    "stage1_zero": Entry(ThresholdCodes),
    "lsh": Entry(ThresholdCodes, lambda d: ThresholdSettings(transform="lsh")),
    "pca_sign0.75b": Entry(ThresholdCodes, lambda d: ThresholdSettings(transform="pca", out=d * 3 // 4), "texts"),
    "stage1_trained": Entry(ThresholdCodes, lambda d: ThresholdSettings(thresholds="learned"), "training",
                            quantizer="QuantizationModuleStage1"),
    "stage1_rotated": Entry(ThresholdCodes, lambda d: ThresholdSettings(thresholds="learned", rotation=True), "training",
                            quantizer="QuantizationModuleStage1Rotated", loss_weights=(1.0, 1.0)),
    "stage2_trained": Entry(Stage2Codes, lambda d: ThresholdSettings(thresholds="learned"), "training",
                            quantizer="QuantizationModuleStage2"),
    # multi-level codes: 3 levels (1.5 bits) or 4 levels (2 bits) per dimension; thresholds at quantiles, Lloyd-Max
    # or learned (Stage 1 at more bits)
    "quantile1.5b": Entry(ThresholdCodes, lambda d: ThresholdSettings(3, "quantile"), "texts"),
    "lloyd1.5b": Entry(ThresholdCodes, lambda d: ThresholdSettings(3, "lloyd"), "texts"),
    "learned1.5b": Entry(ThresholdCodes, lambda d: ThresholdSettings(3, "learned"), "training",
                         quantizer="QuantizationModuleMultiLevel", lr=1e-4),
    "quantile2b": Entry(ThresholdCodes, lambda d: ThresholdSettings(4, "quantile"), "texts"),
    "lloyd2b": Entry(ThresholdCodes, lambda d: ThresholdSettings(4, "lloyd"), "texts"),
    "learned2b": Entry(ThresholdCodes, lambda d: ThresholdSettings(4, "learned"), "training",
                       quantizer="QuantizationModuleMultiLevel", lr=1e-4),
    # a hybrid allocation (QAMA's quarters): the top principal components get the most levels, 2, 1.5 and 1 bits for
    # the first three quarters of d, 1 bit for half of the last quarter (0.5 per dimension; QAMA merges its pairs
    # with a learned layer): 1.25 bits per dimension of information, 1.625 in thermometer bits (QAMA counts those)
    "hybrid1.25b": Entry(ThresholdCodes, lambda d: ThresholdSettings(
        thresholds="lloyd", transform="pca", groups=((d // 4, 4), (d // 4, 3), (d // 4, 2), (d // 8, 2))), "texts"),
    # truncation x quantisation: the top principal components (or the first dimensions, for Matryoshka models), each
    # cut into Lloyd-Max levels, searched with the float query (bytes: the packed levels)
    "pca0.5x2b": Entry(ThresholdCodes, lambda d: ThresholdSettings(4, "lloyd", "pca", d // 2, modes=ASYM), "texts"),
    "pca0.33x4b": Entry(ThresholdCodes, lambda d: ThresholdSettings(16, "lloyd", "pca", d // 3, modes=ASYM), "texts"),
    "pca0.67x2b": Entry(ThresholdCodes, lambda d: ThresholdSettings(4, "lloyd", "pca", 2 * d // 3, modes=ASYM), "texts"),
    "pca0.5x4b": Entry(ThresholdCodes, lambda d: ThresholdSettings(16, "lloyd", "pca", d // 2, modes=ASYM), "texts"),
    "pca0.25x8b": Entry(ThresholdCodes, lambda d: ThresholdSettings(256, "lloyd", "pca", d // 4, modes=ASYM), "texts"),
    "first0.5x2b": Entry(ThresholdCodes, lambda d: ThresholdSettings(4, "lloyd", "first", d // 2, modes=ASYM), "texts"),
    "first0.5x4b": Entry(ThresholdCodes, lambda d: ThresholdSettings(16, "lloyd", "first", d // 2, modes=ASYM), "texts"),
}


def entry(name: str) -> Entry:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; the registry has: {', '.join(METHODS)}")
    return METHODS[name]


def settings(name: str, d: int):
    """A method's settings at dimension d."""
    e = entry(name)
    return e.family.Settings() if e.settings is None else e.settings(d)


def modes_of(name: str, d: int) -> tuple[str, ...]:
    """A method's search modes at dimension d, its own search first."""
    return entry(name).family.modes(settings(name, d))


def own_mode(name: str, d: int) -> str:
    """The method's own search: its first mode (training validates with it)."""
    return modes_of(name, d)[0]


def row_name(name: str, mode: str, d: int) -> str:
    """The table's name of a method's row in `mode`: the method's name for its own search, "<name>+<mode>" otherwise."""
    return name if mode == own_mode(name, d) else f"{name}+{mode}"


def row_bytes(name: str, d: int, mode: str) -> int:
    """Bytes per document a row stores and reads: its codes, plus its re-ranker's documents in a re-ranking mode."""
    reranker = MODES[mode].reranker
    extra = row_bytes(reranker, d, own_mode(reranker, d)) if reranker else 0
    return entry(name).family.code_bytes(d, mode, settings(name, d)) + extra


def keeps_float(mode: str) -> bool:
    """Whether a row of `mode` keeps the float documents beside its codes (the budget tables leave such rows out)."""
    reranker = MODES[mode].reranker
    return reranker is not None and entry(reranker).family is Float


def describe(name: str, d: int) -> str:
    return entry(name).family.describe(d, settings(name, d))


def family_of(name: str, d: int) -> str:
    return entry(name).family.label(settings(name, d))


def information_bits(name: str, d: int) -> float:
    return entry(name).family.information_bits(d, settings(name, d))


def applies(name: str, d: int) -> str | None:
    """None, or why the method cannot be used at dimension d."""
    return entry(name).family.applies(d, settings(name, d))


def make_method(name: str, dim: int) -> Family:
    """A fresh, unfitted method of the registry at dimension `dim`."""
    if reason := applies(name, dim):
        raise UsageError(f"{name} does not apply at dimension {dim}: {reason}")
    return entry(name).family(name, dim, settings(name, dim))


def rows_of(name: str, d: int, modes=None) -> dict[str, str]:
    """The table rows of a method: row name -> mode. Its own mode always runs; the others if in `modes` (None: all)."""
    return {row_name(name, mode, d): mode for mode in modes_of(name, d)
            if mode == own_mode(name, d) or modes is None or mode in modes}


def table_rows(name: str, d: int, modes=None, rerank_k: int = RERANK_K, depths=RERANK_DEPTHS) -> dict[str, tuple]:
    """Every row the evaluation runs for a method: row name -> (mode, re-ranking depth or None). A re-ranking row is
    at depth `rerank_k`; a row of DEPTH_MODE also at each other depth of `depths`, named "<row>@k" (the depth table's)."""
    out = {}
    for row, mode in rows_of(name, d, modes).items():
        out[row] = (mode, rerank_k if MODES[mode].reranker else None)
        if mode == DEPTH_MODE:
            out |= {f"{row}@{k}": (mode, k) for k in depths if k != rerank_k}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the search backend of every row


class MethodIndex:
    """An mteb search backend (add_documents / search / clear) for one row: it receives the shared encoder's float
    embeddings and stores and searches them as its method does, in its mode. `rerank_k` and `reranker` (the method
    whose documents re-rank, for a re-ranking mode: MODES[mode].reranker) are the row's settings. Validation in
    training ranks through it too."""

    def __init__(self, method: Family, mode: str, rerank_k: int = RERANK_K, reranker: Family | None = None):
        if (MODES[mode].reranker is None) != (reranker is None):
            raise ValueError(f"mode {mode} re-ranks with {MODES[mode].reranker}, got {reranker and reranker.name}")
        self.method, self.mode, self.rerank_k, self.reranker = method, mode, rerank_k, reranker
        self.stored, self.n_documents = None, 0

    def add_documents(self, embeddings, idxs: list[str] | None = None) -> None:
        docs = np.asarray(embeddings, dtype=np.float32)
        if docs.ndim != 2 or docs.shape[1] != self.method.dim:
            raise ValueError(f"{self.method.name} takes (documents, {self.method.dim}) embeddings, got {docs.shape}")
        self.stored, self.n_documents = self.method.build(docs, self.mode, self.reranker), len(docs)

    def search(self, embeddings, top_k: int, similarity_fn=None, top_ranked=None, query_idx_to_id=None):
        queries = np.asarray(embeddings, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.method.dim:
            raise ValueError(f"{self.method.name} takes (queries, {self.method.dim}) embeddings, got {queries.shape}")
        top_k = min(top_k, self.n_documents)  # faiss pads a short list with id -1, which mteb reads as the last document
        scores, ids = self.method.search(self.stored, queries, top_k, self.mode, self.rerank_k)
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


def rank(method: Family, mode: str, docs: np.ndarray, queries: np.ndarray, doc_ids: list, query_ids: list,
         top: int = 1000, rerank_k: int = RERANK_K, reranker: Family | None = None) -> dict[str, dict[str, float]]:
    """{query id: {document id: score}} of a row's top documents (mteb's retrieval depth is 1,000): the same index and
    search the evaluation's rows use, so validation chooses on the ranking that is reported."""
    index = MethodIndex(method, mode, rerank_k, reranker)
    index.add_documents(docs, doc_ids)
    scores, ids = index.search(queries, min(top, len(doc_ids)))
    return {q: {doc_ids[j]: float(s) for j, s in zip(row_ids, row_scores)}
            for q, row_ids, row_scores in zip(query_ids, ids, scores)}
