"""Learned quantisers: thresholds (and a rotation) trained so that code similarities follow float similarities, their
losses, one training loop, and the training command that fits or trains every method of the registry.

Read top to bottom: defaults -> the quantiser protocol and the quantisers (soft codes for training) -> losses -> the
training loop and the choice among initialisations -> the training command.

    python quantization_modules.py                          # transfer: fit and train every method, checkpoints/
    python quantization_modules.py --methods rq1b rq1b_fastscan   # slow fits (CPU minutes each) only when named
    python quantization_modules.py --protocol in-domain     # the evaluated tasks' train queries added
    python quantization_modules.py --methods pq1b int8      # only these

Protocols (fitting.py). transfer (default): nothing from an evaluated task's train or test data is trained on. in-domain:
the evaluated tasks' train queries (minus validation) and their relevant documents are added. Both: candidates are
chosen on validation queries (a task's dev split, else a seeded 20% of its train queries), ranked by the method's own
search; test qrels are never read here.

Methods fitted on texts are fitted first, two at a time (each on one faiss thread: the same checkpoints as one after
another), then the learned ones are trained one at a time.

Interruptions. The checkpoints are replaced together at the end of a run. Until then each one is staged under
`<cache-dir>/unfinished-checkpoints/` as soon as it is made, so a rerun with the same inputs and settings keeps what an
interrupted run fitted or trained, and the embedding cache keeps what it encoded.

A learned quantiser is one subclass of `Quantizer` named by a registry entry (`Entry.quantizer`): built from the
entry's settings, trained by `train_quantizer`, and turned by `export()` into the state its registry method stores in
its checkpoint and searches with; the evaluation never needs torch.
"""

import argparse
import datetime
import hashlib
import json
import math
import signal
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import methods
from checkpoints import CHECKPOINTS_DIR, checkpoint_path, load_checkpoint, save_checkpoint, update_training_record
from data import IN_DOMAIN_PAIRS, MAX_PER_SOURCE, PROTOCOLS, SEED, TASKS, UsageError, check_writable, clocks, spent, write_atomic
from data import document_text, find_task_folder, load_beir, load_training_data, task_query_splits
from encoders import CACHE_DIR, DEFAULT_MODEL, BaseModel, canonical_name, quiet_libraries
from fitting import TRAIN_DATA, FittingData, common_metadata, embed_fitting_data, fit, fit_side_by_side, fitted_metadata
from mteb_adapter import ndcg_at_10, task_prompt

# ---------------------------------------------------------------------------------------------------------------
# defaults (override on the command line)
EPOCHS = 10
TRAIN_BATCH_SIZE = 512  # embeddings per training step (encoding batches: encoders.BATCH_SIZE)
LR = 1e-3  # each registry entry may set its own (Entry.lr)
TEMPERATURE = 10.0  # sigmoid sharpness; MiniLM dimensions have a spread of about 0.05
ACTIVATIONS = ["sigmoid", "ste", "anneal"]  # ste: hard bits forward, sigmoid gradient backward
ACTIVATION = "ste"  # best on validation (docs/findings.md)
ANNEAL = (10.0, 300.0)  # temperature schedule of "anneal": geometric from soft to nearly hard over the epochs
NCE_TEMPERATURE = 0.05
RANDOM_INITS = 2  # random initialisations besides the training-free ones (zero and median, quantile and Lloyd-Max, the
#                   k-means): the committed checkpoints' five lost 0.0004 validation nDCG@10 on average at two
#                   (results/experiments/training-candidates.md), at 4/7 of the training time
GRAD_CLIP = 1.0
STAGING = "unfinished-checkpoints"  # under --cache-dir: each checkpoint as soon as it is made, until the run ends


# ---------------------------------------------------------------------------------------------------------------
# the quantiser protocol, then the quantisers: soft codes for training; export() gives what the method searches with


