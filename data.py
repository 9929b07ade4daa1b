"""Reading data: BEIR task folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), sentence-pair files, the
validation/train query splits of the evaluated tasks, and the training data of each protocol.

Every problem with a file is a UsageError naming the file and line: the commands print it as one `error:` line.
"""

import json
import os
import random
import tempfile
from pathlib import Path

# defaults
PROTOCOLS = ["transfer", "in-domain"]
TASKS = ["NFCorpus", "SciFact"]  # evaluated tasks: their validation queries choose candidates (and in-domain trains)
MAX_PER_SOURCE = 1000  # pairs per pair file, documents per beir-small corpus: one large source must not drown the rest
IN_DOMAIN_PAIRS = 20_000  # in-domain: (train query, relevant document) pairs per evaluated task
VALIDATION_FRACTION = 0.2  # of a task's train queries, when it has no dev split
SEED = 0

class UsageError(Exception):
    """Bad input from the user: reported as one line, never as a traceback."""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"missing data file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    raise UsageError(f"{path}:{n}: not a JSON object")
                rows.append(row)
    return rows


def _fields(rows: list[dict], path: Path, *keys: str) -> list[dict]:
    """The rows of a jsonl file, refusing the first one that lacks a required key."""
    for n, row in enumerate(rows, 1):
        if any(row.get(k) is None for k in keys):
            raise UsageError(f"{path}: record {n} lacks {' or '.join(repr(k) for k in keys if row.get(k) is None)}")
    return rows


def document_text(doc: dict) -> str:
    """A document as mteb shows it to the encoder: title and text joined by a space."""
    return (doc.get("title", "") + " " + doc["text"]).strip()


def load_qrels(folder: Path, split: str) -> dict[str, dict[str, int]]:
    """Read `folder/qrels/<split>.tsv` as {query_id: {doc_id: score}}, naming the line of anything malformed."""
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise UsageError(f"missing qrels file: {path}")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if n == 1 and fields[0] == "query-id" or not line.strip():
                continue
            if len(fields) != 3 or not fields[2].strip().lstrip("-").isdigit():
                raise UsageError(f"{path}:{n}: malformed qrels line {line.rstrip()!r} (want query-id<TAB>corpus-id<TAB>score)")
            qrels.setdefault(fields[0], {})[fields[1]] = int(fields[2])
    return qrels


def load_beir(folder: Path, split: str | None = None) -> tuple[dict, dict, dict]:
    """Read a BEIR folder. Returns corpus {id: {"title", "text"}}, queries {id: text}, qrels {qid: {doc_id: score}}.

    With a split, only that split's queries are returned; with `split=None`, all queries and no qrels.
    Raises UsageError naming the file and line of anything missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"data folder not found: {folder}")
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    corpus = {str(d["_id"]): {"title": d.get("title") or "", "text": d["text"]} for d in _fields(_read_jsonl(corpus_path), corpus_path, "_id", "text")}
    queries = {str(q["_id"]): q["text"] for q in _fields(_read_jsonl(queries_path), queries_path, "_id", "text")}
    if not corpus:
        raise UsageError(f"{corpus_path} holds no documents")
    if split is None:
        return corpus, queries, {}
    qrels = load_qrels(folder, split)
    queries = {qid: queries[qid] for qid in qrels if qid in queries}
    if not any(score > 0 for qid in queries for score in qrels[qid].values()):
        raise UsageError(f"{folder / 'qrels' / (split + '.tsv')}: no query of queries.jsonl has a relevant document (score > 0)")
    return corpus, queries, qrels


def check_writable(folder: Path, what: str = "output folder") -> None:
    """Create `folder` if needed and prove a file can be written there, before any long work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"{what} {folder} is not writable ({e.strerror})") from None


