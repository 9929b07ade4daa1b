"""Tests of report.py --compare, the cross-model report: on two results folders built from the real MiniLM latest.csv,
one as it is (d = 384) and one as a 768-d model would store it (the registry's bytes at d = 768, nDCG@10 perturbed),
each with per-query scores whose mean is the row's nDCG@10. What the report picks and tests is checked against a brute
force in pandas and `paired_test` on the scores themselves."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import methods
import report
import results
from conftest import ROOT

MINILM = ROOT / "results" / "sentence-transformers__all-MiniLM-L6-v2"
METRICS = ["ndcg_at_10", "bytes_per_vector", "bits_per_vector", "retention"]
QUERIES = 40  # per task: small, so the paired tests are quick


def registry_rows(dim: int) -> dict[str, str]:
    """Row name -> mode, for every registry method at dimension `dim`."""
    return {row: mode for name in methods.METHODS if not methods.applies(name, dim)
            for row, mode in methods.rows_of(name, dim).items()}


def write_folder(folder, rows: pd.DataFrame, seed: int, per_query: bool = True) -> dict:
    """latest.csv of `rows`, and (if `per_query`) per_query.csv: QUERIES seeded scores per task and row whose mean is
    the row's nDCG@10. Returns (task, split, row) -> those scores, indexed by query id."""
    folder.mkdir(parents=True)
    rows.to_csv(folder / "latest.csv", index=False)
    rng, scores, records = np.random.default_rng(seed), {}, []
    for task, split, row, ndcg in rows[rows.metric == "ndcg_at_10"][["task", "split", "method", "value"]].itertuples(index=False):
        noise = rng.normal(0, 0.2, QUERIES)
        scores[task, split, row] = pd.Series(ndcg + noise - noise.mean(), [f"{task}-q{i}" for i in range(QUERIES)])
        records += [(task, split, row, qid, value) for qid, value in scores[task, split, row].items()]
    if per_query:
        pd.DataFrame(records, columns=["task", "split", "method", "query_id", "ndcg_at_10"]).to_csv(folder / results.PER_QUERY, index=False)
    return scores


