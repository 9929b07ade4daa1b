"""The fitting data of a protocol, embedded once (cached), and a method fitted on it into its checkpoint.

Both commands use it: the training command fits every method fitted on texts and trains the learned ones on these
embeddings; the evaluation fits a method fitted on texts that has no checkpoint yet, with the same fit and the same
checkpoint, so the next run of either reuses it.

Protocols. transfer: fitting texts and training pairs from `<train-data>/pairs/` and `<train-data>/beir-small/`,
nothing from an evaluated task. in-domain: the evaluated tasks' train queries (minus validation) and their relevant
documents are added (data.load_training_data).
"""

import datetime
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import methods
from checkpoints import save_checkpoint
from data import IN_DOMAIN_PAIRS, MAX_PER_SOURCE, SEED, TASKS, UsageError, load_training_data
from encoders import BaseModel

TRAIN_DATA = Path("../shared/data")  # the default --train-data: pairs/ and beir-small/
FIT_THREADS = 2  # methods fitted side by side, each on one faiss thread: the checkpoints one after another would give


@dataclass
class FittingData:
    """A protocol's fitting texts (document prompt) and training pairs (anchor: query prompt, positive: document
    prompt), embedded. `positives` index `embeddings`; `pair_source` numbers each pair's source; `sources`: items per
    source."""

    texts: list[str]
    embeddings: np.ndarray
    anchors: np.ndarray
    positives: np.ndarray
    pair_source: np.ndarray
    sources: dict[str, int]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]


def load_fitting_data(base: BaseModel, train_data: Path, protocol: str, tasks: list[str] = TASKS,
                      max_per_source: int = MAX_PER_SOURCE, seed: int = SEED, in_domain_pairs: int = IN_DOMAIN_PAIRS,
                      beir_dir: Path | None = None, verbose: bool = True) -> FittingData:
    """The protocol's fitting texts and pairs from `train_data` (read and checked first), each text embedded once
    through the cache."""
    read = load_training_data(train_data, protocol, tasks, max_per_source, seed, in_domain_pairs, beir_dir=beir_dir)
    return embed_fitting_data(base, *read, verbose=verbose)


def embed_fitting_data(base: BaseModel, pairs_by_source: dict[str, list], texts_by_source: dict[str, list],
                       verbose: bool = True) -> FittingData:
    """The fitting texts (both sides of every pair and the extra texts) and the pairs' anchors, embedded."""
    if verbose:
        print("training pairs: " + ", ".join(f"{k} {len(v):,}" for k, v in pairs_by_source.items()))
        print("extra training texts: " + ", ".join(f"{k} {len(v):,}" for k, v in texts_by_source.items()))
    texts = list(dict.fromkeys([t for v in pairs_by_source.values() for pair in v for t in pair]
                               + [t for v in texts_by_source.values() for t in v]))
    pair_list = [(a, b, i) for i, v in enumerate(pairs_by_source.values()) for a, b in v]
    embeddings = base.embed(texts, "document", desc="encoding fitting texts")
    anchors = base.embed([a for a, _, _ in pair_list], "query", desc="encoding training anchors")
    row = {t: i for i, t in enumerate(texts)}
    return FittingData(texts, embeddings, anchors, embeddings[[row[b] for _, b, _ in pair_list]],
                       np.array([i for _, _, i in pair_list], dtype=np.int64),
                       {k: len(v) for k, v in pairs_by_source.items()} | {k: len(v) for k, v in texts_by_source.items()})


def common_metadata(model: str, protocol: str, dim: int, seed: int, sources: dict[str, int]) -> dict:
    """What every checkpoint of a run says of what made it."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"base_model": model, "protocol": protocol, "dimension": str(dim), "seed": str(seed),
            "training_sources": sources, "date": date}


def fit(name: str, x: np.ndarray) -> methods.Family:
    """The registry method `name` fitted on `x`; a fit faiss refuses (too few texts for k-means or PCA) is one line."""
    method = methods.make_method(name, x.shape[1])
    try:
        method.fit(x)
    except RuntimeError as e:
        raise UsageError(f"{name}: cannot be fitted on {len(x):,} texts ({str(e).splitlines()[0].split('failed: ')[-1]})") from None
    return method


def fitted_metadata(common: dict, name: str, dim: int, n_texts: int) -> dict:
    """A fitted method's checkpoint metadata: the run's, the method's and what it was fitted on."""
    return common | {"method": name, "description": methods.describe(name, dim), "fitted_on": f"{n_texts:,} fitting texts"}


def fit_to_checkpoint(name: str, data: FittingData, common: dict, path: Path, extra: dict | None = None) -> methods.Family:
    """Fit `name` on the fitting texts and write its checkpoint at `path` (whole or not at all)."""
    method = fit(name, data.embeddings)
    save_checkpoint(path, method.state(), fitted_metadata(common, name, data.dim, len(data.embeddings)) | (extra or {}))
    return method


def fit_side_by_side(fit_one: Callable[[str], object], names: list[str], threads: int = FIT_THREADS) -> list:
    """fit_one(name) for every name, `threads` at a time (faiss leaves Python's lock while it fits, and each fit keeps
    to one OpenMP thread of its own: methods.one_faiss_thread), results in order. Ctrl-C drops the fits not started;
    those under way finish and keep their checkpoints before the process exits."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="fit")
    try:
        return list(pool.map(fit_one, names))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
