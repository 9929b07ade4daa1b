"""Reading data: BEIR task folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), sentence-pair files, the
validation/train query splits of the evaluated tasks, and the training data of each protocol.

Every problem with a file is a UsageError naming the file and line: the commands print it as one `error:` line.
Files are UTF-8; a leading BOM and CRLF line ends are accepted. Refused: a byte that is not UTF-8, a line that is not
a JSON object, a missing field or a non-string where text belongs, duplicate document or query ids, a query with
empty text, a pair with an empty side, a qrels line that is malformed, repeats a (query, document) pair or names a
query or document the folder does not hold. Where many records break one rule, the first is named and the other
ids counted: `<file>:<line>: duplicate document id '123' (and 4 more)`. A document with neither title nor text is
kept, with one warning line.
"""

import contextlib
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 file, numbered from 1, without their line ends (LF or CRLF) or a leading BOM."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            yield n, line.rstrip("\r\n")


def _refuse(path: Path, problem: str, offenders: list[tuple[int, object]]) -> None:
    """Raise one line for the (line, id) offenders of one rule: the first named, the other distinct ids counted."""
    if message := _summary(path, problem, offenders):
        raise UsageError(message)


def _summary(path: Path, problem: str, offenders: list[tuple[int, object]]) -> str:
    """`<path>:<line>: <problem with the first id> (and N more)`, or "" when there is no offender."""
    first_line: dict = {}
    for n, key in offenders:
        first_line.setdefault(key, n)
    if not first_line:
        return ""
    key, n = next(iter(first_line.items()))
    return f"{path}:{n}: {problem % (key,)}" + (f" (and {len(first_line) - 1} more)" if len(first_line) > 1 else "")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """The JSON objects of a jsonl file with their line numbers; blank lines are skipped."""
    if not path.is_file():
        raise UsageError(f"missing data file: {path}")
    rows = []
    for n, line in _lines(path):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{n}: not a JSON object")
            rows.append((n, row))
    return rows


JSON_TYPES = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}


