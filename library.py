"""The tool as a library: `load_encoder` gives texts in, what a registry method stores out, scored as the evaluation
scores it.

    from library import load_encoder
    encoder = load_encoder("stage1_trained")                  # the packaged MiniLM, checkpoints/ of this repository
    codes = encoder.encode(["A first document.", "Another one."])                       # (2, 48) uint8
    scores = encoder.similarity(encoder.encode(["a query"]), codes)                     # 384 - 2 * Hamming distance
"""

from pathlib import Path

import numpy as np

import methods
from checkpoints import CHECKPOINTS_DIR, load_method
from encoders import BATCH_SIZE, CACHE_DIR, DEFAULT_MODEL, BaseModel, canonical_name, quiet_loading


class Encoder:
    """Texts in, what a method of the registry stores out, and the method's own scoring of it.

    encode(texts, kind="document", precision=None): the method's stored form (packed bits for binary codes, int8, PQ
    or RaBitQ codes, float16, PCA projections...), with the model's prompt for `kind`; "float32": the float
    embedding; "ubinary" / "binary": packed bits as uint8 / int8 (sentence-transformers' names), for bit codes.
    similarity(queries, documents): (n_queries, n_documents) scores as the evaluation's search gives them. Queries are
    float32 embeddings (the method's own search mode) or what encode returned (decoded, dot product: for bit codes,
    bits - 2 * Hamming distance).
    """

    def __init__(self, base: BaseModel, method):
        self.base, self.method = base, method
        self.mode = methods.own_mode(method.name, method.dim)
        self.bytes_per_vector = methods.row_bytes(method.name, method.dim, self.mode)
        self.bit_codes = self.mode == "hamming"

    def encode(self, texts: list[str] | str, kind: str = "document", precision: str | None = None) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        x = self.base.encode(texts, kind, self.base.prompt(kind))
        if precision == "float32":
            return x
        if precision not in (None, "ubinary", "binary") or (precision is not None and not self.bit_codes):
            raise ValueError(f"precision {precision!r}: {self.method.name} stores its own codes; use None or 'float32'"
                             + (", 'ubinary' or 'binary'" if self.bit_codes else ""))
        codes = self.method.encode(x)
        return (codes.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else codes

    def similarity(self, queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
        queries, documents = (np.asarray(a) for a in (queries, documents))
        if documents.dtype == np.int8 and self.bit_codes:  # the "binary" precision: back to np.packbits bytes
            documents = (documents.astype(np.int16) + 128).astype(np.uint8)
        if queries.dtype == np.int8 and self.bit_codes:
            queries = (queries.astype(np.int16) + 128).astype(np.uint8)
        if queries.dtype == np.float32 and queries.shape[1] == self.method.dim:  # float queries: the method's own search
            scores, ids = self.method.search(self.method.store(documents), queries, len(documents), self.mode)
            out = np.empty((len(queries), len(documents)), np.float32)
            np.put_along_axis(out, np.asarray(ids), np.asarray(scores, np.float32), axis=1)
            return out
        return self.method.decode(queries) @ self.method.decode(documents).T


def load_encoder(method: str, model: str = DEFAULT_MODEL, checkpoints: str | Path = CHECKPOINTS_DIR,
                 protocol: str = "transfer", device: str | list[str] | None = None, batch_size: int = BATCH_SIZE,
                 verbose: bool = False) -> Encoder:
    """An Encoder for a registry method (methods.METHODS): the base model on `device` (default: the fastest here;
    several devices encode in parallel) and the method's checkpoint from `checkpoints` when it is fitted or trained.
    Prints nothing unless `verbose` (then the libraries' loading progress and logs). Raises UsageError, one line, for an
    unknown method or a missing or mismatched checkpoint."""
    devices = [device] if isinstance(device, str) else device
    model = canonical_name(model)
    with quiet_loading(not verbose):
        base = BaseModel(model, Path(CACHE_DIR), devices, batch_size)
        dim = base.model.get_embedding_dimension()
    loaded, _ = load_method(method, dim, model, Path(checkpoints), protocol)
    return Encoder(base, loaded)
