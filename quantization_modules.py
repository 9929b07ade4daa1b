"""Binary quantisers with learned per-dimension thresholds, their losses, one training loop, and the training command.

Read top to bottom: defaults -> base model and embedding cache -> data and splits -> quantisers -> codes and their
search -> losses -> training and validation -> checkpoints -> command line.

    python quantization_modules.py --data-dir ../shared/data --out checkpoints/                       # transfer
    python quantization_modules.py --data-dir ../shared/data --out checkpoints/ --protocol in-domain  # opt-in

Protocols. transfer (default): nothing from an evaluated task's train or test data is trained on; training pairs
come from pairs/ and beir-small/. in-domain: the evaluated tasks' train queries (minus validation) are added.
Both: candidates are chosen on validation queries (a task's dev split, else a seeded 20% of its train queries);
test qrels are never read here.
"""

import argparse
import datetime
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from tqdm import tqdm

from data import (
    PROTOCOLS,
    SEED,
    TASKS,
    IN_DOMAIN_PAIRS,
    MAX_PER_SOURCE,
    UsageError,
    check_writable,
    document_text,
    find_task_folder,
    load_beir,
    load_training_data,
    task_query_splits,
)
from encoders import CACHE_DIR, DEFAULT_MODEL, embed_texts, load_base_model, load_encoder, model_slug, quiet_libraries  # noqa: F401 (load_encoder: the library entry point, importable from here)

# ---------------------------------------------------------------------------------------------------------------
# defaults (override on the command line)
EPOCHS = 10
BATCH_SIZE = 512
LR = 1e-3
TEMPERATURE = 10.0  # sigmoid sharpness; MiniLM dimensions have a spread of about 0.05
ACTIVATIONS = ["sigmoid", "ste", "anneal"]  # ste: hard bits forward, sigmoid gradient backward
ACTIVATION = "ste"  # best on validation (README, "What training can and cannot do")
ANNEAL = (10.0, 300.0)  # temperature schedule of "anneal": geometric from soft to nearly hard over the epochs
SIM_WEIGHT = 1.0  # similarity_preservation_loss (each learned method's weights are in the registry, methods.py)
CONTRASTIVE_WEIGHT = 0.0  # info_nce_loss on positive pairs; for thresholds alone it lowered validation nDCG@10 (README)
NCE_TEMPERATURE = 0.05
RANDOM_INITS = 5  # random threshold initialisations, besides zero and the per-dimension median
GRAD_CLIP = 1.0
ORTHOGONALITY_TOLERANCE = 1e-3  # a loaded rotation must satisfy |R R^T - I| <= this


# ---------------------------------------------------------------------------------------------------------------
# quantisers: soft codes in [0, 1] for training, hard bits for search


class QuantizationModuleStage1(nn.Module):
    """One learnable threshold per dimension; bit = value > threshold. Thresholds all zero give the sign bit."""

    method = "stage1"

    def __init__(self, embedding_dim: int, temperature: float = TEMPERATURE):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.temperature = temperature
        self.straight_through = False  # set by training with activation "ste"
        self.thresholds = nn.Parameter(torch.zeros(embedding_dim))

    @property
    def bits_per_vector(self) -> int:
        return self.embedding_dim

    def combine(self, per_dim: torch.Tensor) -> torch.Tensor:
        """Map per-dimension bits (or their soft versions) to output bits. Stage 1: one bit per dimension."""
        return per_dim

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The values the thresholds compare: the embedding itself (a rotation of it in the rotated quantiser)."""
        return x

    def project(self) -> None:
        """Called after every optimiser step, to restore a constraint on the parameters. Thresholds have none."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Soft codes in [0, 1], differentiable in the thresholds; hard bits forward if straight_through."""
        z = self.temperature * (self.rotate(x) - self.thresholds)
        soft = torch.sigmoid(z)
        if self.straight_through:
            soft = soft + ((z > 0).float() - soft).detach()
        return self.combine(soft)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Hard bits, a bool tensor of shape (n, bits_per_vector)."""
        return self.margins(x) > 0

    @torch.no_grad()
    def margins(self, x: torch.Tensor) -> torch.Tensor:
        """How far each output bit's condition is from flipping: bit = margin > 0. Stage 1: x - threshold.
        Used as the float query in asymmetric search (for zero thresholds, the float query itself)."""
        return self.rotate(x) - self.thresholds


class QuantizationModuleStage2(QuantizationModuleStage1):
    """First half of the dimensions as Stage 1; the second half in pairs (d, d+1), one bit per pair that is 0 only
    when both values are under their thresholds (soft: 1 - (1 - s_a)(1 - s_b)). 384 dims -> 192 + 96 = 288 bits."""

    method = "stage2"

    def __init__(self, embedding_dim: int, temperature: float = TEMPERATURE):
        if embedding_dim % 4:
            raise ValueError(f"Stage 2 needs a dimension divisible by 4, got {embedding_dim}")
        super().__init__(embedding_dim, temperature)
        self.half = embedding_dim // 2

    @property
    def bits_per_vector(self) -> int:
        return self.half + (self.embedding_dim - self.half) // 2

    def combine(self, per_dim: torch.Tensor) -> torch.Tensor:
        a, b = per_dim[:, self.half :: 2], per_dim[:, self.half + 1 :: 2]
        return torch.cat([per_dim[:, : self.half], 1 - (1 - a) * (1 - b)], dim=1)

    @torch.no_grad()
    def margins(self, x: torch.Tensor) -> torch.Tensor:
        """A pair's bit is 1 when either value is over its threshold, so its margin is the larger of the two."""
        m = self.rotate(x) - self.thresholds
        return torch.cat([m[:, : self.half], torch.maximum(m[:, self.half :: 2], m[:, self.half + 1 :: 2])], dim=1)


