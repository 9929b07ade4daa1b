"""The evaluation command end to end: every registry method through mteb on a slice of the real SciFact (conftest
`evaluated`), its numbers against mteb's own JSON and against the ranking training validates with, the in-domain
protocol, and every kind of bad input and bad checkpoint refused with one line and nothing written."""

import datetime
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

import checkpoints
import encoders
import evaluate_quantization_mteb as ev
import methods
import mteb_adapter
import report
import results
from conftest import ROOT, evaluate, interrupt
from encoders import DEFAULT_MODEL, model_slug

pytestmark = pytest.mark.usefixtures("faiss_one_thread")
DIM = 384
BINARY = [n for n, e in methods.METHODS.items() if methods.family_of(n, DIM) == "binary"]


def metric(rows: pd.DataFrame, name: str) -> pd.Series:
    return rows[rows.metric == name].set_index("method").value


def mteb_scores(output) -> dict[str, float]:
    """Each row's nDCG@10 as mteb wrote it: <output>/mteb/results/<model>/<row>/SciFact.json."""
    return {path.parent.name: json.loads(path.read_text())["scores"]["test"][0]["ndcg_at_10"]
            for path in (output / "mteb").rglob("SciFact.json")}


def expected_rows(protocol: str = "transfer") -> list[str]:
    """The table's rows from the registry: each method's modes, and each +rerank_int8 row again at every other depth."""
    rows = []
    for name, e in methods.METHODS.items():
        if protocol in e.protocols:
            for row, mode in methods.rows_of(name, DIM).items():
                rows.append(row)
                if mode == "rerank_int8":
                    rows += [f"{row}@{k}" for k in methods.RERANK_DEPTHS if k != methods.RERANK_K]
    return rows


def test_every_registry_method_runs_end_to_end_and_each_row_stores_what_it_says(evaluated):
    rows = evaluated.rows
    assert sorted(rows.method.unique()) == sorted(expected_rows())
    assert list(rows.columns) == ["protocol", "task", "split", "method", "metric", "value"]
    assert set(rows.protocol) == {"transfer"} and set(rows.task) == {"SciFact"} and set(rows.split) == {"test"}
    for name in methods.METHODS:
        for row, mode in (methods.rows_of(name, DIM).items() if name != "float_adapted" else []):
            assert metric(rows, "bytes_per_vector")[row] == methods.row_bytes(name, DIM, mode), row
    ndcg = metric(rows, "ndcg_at_10")
    assert 0.75 < ndcg["float"] < 0.95  # 470 documents: easier than all 5,183 (0.645 there)
    # residual codes fitted on 1,070 texts: 48 codebooks of 256 centroids memorise them (0.58 here, 91% fitted on 22k)
    rq = {row for n in methods.METHODS if methods.family_of(n, DIM) == "additive" for row in methods.rows_of(n, DIM)}
    for row in expected_rows():
        assert (0.6 if row in rq else 0.7) * ndcg["float"] < ndcg[row] < ndcg["float"] + 0.03, row
    for cast in ("float16", "bfloat16", "int8", "int8+asym"):
        assert abs(ndcg[cast] - ndcg["float"]) < 0.003, cast
    markdown = (evaluated.output / "latest.md").read_text()
    assert markdown.startswith("## ") and "(d = 384)" in markdown.splitlines()[0]
    assert "faiss PQ48np" in markdown and "### How deep to re-rank" in markdown  # rows named by what they are at d
    for picture in ("quality_vs_bytes.png", "rerank_depth.png"):
        assert (evaluated.output / picture).read_bytes().startswith(b"\x89PNG")


