"""A model's results folder as files: `latest.csv` (every row's metrics), `per_query.csv.gz` (every row's nDCG@10 per
query) and `record.json`, the run record: per row its run, wall and CPU time, peak memory, bytes, and the fingerprints
of the checkpoints it was loaded from; per task the fingerprint of the data it was scored on; per run its command.

The evaluation merges each run into the folder: the rows it ran replace their old selves, every other row stays, and
the statistics are computed again over the whole table. A run on other data for a task the table holds, or for another
model, dimension or protocol, is refused (one line). `status()` says which registry rows a folder lacks and which were
scored with a checkpoint that has changed since (stale).
"""

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import methods
from checkpoints import checkpoint_fingerprint, checkpoint_path
from data import PROTOCOLS, UsageError

LATEST = "latest.csv"
PER_QUERY = "per_query.csv.gz"  # per-query nDCG@10 of every row, beside latest.csv (gzip: 5 MB of text)
RECORD = "record.json"
COLUMNS = ["protocol", "task", "split", "method", "metric", "value"]
STATISTICS = ("retention", "delta_vs_", "p_vs_")  # metric prefixes computed over the whole table, again at each merge


def per_query_csv(per_query: dict[tuple[str, str, str], pd.Series]) -> bytes:
    """`per_query` as long-form CSV (task, split, method, query_id, ndcg_at_10), at full precision so a paired test
    read back from it is the one the run made."""
    frames = [pd.DataFrame({"task": task, "split": split, "method": row, "query_id": scores.index.astype(str),
                            "ndcg_at_10": scores.to_numpy(dtype=float)}) for (task, split, row), scores in per_query.items()]
    columns = ["task", "split", "method", "query_id", "ndcg_at_10"]
    text = pd.concat(frames).to_csv(index=False) if frames else ",".join(columns) + "\n"
    return gzip.compress(text.encode(), mtime=0)  # mtime 0: the same scores give the same bytes


