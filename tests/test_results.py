"""A model's table across runs (results.py), on tables written here by hand: a run replaces only its own rows, a run on
other data or another model is refused, a row whose checkpoint changed since it was scored is stale, and the status
names what a table lacks against the registry. No model, no mteb: the files alone."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import checkpoints
import methods
import results
from conftest import ROOT
from data import UsageError

SETTING = dict(model="org/model", dimension=384, protocol="transfer",
               tasks={"T test": dict(fingerprint="data-1", documents=5, queries=2)})


def table(run: str, scores: dict[str, float], setting: dict = SETTING, sums: dict | None = None) -> results.Table:
    """A run's table: each row's nDCG@10 (on both queries) and bytes on task T, its per-query scores, its record."""
    records = [(setting["protocol"], "T", "test", row, metric, value) for row, score in scores.items()
               for metric, value in (("ndcg_at_10", score), ("bytes_per_vector", 48.0))]
    per_query = {("T", "test", row): pd.Series({"q1": score, "q2": score}) for row, score in scores.items()}
    rows = {row: dict(run=run, checkpoints=(sums or {}).get(row, {})) for row in scores}
    return results.Table(pd.DataFrame(records, columns=results.COLUMNS), per_query, setting | dict(runs={run: {}}, rows=rows))


def checkpoint_file(values: list[float], note: str = "") -> bytes:
    """A checkpoint file holding one array."""
    return checkpoints.checkpoint_bytes({"x": np.array(values, np.float32)}, {"note": note})


def ndcg(t: results.Table) -> dict[str, float]:
    return t.rows[t.rows.metric == "ndcg_at_10"].set_index("method").value.to_dict()


def test_a_run_replaces_its_own_rows_and_keeps_every_other_in_the_registrys_order(tmp_path):
    old = table("r1", {"pq1b": 0.5, "float": 0.9, "stage1_zero": 0.4})
    merged = results.merge(old, table("r2", {"stage1_zero": 0.45, "lsh": 0.41}), tmp_path)
    assert ndcg(merged) == {"float": 0.9, "pq1b": 0.5, "stage1_zero": 0.45, "lsh": 0.41}
    assert list(dict.fromkeys(merged.rows.method)) == ["float", "pq1b", "stage1_zero", "lsh"]  # METHODS' order
    assert list(dict.fromkeys(merged.rows.method)) == [m for m in methods.METHODS if m in ndcg(merged)]
    assert merged.per_query["T", "test", "stage1_zero"]["q1"] == 0.45 and merged.per_query["T", "test", "pq1b"]["q1"] == 0.5
    assert {row: e["run"] for row, e in merged.record["rows"].items()} == {"float": "r1", "pq1b": "r1", "stage1_zero": "r2", "lsh": "r2"}
    assert list(merged.record["runs"]) == ["r1", "r2"]
    fresh = results.merge(None, table("r3", {"float": 0.9, "pq1b": 0.5, "stage1_zero": 0.45, "lsh": 0.41}), tmp_path)
    pd.testing.assert_frame_equal(merged.rows, fresh.rows)  # the same rows in the same order as one run of them all


@pytest.mark.parametrize("change, says", [
    (dict(tasks={"T test": dict(fingerprint="data-2", documents=4, queries=2)}), "scored T test on other data (5 documents"),
    (dict(dimension=768), "holds dimension 384, this run 768"),
    (dict(model="org/other"), "holds model 'org/model'"),
    (dict(protocol="in-domain"), "holds protocol 'transfer'"),
])
def test_a_run_on_other_data_or_of_another_model_is_refused(tmp_path, change, says):
    old = table("r1", {"float": 0.9})
    with pytest.raises(UsageError, match=f"{results.LATEST} {says}".replace("(", r"\(")):
        results.merge(old, table("r2", {"pq1b": 0.5}, SETTING | change), tmp_path)
    other_task = SETTING | dict(tasks={"U test": dict(fingerprint="data-3", documents=9, queries=3)})
    assert "pq1b" in ndcg(results.merge(old, table("r2", {"pq1b": 0.5}, other_task), tmp_path))  # another task: fine


def test_a_row_is_stale_once_its_checkpoint_changes_or_goes(tmp_path):
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("pq1b", "int8")}
    for path in paths.values():
        path.write_bytes(checkpoint_file([1.0, 2.0]))
    sums = {row: {str(paths[name]): checkpoints.checkpoint_fingerprint(paths[name])} for row, name in
            (("pq1b", "pq1b"), ("int8", "int8"), ("stage1_zero+rerank_int8", "int8"))}
    record = table("r1", {"pq1b": 0.5, "int8": 0.8, "stage1_zero+rerank_int8": 0.7, "float": 0.9}, sums=sums).record
    assert results.stale_rows(record) == {}
    paths["int8"].write_bytes(checkpoint_file([1.0, 2.5]))  # refitted
    paths["pq1b"].unlink()
    assert results.stale_rows(record) == {"pq1b": f"{paths['pq1b']} is gone since run r1",
                                          "int8": f"{paths['int8']} changed since run r1",
                                          "stage1_zero+rerank_int8": f"{paths['int8']} changed since run r1"}


def write_folder(folder, t: results.Table) -> None:
    folder.mkdir(parents=True)
    t.rows.to_csv(folder / results.LATEST, index=False)
    (folder / results.PER_QUERY).write_bytes(results.per_query_csv(t.per_query))
    (folder / results.RECORD).write_text(results.record_json(t.record))


def complete_table(tmp_path) -> tuple:
    """A results folder holding every row the registry has for a 384-d model, each with a checkpoint file where its
    method (or its re-ranker) is fitted or trained, as the evaluation records them."""
    folder_of_checkpoints, sums = tmp_path / "checkpoints", {}
    for name, e in methods.METHODS.items():
        if e.fitted_on != "nothing" and "transfer" in e.protocols:
            path = folder_of_checkpoints / "org__model" / f"{name}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(checkpoint_file([float(len(name))]))
            sums[name] = {str(path): checkpoints.checkpoint_fingerprint(path)}
    rows = {row: (name, mode) for name in methods.METHODS for row, (mode, _) in methods.table_rows(name, 384).items()
            if "transfer" in methods.entry(name).protocols}
    checkpoint_of = {row: sums.get(name, {}) | sums.get(methods.MODES[mode].reranker, {}) for row, (name, mode) in rows.items()}
    folder = tmp_path / "results" / "org__model"
    write_folder(folder, table("r1", {row: 0.5 for row in rows}, sums=checkpoint_of))
    return folder, folder_of_checkpoints, sums


def status_command(tmp_path):
    return subprocess.run([sys.executable, str(ROOT / "report.py"), "--status", str(tmp_path / "results"),
                           str(tmp_path / "checkpoints")], capture_output=True, text=True, timeout=300)


def test_the_status_names_missing_stale_and_unrecorded_rows_and_missing_checkpoints(tmp_path):
    folder, checkpoint_dir, sums = complete_table(tmp_path)
    status = results.status(folder, checkpoint_dir)
    assert all(status[k] == [] for k in ("missing", "stale", "unrecorded", "no_checkpoint", "unknown")), status
    done = status_command(tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"{folder} (d = 384, transfer): complete", done.stdout
    t = results.read_table(folder)
    recorded = folder.joinpath(results.RECORD).read_text()
    del t.record["rows"]["float16"]  # scored before run records: said, not a gap
    folder.joinpath(results.RECORD).write_text(results.record_json(t.record))
    done = status_command(tmp_path)
    assert done.returncode == 0 and "1 scored before run records" in done.stdout and "float16" in done.stdout, done.stdout
    folder.joinpath(results.RECORD).write_text(recorded)

    (checkpoint_dir / "org__model" / "pq1b.safetensors").write_bytes(checkpoint_file([0.0]))  # refitted
    (checkpoint_dir / "org__model" / "lloyd2b.safetensors").write_bytes(checkpoint_file([float(len("lloyd2b"))], "new metadata only"))  # the same arrays
    (checkpoint_dir / "org__model" / "pq1.67b.safetensors").unlink()
    t = results.read_table(folder)
    t.rows = t.rows[~t.rows.method.isin(["lsh+asym", "int4"])]
    del t.record["rows"]["float16"]
    folder.joinpath(results.LATEST).write_text(t.rows.to_csv(index=False))
    folder.joinpath(results.RECORD).write_text(results.record_json(t.record))
    status = results.status(folder, checkpoint_dir)
    assert status["missing"] == ["int4", "lsh+asym"] and status["unrecorded"] == ["float16"]
    assert status["no_checkpoint"] == ["pq1.67b"]
    assert [line.split(":")[0] for line in status["stale"]] == [*methods.table_rows("pq1b", 384), *methods.table_rows("pq1.67b", 384)]
    done = status_command(tmp_path)
    assert done.returncode == 1 and "2 missing: int4, lsh+asym" in done.stdout and "1 no checkpoint: pq1.67b" in done.stdout


def test_the_evaluations_record_is_what_the_status_reads(tmp_path):
    """The record is JSON with one key per line at the top levels, and a table read back is the table written."""
    t = table("r1", {"float": 0.9, "pq1b": 0.5})
    write_folder(tmp_path / "f", t)
    back = results.read_table(tmp_path / "f")
    pd.testing.assert_frame_equal(back.rows, t.rows)
    assert back.record == json.loads(results.record_json(t.record)) and back.per_query.keys() == t.per_query.keys()