def test_retention_and_deltas_are_measured_against_mtebs_own_scores(evaluated):
    rows, scores = evaluated.rows, mteb_scores(evaluated.output)
    assert set(scores) == set(rows.method)
    np.testing.assert_allclose(metric(rows, "ndcg_at_10")[list(scores)], list(scores.values()), rtol=1e-5)
    retention, float_score = metric(rows, "retention"), scores["float"]
    for row, score in scores.items():
        assert retention[row] == pytest.approx(score / float_score, rel=1e-4), row
        # a mean of per-query differences is the difference of the means: the paired tests saw the same queries
        assert metric(rows, "delta_vs_float")[row] == pytest.approx(score - float_score, abs=2e-5), row
        assert metric(rows, "delta_vs_stage1_zero")[row] == pytest.approx(score - scores["stage1_zero"], abs=2e-5), row
        low, high = metric(rows, "delta_vs_float_ci_low")[row], metric(rows, "delta_vs_float_ci_high")[row]
        assert low <= metric(rows, "delta_vs_float")[row] <= high, row
    assert retention["stage1_zero"] < 0.95 and retention["pq0.5b"] < 0.93  # the slice separates the methods
    # 60 queries: sign bits are significantly worse than float, re-ranking 50 candidates with float is not
    p = metric(rows, "p_vs_float")
    assert p["stage1_zero"] < 0.01 and p["stage1_zero+rerank"] > 0.05


def test_asym_rows_beat_hamming_on_real_data(evaluated):
    ndcg = metric(evaluated.rows, "ndcg_at_10")
    gains = {name: ndcg[name + "+asym"] - ndcg[name] for name in BINARY}
    assert np.mean(list(gains.values())) > 0.02 and min(gains.values()) > -0.02, gains  # a reversed ranking: about -0.8


def ties_that_count(ranking: dict, qrels: dict) -> int:
    """Relevant documents in a query's top 10 that tie with their copy: the order pytrec_eval gives them sets nDCG@10."""
    return sum(d in ranking[q] and ranking[q][d] == ranking[q].get("copy-" + d)
               and ranking[q][d] >= sorted(ranking[q].values(), reverse=True)[9] for q in qrels for d in qrels[q])


def test_validation_in_training_and_the_evaluation_report_give_the_same_ndcg(evaluated, fitted, task_embeddings):
    """One ranker: every row's nDCG@10 in the CSV equals methods.rank + mteb_adapter.ndcg_at_10 (what the training
    command validates with) on the same data, here with exact ties (copied documents), and equals what the training
    command itself printed and stored."""
    task = {k: task_embeddings[k] for k in ("docs", "queries", "doc_ids", "query_ids")}
    qrels, ndcg = task_embeddings["qrels"], metric(evaluated.rows, "ndcg_at_10")
    int8 = checkpoints.load_method("int8", DIM, DEFAULT_MODEL, fitted.checkpoints, "transfer")[0]
    for name in [n for n, e in methods.METHODS.items() if "transfer" in e.protocols]:
        method = checkpoints.load_method(name, DIM, DEFAULT_MODEL, fitted.checkpoints, "transfer")[0]
        for row, mode in methods.rows_of(name, DIM).items():
            reranker = {"int8": int8, "float": methods.make_method("float", DIM)}.get(methods.MODES[mode].reranker)
            ranking = methods.rank(method, mode, **task, reranker=reranker)
            assert mteb_adapter.ndcg_at_10(ranking, qrels) == pytest.approx(ndcg[row], abs=1e-5), row
            if mode == "hamming" and methods.information_bits(name, DIM) <= 1:
                assert ties_that_count(ranking, qrels) >= 5, row
    printed = {line.split()[0]: float(line.split()[-1]) for line in fitted.stdout.splitlines()
               if " validation nDCG@10 " in line and not line.startswith(" ")}  # "float  validation nDCG@10 ... mean 0.8606"
    for name in ("float", "stage1_zero"):
        assert printed[name] == pytest.approx(ndcg[name], abs=5e-5), name
    for name in [n for n, e in methods.METHODS.items() if e.fitted_on == "training"]:
        path = checkpoints.checkpoint_path(fitted.checkpoints, DEFAULT_MODEL, name)
        meta = checkpoints.load_checkpoint(path, DEFAULT_MODEL, DIM, "transfer", name)[1]
        chosen = json.loads(meta["validation_ndcg_at_10"])[meta["initialisation"]]
        assert chosen["SciFact"] == pytest.approx(ndcg[name], abs=1e-5), name