def as_768(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """`rows` as a 768-d model's: the registry's bytes at d = 768, each row's nDCG@10 moved by up to ±0.03 (float's
    kept), retention recomputed from them."""
    modes, rows = registry_rows(768), rows.copy()
    base = rows.method.str.partition("@")[0]
    nbytes = base.map(lambda row: methods.row_bytes(row.partition("+")[0], 768, modes[row]))
    rows.loc[rows.metric == "bytes_per_vector", "value"] = nbytes[rows.metric == "bytes_per_vector"]
    rows.loc[rows.metric == "bits_per_vector", "value"] = 8 * nbytes[rows.metric == "bits_per_vector"]
    ndcg = (rows.metric == "ndcg_at_10") & (rows.method != "float")
    rows.loc[ndcg, "value"] = (rows.value[ndcg] + np.random.default_rng(seed).uniform(-0.03, 0.03, ndcg.sum())).round(6)
    value = rows[rows.metric == "ndcg_at_10"].set_index(["task", "split", "method"]).value
    retention = rows.metric == "retention"
    rows.loc[retention, "value"] = [value[t, s, m] / value[t, s, "float"] for t, s, m in
                                    rows[retention][["task", "split", "method"]].itertuples(index=False)]
    return rows


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """results/org__model-a (the real MiniLM rows) and results/org__model-b (as_768 of them), each with per_query.csv."""
    if not (MINILM / "latest.csv").exists():
        pytest.skip(f"{MINILM / 'latest.csv'} is not here")
    rows = pd.read_csv(MINILM / "latest.csv", dtype={"task": str, "split": str, "method": str, "metric": str})
    rows = rows[rows.metric.isin(METRICS)].reset_index(drop=True)
    results = tmp_path_factory.mktemp("results")
    a, b = results / "org__model-a", results / "org__model-b"
    rows_b = as_768(rows, seed=1)
    scores = {"model-a": write_folder(a, rows, seed=2), "model-b": write_folder(b, rows_b, seed=3)}
    report.main(["--compare", str(a), str(b)])
    return dict(folders=(a, b), rows={"model-a": rows, "model-b": rows_b}, scores=scores,
                markdown=(results / "cross-model.md").read_text())


def brute_force_best(rows: pd.DataFrame, dim: int, budget: int) -> str | None:
    """The row with the highest mean nDCG@10 over tasks among rows without float vectors or a depth, bytes <= budget;
    ties: fewer bytes, then the first in latest.csv."""
    modes = registry_rows(dim)
    wide = rows.pivot_table(index="method", columns="metric", values="value", aggfunc="mean", sort=False)
    fits = wide[[modes.get(row) is not None and not methods.keeps_float(modes[row]) for row in wide.index]]
    fits = fits[fits.bytes_per_vector <= budget]
    if fits.empty:
        return None
    top = fits[fits.ndcg_at_10 == fits.ndcg_at_10.max()]
    return top.sort_values("bytes_per_vector", kind="stable").index[0]


def table(markdown: str, heading: str) -> list[dict]:
    """The rows of the first markdown table after `heading`, as {header: cell}."""
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    cells = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    header, body = cells(lines[start]), []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append(dict(zip(header, cells(line))))
    return body


DIMS = (("model-a", 384), ("model-b", 768))


def test_the_best_row_per_budget_is_the_brute_force_best_for_each_model(two_models):
    """Budgets are bits per dimension: each model's bytes at its own dimension (36 B at 384-d is 72 B at 768-d)."""
    picked = {row["bits/dim"]: row for row in table(two_models["markdown"], "### Best row per budget, by model")}
    assert list(picked) == ["0.75", "1", "1.33", "1.67", "2", "2.67", "4", "8"]
    assert (picked["0.75"]["model-a: budget"], picked["0.75"]["model-b: budget"]) == ("36 B", "72 B")
    disagree = 0
    for bits, label_bits in zip(report.BUDGET_BITS, picked):
        row = picked[label_bits]
        best = {label: brute_force_best(two_models["rows"][label], dim, round(bits * dim / 8)) for label, dim in DIMS}
        for label, want in best.items():
            assert row[f"{label}: best row"] == (want or "nothing fits"), (bits, label)
        disagree += None not in best.values() and len(set(best.values())) == 2
        assert row["same row"] == ("—" if None in best.values() else "yes" if len(set(best.values())) == 1 else "no")
    assert disagree >= 2


def brute_force_goal(rows: pd.DataFrame, dim: int, bits: float, target: float, mode: str | None) -> tuple[str, str]:
    """(best row, verdict) of a frontier goal: within bits * dim / 8 bytes among rows without float vectors, or, with
    a mode, among that mode's rows of at most `bits` bits per dimension, whatever their bytes."""
    if mode is None:
        best = brute_force_best(rows, dim, round(bits * dim / 8))
    else:
        modes = registry_rows(dim)
        of_mode = [row for row in dict.fromkeys(rows.method) if modes.get(row) == mode
                   and methods.information_bits(row.partition("+")[0], dim) <= bits]
        best = brute_force_best(rows[rows.method.isin(of_mode)], dim, np.inf)
    retention = rows[(rows.method == best) & (rows.metric == "retention")].value.mean()
    short = round(100 * (target - retention), 1)
    return best, "met" if retention >= target else f"missed by {short} points"


def test_the_frontier_goals_are_checked_for_each_model_as_a_brute_force_checks_them(two_models):
    listed = table(two_models["markdown"], "### The frontier goals, by model")
    assert len(listed) == len(report.GOALS) == 6
    verdicts = []
    for row, (bits, target, mode) in zip(listed, report.GOALS):
        for label, dim in DIMS:
            best, verdict = brute_force_goal(two_models["rows"][label], dim, bits, target, mode)
            assert (row[f"{label}: best row"], row[label]) == (best, verdict), (bits, mode, label)
            verdicts.append(verdict)
    assert listed[-1]["bits/dim"] == "2, hamming" and listed[-1]["model-a: budget"] == "any bytes"
    assert "met" in verdicts and any(v.startswith("missed") for v in verdicts)  # both outcomes are exercised


def test_at_the_same_bytes_each_models_best_is_tested_against_the_others_over_the_same_queries(two_models):
    listed = table(two_models["markdown"], "### Same bytes, either model")
    budgets = sorted({round(bits * dim / 8) for bits in report.BUDGET_BITS for _, dim in DIMS})
    assert [row["budget"] for row in listed] == [f"{b:,} B" for b in budgets]
    for row, budget in zip(listed, budgets):
        best = {label: brute_force_best(two_models["rows"][label], dim, budget) for label, dim in DIMS}
        assert [row["model-a: best row"], row["model-b: best row"]] == [best[l] or "nothing fits" for l in best]
        for task in ("NFCorpus", "SciFact"):
            cell = row[f"Δ model-b − model-a, {task} (p)"]
            if None in best.values():
                assert cell == "—"
                continue
            a = two_models["scores"]["model-a"][task, "test", best["model-a"]]
            b = two_models["scores"]["model-b"][task, "test", best["model-b"]]
            delta, _, _, p = report.paired_test(b.to_numpy(), a.reindex(b.index).to_numpy())
            assert parse_cell(cell) == (pytest.approx(delta, abs=5e-5), "<0.001" if p < 0.001 else f"{p:.3f}"), (budget, task)
    assert listed[0]["model-b: best row"] == "nothing fits"  # 36 B: no 768-d row is that small


def parse_cell(cell: str) -> tuple[float, str]:
    """'+0.0123 (0.045)*' -> (0.0123, '0.045')."""
    match = re.fullmatch(r"([+-]\d\.\d{4}) \((<0\.001|\d\.\d{3})\)\*?", cell)
    assert match, cell
    return float(match.group(1)), match.group(2)


def test_where_the_models_disagree_each_is_tested_with_paired_test_on_its_per_query_scores(two_models):
    listed = table(two_models["markdown"], "### Where the models' best rows differ")
    checked = 0
    for bits in report.BUDGET_BITS:
        x, y = (brute_force_best(two_models["rows"][label], dim, round(bits * dim / 8)) for label, dim in DIMS)
        here = [row for row in listed if row["bits/dim"] == f"{bits:.3g}"]
        if None in (x, y) or x == y:
            assert not here, bits
            continue
        assert {(row["X (best for)"], row["Y (best for)"], row["in model"]) for row in here} == {
            (f"{x} (model-a)", f"{y} (model-b)", label) for label in ("model-a", "model-b")}
        for row in here:
            scores = two_models["scores"][row["in model"]]
            for task in ("NFCorpus", "SciFact"):
                a, b = scores[task, "test", x], scores[task, "test", y]
                delta, _, _, p = report.paired_test(a.to_numpy(), b.reindex(a.index).to_numpy())
                shown_delta, shown_p = parse_cell(row[f"Δ {task} (p)"])
                assert shown_delta == pytest.approx(delta, abs=5e-5), (bits, row["in model"], task)
                assert shown_p == ("<0.001" if p < 0.001 else f"{p:.3f}"), (bits, row["in model"], task)
                checked += 1
    assert checked >= 8


def test_without_per_query_scores_the_tests_say_so(two_models, tmp_path):
    shutil.copytree(two_models["folders"][0], tmp_path / "org__model-a")
    write_folder(tmp_path / "org__model-b", two_models["rows"]["model-b"], seed=3, per_query=False)
    written = report.write_cross_model([str(tmp_path / "org__model-a"), str(tmp_path / "org__model-b")])
    assert written == tmp_path / "cross-model.md"
    listed = table(written.read_text(), "### Where the models' best rows differ")
    cells = {row["in model"]: {row["Δ NFCorpus (p)"], row["Δ SciFact (p)"]} for row in listed}
    assert cells["model-b"] == {"no per-query scores"}
    assert all(re.fullmatch(r"[+-]\d\.\d{4} \(.+\)\*?", cell) for cell in cells["model-a"])


def test_in_domain_folders_get_their_own_report_beside_the_transfer_one(two_models, tmp_path):
    for label, folder in zip(("model-a", "model-b"), two_models["folders"]):
        shutil.copytree(folder, tmp_path / f"org__{label}" / "in-domain")
    (tmp_path / "cross-model.md").write_text("the transfer report")
    written = report.write_cross_model([str(tmp_path / "org__model-a" / "in-domain"), str(tmp_path / "org__model-b" / "in-domain")])
    assert written == tmp_path / "cross-model-in-domain.md" and (tmp_path / "cross-model.md").read_text() == "the transfer report"
    assert written.read_text().startswith("## Compression across models: model-a in-domain vs model-b in-domain")


def test_per_query_scores_survive_the_csv_exactly(tmp_path):
    scores = {("T", "test", "x"): pd.Series([1 / 3, 2 / 7, 0.0, 1.0], ["2", "10", "a b", "007"]),
              ("T", "test", "y"): pd.Series([np.pi / 4, 0.1 + 0.2, 1e-17, 0.5], ["2", "10", "a b", "007"])}
    (tmp_path / results.PER_QUERY).write_bytes(results.per_query_csv(scores))
    back = results.read_per_query(tmp_path / results.PER_QUERY)
    assert list(back) == list(scores)
    for key, series in scores.items():
        assert list(back[key].index) == list(series.index) and (back[key].to_numpy() == series.to_numpy()).all()


def refused(*folders) -> str:
    """The one-line error report.main gives for `--compare folders`."""
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--compare", *map(str, folders)])
    error = exit_info.value.code
    assert isinstance(error, str) and error.startswith("error: ") and "\n" not in error  # sys.exit(str): status 1
    return error


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(two_models, tmp_path):
    a = shutil.copytree(two_models["folders"][0], tmp_path / "org__model-a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "latest.csv").write_text("not,a\nresults,file\n")
    mismatched = tmp_path / "org__mismatched"
    write_folder(mismatched, two_models["rows"]["model-b"], seed=3)
    rows = pd.read_csv(mismatched / "latest.csv")
    rows.loc[rows.metric == "ndcg_at_10", "value"] += 0.01  # per_query.csv no longer averages to latest.csv
    rows.to_csv(mismatched / "latest.csv", index=False)
    assert "at least two" in refused(a)
    assert "at least two" in refused()
    assert "given twice" in refused(a, a)
    assert "is not a folder" in refused(a, tmp_path / "nowhere")
    assert "has no latest.csv" in refused(a, tmp_path / "empty")
    assert "the evaluation's latest.csv?" in refused(a, tmp_path / "garbage")
    assert "is not from the run of latest.csv" in refused(a, mismatched)
    assert not (tmp_path / "cross-model.md").exists()

    # the command itself: a non-zero exit, one line on stderr, no traceback
    result = subprocess.run([sys.executable, "report.py", "--compare", str(a)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --compare needs at least two results folders (results/<model-slug>), got 1"]


def test_the_tables_copy_into_docs_and_the_copy_mode_still_works(two_models, tmp_path):
    report_file = two_models["folders"][0].parent / "cross-model.md"
    heading = "### Best row per budget, by model"
    doc = tmp_path / "doc.md"
    doc.write_text(f"Before.\n\n<!-- from {report_file}: {heading} -->\nstale\n<!-- end -->\n\nAfter.\n")
    report.main([str(doc)])
    body = doc.read_text().split("-->\n", 1)[1].split("\n<!-- end -->")[0].splitlines()
    assert body and all(line.startswith("|") for line in body)
    assert len(body) == 2 + len(report.BUDGET_BITS) and doc.read_text().startswith("Before.") and doc.read_text().endswith("After.\n")