def read_per_query(path: Path) -> dict[tuple[str, str, str], pd.Series]:
    """A `per_query_csv` file back as (task, split, row) -> nDCG@10 per query, indexed by query id.

    Raises:
        UsageError: If the file is not such a CSV.
    """
    try:
        frame = pd.read_csv(path, dtype={"task": str, "split": str, "method": str, "query_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as e:
        raise UsageError(f"{path} is not a per-query CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = {"task", "split", "method", "query_id", "ndcg_at_10"} - set(frame.columns)
    if missing:
        raise UsageError(f"{path} has no column {', '.join(sorted(missing))}; is it the evaluation's {PER_QUERY}?")
    return {key: group.set_index("query_id").ndcg_at_10.rename(None)
            for key, group in frame.groupby(["task", "split", "method"], sort=False)}


def read_latest(path: Path) -> pd.DataFrame:
    """A latest.csv, refusing one that is not the evaluation's."""
    try:
        rows = pd.read_csv(path, dtype={"task": str, "split": str, "method": str, "metric": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a results CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if missing := {"task", "split", "method", "metric", "value"} - set(rows.columns):
        raise UsageError(f"{path} has no {', '.join(sorted(missing))}; is it the evaluation's latest.csv?")
    return rows


@dataclass
class Table:
    """What a results folder holds, or a run adds: `rows` long form (statistics left out: they are recomputed),
    `per_query` (task, split, row) -> nDCG@10 per query, `record` the run record."""

    rows: pd.DataFrame
    per_query: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def record_json(record: dict) -> str:
    """The run record as JSON text, one key per line at the top levels (a diff shows which rows a run changed)."""
    return json.dumps(record, indent=1) + "\n"


def without_statistics(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[~rows.metric.str.startswith(STATISTICS)]


def read_table(folder: Path) -> Table | None:
    """The folder's table, or None when it has no latest.csv yet."""
    folder = Path(folder)
    if not (folder / LATEST).is_file():
        return None
    rows = without_statistics(read_latest(folder / LATEST))
    per_query = read_per_query(folder / PER_QUERY) if (folder / PER_QUERY).is_file() else {}
    try:
        record = json.loads((folder / RECORD).read_text()) if (folder / RECORD).is_file() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{folder / RECORD} is not a run record ({e})") from None
    return Table(rows, per_query, record)


def check_same_setting(old: dict, new: dict, folder: Path) -> None:
    """Refuse to merge a run into a table of another model, dimension or protocol, or scored on other data for a task
    both hold: its rows could not be compared."""
    for key in ("model", "dimension", "protocol"):
        if key in old and old[key] != new[key]:
            raise UsageError(f"{folder / LATEST} holds {key} {old[key]!r}, this run {new[key]!r}; give --output for a "
                             "table of its own")
    for task, data in new["tasks"].items():
        held = old.get("tasks", {}).get(task)
        if held is not None and held["fingerprint"] != data["fingerprint"]:
            raise UsageError(f"{folder / LATEST} scored {task} on other data ({held['documents']:,} documents, "
                             f"{held['queries']:,} queries; this run {data['documents']:,}, {data['queries']:,}); give "
                             "--output for a table of its own")


def row_order(rows: list[str], dim: int) -> list[str]:
    """Rows in the registry's order (each method's own mode first, then its other modes, then its depth rows), rows the
    registry no longer has at the end in their order: a table's order does not depend on which runs made it."""
    known = [row for name in methods.METHODS if methods.applies(name, dim) is None for row in methods.table_rows(name, dim)]
    place = {row: i for i, row in enumerate(known)}
    return sorted(dict.fromkeys(rows), key=lambda row: (place.get(row.split("@")[0], len(place)), row.count("@"),
                                                         int(row.split("@")[1]) if "@" in row else 0))


def merge(old: Table | None, new: Table, folder: Path) -> Table:
    """The folder's table with the run's rows in place of their old selves (every task of a re-run row is replaced);
    the other rows stay as they were. Raises UsageError when the two cannot be merged (check_same_setting)."""
    if old is None:
        return new
    check_same_setting(old.record, new.record, folder)
    ran = set(new.rows.method)
    kept = old.rows[~old.rows.method.isin(ran)]
    rows = pd.concat([kept, new.rows], ignore_index=True)
    order = {row: i for i, row in enumerate(row_order(list(rows.method), new.record["dimension"]))}
    rows = rows.iloc[sorted(range(len(rows)), key=lambda i: order[rows.method.iloc[i]])].reset_index(drop=True)
    per_query = {k: v for k, v in old.per_query.items() if k[2] not in ran} | new.per_query
    per_query = {k: per_query[k] for k in sorted(per_query, key=lambda k: order[k[2]])}
    record = {**old.record, **{k: new.record[k] for k in ("model", "dimension", "protocol")},
              "tasks": old.record.get("tasks", {}) | new.record["tasks"],
              "runs": old.record.get("runs", {}) | new.record["runs"],
              "rows": {k: v for k, v in old.record.get("rows", {}).items() if k not in ran} | new.record["rows"]}
    record["rows"] = {row: record["rows"][row] for row in order if row in record["rows"]}
    return Table(rows, per_query, record)


def stale_rows(record: dict) -> dict[str, str]:
    """Rows scored with a checkpoint whose arrays have changed (or which is gone) since: row -> why."""
    stale, current = {}, {}
    for row, entry in record.get("rows", {}).items():
        for path, fingerprint in entry.get("checkpoints", {}).items():
            if path not in current:
                current[path] = checkpoint_fingerprint(Path(path))
            if current[path] != fingerprint:
                stale[row] = f"{path} {'is gone' if current[path] is None else 'changed'} since run {entry['run']}"
                break
    return stale


def expected_rows(dim: int, protocol: str) -> list[str]:
    """Every row a full evaluation writes for a model of dimension `dim` under `protocol`, in the registry's order."""
    return [row for name, e in methods.METHODS.items() if protocol in e.protocols and methods.applies(name, dim) is None
            for row in methods.table_rows(name, dim)]


def status(folder: Path, checkpoints_dir: Path) -> dict:
    """A results folder against the registry: its model, dimension and protocol, and lists of rows not run, rows
    scored with a checkpoint that changed since (stale), rows without a record, rows the registry no longer has, and
    fitted or trained methods without a checkpoint in `checkpoints_dir`."""
    table = read_table(folder)
    if table is None:
        raise UsageError(f"{folder} has no {LATEST}")
    record, ran = table.record, list(dict.fromkeys(table.rows.method))
    protocol = record.get("protocol") or (folder.name if folder.name in PROTOCOLS else "transfer")
    float_bytes = table.rows[(table.rows.method == "float") & (table.rows.metric == "bytes_per_vector")].value
    dim = record.get("dimension") or (int(float_bytes.iloc[0]) // 4 if len(float_bytes) else None)
    if dim is None:
        raise UsageError(f"{folder}: neither {RECORD} nor a float row says the model's dimension")
    model = record.get("model")
    expected = expected_rows(dim, protocol)
    fitted = [name for name, e in methods.METHODS.items() if e.fitted_on != "nothing" and protocol in e.protocols
              and methods.applies(name, dim) is None]
    no_checkpoint = [] if model is None else [
        name for name in fitted if not checkpoint_path(checkpoints_dir, model, name, protocol).is_file()]
    stale = stale_rows(record)
    return dict(folder=str(folder), model=model, dimension=dim, protocol=protocol,
                missing=[row for row in expected if row not in ran],
                stale=[f"{row}: {why}" for row, why in stale.items()],
                unrecorded=[row for row in ran if row not in record.get("rows", {})],
                unknown=[row for row in ran if row not in expected],
                no_checkpoint=no_checkpoint)
