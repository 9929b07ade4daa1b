"""Tests of report.py: the paired test's exact p-values, retention and deltas by hand, Pareto marks and budget winners
on rows built to have a known answer, reports on subsets of rows, and the plot."""

import io
import itertools

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import report

QUERIES = [f"q{i}" for i in range(8)]
SPREAD = np.linspace(-0.07, 0.07, 8)  # per-query variation around a row's mean; sums to 0


def exact_p(diff: np.ndarray) -> float:
    """Two-sided sign-flip p-value by enumerating every flip."""
    flips = np.array(list(itertools.product([1, -1], repeat=len(diff))))
    return float(np.mean(np.abs(flips @ diff) >= abs(diff.sum()) - 1e-12))


def long_rows(scores: dict, nbytes: dict) -> pd.DataFrame:
    """Long-form rows: nDCG@10 (the mean of each per-query Series) and bytes, from {(task, split, row): Series}."""
    records = []
    for (task, split, row), series in scores.items():
        records += [(task, split, row, "ndcg_at_10", series.mean()), (task, split, row, "bytes_per_vector", float(nbytes[row])),
                    (task, split, row, "bits_per_vector", 8.0 * nbytes[row])]
    return pd.DataFrame(records, columns=["task", "split", "method", "metric", "value"])


def markdown_table(markdown: str, first_header: str) -> list[dict]:
    """The rows of the markdown table whose first header cell is `first_header`, as {header: cell}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and line.strip("| ").startswith(first_header))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append(dict(zip(header, [cell.strip() for cell in line.strip("|").split("|")])))
    return body


def info_for(rows, learned=(), keeps_float=()):
    """info for every row: float rows are family float, mode exact; the others binary, hamming."""
    return {row: {"method": row, "family": "float" if row.startswith("float") else "binary",
                  "mode": "exact" if row.startswith("float") else "hamming", "learned": row in learned, "keeps_float": row in keeps_float}
            for row in dict.fromkeys(rows.method)}


def test_paired_test_p_is_the_exact_sign_flip_p():
    rng = np.random.default_rng(1)
    a, b = rng.random(9), rng.random(9)  # 2^9 = 512 flips < RESAMPLES: scipy enumerates them all
    delta, low, high, p = report.paired_test(a, b)
    assert delta == pytest.approx((a - b).mean()) and low < delta < high
    assert p == pytest.approx(exact_p(a - b))
    # by hand: equal positive differences reach |mean| only unflipped or all flipped, 2 of 2^5
    assert report.paired_test(np.full(5, 0.3), np.full(5, 0.1)) == pytest.approx((0.2, 0.2, 0.2, 2 / 32))
    # by hand: five +0.1 and one -0.1 (sum 0.4); |sum| >= 0.4 with 0, 1, 5 or 6 negatives: (1 + 6 + 6 + 1) / 64
    assert report.paired_test(np.array([0.1] * 5 + [-0.1]), np.zeros(6))[3] == pytest.approx(14 / 64)
    assert report.paired_test(a, a) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="one value per query"):
        report.paired_test(a, b[:5])


def test_retention_and_deltas_by_hand():
    q = ["q1", "q2", "q3", "q4"]
    scores = {
        ("A", "test", "float"): pd.Series([0.8, 0.6, 0.4, 0.2], q),        # mean 0.5
        ("A", "test", "stage1_zero"): pd.Series([0.6, 0.4, 0.3, 0.1], q),  # mean 0.35
        ("A", "test", "x"): pd.Series([0.1, 0.3, 0.5, 0.7], q[::-1]),      # mean 0.4, stored in another query order
        ("B", "test", "float"): pd.Series([1.0, 1.0, 0.0, 0.0], q),        # mean 0.5
        ("B", "test", "stage1_zero"): pd.Series([1.0, 0.0, 1.0, 0.0], q),
        ("B", "test", "x"): pd.Series([1.0, 0.0, 0.0, 0.0], q),            # mean 0.25
    }
    rows = long_rows(scores, {"float": 1536, "stage1_zero": 48, "x": 48})
    rows.insert(0, "protocol", "transfer")
    out = report.add_statistics(rows, scores, "float")
    value = out.set_index(["task", "method", "metric"]).value
    assert list(out.columns) == list(rows.columns) and (out.protocol == "transfer").all()
    assert value["A", "x", "retention"] == pytest.approx(0.4 / 0.5) and value["A", "stage1_zero", "retention"] == pytest.approx(0.7)
    assert value["B", "x", "retention"] == pytest.approx(0.5) and value["A", "float", "retention"] == 1
    # A, x - float: -0.1 on every query -> p = 2 / 2^4, interval [-0.1, -0.1]
    assert value["A", "x", "delta_vs_float"] == pytest.approx(-0.1)
    assert (value["A", "x", "delta_vs_float_ci_low"], value["A", "x", "delta_vs_float_ci_high"]) == pytest.approx((-0.1, -0.1))
    assert value["A", "x", "p_vs_float"] == pytest.approx(2 / 16)
    # A, x - stage1_zero: +0.1, +0.1, 0, 0 -> mean 0.05; |sum| >= 0.2 when the two nonzero signs agree: 8 of 16
    assert value["A", "x", "delta_vs_stage1_zero"] == pytest.approx(0.05) and value["A", "x", "p_vs_stage1_zero"] == pytest.approx(0.5)
    # B, x - float: one query at -1 -> mean -0.25, and every flip reaches |sum| = 1: p = 1
    assert value["B", "x", "delta_vs_float"] == pytest.approx(-0.25) and value["B", "x", "p_vs_float"] == pytest.approx(1.0)
    assert value["A", "float", "p_vs_float"] == 1 and value["B", "stage1_zero", "delta_vs_stage1_zero"] == 0

    # without the reference: no retention and no test against it, the baseline's still there
    no_float = {k: v for k, v in scores.items() if k[2] != "float"}
    out = report.add_statistics(rows[rows.method != "float"], no_float, "float")
    assert not out.metric.str.contains("retention|vs_float").any()
    assert out.set_index(["task", "method", "metric"]).value["A", "x", "delta_vs_stage1_zero"] == pytest.approx(0.05)

    scores["A", "test", "x"] = pd.Series([0.1, 0.3, 0.5, 0.7], ["q1", "q2", "q3", "q9"])
    with pytest.raises(ValueError, match="different queries"):
        report.add_statistics(rows, scores, "float")


@pytest.fixture
def known_frontier():
    """Rows whose Pareto set and budget winners are known by construction (one task, 8 queries)."""
    means = {"tiny": (24, 0.20), "s2": (36, 0.35), "sign": (48, 0.40), "learned48": (48, 0.45), "pq64": (64, 0.45), "pca96": (96, 0.44),
             "int8": (384, 0.58), "float": (1536, 0.60), "rescore": (1584, 0.59)}
    scores = {("T", "test", row): pd.Series(mean + SPREAD, QUERIES) for row, (_, mean) in means.items()}
    wobble = np.array([0.05, -0.03] * 4)  # float - rescore: mean +0.01, not a significant difference
    scores["T", "test", "float"] = pd.Series(0.59 + SPREAD + wobble, QUERIES)
    nbytes = {row: b for row, (b, _) in means.items()}
    rows = long_rows(scores, nbytes)
    return rows, scores, info_for(rows, learned={"s2", "learned48", "rescore"}, keeps_float={"rescore"}), nbytes


def test_pareto_marks_and_budget_winners_by_construction(known_frontier):
    rows, scores, info, nbytes = known_frontier
    rows = report.add_statistics(rows, scores, "float", baseline="sign")
    markdown = report.frontier_report(rows, scores, "known", "float", info, 384, budgets=(20, 30, 36, 48, 64, 384, 2000), baseline="sign")
    main = markdown_table(markdown, "row")
    # sorted by bytes, the better of a tie first; Pareto: nothing with fewer or equal bytes is better, and pq64 only
    # matches learned48 with more bytes
    assert [r["row"] for r in main] == ["tiny", "s2", "learned48", "sign", "pq64", "pca96", "int8", "float", "rescore"]
    assert {r["row"] for r in main if r["pareto"] == "◆"} == {"tiny", "s2", "learned48", "int8", "float"}
    assert main[0]["bytes"] == "24" and main[7]["bytes"] == "1,536" and main[6]["retention"] == "96.7%"
    assert list(report.pareto_optimal([48, 48, 64, 36], [0.5, 0.5, 0.5, np.nan])) == [True, True, False, False]
    # marks only where p < ALPHA: rescore is within noise of float (and float of itself); both differ from sign
    assert (main[7]["T"], main[8]["T"]) == ("0.6000†", "0.5900†")
    assert main[2]["T"] == "0.4500*†" and main[2]["Δ T (p)"] == "+0.0500 (0.008)" and main[3]["Δ T (p)"] == ""

    budgets = {r["budget"]: r for r in markdown_table(markdown, "budget")}
    assert budgets["20 B"]["best row"] == "nothing fits in 20 B" and budgets["20 B"]["Δ T (p)"] == "—"
    assert (budgets["30 B"]["best row"], budgets["30 B"]["best learned"], budgets["30 B"]["Δ T (p)"]) == ("tiny", "—", "—")
    assert (budgets["36 B"]["best row"], budgets["36 B"]["Δ T (p)"]) == ("s2", "same row")
    assert (budgets["64 B"]["best row"], budgets["64 B"]["bytes"], budgets["64 B"]["Δ T (p)"]) == ("learned48", "48", "same row")
    # int8 - learned48 is +0.13 on all 8 queries: p = 2 / 2^8
    assert (budgets["384 B"]["best row"], budgets["384 B"]["best learned"]) == ("int8", "learned48")
    assert budgets["384 B"]["Δ T (p)"] == "+0.1300 (0.008)*" and budgets["384 B"]["sig. better"] == "yes"
    p = exact_p(np.array([0.05, -0.03] * 4))
    assert p > report.ALPHA
    assert (budgets["2,000 B"]["best row"], budgets["2,000 B"]["best learned"]) == ("float", "rescore")
    assert budgets["2,000 B"]["Δ T (p)"] == f"+0.0100 ({p:.3f})" and budgets["2,000 B"]["sig. better"] == "no"


def test_report_on_subsets_of_rows(known_frontier):
    rows, scores, info, nbytes = known_frontier
    # no reference row, no learned rows
    keep = ["tiny", "sign", "pca96", "int8"]
    sub_scores = {k: v for k, v in scores.items() if k[2] in keep}
    sub = report.add_statistics(rows[rows.method.isin(keep)], sub_scores, "float", baseline="sign")
    markdown = report.frontier_report(sub, sub_scores, "subset", "float", {r: {**info[r], "learned": False} for r in keep}, 384, baseline="sign")
    main, budgets = markdown_table(markdown, "row"), markdown_table(markdown, "budget")
    assert "retention" not in main[0] and "differs from float" not in markdown and "† differs from sign" in markdown
    assert not any(r["T"].endswith("*") for r in main) and any(r["T"].endswith("†") for r in main)
    assert [r["best learned"] for r in budgets] == ["—"] * len(report.BUDGET_BITS) and budgets[-1]["best row"] == "int8"
    # in-domain: retention against float_adapted, two tasks (one of them only partly run), stage1_zero absent
    scores_in = {**{("T", "test", r): s for (_, _, r), s in scores.items()}, ("T", "test", "float_adapted"): scores["T", "test", "float"],
                 ("U", "test", "float_adapted"): scores["T", "test", "float"], ("U", "test", "int8"): scores["T", "test", "int8"]}
    rows_in = long_rows(scores_in, {**nbytes, "float_adapted": 1536})
    info_in = {**info, "float_adapted": info["float"]}
    rows_in = report.add_statistics(rows_in, scores_in, "float_adapted")
    markdown = report.frontier_report(rows_in, scores_in, "in-domain", "float_adapted", info_in, 384)
    main = {r["row"]: r for r in markdown_table(markdown, "row")}
    assert "* differs from float_adapted" in markdown and "retention: nDCG@10 / float_adapted's" in markdown
    assert "Δ" not in markdown.split("###")[0]  # no stage1_zero row: no Δ columns
    assert main["float_adapted"]["retention"] == "100.0%" and main["int8"]["retention"] == "96.7%"
    assert main["pca96"]["U"] == "" and main["pca96"]["mean"] == "" and main["pca96"]["pareto"] == ""  # not run on U
    with pytest.raises(ValueError, match="no info"):
        report.frontier_report(rows, scores, "missing", "float", {}, 384)


def test_plot_is_a_png_with_a_panel_per_task(known_frontier):
    rows, scores, info, nbytes = known_frontier
    info["pca96"] = {**info["pca96"], "family": "a family with no colour of its own", "mode": "qb8"}
    one_task = report.plot(rows, "one task", info)
    two_tasks = report.plot(pd.concat([rows, rows.assign(task="U")]), "two tasks", info)
    for png in (one_task, two_tasks):
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    height, width = matplotlib.image.imread(io.BytesIO(one_task)).shape[:2]
    assert matplotlib.image.imread(io.BytesIO(two_tasks)).shape[1] > 1.5 * width - 200


def test_the_bootstrap_interval_is_95_percent_as_scipy_computes_it():
    from scipy import stats

    rng = np.random.default_rng(3)
    a, b = rng.random(200), rng.random(200) * 0.8
    _, low, high, _ = report.paired_test(a, b)
    for level, close in [(0.95, True), (0.90, False)]:
        ci = stats.bootstrap(((a - b),), np.mean, confidence_level=level, method="percentile", n_resamples=20_000,
                             random_state=0).confidence_interval
        near = abs(low - ci.low) < 0.004 and abs(high - ci.high) < 0.004  # resampling noise: ~0.001 here
        assert near == close, (level, low, high, ci)


def test_significantly_better_means_on_every_task(known_frontier):
    rows, scores, info, nbytes = known_frontier
    # a second task where int8 is no better than learned48: the 384 B budget is significant on T only -> "no"
    second = {("U", "test", r): s for (_, _, r), s in scores.items()}
    second["U", "test", "int8"] = scores["T", "test", "learned48"] + np.array([0.05, -0.05] * 4)
    both = {**scores, **second}
    rows2 = report.add_statistics(long_rows(both, nbytes), both, "float", baseline="sign")
    budgets = {r["budget"]: r for r in markdown_table(report.frontier_report(rows2, both, "two", "float", info, 384, budgets=(384,),
                                                                              baseline="sign"), "budget")}
    assert budgets["384 B"]["Δ T (p)"].endswith("*") and not budgets["384 B"]["Δ U (p)"].endswith("*")
    assert budgets["384 B"]["sig. better"] == "no"
    # and where int8 is better on both tasks: "yes"
    second["U", "test", "int8"] = scores["T", "test", "int8"]
    both = {**scores, **second}
    rows2 = report.add_statistics(long_rows(both, nbytes), both, "float", baseline="sign")
    budgets = {r["budget"]: r for r in markdown_table(report.frontier_report(rows2, both, "two", "float", info, 384, budgets=(384,),
                                                                              baseline="sign"), "budget")}
    assert budgets["384 B"]["sig. better"] == "yes"


def test_learned_rows_are_compared_with_training_free_rows_of_the_same_bits_and_mode(known_frontier):
    rows, scores, info, nbytes = known_frontier
    for row in info:
        info[row] = {**info[row], "information_bits": 1.0}
    info["s2"]["information_bits"] = 0.75  # no training-free row at 0.75 bits: not compared
    info["int8"]["family"] = "scalar"
    rows = report.add_statistics(rows, scores, "float", baseline="sign")
    table = markdown_table(report.frontier_report(rows, scores, "t", "float", info, 384, baseline="sign"), "bits/dim")
    pairs = {(r["learned"], r["training-free"]): r for r in table}
    assert ("learned48", "sign") in pairs and not any(learned == "s2" for learned, _ in pairs)
    assert not any(free in ("float", "int8") for _, free in pairs)  # other families are not training-free versions
    assert pairs["learned48", "sign"]["Δ T (p)"] == "+0.0500 (0.008)*"  # +0.05 on every query: 2 / 2^8
    assert pairs["learned48", "sign"]["learned sig. better on every task"] == "yes"


def test_the_depth_table_names_the_first_depth_that_reaches_99_percent():
    queries = QUERIES
    retention = {10: 0.95, 20: 0.985, 50: 0.991, 100: 0.995}
    scores = {("T", "test", "float"): pd.Series(0.5 + SPREAD, queries)}
    info = {"float": {"method": "float", "family": "float", "mode": "exact", "learned": False, "keeps_float": False}}
    for k, r in retention.items():
        row = "sign+rerank_int8" + ("" if k == 50 else f"@{k}")
        scores["T", "test", row] = pd.Series(0.5 * r + SPREAD, queries)
        info[row] = {"method": "sign", "family": "binary", "mode": "rerank_int8", "learned": False, "keeps_float": False, "depth": k,
                     "extra": k != 50, "information_bits": 1.0}
    rows = report.add_statistics(long_rows(scores, {r: 432 for _, _, r in scores}), scores, "float")
    markdown = report.frontier_report(rows, scores, "t", "float", info, 384)
    depth = markdown_table(markdown, "bits/dim")[-1]
    assert depth["best method"] == "sign" and depth["k=10"] == "95.0%" and depth["first k ≥ 99%"] == "50"
    main = [r["row"] for r in markdown_table(markdown, "row")]
    assert sorted(main) == ["float", "sign+rerank_int8"]  # the other depths stay out of the main table
    assert report.depth_plot(rows, info, "t").startswith(b"\x89PNG")


@pytest.mark.parametrize("line, says", [
    ("<!-- from {tmp}/absent.md: ### Table -->", "absent.md does not exist"),
    ("<!-- from {tmp}/source.md: ### Other -->", "has no heading '### Other'"),
])
def test_a_copied_table_whose_source_is_gone_is_one_error_line_and_the_file_unchanged(line, says, tmp_path):
    (tmp_path / "source.md").write_text("### Table\n\n| a |\n|---|\n| 1 |\n")
    doc = tmp_path / "doc.md"
    doc.write_text(line.format(tmp=tmp_path) + "\nold\n<!-- end -->\n")
    before = doc.read_text()
    with pytest.raises(SystemExit) as exit_:
        report.main([str(doc)])
    assert str(exit_.value).startswith(f"error: {doc}: ") and says in str(exit_.value) and "\n" not in str(exit_.value)
    assert doc.read_text() == before
    doc.write_text(f"<!-- from {tmp_path}/source.md: ### Table -->\nold\n<!-- end -->\n")
    report.main([str(doc)])
    assert doc.read_text() == f"<!-- from {tmp_path}/source.md: ### Table -->\n| a |\n|---|\n| 1 |\n<!-- end -->\n"