class QuantizationModuleStage1Rotated(QuantizationModuleStage1):
    """Stage 1 after a learned orthogonal rotation: bit = (R x)_d > t_d. Still one bit per dimension; R starts as the
    identity (sign bits) and leaves every float cosine unchanged, so the float model through it is the float model."""

    method = "stage1_rotated"

    def __init__(self, embedding_dim: int, temperature: float = TEMPERATURE):
        super().__init__(embedding_dim, temperature)
        self.rotation = nn.Parameter(torch.eye(embedding_dim))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.rotation.T

    @torch.no_grad()
    def project(self) -> None:
        """Pull the rotation back to the nearest orthogonal matrix (Newton-Schulz steps, two matrix products each;
        the drift of one optimiser step needs two or three)."""
        r = self.rotation
        for _ in range(10):
            error = r @ r.T - torch.eye(len(r))
            if error.abs().max() < 1e-6:
                break
            r = r - 0.5 * error @ r
        self.rotation.copy_(r)




def to_signed(codes: torch.Tensor) -> torch.Tensor:
    """0/1 codes -> -1/+1, so that a dot product is bits_per_vector - 2 * Hamming distance."""
    return 2 * codes.float() - 1


# ---------------------------------------------------------------------------------------------------------------
# losses


def similarity_preservation_loss(float_emb: torch.Tensor, quantised_emb: torch.Tensor) -> torch.Tensor:
    """MSE between the cosine-similarity matrices of a batch of float embeddings and of their (±1) codes."""
    float_sim = F.normalize(float_emb, dim=1) @ F.normalize(float_emb, dim=1).T
    quant_sim = F.normalize(quantised_emb, dim=1) @ F.normalize(quantised_emb, dim=1).T
    return F.mse_loss(quant_sim, float_sim)


def info_nce_loss(anchor_codes: torch.Tensor, positive_codes: torch.Tensor, temperature: float = NCE_TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of positive pairs: each anchor's positive against the batch's other positives."""
    logits = F.normalize(anchor_codes, dim=1) @ F.normalize(positive_codes, dim=1).T / temperature
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---------------------------------------------------------------------------------------------------------------
# training: one loop for every quantiser, then validation and the choice among initialisations


def train_quantizer(
    quantizer: QuantizationModuleStage1,
    embeddings: np.ndarray | torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = SEED,
    activation: str = ACTIVATION,
    sim_weight: float = SIM_WEIGHT,
    contrastive_weight: float = CONTRASTIVE_WEIGHT,
    verbose: bool = True,
) -> list[float]:
    """Train a quantiser on cached float embeddings with Adam and gradient clipping. Returns the loss of each epoch.

    Each step: `sim_weight` x similarity loss on a batch of embeddings, plus (with `pairs` = anchor rows, positive rows,
    source ids, all indexes into `embeddings`) `contrastive_weight` x InfoNCE on a batch of pairs sampled so that every
    source is equally likely.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    if pairs is not None and contrastive_weight:
        anchors, positives, source = pairs
        pair_weights = 1.0 / torch.bincount(source)[source].float()  # balanced across sources
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=lr)
    quantizer.straight_through = activation == "ste"
    losses = []
    for epoch in (bar := tqdm(range(epochs), desc=f"train {quantizer.method}", leave=False, disable=not verbose)):
        if activation == "anneal":
            quantizer.temperature = ANNEAL[0] * (ANNEAL[1] / ANNEAL[0]) ** (epoch / max(1, epochs - 1))
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = x[order[start : start + batch_size]]
            loss = torch.zeros(())
            if sim_weight:
                loss = loss + sim_weight * similarity_preservation_loss(batch, to_signed(quantizer(batch)))
            if pairs is not None and contrastive_weight:
                pick = torch.multinomial(pair_weights, min(batch_size, len(anchors)), replacement=False, generator=generator)
                loss = loss + contrastive_weight * info_nce_loss(to_signed(quantizer(x[anchors[pick]])), to_signed(quantizer(x[positives[pick]])))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(quantizer.parameters(), GRAD_CLIP)
            optimizer.step()
            quantizer.project()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
        if verbose:
            tqdm.write(f"{quantizer.method} epoch {epoch + 1:3d}/{epochs}  loss {losses[-1]:.6f}")
    quantizer.straight_through = False
    return losses