def find_task_folder(data_dir: Path, task_name: str) -> Path:
    """`data_dir/<task name>/`, matched case-insensitively (SciFact -> scifact/)."""
    if not Path(data_dir).is_dir():
        raise UsageError(f"data folder not found: {data_dir}")
    folders = {p.name.lower(): p for p in Path(data_dir).iterdir() if p.is_dir()}
    if task_name.lower() not in folders:
        raise UsageError(f"no folder for {task_name} in {data_dir} (have: {', '.join(sorted(folders)) or 'none'})")
    return folders[task_name.lower()]


def task_query_splits(folder: Path, seed: int = SEED) -> dict[str, dict[str, dict[str, int]]]:
    """The non-test qrels of a task, as two disjoint query sets: "validation" and "train" (in-domain training only).

    validation = the dev split if the task has one, else a seeded VALIDATION_FRACTION of its train queries.
    """
    train = load_qrels(folder, "train") if (Path(folder) / "qrels" / "train.tsv").is_file() else {}
    if (Path(folder) / "qrels" / "dev.tsv").is_file():
        validation = load_qrels(folder, "dev")
    else:
        ids = sorted(train)
        random.Random(seed).shuffle(ids)
        validation = {qid: train[qid] for qid in ids[: round(VALIDATION_FRACTION * len(ids))]}
    return {"validation": validation, "train": {q: d for q, d in train.items() if q not in validation}}


def load_training_data(data_dir: Path, protocol: str = "transfer", tasks: list[str] = TASKS,
                       max_per_source: int = MAX_PER_SOURCE, seed: int = SEED,
                       in_domain_pairs: int = IN_DOMAIN_PAIRS) -> tuple[dict[str, list], dict[str, list]]:
    """Training data by source, at most `max_per_source` items per source (`in_domain_pairs` per task), seeded.

    Returns (pairs, texts): positive (anchor, positive) pairs for the contrastive loss, and extra texts for the
    similarity loss (which also uses both sides of every pair).
    transfer: pairs from every `pairs/*.jsonl`, texts from every `beir-small/*` corpus. Nothing from `beir/`.
    in-domain: the contrastive pairs are instead (query, relevant document) pairs from the train queries of each
    evaluated task in `beir/`, never from its validation or test queries; the general pairs become texts (in the
    balanced sampling they would outvote the in-domain pairs).
    """
    data_dir, rng = Path(data_dir), random.Random(seed)
    pairs: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((data_dir / "pairs").glob("*.jsonl")):
        rows = [(r.get("anchor") or r.get("sentence1"), r.get("positive") or r.get("sentence2")) for r in _read_jsonl(path)]
        pairs[f"pairs/{path.stem}"] = [(a, b) for a, b in rows if a and b]
    texts = {f"beir-small/{folder.name}": [document_text(d) for d in load_beir(folder)[0].values()]
             for folder in sorted(p for p in (data_dir / "beir-small").glob("*") if p.is_dir())}
    if protocol == "in-domain":
        for task in tasks:
            folder = find_task_folder(data_dir / "beir", task)
            corpus, queries, _ = load_beir(folder)
            train = task_query_splits(folder, seed)["train"]
            pairs[f"in-domain/{task}"] = [(queries[q], document_text(corpus[d])) for q, docs in train.items() for d, s in docs.items() if s > 0]
    if not any(pairs.values()):
        raise UsageError(f"no training pairs under {data_dir} (expected pairs/*.jsonl)")
    sample = lambda items, n=max_per_source: rng.sample(items, min(len(items), n))  # noqa: E731
    pairs = {k: sample(v, in_domain_pairs if k.startswith("in-domain/") else max_per_source) for k, v in pairs.items() if v}
    texts = {k: sample(v) for k, v in texts.items() if v}
    if protocol == "in-domain":
        texts |= {k: [t for pair in pairs.pop(k) for t in pair] for k in [k for k in pairs if k.startswith("pairs/")]}
    return pairs, texts


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file whole or not at all: a temporary file beside it, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