def test_in_domain_evaluation_reads_in_domain_checkpoints_and_measures_against_float_adapted(fitted_in_domain, fitted,
                                                                                             embedding_cache, tmp_path):
    common = ["--tasks", "SciFact", "--data-dir", fitted_in_domain.data_dir, "--cache-dir", embedding_cache, "--protocol", "in-domain"]
    evaluate(*common, "--methods", "float", "stage1_trained", "--checkpoints", fitted_in_domain.checkpoints,
                      "--output", tmp_path / "results")
    rows, scores = pd.read_csv(tmp_path / "results" / "latest.csv"), mteb_scores(tmp_path / "results")
    assert list(rows.method.unique()) == ["float", "float_adapted", "stage1_trained", "stage1_trained+asym", "stage1_trained+rerank",
                                          "stage1_trained+rerank_int8"] + [f"stage1_trained+rerank_int8@{k}" for k in (10, 20, 100, 200)]
    title = (tmp_path / "results" / "latest.md").read_text().splitlines()[0]
    assert set(rows.protocol) == {"in-domain"} and "protocol in-domain" in title and "on in-domain/, pairs/" in title
    # thresholds leave every float cosine as it is: the adapted float model is the float model, and the reference
    assert scores["float_adapted"] == scores["float"]
    for row, score in scores.items():
        assert metric(rows, "retention")[row] == pytest.approx(score / scores["float_adapted"], rel=1e-4)
    assert "delta_vs_float_adapted" in set(rows.metric) and "delta_vs_float" not in set(rows.metric)
    # the other protocol's checkpoints are not used by mistake
    with pytest.raises(SystemExit, match=r"no checkpoint at .*/in-domain/stage1_trained.safetensors"):
        evaluate(*common, "--methods", "stage1_trained", "--checkpoints", fitted.checkpoints, "--output", tmp_path / "other")
    moved = tmp_path / "moved"
    target = checkpoints.checkpoint_path(moved, DEFAULT_MODEL, "stage1_trained")
    target.parent.mkdir(parents=True)
    shutil.copy(checkpoints.checkpoint_path(fitted_in_domain.checkpoints, DEFAULT_MODEL, "stage1_trained", "in-domain"), target)
    with pytest.raises(SystemExit, match="made for protocol 'in-domain', not 'transfer'"):
        evaluate(*common[:-2], "--methods", "stage1_trained", "--modes", "--checkpoints", moved, "--output", tmp_path / "other")
    assert not (tmp_path / "other" / "latest.csv").exists()


def test_a_rerun_encodes_nothing_and_the_report_names_only_the_references_it_has(tmp_path, tiny_beir, monkeypatch):
    args = ["--tasks", "SciFact", "--data-dir", tiny_beir, "--cache-dir", tmp_path / "cache", "--output", tmp_path / "results"]
    evaluate(*args, "--methods", "stage1_zero", "--modes", "asym")
    markdown = (tmp_path / "results" / "latest.md").read_text()
    assert "† differs from stage1_zero" in markdown and "differs from float" not in markdown and "retention" not in markdown
    cache_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}

    def no_model(*args, **kwargs):
        raise AssertionError("a run whose texts are all cached loaded the model")
    monkeypatch.setattr(encoders, "load_base_model", no_model)
    evaluate(*args, "--methods", "float")
    assert cache_files and cache_files == {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert metric(pd.read_csv(tmp_path / "results" / "latest.csv"), "ndcg_at_10")["float"] > 0.9


@pytest.mark.parametrize("args, message", [
    (["--tasks", "SciFactt"], "SciFact"),  # mteb suggests the close name
    (["--tasks", "Banking77Classification"], "only Retrieval tasks"),
    (["--tasks", " "], "no task names"),
    (["--tasks"], "expected at least one argument"),
    (["--tasks", "SciFact", "--data-dir", "/nonexistent"], "data folder not found"),
    (["--tasks", "NFCorpus", "--data-dir", "{data}"], "no folder for NFCorpus"),
    (["--tasks", "SciFact", "--rerank-k", "5"], "--rerank-k and --rerank-depths must be at least 10"),
    (["--tasks", "SciFact", "--rerank-depths", "5", "50"], "must be at least 10 (nDCG@10 needs ten documents), got 5"),
    (["--tasks", "SciFact", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--tasks", "SciFact", "--methods", "stage1"], "invalid choice: 'stage1'"),
    (["--tasks", "SciFact", "--modes", "hamming", "qb9"], "invalid choice: 'qb9'"),
])
def test_bad_input_before_any_work(tmp_path, tiny_beir, args, message):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "results"),
                 *[a.replace("{data}", str(tiny_beir)) for a in args]])
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and message in error and "\n" not in error.strip()
    assert not (tmp_path / "results" / "latest.csv").exists()