def train_quantization_stage1(embeddings, temperature: float = TEMPERATURE, **kwargs) -> QuantizationModuleStage1:
    quantizer = QuantizationModuleStage1(embeddings.shape[1], temperature)
    train_quantizer(quantizer, embeddings, **kwargs)
    return quantizer


def train_quantization_stage2(embeddings, temperature: float = TEMPERATURE, **kwargs) -> QuantizationModuleStage2:
    quantizer = QuantizationModuleStage2(embeddings.shape[1], temperature)
    train_quantizer(quantizer, embeddings, **kwargs)
    return quantizer


def initial_thresholds(name: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """zero, the per-dimension median, or random{i}: normal around 0 with half each dimension's spread."""
    if name == "zero":
        return torch.zeros(x.shape[1])
    if name == "median":
        return x.median(0).values
    g = torch.Generator().manual_seed(seed * 1000 + int(name.removeprefix("random")))
    return 0.5 * x.std(0) * torch.randn(x.shape[1], generator=g)


def train_candidates(build, embeddings, validate, n_random: int = RANDOM_INITS, seed: int = SEED, **train_kwargs):
    """Train one quantiser per initialisation (zero, median, random0..k-1); keep the best mean validation nDCG@10.

    `build()` makes a fresh quantiser; `validate(quantizer)` gives {task: validation nDCG@10}, ranked as the
    evaluation ranks (methods.rank). Returns (best quantiser, its initialisation, {initialisation: {task: nDCG@10,
    "mean": ...}}).
    """
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    scores, best = {}, None
    for name in tqdm(["zero", "median"] + [f"random{i}" for i in range(n_random)], desc="candidates", leave=False):
        quantizer = build()
        with torch.no_grad():
            quantizer.thresholds.copy_(initial_thresholds(name, x, seed))
        train_quantizer(quantizer, x, seed=seed, verbose=False, **train_kwargs)
        scores[name] = validate(quantizer)
        scores[name]["mean"] = float(np.mean(list(scores[name].values())))
        tqdm.write(f"  {quantizer.method} init {name:8s} validation nDCG@10 "
              + "  ".join(f"{t} {v:.4f}" for t, v in scores[name].items()))
        if best is None or scores[name]["mean"] > scores[best[0]]["mean"]:
            best = (name, quantizer)
    return best[1], best[0], scores


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: safetensors with the learned parameters, plus metadata saying what made them


def checkpoint_path(checkpoints_dir: Path, model_name: str, method: str, protocol: str = "transfer") -> Path:
    """<dir>/<model-slug>/<method>.safetensors for transfer; <dir>/<model-slug>/in-domain/<method>.safetensors otherwise."""
    folder = Path(checkpoints_dir) / model_slug(model_name)
    return (folder if protocol == "transfer" else folder / protocol) / f"{method}.safetensors"


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write tensors with metadata (values as strings; dicts and lists as JSON) atomically: a whole file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: t.detach().contiguous() for k, t in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path} ({e.strerror})") from None