def _check_fields(path: Path, rows: list[tuple[int, dict]], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Refuse the first record that lacks a required field or holds a non-string in a text field (an `_id` may be an integer)."""
    for record, (n, row) in enumerate(rows, 1):
        if missing := [k for k in required if row.get(k) is None]:
            raise UsageError(f"{path}: record {record} lacks {' or '.join(map(repr, missing))} (line {n})")
        for key in (*required, *optional):
            value = row.get(key)
            if value is not None and not isinstance(value, str) and not (key == "_id" and type(value) is int):
                wanted = "a string or an integer" if key == "_id" else "a string"
                raise UsageError(f"{path}:{n}: {key!r} must be {wanted}, not {JSON_TYPES.get(type(value), type(value).__name__)}")


def _read_records(path: Path, kind: str, optional: tuple[str, ...] = ()) -> dict[str, tuple[int, dict]]:
    """{_id: (line, record)} of a corpus or queries file, refusing bad fields and repeated ids."""
    rows = _read_jsonl(path)
    _check_fields(path, rows, ("_id", "text"), optional)
    records: dict[str, tuple[int, dict]] = {}
    repeats = []
    for n, row in rows:
        if (key := str(row["_id"])) in records:
            repeats.append((n, key))
        else:
            records[key] = (n, row)
    _refuse(path, f"duplicate {kind} id %r", repeats)
    return records


def document_text(doc: dict) -> str:
    """A document as mteb shows it to the encoder: title and text joined by a space."""
    return (doc.get("title", "") + " " + doc["text"]).strip()


def load_qrels(folder: Path, split: str, corpus: dict | None = None, queries: dict | None = None) -> dict[str, dict[str, int]]:
    """Read `folder/qrels/<split>.tsv` as {query_id: {doc_id: score}}, refusing malformed lines and repeated pairs.

    Given the folder's corpus and queries, it also refuses a file in which no query of queries.jsonl has a relevant
    document, then a query or document id they do not hold.
    """
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise UsageError(f"missing qrels file: {path}")
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    repeats = []
    for n, line in _lines(path):
        fields = line.split("\t")
        if n == 1 and fields[0] == "query-id" or not line.strip():
            continue
        if len(fields) != 3 or not re.fullmatch(r"-?[0-9]+", fields[2].strip()):
            raise UsageError(f"{path}:{n}: malformed qrels line {line!r} (want query-id<TAB>corpus-id<TAB>score)")
        query_id, doc_id = fields[0], fields[1]
        if (query_id, doc_id) in first_line:
            repeats.append((n, (query_id, doc_id)))
        else:
            first_line[query_id, doc_id] = n
            qrels.setdefault(query_id, {})[doc_id] = int(fields[2])
    _refuse(path, "repeated (query, document) pair %r", repeats)
    if queries is not None:
        if not any(score > 0 for qid in qrels if qid in queries for score in qrels[qid].values()):
            raise UsageError(f"{path}: no query of queries.jsonl has a relevant document (score > 0)")
        _refuse(path, "query %r is not in queries.jsonl", [(n, q) for (q, _), n in first_line.items() if q not in queries])
    if corpus is not None:
        _refuse(path, "document %r is not in corpus.jsonl", [(n, d) for (_, d), n in first_line.items() if d not in corpus])
    return qrels


def load_beir(folder: Path, split: str | None = None) -> tuple[dict, dict, dict]:
    """Read a BEIR folder. Returns corpus {id: {"title", "text"}}, queries {id: text}, qrels {qid: {doc_id: score}}.

    With a split, only that split's queries are returned; with `split=None`, all queries and no qrels.
    Raises UsageError naming the file and line of anything missing or malformed (see the module's docstring).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"data folder not found: {folder}")
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    documents = _read_records(corpus_path, "document", optional=("title",))
    if not documents:
        raise UsageError(f"{corpus_path} holds no documents")
    query_records = _read_records(queries_path, "query")
    _refuse(queries_path, "query %r has empty text", [(n, q) for q, (n, row) in query_records.items() if not row["text"].strip()])
    # a title alone is enough to embed; a document with neither is odd but the corpus as given, so shown and kept
    if empty := _summary(corpus_path, "document %r has neither title nor text", [
            (n, d) for d, (n, row) in documents.items() if not row["text"].strip() and not (row.get("title") or "").strip()]):
        print(f"warning: {empty}; kept as an empty text", file=sys.stderr)
    corpus = {d: {"title": row.get("title") or "", "text": row["text"]} for d, (_, row) in documents.items()}
    queries = {q: row["text"] for q, (_, row) in query_records.items()}
    if split is None:
        return corpus, queries, {}
    qrels = load_qrels(folder, split, corpus, queries)
    return corpus, {qid: queries[qid] for qid in qrels}, qrels


def check_writable(folder: Path, what: str = "output folder") -> None:
    """Prove, before any long work, that `folder` can be written: itself if it exists, else the nearest existing
    folder above it (nothing is created, so a run that fails later leaves no empty folder behind)."""
    folder = Path(folder).absolute()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=existing):
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
    folder = Path(folder)
    corpus, queries, _ = load_beir(folder)  # only to check that the qrels name documents and queries the folder holds
    train = load_qrels(folder, "train", corpus, queries) if (folder / "qrels" / "train.tsv").is_file() else {}
    if (folder / "qrels" / "dev.tsv").is_file():
        validation = load_qrels(folder, "dev", corpus, queries)
    else:
        ids = sorted(train)
        random.Random(seed).shuffle(ids)
        validation = {qid: train[qid] for qid in ids[: round(VALIDATION_FRACTION * len(ids))]}
    return {"validation": validation, "train": {q: d for q, d in train.items() if q not in validation}}


def load_training_data(data_dir: Path, protocol: str = "transfer", tasks: list[str] = TASKS,
                       max_per_source: int = MAX_PER_SOURCE, seed: int = SEED,
                       in_domain_pairs: int = IN_DOMAIN_PAIRS, beir_dir: Path | None = None) -> tuple[dict[str, list], dict[str, list]]:
    """Training data by source, at most `max_per_source` items per source (`in_domain_pairs` per task), seeded.

    Returns (pairs, texts): positive (anchor, positive) pairs for the contrastive loss, and extra texts for the
    similarity loss (which also uses both sides of every pair).
    transfer: pairs from every `pairs/*.jsonl`, texts from every `beir-small/*` corpus. Nothing from `beir/`.
    in-domain: the contrastive pairs are instead (query, relevant document) pairs from the train queries of each
    evaluated task in `beir_dir` (default `<data_dir>/beir/`), never from its validation or test queries; the general pairs become texts (in the
    balanced sampling they would outvote the in-domain pairs).
    """
    data_dir, rng = Path(data_dir), random.Random(seed)
    pairs: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((data_dir / "pairs").glob("*.jsonl")):
        rows = _read_jsonl(path)
        keys = ("anchor", "positive") if rows and "anchor" in rows[0][1] else ("sentence1", "sentence2")
        _check_fields(path, rows, keys)
        for n, row in rows:
            if empty := [k for k in keys if not row[k].strip()]:
                raise UsageError(f"{path}:{n}: empty {empty[0]!r} in a pair")
        pairs[f"pairs/{path.stem}"] = [(row[keys[0]], row[keys[1]]) for _, row in rows]
    texts = {f"beir-small/{folder.name}": [document_text(d) for d in load_beir(folder)[0].values()]
             for folder in sorted(p for p in (data_dir / "beir-small").glob("*") if p.is_dir())}
    if protocol == "in-domain":
        for task in tasks:
            folder = find_task_folder(beir_dir or data_dir / "beir", task)  # the evaluated tasks' folders
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


def write_atomic(path: Path, data: str | bytes | Callable, exclusive: bool = False) -> None:
    """Write a file whole or not at all: a temporary file beside it, flushed to disk, then a rename. `data`: text,
    bytes, or a function that writes to the open binary file (np.save). `exclusive`: refuse to replace an existing
    file (FileExistsError). A full disk or a refused write is a UsageError naming the file; no temporary file is left
    and folders it created are removed. The one atomic writer of the tool: results, checkpoints, cache shards."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # deepest first; removed on failure
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows up here at the latest
        if exclusive:
            os.link(tmp, path)  # fails if path exists: another run's file is never replaced
            tmp.unlink()
        else:
            os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the new name is on disk before anything written after it (a cache shard's keys)
        finally:
            os.close(folder)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as e:
        with contextlib.suppress(OSError):  # e.g. under a path that is a file: there is no temporary file
            tmp.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise UsageError(f"cannot write {path} ({e.strerror or e})") from None


def clocks(thread: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds now, for `spent`; CPU of the process, or of the calling thread only (a fit run beside
    others)."""
    return time.perf_counter(), time.thread_time() if thread else time.process_time()


def spent(since: tuple[float, float], thread: bool = False) -> dict[str, float]:
    """Wall and CPU seconds since `since` (clocks(thread)): CPU time says what the work cost on a busy machine."""
    now = clocks(thread)
    return {"seconds": round(now[0] - since[0], 2), "cpu_seconds": round(now[1] - since[1], 2)}