def edit_faiss(key, edit):
    """A change to a checkpoint's serialised faiss index or transform: `edit` receives it read back by faiss."""
    import faiss

    def change(tensors, meta, source):
        if key == "faiss_index":
            index = faiss.deserialize_index(tensors[key])
            edit(index)
            tensors[key] = faiss.serialize_index(index)
        else:
            reader = faiss.VectorIOReader()
            faiss.copy_array_to_vector(tensors[key], reader.data)
            transform = faiss.read_VectorTransform(reader)
            edit(transform)
            writer = faiss.VectorIOWriter()
            faiss.write_VectorTransform(transform, writer)
            tensors[key] = faiss.vector_to_array(writer.data)
    return change


def nan_at(vector, i):
    import faiss

    values = faiss.vector_to_array(vector)
    values[i] = np.nan
    faiss.copy_array_to_vector(values, vector)


def set_tensor(key, value):
    return lambda tensors, meta, source: tensors.__setitem__(key, value(tensors[key].copy(), source))


def set_meta(key, value):
    return lambda tensors, meta, source: meta.__setitem__(key, value)


def with_value(value, where):
    def change(t, _):
        t[where] = value
        return t
    return change


BAD_CHECKPOINTS = {  # what is wrong: (method, change to its arrays and metadata, words the one error line must hold)
    "NaN threshold": ("stage1_trained", set_tensor("thresholds", with_value(np.nan, 5)),
                      ["stage1_trained.safetensors", "'thresholds' holds 1 non-finite values"]),
    "Inf thresholds": ("stage2_trained", set_tensor("thresholds", with_value(np.inf, slice(0, 3))),
                       ["stage2_trained.safetensors: thresholds holds 3 non-finite values"]),
    "NaN rotation": ("stage1_rotated", set_tensor("rotation", with_value(np.nan, 0)),
                     ["stage1_rotated.safetensors", "'rotation' holds 384 non-finite values"]),
    "all-zero rotation": ("stage1_rotated", set_tensor("rotation", lambda t, _: np.zeros_like(t)),
                          ["stage1_rotated.safetensors: the rotation is not orthogonal (|R R^T - I| reaches 1)"]),
    "768 thresholds, metadata 384": ("stage1_trained", set_tensor("thresholds", lambda t, _: np.zeros((768, 1), np.float32)),
                                     ["stage1_trained.safetensors: thresholds has shape (768, 1), not (384, 1)"]),
    "no recon": ("learned2b", lambda tensors, meta, source: tensors.pop("recon"), ["learned2b.safetensors lacks recon"]),
    "truncated faiss index": ("pq1b", set_tensor("faiss_index", lambda t, _: t[:5000]),
                              ["pq1b.safetensors does not hold a faiss index"]),
    "garbage faiss index": ("rabitq", set_tensor("faiss_index", lambda t, _: np.arange(4000).astype(np.uint8)),
                            ["rabitq.safetensors does not hold a faiss index"]),
    "NaN PQ centroid": ("pq0.5b", edit_faiss("faiss_index", lambda index: nan_at(index.pq.centroids, 12345)),  # no probe's code
                        ["pq0.5b.safetensors: the faiss index decodes to non-finite values"]),
    "NaN scalar range": ("int8", edit_faiss("faiss_index", lambda index: nan_at(index.sq.trained, 3)),
                         ["int8.safetensors: the faiss index decodes to non-finite values"]),
    "another index's size": ("pq1b", set_tensor("faiss_index", lambda t, source: load_file(str(checkpoints.checkpoint_path(
        source, DEFAULT_MODEL, "pq0.5b")))["faiss_index"]), ["pq1b.safetensors holds a faiss index", "24 bytes, not a trained PQ48np"]),
    "truncated transform": ("pca_quarter", set_tensor("faiss_transform", lambda t, _: t[:999]),
                            ["pca_quarter.safetensors does not hold a faiss transform"]),
    "NaN in a transform": ("pca_sign0.75b", edit_faiss("faiss_transform", lambda transform: nan_at(transform.A, 7)),
                           ["pca_sign0.75b.safetensors: the transform gives non-finite values"]),
    "another model": ("stage1_trained", set_meta("base_model", "someone/else"), ["made for base_model 'someone/else'"]),
    "another protocol": ("int8", set_meta("protocol", "in-domain"), ["made for protocol 'in-domain', not 'transfer'"]),
    "another method": ("int4", set_meta("method", "int8"), ["int4.safetensors was made for method 'int8', not 'int4'"]),
    "another dimension": ("lloyd2b", set_meta("dimension", "768"), ["made for dimension '768', not '384'"]),
}