class Quantizer(nn.Module, ABC):
    """A trainable form of a registry method. forward(x) gives the vectors whose cosines the losses compare (+-1 for
    bit codes), differentiable in the parameters; `straight_through` (set by the loop for activation "ste") makes the
    forward hard. Every subclass is found by its name (`Entry.quantizer`) in `Quantizer.classes`."""

    classes: dict[str, type] = {}
    straight_through = False
    temperature = TEMPERATURE

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Quantizer.classes[cls.__name__] = cls

    @abstractmethod
    def candidate_inits(self, n_random: int) -> list[str]:
        """The initialisations training tries, the training-free ones first."""

    @abstractmethod
    def initialise(self, init: str, x: torch.Tensor, seed: int) -> None:
        """Set the parameters to initialisation `init` (one of candidate_inits), from the training embeddings."""

    @abstractmethod
    def export(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """The registry method's state (its checkpoint's arrays); `x`: the training embeddings."""

    def query(self, x: torch.Tensor) -> torch.Tensor | None:
        """The query as the method's search compares it with the codes, when that is not the query's own code (None:
        the search compares codes with codes, as Hamming distance does)."""
        return None

    def project(self) -> None:
        """Restore a constraint on the parameters after each optimiser step (a rotation's orthogonality)."""


@torch.no_grad()
def orthogonalise(rotation: nn.Parameter) -> None:
    """Pull a rotation back to the nearest orthogonal matrix after an optimiser step (Newton-Schulz steps, two matrix
    products each; the drift of one step needs two or three)."""
    r = rotation
    for _ in range(10):
        error = r @ r.T - torch.eye(len(r))
        if error.abs().max() < 1e-6:
            break
        r = r - 0.5 * error @ r
    rotation.copy_(r)


class QuantizationModuleStage1(Quantizer):
    """One learnable threshold per dimension; bit = value > threshold. Thresholds all zero give the sign bit. With
    `levels` > 2 (the settings'), levels - 1 thresholds per dimension and a thermometer code."""

    def __init__(self, embedding_dim: int, settings: methods.ThresholdSettings | None = None, temperature: float = TEMPERATURE):
        super().__init__()
        self.levels = (settings or methods.ThresholdSettings()).levels
        self.embedding_dim, self.temperature = embedding_dim, temperature
        self.thresholds = nn.Parameter(torch.zeros(embedding_dim, self.levels - 1))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The values the thresholds compare: the embedding itself (a rotation of it in the rotated quantiser)."""
        return x

    def combine(self, bits: torch.Tensor) -> torch.Tensor:
        """Per-dimension thermometer bits (n, dims, levels - 1) -> the code's bits (n, code bits)."""
        return bits.flatten(1)

    def soft_bits(self, x: torch.Tensor) -> torch.Tensor:
        """Soft bits in [0, 1], differentiable in the thresholds; hard bits forward if straight_through. A value on a
        threshold is below it (bit 0), as sentence-transformers' `> 0`."""
        z = self.temperature * (self.rotate(x)[:, :, None] - self.thresholds[None])
        soft = torch.sigmoid(z)
        if self.straight_through:
            soft = soft + ((z > 0).float() - soft).detach()
        return self.combine(soft)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The code as +-1 per bit, so that a dot product is bits - 2 * Hamming distance."""
        return 2 * self.soft_bits(x) - 1

    def candidate_inits(self, n_random: int) -> list[str]:
        return (["zero", "median"] if self.levels == 2 else ["quantile", "lloyd"]) + [f"random{i}" for i in range(n_random)]

    def initialise(self, init: str, x: torch.Tensor, seed: int) -> None:
        with torch.no_grad():
            self.thresholds.copy_(initial_thresholds(init, self.rotate(x), self.levels, seed))

    @torch.no_grad()
    def export(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Sorted thresholds (dims, levels - 1), reconstruction values (dims, levels): +-1 for two levels, else the
        mean of `x` (the training texts) in each level."""
        thresholds = self.thresholds.sort(dim=1).values.numpy().astype(np.float32)
        if self.levels == 2:
            recon = np.tile(np.array([-1.0, 1.0], np.float32), (self.embedding_dim, 1))
        else:
            recon = methods.bin_means(self.rotate(torch.as_tensor(x)).numpy(), thresholds)
        return {"thresholds": thresholds, "recon": recon}


class QuantizationModuleStage2(QuantizationModuleStage1):
    """First half of the dimensions as Stage 1; the second half in pairs (d, d+1), one bit per pair that is 0 only
    when both values are under their thresholds (soft: 1 - (1 - s_a)(1 - s_b)). 384 dims -> 192 + 96 = 288 bits."""

    def __init__(self, embedding_dim: int, settings: methods.ThresholdSettings | None = None, temperature: float = TEMPERATURE):
        if embedding_dim % 4:
            raise ValueError(f"Stage 2 needs a dimension divisible by 4, got {embedding_dim}")
        super().__init__(embedding_dim, settings, temperature)
        self.half = embedding_dim // 2

    def combine(self, bits: torch.Tensor) -> torch.Tensor:
        bits = bits[:, :, 0]
        a, b = bits[:, self.half :: 2], bits[:, self.half + 1 :: 2]
        return torch.cat([bits[:, : self.half], 1 - (1 - a) * (1 - b)], dim=1)


class QuantizationModuleStage1Rotated(QuantizationModuleStage1):
    """Stage 1 after a learned orthogonal rotation: bit = (R x)_d > t_d. Still one bit per dimension; R starts as the
    identity (sign bits) and leaves every float cosine unchanged, so the float model through it is the float model."""

    def __init__(self, embedding_dim: int, settings: methods.ThresholdSettings | None = None, temperature: float = TEMPERATURE):
        super().__init__(embedding_dim, settings, temperature)
        self.rotation = nn.Parameter(torch.eye(embedding_dim))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.rotation.T

    def project(self) -> None:
        orthogonalise(self.rotation)

    @torch.no_grad()
    def export(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        return super().export(x) | {"rotation": self.rotation.numpy().astype(np.float32)}


class QuantizationModuleMultiLevel(QuantizationModuleStage1):
    """Stage 1 at more bits: `levels` levels per dimension (the settings'), separated by levels - 1 learned thresholds;
    the code is the thermometer code (level l: l of the levels - 1 bits set), so code cosines, like Hamming distance,
    follow the L1 distance between levels. 3 levels: 1.58 bits of information per dimension; 4 levels: 2."""


def initial_thresholds(name: str, x: torch.Tensor, levels: int, seed: int) -> torch.Tensor:
    """(dims, levels - 1) starting thresholds. Two levels: zero, the per-dimension median, or random{i} (normal around
    0 with half each dimension's spread). More: quantile (at the i/k quantiles), lloyd (Lloyd-Max), or random{i}
    (the quantiles moved by a quarter of each dimension's spread at random)."""
    v = x.numpy()
    if name == "zero":
        return torch.zeros(x.shape[1], levels - 1)
    if name in ("median", "quantile"):
        return torch.from_numpy(np.quantile(v, np.arange(1, levels) / levels, axis=0).T.astype(np.float32))
    if name == "lloyd":
        return torch.from_numpy(methods.lloyd_max(v, levels))
    g = torch.Generator().manual_seed(seed * 1000 + int(name.removeprefix("random")))
    noise = torch.randn(x.shape[1], levels - 1, generator=g) * x.std(0)[:, None]
    if levels == 2:
        return 0.5 * noise
    return initial_thresholds("quantile", x, levels, seed) + 0.25 * noise


class LearnedPQ(Quantizer):
    """Product-quantisation codebooks trained for the frozen encoder, with an OPQ spec also the orthogonal rotation
    before them (trained jointly). Started from faiss's own fit of the entry's spec (k-means: "kmeans" is the
    training-free row's fit; "kmeans{i}" re-seeds the k-means, an OPQ rotation fitted once). Each sub-vector is assigned
    to its nearest centroid forward (as faiss encodes) and softly backward: softmax over minus its squared distances to
    the sub-quantiser's centroids, sharpened by `temperature` and scaled by the mean distance to the nearest one at the
    start. The search is faiss's asymmetric one, so the losses compare the float query with the decoded document
    (`query`); export() puts the trained codebooks (and rotation) in the entry's faiss index."""

    fits: dict = {}  # (spec, seed, data) -> faiss's fit, shared by the candidates of one training (OPQ takes minutes)

    def __init__(self, embedding_dim: int, settings: methods.FaissSettings, temperature: float = TEMPERATURE):
        super().__init__()
        self.settings, self.dim, self.temperature = settings, embedding_dim, temperature
        index = faiss.index_factory(embedding_dim, settings.spec, faiss.METRIC_INNER_PRODUCT)
        pq = methods.FaissCodes.inner(index).pq
        self.m, self.ksub, self.dsub = pq.M, pq.ksub, pq.dsub
        self.centroids = nn.Parameter(torch.zeros(self.m, self.ksub, self.dsub))
        self.rotation = nn.Parameter(torch.eye(embedding_dim)) if isinstance(index, faiss.IndexPreTransform) else None
        self.scale = 1.0  # mean squared distance of a sub-vector to its nearest centroid at the start

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rotation is None else x @ self.rotation.T

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(n, m, ksub) squared distances of each sub-vector to each centroid of its sub-quantiser."""
        v = self.rotate(x).reshape(len(x), self.m, self.dsub)
        return ((v * v).sum(-1, keepdim=True) - 2 * torch.einsum("nmd,mkd->nmk", v, self.centroids)
                + (self.centroids * self.centroids).sum(-1)[None])

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(n, m) hard codes: each sub-vector's nearest centroid."""
        return self.distances(x).argmin(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The decoded documents (n, d), in the rotated space the codebooks live in."""
        d = self.distances(x)
        soft = torch.softmax(-self.temperature * d / self.scale, dim=-1)
        if self.straight_through:
            soft = soft + (F.one_hot(d.argmin(-1), self.ksub).float() - soft).detach()
        return torch.einsum("nmk,mkd->nmd", soft, self.centroids).reshape(len(x), -1)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate(x)  # float, as faiss's ADC compares it with the decoded documents

    def candidate_inits(self, n_random: int) -> list[str]:
        return ["kmeans"] + [f"kmeans{i}" for i in range(1, n_random + 1)]

    def initialise(self, init: str, x: torch.Tensor, seed: int) -> None:
        index = self.faiss_fit(init, x.numpy(), seed)
        with torch.no_grad():
            if self.rotation is not None:
                opq = faiss.downcast_VectorTransform(index.chain.at(0))
                self.rotation.copy_(torch.from_numpy(faiss.vector_to_array(opq.A).reshape(self.dim, self.dim)))
            pq = methods.FaissCodes.inner(index).pq
            self.centroids.copy_(torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(self.m, self.ksub, self.dsub)))
            self.scale = float(self.distances(x).min(-1).values.mean().clamp_min(1e-12))

    def faiss_fit(self, init: str, x: np.ndarray, seed: int):
        """faiss's fit of the spec: the registry's own (methods.FaissCodes.fit) for "kmeans"; for "kmeans{i}" its k-means
        seeded again (after the same OPQ rotation). Cached for the candidates of one training."""
        key = (self.settings.spec, init, seed, hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest())
        if key not in LearnedPQ.fits:
            method = methods.FaissCodes("kmeans", self.dim, self.settings)
            inner = methods.FaissCodes.inner(method.faiss_index)
            if init != "kmeans":
                inner.pq.cp.seed = 1234 + 1000 * seed + int(init.removeprefix("kmeans"))
            if init == "kmeans" or self.rotation is None:
                method.fit(x)
            else:  # the default fit's rotation, then only the codebooks fitted again on the rotated texts
                fitted = faiss.downcast_VectorTransform(self.faiss_fit("kmeans", x, seed).chain.at(0))
                opq = faiss.downcast_VectorTransform(method.faiss_index.chain.at(0))
                faiss.copy_array_to_vector(faiss.vector_to_array(fitted.A), opq.A)
                opq.is_trained = method.faiss_index.is_trained = True
                with methods.one_faiss_thread():
                    inner.train(fitted.apply(np.ascontiguousarray(x, dtype=np.float32)))
            LearnedPQ.fits[key] = method.faiss_index
        return LearnedPQ.fits[key]

    @torch.no_grad()
    def export(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """The entry's faiss index holding the trained codebooks (and rotation): what FaissCodes stores and searches."""
        index = faiss.index_factory(self.dim, self.settings.spec, faiss.METRIC_INNER_PRODUCT)
        inner = methods.FaissCodes.inner(index)
        faiss.copy_array_to_vector(self.centroids.numpy().astype(np.float32).ravel(), inner.pq.centroids)
        inner.is_trained = True
        if self.rotation is not None:
            opq = faiss.downcast_VectorTransform(index.chain.at(0))
            faiss.copy_array_to_vector(self.rotation.numpy().astype(np.float32).ravel(), opq.A)
            opq.is_trained = index.is_trained = True
        return {"faiss_index": faiss.serialize_index(index)}

    def project(self) -> None:
        if self.rotation is not None:
            orthogonalise(self.rotation)


def make_quantizer(name: str, dim: int, temperature: float = TEMPERATURE) -> Quantizer:
    """The quantiser a registry entry names (`Entry.quantizer`), built from the entry's settings at `dim`."""
    e = methods.entry(name)
    if e.quantizer not in Quantizer.classes:
        raise UsageError(f"{name} names quantiser {e.quantizer!r}; quantization_modules.py has {', '.join(Quantizer.classes)}")
    return Quantizer.classes[e.quantizer](dim, methods.settings(name, dim), temperature)


# ---------------------------------------------------------------------------------------------------------------
# losses


def similarity_preservation_loss(float_emb: torch.Tensor, quantised_emb: torch.Tensor,
                                 query_emb: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the cosine-similarity matrix of a batch of float embeddings and what the search scores for them:
    the cosines of their (±1) codes with each other, or with `query_emb` each query as the search sees it against each
    decoded document (float query . decoded document, as an asymmetric search scores: no normalisation)."""
    float_sim = F.normalize(float_emb, dim=1) @ F.normalize(float_emb, dim=1).T
    if query_emb is None:
        quant_sim = F.normalize(quantised_emb, dim=1) @ F.normalize(quantised_emb, dim=1).T
    else:
        quant_sim = query_emb @ quantised_emb.T
    return F.mse_loss(quant_sim, float_sim)


def info_nce_loss(anchor_codes: torch.Tensor, positive_codes: torch.Tensor, temperature: float = NCE_TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of positive pairs: each anchor's positive against the batch's other positives,
    and each positive's anchor against the other anchors."""
    logits = F.normalize(anchor_codes, dim=1) @ F.normalize(positive_codes, dim=1).T / temperature
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def balanced_pair_weights(source: torch.Tensor) -> torch.Tensor:
    """Sampling weight of each pair so that every source is equally likely, whatever its size."""
    return 1.0 / torch.bincount(source)[source].float()


# ---------------------------------------------------------------------------------------------------------------
# training: one loop for every quantiser, then validation and the choice among initialisations


def train_quantizer(
    quantizer: Quantizer,
    embeddings: np.ndarray | torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    epochs: int = EPOCHS,
    batch_size: int = TRAIN_BATCH_SIZE,
    lr: float = LR,
    seed: int = SEED,
    activation: str = ACTIVATION,
    sim_weight: float = 1.0,
    contrastive_weight: float = 0.0,
    verbose: bool = True,
) -> list[float]:
    """Train a quantiser on cached float embeddings with Adam and gradient clipping. Returns the loss of each epoch.

    Each step: `sim_weight` x similarity loss on a batch of embeddings, plus (with `pairs` = anchor embeddings,
    positive embeddings, source ids) `contrastive_weight` x InfoNCE on a batch of pairs sampled so that every source
    is equally likely.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    if pairs is not None and contrastive_weight:
        anchors, positives, source = (torch.as_tensor(p) for p in pairs)
        pair_weights = balanced_pair_weights(source)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=lr)
    quantizer.straight_through = activation == "ste"
    losses = []
    for epoch in (bar := tqdm(range(epochs), desc=f"train {type(quantizer).__name__}", leave=False, disable=not verbose)):
        if activation == "anneal":
            quantizer.temperature = ANNEAL[0] * (ANNEAL[1] / ANNEAL[0]) ** (epoch / max(1, epochs - 1))
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = x[order[start : start + batch_size]]
            loss = torch.zeros(())
            if sim_weight:
                loss = loss + sim_weight * similarity_preservation_loss(batch, quantizer(batch), quantizer.query(batch))
            if pairs is not None and contrastive_weight:
                pick = torch.multinomial(pair_weights, min(batch_size, len(anchors)), replacement=False, generator=generator)
                query = quantizer.query(anchors[pick])
                query = quantizer(anchors[pick]) if query is None else query
                loss = loss + contrastive_weight * info_nce_loss(query, quantizer(positives[pick]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(quantizer.parameters(), GRAD_CLIP)
            optimizer.step()
            quantizer.project()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
    quantizer.straight_through = False
    return losses


def train_candidates(build, embeddings, validate, n_random: int = RANDOM_INITS, seed: int = SEED, **train_kwargs):
    """Train one quantiser per initialisation (its candidate_inits); keep the best mean validation nDCG@10.

    `build()` makes a fresh quantiser; `validate(quantizer)` gives {task: validation nDCG@10}, ranked as the evaluation
    ranks (methods.rank). Returns (best quantiser, its initialisation, {initialisation: {task: nDCG@10, "mean": ...}}).
    """
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    scores, best = {}, None
    for name in tqdm(build().candidate_inits(n_random), desc="candidates", leave=False):
        quantizer = build()
        quantizer.initialise(name, x, seed)
        train_quantizer(quantizer, x, seed=seed, verbose=False, **train_kwargs)
        scores[name] = validate(quantizer)
        scores[name]["mean"] = float(np.mean(list(scores[name].values())))
        tqdm.write(f"  {type(quantizer).__name__} init {name:8s} validation nDCG@10 "
                   + "  ".join(f"{t} {v:.4f}" for t, v in scores[name].items()))
        if best is None or scores[name]["mean"] > scores[best[0]]["mean"]:
            best = (name, quantizer)
    return best[1], best[0], scores


# ---------------------------------------------------------------------------------------------------------------
# the training command: embed the fitting texts and validation tasks once (cached), fit every method fitted on texts,
# train every candidate of the learned ones and keep the best on validation; stage each checkpoint as it is made (a
# rerun keeps it), move them into place together at the end (an interrupted run leaves the old set whole)


def parse_args(argv=None) -> argparse.Namespace:
    fitted = [name for name, e in methods.METHODS.items() if e.fitted_on != "nothing"]
    default = [name for name in fitted if not methods.entry(name).slow_fit]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")
    p.add_argument("--train-data", type=Path, default=TRAIN_DATA, help="folder with pairs/ and beir-small/ (fitting texts)")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/beir"),
                   help="folder of the evaluated tasks' BEIR folders (validation; in-domain training), as in the evaluation")
    p.add_argument("--out", type=Path, default=Path(CHECKPOINTS_DIR), help="checkpoints go to <out>/<model-slug>/[in-domain/]")
    p.add_argument("--protocol", default="transfer", choices=PROTOCOLS)
    p.add_argument("--tasks", nargs="+", default=TASKS, help="evaluated tasks (folders in --data-dir): validation, in-domain data")
    p.add_argument("--methods", nargs="+", default=default, choices=fitted, metavar="METHOD",
                   help=f"registry methods to fit or train (default: all but the slow fits, "
                        f"{', '.join(n for n in fitted if n not in default)}): {', '.join(fitted)}")
    p.add_argument("--model", default=DEFAULT_MODEL, type=canonical_name)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR))
    p.add_argument("--max-per-source", type=int, default=MAX_PER_SOURCE)
    p.add_argument("--in-domain-pairs", type=int, default=IN_DOMAIN_PAIRS, help="in-domain pairs per evaluated task")
    p.add_argument("--activation", default=ACTIVATION, choices=ACTIVATIONS)
    p.add_argument("--sim-weight", type=float, help="default per method: the registry's loss_weights")
    p.add_argument("--contrastive-weight", type=float, help="default per method, as --sim-weight")
    p.add_argument("--random-inits", type=int, default=RANDOM_INITS)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=TRAIN_BATCH_SIZE)
    p.add_argument("--lr", type=float, help=f"default per method: the registry's lr ({LR} unless it says)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", nargs="+", help="cuda, cuda:0, mps, cpu (default: the fastest here); several encode in parallel")
    p.add_argument("--verbose", action="store_true", help="show the libraries' warnings and logs")
    args = p.parse_args(argv)
    for name, value, low in [("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1), ("--random-inits", args.random_inits, 0),
                             ("--max-per-source", args.max_per_source, 1), ("--in-domain-pairs", args.in_domain_pairs, 1)]:
        if value < low:
            p.error(f"{name} must be at least {low}, got {value}")
    for name, value in [("--lr", args.lr), ("--temperature", args.temperature)]:
        if value is not None and not value > 0:
            p.error(f"{name} must be positive, got {value}")
    args.methods = [m for m in dict.fromkeys(args.methods) if args.protocol in methods.entry(m).protocols]
    return args


def loss_weights(args, name: str) -> tuple[float, float]:
    """A trained method's (similarity, InfoNCE) weights: the registry's, unless given on the command line."""
    default = methods.entry(name).loss_weights
    weights = (default[0] if args.sim_weight is None else args.sim_weight,
               default[1] if args.contrastive_weight is None else args.contrastive_weight)
    if not all(math.isfinite(w) and w >= 0 for w in weights) or weights == (0, 0):
        raise UsageError(f"{name}: loss weights must be >= 0 and not both 0, got similarity {weights[0]}, contrastive {weights[1]}")
    return weights


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    try:
        run(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # the shell's convention for Ctrl-C: 130 (sys.exit with a message would exit 1)
        print("interrupted; no checkpoint was written (a rerun keeps the methods made so far and encodes nothing the "
              "cache already holds)", file=sys.stderr)
        sys.exit(130)


@dataclass
class Validation:
    """Each evaluated task's validation queries and documents, embedded: what candidates are chosen on."""

    tasks: dict[str, dict]

    def ndcg(self, method, mode: str) -> dict[str, float]:
        """Validation nDCG@10 per task, ranked by the evaluation's own index and search in `mode`."""
        keys = ("docs", "queries", "doc_ids", "query_ids")
        return {task: ndcg_at_10(methods.rank(method, mode, **{k: v[k] for k in keys}), v["qrels"]) for task, v in self.tasks.items()}

    def text(self, method, mode: str) -> str:
        return "  ".join(f"{t} {v:.4f}" for t, v in self.ndcg(method, mode).items())


def read_validation(data_dir: Path, tasks: list[str], seed: int) -> dict[str, tuple]:
    """Each task's documents and validation queries (never test ones) with their qrels, read and checked."""
    read = {}
    for task in tasks:
        folder = find_task_folder(data_dir, task)
        corpus, queries, _ = load_beir(folder)
        qrels = task_query_splits(folder, seed)["validation"]
        held_out = [q for q in qrels if q in queries]
        if not held_out:
            raise UsageError(f"{task}: no validation queries (wanted qrels/dev.tsv, or qrels/train.tsv to hold some out, in {folder})")
        read[task] = corpus, queries, held_out, {q: qrels[q] for q in held_out}
    return read


def embed_validation(base: BaseModel, read: dict[str, tuple]) -> Validation:
    """The validation queries and documents of each task, embedded with the task's mteb prompts."""
    validation = {}
    for task, (corpus, queries, held_out, qrels) in read.items():
        validation[task] = dict(
            queries=base.embed([queries[q] for q in held_out], "query", task_prompt(base, task, "query"),
                               desc=f"encoding {task} validation queries"),
            docs=base.embed([document_text(d) for d in corpus.values()], "document", task_prompt(base, task, "document"),
                            desc=f"encoding {task} documents"),
            query_ids=held_out, doc_ids=list(corpus), qrels=qrels)
    return Validation(validation)


class Staging:
    """Where each checkpoint waits until the run ends, and whether an earlier, interrupted run already made it: a
    staged checkpoint is kept when it was made from the same inputs (embeddings, validation, metadata) and settings."""

    def __init__(self, args, data: FittingData, validation: Validation, common: dict):
        self.args, self.dim = args, data.dim
        self.folder = Path(args.cache_dir) / STAGING / checkpoint_path(Path(), args.model, "x", args.protocol).parent
        inputs = hashlib.sha256()
        for part in (data.embeddings, data.anchors, data.pair_source,
                     *(v[k] for v in validation.tasks.values() for k in ("queries", "docs"))):
            inputs.update(np.ascontiguousarray(part).tobytes())
        inputs.update(json.dumps({k: v for k, v in common.items() if k != "date"}, sort_keys=True).encode())
        self.inputs = inputs.digest()

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def fingerprint(self, settings: dict) -> str:
        return hashlib.sha256(self.inputs + json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def kept(self, name: str, fingerprint: str) -> tuple[dict, dict] | None:
        """The staged checkpoint of `name` if an earlier run made it from the same inputs and settings, else None."""
        try:
            tensors, meta = load_checkpoint(self.path(name), self.args.model, self.dim, self.args.protocol, name)
        except UsageError:  # none, or unreadable: made again
            return None
        return (tensors, meta) if meta.get("made_with") == fingerprint else None


def fit_one(name: str, data: FittingData, validation: Validation, staging: Staging, common: dict) -> bool:
    """Fit a method fitted on texts (or keep its staged checkpoint) and print its validation nDCG@10 in its own search.
    False when it cannot be fitted (one line; the other methods go on)."""
    start, fingerprint = time.time(), staging.fingerprint({"method": name})
    if previous := staging.kept(name, fingerprint):
        method = methods.make_method(name, data.dim)
        method.load_state(previous[0], staging.path(name))
        how = f"kept from an interrupted run ({staging.path(name)})"
    else:
        try:
            method = fit(name, data.embeddings)
        except UsageError as e:
            tqdm.write(f"{name}: skipped, {str(e).removeprefix(name + ': ')}")
            return False
        save_checkpoint(staging.path(name), method.state(), fitted_metadata(common, name, data.dim, len(data.embeddings))
                        | {"made_with": fingerprint})
        how = f"fitted on {len(data.embeddings):,} texts in {time.time() - start:.1f}s"
    mode = methods.own_mode(name, data.dim)
    tqdm.write(f"{name}: {how}; validation nDCG@10 ({mode}) {validation.text(method, mode)}")
    return True


def train_one(name: str, args, data: FittingData, validation: Validation, staging: Staging, common: dict) -> None:
    """Train every candidate of a learned method (or keep its staged checkpoint) and stage the best on validation,
    ranked by the method's own search."""
    start, (sim_weight, contrastive_weight) = time.time(), loss_weights(args, name)
    lr = args.lr or methods.entry(name).lr or LR
    settings = {"method": name, "temperature": args.temperature, "loss": [sim_weight, contrastive_weight],
                "activation": args.activation, "epochs": args.epochs, "lr": lr, "batch_size": args.batch_size,
                "random_inits": args.random_inits}
    if previous := staging.kept(name, fingerprint := staging.fingerprint(settings)):
        tqdm.write(f"{name}: kept from an interrupted run ({staging.path(name)}; init {previous[1]['initialisation']})")
        return
    tqdm.write(f"{name}: loss {sim_weight} * similarity_preservation + {contrastive_weight} * info_nce")
    method, mode = methods.make_method(name, data.dim), methods.own_mode(name, data.dim)

    def validate(quantizer):
        method.load_state(quantizer.export(data.embeddings), Path(f"<{name} in training>"))
        return validation.ndcg(method, mode)

    pairs = (torch.from_numpy(data.anchors), torch.from_numpy(data.positives), torch.from_numpy(data.pair_source))
    quantizer, init, scores = train_candidates(
        lambda: make_quantizer(name, data.dim, args.temperature), data.embeddings, validate, args.random_inits, args.seed,
        pairs=pairs, epochs=args.epochs, batch_size=args.batch_size, lr=lr, activation=args.activation,
        sim_weight=sim_weight, contrastive_weight=contrastive_weight)
    save_checkpoint(staging.path(name), quantizer.export(data.embeddings), common | {
        "method": name, "description": methods.describe(name, data.dim), "quantizer": type(quantizer).__name__,
        "initialisation": init, "temperature": str(args.temperature),
        "loss": f"{sim_weight} * similarity_preservation + {contrastive_weight} * info_nce(t={NCE_TEMPERATURE})",
        "activation": args.activation, "epochs": str(args.epochs), "lr": str(lr), "batch_size": str(args.batch_size),
        "validation_ndcg_at_10": scores, "made_with": fingerprint})
    tqdm.write(f"{name}: chose init {init} (validation mean nDCG@10 {scores[init]['mean']:.4f}); "
               f"{len(scores)} candidates trained in {time.time() - start:.1f}s")


def commit(moves: list[tuple[Path, Path]], folder: Path, run_entry: dict, costs: dict[str, dict]) -> None:
    """Move the staged checkpoints into place together, and add the run to the folder's training record (what each
    method cost): Ctrl-C waits the milliseconds this takes, so an interrupted run never leaves the set half old, half
    new."""
    ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for staged, path in moves:
            write_atomic(path, staged.read_bytes())
        for staged, _ in moves:
            staged.unlink()
        if moves:
            update_training_record(folder, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), run_entry, costs)
    finally:
        signal.signal(signal.SIGINT, ctrl_c)


def run(args) -> None:
    """Check the folders and weights, embed the data, then fit or train each method that applies, then commit."""
    for name in args.methods:
        if methods.entry(name).learned:
            loss_weights(args, name)  # refused before any work
    check_writable(checkpoint_path(args.out, args.model, "x", args.protocol).parent, "checkpoint folder")
    check_writable(args.cache_dir, "embedding cache folder")
    training = load_training_data(args.train_data, args.protocol, args.tasks, args.max_per_source, args.seed,
                                  args.in_domain_pairs, beir_dir=args.data_dir)  # every file read and checked first
    held_out = read_validation(args.data_dir, args.tasks, args.seed)
    base, start = BaseModel(args.model, args.cache_dir, args.device), clocks()
    validation = embed_validation(base, held_out)
    data = embed_fitting_data(base, *training)
    run_entry = {"command": sys.argv, "texts": len(data.texts), "embedding": spent(start)}
    common = common_metadata(args.model, args.protocol, data.dim, args.seed, data.sources)
    common["validation_query_ids"] = {task: v["query_ids"] for task, v in validation.tasks.items()}
    staging = Staging(args, data, validation, common)
    for name in ("float", "stage1_zero"):  # the references every method's validation line reads against
        print(f"{name:12s} validation nDCG@10 {validation.text(methods.make_method(name, data.dim), methods.own_mode(name, data.dim))}")
    names = []
    for name in args.methods:
        if reason := methods.applies(name, data.dim):
            tqdm.write(f"{name}: skipped, it does not apply at dimension {data.dim} ({reason})")
        else:
            names.append(name)
    costs = {}  # each method's wall and CPU seconds (a fit's: its thread's, as fits run side by side)
    with tqdm(total=len(names), desc="methods", unit=" methods") as bar:  # a fit can take minutes (OPQ): the bar names it

        def fit_timed(name: str) -> None:
            bar.set_postfix_str(name)
            start = clocks(thread=True)
            if fit_one(name, data, validation, staging, common):
                costs[name] = spent(start, thread=True)
            bar.update()

        fit_side_by_side(fit_timed, [name for name in names if not methods.entry(name).learned])
        for name in [name for name in names if methods.entry(name).learned]:  # torch uses both cores: one at a time
            bar.set_postfix_str(name)
            start = clocks()
            train_one(name, args, data, validation, staging, common)
            costs[name] = spent(start)
            bar.update()
    moves = [(staging.path(name), checkpoint_path(args.out, args.model, name, args.protocol)) for name in costs]
    folder = checkpoint_path(args.out, args.model, "x", args.protocol).parent
    commit(moves, folder, run_entry, costs)
    print(f"wrote {len(moves)} checkpoints to {folder}")


if __name__ == "__main__":
    main()