def load_checkpoint(path: Path, model_name: str, embedding_dim: int, protocol: str | None, method: str,
                    registry_name: str | None = None) -> tuple[dict, dict]:
    """Read a checkpoint's tensors and metadata, refusing one that is missing, not safetensors, made for another model,
    dimension, protocol or method, or holding non-finite values. Each refusal is a UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        transfer = protocol in (None, "transfer")
        raise UsageError(f"no checkpoint at {path}; make one with: python quantization_modules.py --model {model_name} "
                         f"--methods {registry_name or method} --out {path.parents[1] if transfer else path.parents[2]}"
                         + ("" if transfer else f" --protocol {protocol}"))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a safetensors checkpoint ({e}); pickled checkpoints are refused") from None
    if meta.get("base_model") != model_name:
        raise UsageError(f"{path} was made for model {meta.get('base_model')!r}, not {model_name!r}")
    if meta.get("method") != method:
        raise UsageError(f"{path} holds a {meta.get('method')} checkpoint, not {method}")
    if meta.get("dimension") != str(embedding_dim):
        raise UsageError(f"{path} is for dimension {meta.get('dimension')}, but {model_name} gives {embedding_dim}")
    if protocol is not None and meta.get("protocol", "transfer") != protocol:
        raise UsageError(f"{path} was made under protocol {meta.get('protocol', 'transfer')!r}, not {protocol!r}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(f"{path}: tensor {name!r} holds {int((~torch.isfinite(tensor)).sum())} non-finite values")
    return tensors, meta


def quantizer_metadata(quantizer: QuantizationModuleStage1) -> dict:
    """What a checkpoint must say to rebuild the quantiser: its kind, dimension and temperature."""
    return {"method": quantizer.method, "dimension": str(quantizer.embedding_dim), "temperature": str(quantizer.temperature)}


def save_quantizer(path: Path, quantizer: QuantizationModuleStage1, metadata: dict) -> None:
    """Write a quantiser's parameters (thresholds, and a rotation if learned) with metadata saying what made them."""
    save_checkpoint(path, dict(quantizer.named_parameters()), quantizer_metadata(quantizer) | metadata)


def load_quantizer(path: Path, model_name: str, embedding_dim: int, quantizer_class: type,
                   protocol: str | None = None, registry_name: str | None = None) -> tuple[QuantizationModuleStage1, dict]:
    """Load a checkpoint of a `quantizer_class` quantiser (load_checkpoint's refusals), refusing also tensors whose
    shapes disagree with the dimension, a rotation that is not orthogonal, and unparseable metadata."""
    tensors, meta = load_checkpoint(path, model_name, embedding_dim, protocol, quantizer_class.method, registry_name)
    try:
        temperature = float(meta.get("temperature", TEMPERATURE))
    except ValueError:
        raise UsageError(f"{path}: metadata temperature {meta['temperature']!r} is not a number") from None
    quantizer = quantizer_class(embedding_dim, temperature)
    want = {name: tuple(p.shape) for name, p in quantizer.named_parameters()}
    have = {name: tuple(t.shape) for name, t in tensors.items()}
    if want != have:
        raise UsageError(f"{path} holds tensors {have}, but a {quantizer_class.method} quantiser of dimension "
                         f"{embedding_dim} has {want}")
    quantizer.load_state_dict(tensors)
    if "rotation" in tensors:
        error = (tensors["rotation"] @ tensors["rotation"].T - torch.eye(embedding_dim)).abs().max().item()
        if error > ORTHOGONALITY_TOLERANCE:
            raise UsageError(f"{path}: the rotation is not orthogonal (|R R^T - I| reaches {error:.3g})")
    return quantizer.eval(), meta


# ---------------------------------------------------------------------------------------------------------------
# command line: embed training and validation texts once (cached), fit every method fitted on texts, train every
# candidate of the learned quantisers and keep the best on validation