@pytest.mark.parametrize("problem", BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_refused_with_one_line_and_nothing_written(problem, fitted, tiny_beir, tmp_path):
    name, change, words = BAD_CHECKPOINTS[problem]
    source = checkpoints.checkpoint_path(fitted.checkpoints, DEFAULT_MODEL, name)
    tensors, meta = checkpoints.load_checkpoint(source, DEFAULT_MODEL, DIM, "transfer", name)
    change(tensors, meta, fitted.checkpoints)
    target = checkpoints.checkpoint_path(tmp_path / "checkpoints", DEFAULT_MODEL, name)
    target.parent.mkdir(parents=True)
    target.write_bytes(checkpoints.checkpoint_bytes(tensors, meta))  # hashes of what it holds: it checks out, and is wrong
    output = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        evaluate("--tasks", "SciFact", "--data-dir", tiny_beir, "--methods", name, "--modes", "--checkpoints",
                 tmp_path / "checkpoints", "--cache-dir", tmp_path / "cache", "--output", output)
    error = exit_info.value.code
    assert isinstance(error, str) and error.startswith("error: ") and "\n" not in error  # sys.exit(str): status 1
    assert all(word in error for word in words), error
    assert not any(p.is_file() for p in output.rglob("*"))


def test_missing_and_pickled_checkpoints_are_refused_with_one_line(fitted, tiny_beir, tmp_path):
    def refused(name, checkpoints):
        with pytest.raises(SystemExit) as exit_info:
            evaluate("--tasks", "SciFact", "--data-dir", tiny_beir, "--methods", name, "--modes", "--checkpoints", checkpoints,
                     "--cache-dir", tmp_path / "cache", "--output", tmp_path / "results")
        assert not any(p.is_file() for p in (tmp_path / "results").rglob("*"))
        return exit_info.value.code

    assert refused("stage1_trained", tmp_path / "empty") == (
        f"error: no row can run: stage1_trained: not trained yet (no checkpoint at {tmp_path / 'empty' / model_slug(DEFAULT_MODEL)}"
        f"/stage1_trained.safetensors): python quantization_modules.py --model {DEFAULT_MODEL} --methods stage1_trained")
    pickled = checkpoints.checkpoint_path(tmp_path / "pickled", DEFAULT_MODEL, "stage2_trained")
    pickled.parent.mkdir(parents=True)
    import pickle

    pickled.write_bytes(pickle.dumps({"thresholds": np.zeros(384)}))
    assert "pickled checkpoints are refused" in refused("stage2_trained", tmp_path / "pickled")


def test_a_method_fitted_on_texts_without_a_checkpoint_is_fitted_as_the_training_command_fits_it(fitted, train_data,
                                                                                                  embedding_cache, tmp_path):
    """No checkpoint for pq1b and int8: the evaluation fits them on the fitting texts (the same texts, fit and
    checkpoint arrays as the training command's), writes their checkpoints where the training command would, scores
    their rows, and a rerun loads them rather than fitting again. A learned method, or a slow fit, without one is one
    line naming the command that makes it."""
    common = ["--tasks", "SciFact", "--data-dir", fitted.data_dir, "--cache-dir", embedding_cache, "--train-data", train_data,
              "--checkpoints", tmp_path / "checkpoints", "--methods", "pq1b", "int8", "stage1_trained", "rq1b", "--modes"]
    stdout = evaluate(*common, "--output", tmp_path / "results")
    assert f"stage1_trained: skipped, not trained yet (no checkpoint at {tmp_path / 'checkpoints'}" in stdout
    slow = checkpoints.checkpoint_path(tmp_path / "checkpoints", DEFAULT_MODEL, "rq1b")
    assert (f"rq1b: skipped, not fitted yet, a fit of CPU minutes (no checkpoint at {slow}): python quantization_modules.py "
            f"--model {DEFAULT_MODEL} --methods rq1b") in stdout.splitlines() and not slow.exists()
    for name in ("pq1b", "int8"):
        path = checkpoints.checkpoint_path(tmp_path / "checkpoints", DEFAULT_MODEL, name)
        assert re.search(rf"^{name}: fitted on [0-9,]+ texts in [0-9.]+s, wrote {re.escape(str(path))}$", stdout, re.M)
        ours = checkpoints.load_checkpoint(path, DEFAULT_MODEL, DIM, "transfer", name)
        training = checkpoints.load_checkpoint(checkpoints.checkpoint_path(fitted.checkpoints, DEFAULT_MODEL, name),
                                               DEFAULT_MODEL, DIM, "transfer", name)
        assert ours[0].keys() == training[0].keys() and all(np.array_equal(ours[0][k], training[0][k]) for k in ours[0])
        assert ours[1]["training_sources"] == training[1]["training_sources"] and ours[1]["fitted_by"] == "evaluate_quantization_mteb.py"
    assert set(pd.read_csv(tmp_path / "results" / "latest.csv").method) == {"pq1b", "int8"}
    run = next(iter(json.loads((tmp_path / "results" / "record.json").read_text())["runs"].values()))
    assert {"encoding the tasks", "fitting texts", "fit pq1b", "fit int8"} <= set(run)  # what the first table cost
    assert all(run[k]["cpu_seconds"] > 0 for k in ("fitting texts", "fit pq1b"))
    again = evaluate(*common, "--output", tmp_path / "again")
    assert "fitted on" not in again and "pq1b" in set(pd.read_csv(tmp_path / "again" / "latest.csv").method)


def test_bad_data_is_refused_with_one_line(fitted, tiny_beir, tmp_path):
    def refused(message, *extra):
        with pytest.raises(SystemExit) as exit_info:
            evaluate("--tasks", "SciFact", "--data-dir", tiny_beir, "--methods", "stage1_zero", "--cache-dir", tmp_path / "cache",
                     "--output", tmp_path / "results", *extra)
        assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
        assert not (tmp_path / "results" / "latest.csv").exists()

    (tmp_path / "a_file").write_text("")
    refused("output folder", "--output", tmp_path / "a_file" / "results")
    refused("embedding cache folder", "--cache-dir", tmp_path / "a_file" / "cache")
    with open(tiny_beir / "scifact" / "qrels" / "test.tsv", "a") as f:
        f.write("q1\td1\n")
    refused("malformed qrels line")
    (tiny_beir / "scifact" / "qrels" / "test.tsv").unlink()
    refused("missing qrels file")


@pytest.mark.slow
def test_command_line_error_is_one_line_without_traceback():
    result = subprocess.run([sys.executable, "evaluate_quantization_mteb.py", "--tasks", "NFCorpuss"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "NFCorpus" in result.stderr


@pytest.mark.slow
def test_hub_failure_is_one_line_pointing_to_data_dir(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # no download, even online
    result = subprocess.run([sys.executable, "evaluate_quantization_mteb.py", "--tasks", "SciFact", "--methods", "float",
                             "--output", str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot load SciFact") and "--data-dir" in result.stderr
    assert not (tmp_path / "results").exists()


def files_under(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_ctrl_c_prints_one_line_exits_130_and_leaves_no_output_or_temporary_file(tmp_path, tiny_beir):
    """A real SIGINT while mteb evaluates the first row (its progress bar has just appeared)."""
    (tmp_path / "tmp").mkdir()
    code, stderr = interrupt("evaluate_quantization_mteb.py", [
        "--tasks", "SciFact", "--data-dir", tiny_beir, "--methods", "float", "float16", "bfloat16", "stage1_zero", "lsh",
        "--cache-dir", tmp_path / "cache", "--output", tmp_path / "results"], b"rows:", "stderr", {"TMPDIR": str(tmp_path / "tmp")})
    assert (code, stderr) == (130, ["interrupted; a rerun resumes from the cache"])  # one line: no traceback
    assert not (tmp_path / "results").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]
    assert not list((tmp_path / "tmp").glob("mteb-results-*"))  # the folder mteb's JSON goes to first: removed too


@pytest.mark.parametrize("failing, whole", [("20300102-030405.csv", []),
                                            ("latest.csv", ["20300102-030405.csv", "20300102-030405.md"])])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_or_half_written_file(failing, whole, tmp_path, tiny_beir,
                                                                              monkeypatch):
    """The disk fills while a result file is written (half of it reaches the disk, then ENOSPC): one error line naming
    the file, no temporary file, and the output folder holds only files written whole before it: none when the first
    file fails, the timestamped pair when latest.csv fails."""
    output, real_fsync, intended = tmp_path / "results", os.fsync, {}
    monkeypatch.setattr(ev, "datetime", SimpleNamespace(datetime=SimpleNamespace(
        now=lambda: datetime.datetime(2030, 1, 2, 3, 4, 5))))

    def full_disk(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.parent == output:
            name = path.name[1:].split(".")  # write_atomic's temporary file: .<name>.<pid>.<thread>.tmp
            name = ".".join(name[:2])
            intended[name] = path.read_bytes()
            if name == failing:
                os.truncate(fd, len(intended[name]) // 2)  # half of it reached the disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        evaluate("--tasks", "SciFact", "--data-dir", tiny_beir, "--methods", "stage1_zero", "--modes",
                 "--cache-dir", tmp_path / "cache", "--output", output)
    assert exit_info.value.code == f"error: cannot write {output / failing} (No space left on device)"
    assert files_under(output) == {name: intended[name] for name in whole}
    assert output.exists() == bool(whole)  # a folder the failed write created is removed with it


def test_two_runs_in_the_same_second_write_two_timestamped_files(tmp_path, tiny_beir, monkeypatch):
    monkeypatch.setattr(ev, "datetime", SimpleNamespace(datetime=SimpleNamespace(
        now=lambda: datetime.datetime(2030, 1, 2, 3, 4, 5))))  # every run starts its report in this second
    output = tmp_path / "results"
    common = ["--tasks", "SciFact", "--data-dir", tiny_beir, "--modes", "--rerank-depths", "--cache-dir", tmp_path / "cache",
              "--output", output]
    evaluate(*common, "--methods", "stage1_zero")
    first = files_under(output)
    evaluate(*common, "--methods", "float")
    second = files_under(output)
    assert {name: second[name] for name in ("20300102-030405.csv", "20300102-030405.md")} == {
        name: first[name] for name in ("20300102-030405.csv", "20300102-030405.md")}  # unchanged
    assert set(pd.read_csv(output / "20300102-030405.csv").method) == {"stage1_zero"}  # each run's own rows
    assert set(pd.read_csv(output / "20300102-030405-1.csv").method) == {"float"}
    assert set(pd.read_csv(output / "latest.csv").method) == {"stage1_zero", "float"}  # the table: both runs'
    assert list(json.loads((output / "record.json").read_text())["runs"]) == ["20300102-030405", "20300102-030405-1"]


def test_a_failure_after_the_writability_check_leaves_no_new_output_folder(tmp_path, tiny_beir):
    """The output folder is proved writable first, but created only when the results exist: no row that can run,
    found after that check (as the methods load), leaves no empty folder (nor its parent) behind."""
    with pytest.raises(SystemExit, match="error: no row can run: stage1_trained: not trained yet"):
        evaluate("--tasks", "SciFact", "--data-dir", tiny_beir, "--methods", "stage1_trained", "--checkpoints",
                 tmp_path / "empty", "--cache-dir", tmp_path / "cache", "--output", tmp_path / "new" / "results")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_every_row_ranks_the_tiny_set_without_shared_data(tmp_path, tiny_beir):
    """No ../shared needed: the tiny set written in conftest and the committed checkpoints. Each query has one relevant
    document among unrelated ones, so float finds every one first; a reversed ranking scores about 0.3."""
    evaluate("--tasks", "SciFact", "--data-dir", tiny_beir, "--checkpoints", ROOT / "checkpoints", "--rerank-depths",
             "--cache-dir", tmp_path / "cache", "--output", tmp_path / "results")
    ndcg = metric(pd.read_csv(tmp_path / "results" / "latest.csv"), "ndcg_at_10")
    assert ndcg["float"] == 1.0
    for row, value in ndcg.items():  # 8 documents, 6 queries: a rerank head of 50 holds every document
        assert value > 0.8, row
        if "+rerank" in row:
            assert value == 1.0, row


def test_time_per_row_is_per_task_and_names_the_slow_rows():
    record = {"rows": {row: {"wall_s": s} for row, s in {"float": 1.0, "rabitq": 5.0, "pq1b": 4.2}.items()}}
    section = report.timing_section(record, n_tasks=2)
    assert "10.2 s over 3 rows and 2 tasks: 1.70 s per row and task on average" in section
    assert section.endswith("over 2 s per task: rabitq 2.5 s, pq1b 2.1 s.")


def test_a_row_whose_checkpoint_changed_after_it_was_scored_is_marked_stale(fitted, embedding_cache, tmp_path):
    """pq1b scored, then its checkpoint refitted (one centroid moved): the next run, of another method, keeps pq1b's row
    and names it stale in latest.md, and the status says so; rerunning pq1b makes the table fresh again."""
    shutil.copytree(fitted.checkpoints, tmp_path / "checkpoints")
    common = ["--tasks", "SciFact", "--data-dir", fitted.data_dir, "--cache-dir", embedding_cache, "--modes",
              "--checkpoints", tmp_path / "checkpoints", "--output", tmp_path / "results"]
    evaluate(*common, "--methods", "pq1b", "stage1_zero")
    path = checkpoints.checkpoint_path(tmp_path / "checkpoints", DEFAULT_MODEL, "pq1b")
    tensors, meta = checkpoints.load_checkpoint(path, DEFAULT_MODEL, DIM, "transfer", "pq1b")
    method = methods.make_method("pq1b", DIM)
    method.load_state(tensors, path)
    pq = methods.FaissCodes.inner(method.faiss_index).pq
    centroids = faiss.vector_to_array(pq.centroids)
    centroids[:8] += 0.01
    faiss.copy_array_to_vector(centroids, pq.centroids)
    checkpoints.save_checkpoint(path, method.state(), meta)
    evaluate(*common, "--methods", "stage1_zero")
    markdown = (tmp_path / "results" / "latest.md").read_text()
    assert "### Stale rows" in markdown and f"- pq1b: {path} changed since run" in markdown
    assert "pq1b" in set(pd.read_csv(tmp_path / "results" / "latest.csv").method)
    assert [line.split(":")[0] for line in results.status(tmp_path / "results", tmp_path / "checkpoints")["stale"]] == ["pq1b"]
    evaluate(*common, "--methods", "pq1b")
    assert "### Stale rows" not in (tmp_path / "results" / "latest.md").read_text()