def main(argv=None) -> None:
    import methods  # the registry, which imports the quantisers above

    fitted = [name for name in methods.METHODS if methods.make_method(name, methods.PROBE_DIM).fitted_on != "nothing"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")
    p.add_argument("--train-data", type=Path, default=Path("../shared/data"), help="folder with pairs/ and beir-small/ (fitting texts)")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/beir"),
                   help="folder of the evaluated tasks' BEIR folders (validation; in-domain training), as in the evaluation")
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="checkpoints go to <out>/<model-slug>/[in-domain/]")
    p.add_argument("--protocol", default="transfer", choices=PROTOCOLS)
    p.add_argument("--tasks", nargs="+", default=TASKS, help="evaluated tasks (folders in --data-dir): validation, in-domain data")
    p.add_argument("--methods", nargs="+", default=fitted, choices=fitted, metavar="METHOD",
                   help=f"registry methods to fit or train (default: all): {', '.join(fitted)}")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR))
    p.add_argument("--max-per-source", type=int, default=MAX_PER_SOURCE)
    p.add_argument("--in-domain-pairs", type=int, default=IN_DOMAIN_PAIRS, help="in-domain pairs per evaluated task")
    p.add_argument("--activation", default=ACTIVATION, choices=ACTIVATIONS)
    p.add_argument("--sim-weight", type=float, help="default per method: the registry's loss_weights")
    p.add_argument("--contrastive-weight", type=float, help="default per method, as --sim-weight")
    p.add_argument("--random-inits", type=int, default=RANDOM_INITS)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--device", nargs="+", help="cuda, cuda:0, mps, cpu (default: the fastest here); several encode in parallel")
    p.add_argument("--verbose", action="store_true", help="show the libraries' warnings and logs")
    args = p.parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    for name, value, low in [("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1), ("--random-inits", args.random_inits, 0),
                             ("--max-per-source", args.max_per_source, 1), ("--in-domain-pairs", args.in_domain_pairs, 1)]:
        if value < low:
            p.error(f"{name} must be at least {low}, got {value}")
    for name, value in [("--lr", args.lr), ("--temperature", args.temperature)]:
        if not value > 0:
            p.error(f"{name} must be positive, got {value}")
    try:
        trained = [m for m in args.methods if methods.make_method(m, methods.PROBE_DIM).fitted_on == "training"]
        weights = {}
        for name in trained:
            default = methods.make_method(name, methods.PROBE_DIM).loss_weights
            weights[name] = sim_weight, contrastive_weight = (default[0] if args.sim_weight is None else args.sim_weight,
                                                              default[1] if args.contrastive_weight is None else args.contrastive_weight)
            if not (math.isfinite(sim_weight) and math.isfinite(contrastive_weight)) or min(sim_weight, contrastive_weight) < 0 \
                    or sim_weight == contrastive_weight == 0:
                raise UsageError(f"{name}: loss weights must be >= 0 and not both 0, got similarity {sim_weight}, contrastive {contrastive_weight}")
        check_writable(checkpoint_path(args.out, args.model, args.methods[0], args.protocol).parent, "checkpoint folder")
        check_writable(args.cache_dir, "embedding cache folder")
        pairs_by_source, texts_by_source = load_training_data(args.train_data, args.protocol, args.tasks, args.max_per_source,
                                                              args.seed, args.in_domain_pairs, beir_dir=args.data_dir)
        print("training pairs: " + ", ".join(f"{k} {len(v):,}" for k, v in pairs_by_source.items()))
        print("extra training texts: " + ", ".join(f"{k} {len(v):,}" for k, v in texts_by_source.items()))
        texts = list(dict.fromkeys([t for v in pairs_by_source.values() for pair in v for t in pair] + [t for v in texts_by_source.values() for t in v]))
        row = {t: i for i, t in enumerate(texts)}
        pairs = tuple(torch.tensor(c) for c in zip(*[(row[a], row[b], i) for i, v in enumerate(pairs_by_source.values()) for a, b in v]))
        # validation: each evaluated task's validation queries against its whole corpus (read before the model loads)
        held_out, task_data = {}, {}
        for task in args.tasks:
            folder = find_task_folder(args.data_dir, task)
            corpus, queries, _ = load_beir(folder)
            qrels = task_query_splits(folder, args.seed)["validation"]
            held_out[task] = [q for q in qrels if q in queries]
            if not held_out[task]:
                raise UsageError(f"{task}: no validation queries (wanted qrels/dev.tsv, or qrels/train.tsv to hold some out, in {folder})")
            task_data[task] = corpus, queries, {q: qrels[q] for q in held_out[task]}
        model = load_base_model(args.model, args.device[0] if args.device else None)
        print(f"device {model.device}; methods: {', '.join(args.methods)}")
        slug_dir = args.cache_dir / model_slug(args.model)
        validation = {}  # the embeddings share the evaluation's task caches
        for task, (corpus, queries, qrels) in task_data.items():
            validation[task] = dict(
                queries=embed_texts(model, [queries[q] for q in held_out[task]], slug_dir / task / "query", devices=args.device,
                                    desc=f"encoding {task} validation queries"),
                docs=embed_texts(model, [document_text(d) for d in corpus.values()], slug_dir / task / "document",
                                 devices=args.device, desc=f"encoding {task} documents"),
                query_ids=held_out[task], doc_ids=list(corpus), qrels=qrels)
        # in-domain texts are the tasks' own queries and documents: read from the task caches, not encoded again
        task_caches = [slug_dir / task / kind for task in args.tasks for kind in ("query", "document")]
        embeddings = embed_texts(model, texts, slug_dir / "_training", also=task_caches, devices=args.device,
                                 desc="encoding training texts")
        dim = embeddings.shape[1]
        sources = {k: len(v) for k, v in pairs_by_source.items()} | {k: len(v) for k, v in texts_by_source.items()}
        common = {"base_model": args.model, "protocol": args.protocol, "dimension": str(dim), "seed": str(args.seed),
                  "training_sources": sources, "validation_query_ids": held_out}

        def validate(method, mode: str = "hamming") -> dict[str, float]:
            """Mean-able validation nDCG@10 per task, ranked by the evaluation's own index and search."""
            from mteb_adapter import ndcg_at_10

            scores = {task: ndcg_at_10(methods.rank(method, mode, **{k: v[k] for k in ("docs", "queries", "doc_ids", "query_ids")}),
                                       v["qrels"]) for task, v in validation.items()}
            return scores | {"mean": float(np.mean(list(scores.values())))}

        for name in ("float", "stage1_zero"):
            print(f"{name:12s} validation nDCG@10 " + "  ".join(f"{t} {v:.4f}" for t, v in validate(methods.make_method(name, dim), next(iter(methods.make_method(name, dim).modes))).items()))

        # methods fitted on the texts (seconds each): ranges, PCA, codebooks, centroids. Every checkpoint is written
        # at the end, together, so an interrupted run leaves the previous set whole rather than a mix of two runs
        to_save = []  # (path, tensors, metadata)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for name in [m for m in args.methods if m not in trained]:
            start, method = time.time(), methods.make_method(name, dim)
            try:
                method.fit(embeddings)
            except RuntimeError as e:  # faiss: e.g. fewer fitting texts than k-means centroids or PCA components
                raise UsageError(f"{name}: cannot be fitted on {len(embeddings):,} texts "
                                 f"({str(e).splitlines()[0].split('failed: ')[-1]})") from None
            to_save.append((checkpoint_path(args.out, args.model, method.checkpoint, args.protocol), method.state(),
                            common | {"method": name, "fitted_on": f"{len(embeddings):,} fitting texts", "date": date}))
            print(f"{name}: fitted on {len(embeddings):,} texts in {time.time() - start:.1f}s")

        train_kwargs = dict(pairs=pairs, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, activation=args.activation)
        start_all = time.time()
        for name in trained:
            start, method = time.time(), methods.make_method(name, dim)
            sim_weight, contrastive_weight = weights[name]
            print(f"{name}: loss {sim_weight} * similarity_preservation + {contrastive_weight} * info_nce")

            def validate_quantizer(quantizer, method=method):
                method.quantizer = quantizer.eval()
                return validate(method)

            quantizer, init, scores = train_candidates(lambda: method.quantizer_class(dim, args.temperature), embeddings,
                                                       validate_quantizer, args.random_inits, args.seed, sim_weight=sim_weight,
                                                       contrastive_weight=contrastive_weight, **train_kwargs)
            path = checkpoint_path(args.out, args.model, method.checkpoint, args.protocol)
            to_save.append((path, dict(quantizer.named_parameters()), quantizer_metadata(quantizer) | common | {
                "name": name, "initialisation": init,
                "loss": f"{sim_weight} * similarity_preservation + {contrastive_weight} * info_nce(t={NCE_TEMPERATURE})",
                "activation": args.activation, "epochs": str(args.epochs), "lr": str(args.lr), "batch_size": str(args.batch_size),
                "validation_ndcg_at_10": scores, "date": date,
            }))
            print(f"{name}: chose init {init} (validation mean nDCG@10 {scores[init]['mean']:.4f}); "
                  f"{len(scores)} candidates trained in {time.time() - start:.1f}s, {quantizer.bits_per_vector} bits")
        if trained:
            print(f"training all candidates took {time.time() - start_all:.1f}s")
        ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the set is written whole: Ctrl-C waits the milliseconds
        try:
            for path, tensors, metadata in to_save:
                save_checkpoint(path, tensors, metadata)
        finally:
            signal.signal(signal.SIGINT, ctrl_c)
        print(f"wrote {len(to_save)} checkpoints to {checkpoint_path(args.out, args.model, 'x', args.protocol).parent}")
    except UsageError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # the shell's convention for Ctrl-C: 130 (sys.exit with a message would exit 1)
        print("interrupted; no checkpoint was written (a rerun encodes nothing the cache already holds)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
