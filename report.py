"""Significance, the frontier report and the plot: what each byte of a compressed embedding buys.

The evaluation calls this once it has run every row:

    rows = add_statistics(rows, per_query, reference="float")
    markdown = frontier_report(rows, per_query, title, "float", info, dim)
    png = plot(rows, title, info)

`rows` is long form (task, split, method, metric, value): `method` is a row name such as "stage1_zero+asym", and the
metrics include ndcg_at_10 and bytes_per_vector. `per_query` maps (task, split, row) to that row's nDCG@10 per query,
indexed by query id. `info` maps each row name to {"method", "family", "mode", "learned", "keeps_float", "describe"}.
The evaluation also writes `per_query` beside latest.csv (`per_query_csv`), so that models can be compared later:

    python report.py --compare results/<model A> results/<model B>   # writes results/cross-model.md
    python report.py README.md docs/*.md                              # refreshes their tables from the results files
"""

import io
import itertools
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

import methods  # noqa: E402
import results  # noqa: E402
from results import PER_QUERY, read_per_query  # noqa: E402
from data import PROTOCOLS, SEED, UsageError, write_atomic  # noqa: E402

RESAMPLES = 10_000  # paired randomisation test and bootstrap interval over per-query nDCG@10
ALPHA = 0.05
BASELINE = "stage1_zero"  # the untrained sign bits every row is also tested against
BUDGET_BITS = (0.75, 1, 4 / 3, 5 / 3, 2, 8 / 3, 4, 8)  # bits per dimension; at d = 384: 36, 48, 64, 80, 96, 128, 192, 384 B
GOALS = ((1, 0.97, None), (4 / 3, 0.97, None), (5 / 3, 0.985, None), (2, 0.995, None), (8 / 3, 0.997, None),
         (2, 0.97, "hamming"))  # the frontier's goals: (bits per dimension, mean retention, mode); a goal with a mode
#   is on that mode's rows of codes with at most those bits per dimension, whatever their bytes (2-bit codes search by
#   Hamming distance as 3-bit thermometer codes); one without is on every row within that many bytes
PLOT_TICKS = (36, 48, 64, 96, 128, 192, 256, 384)  # bytes marked on the plot's axis, then doubling
DEPTH_TARGET = 0.99  # the retention the depth table asks for
FAMILY_COLOURS = {"float": "black", "cast": "tab:gray", "scalar": "tab:blue", "pca": "tab:green", "binary": "tab:red",
                  "pq": "tab:purple", "rabitq": "tab:orange", "multi-level": "tab:brown"}  # another family gets the next free colour
CROSS_MODEL = "cross-model{}.md"  # written beside the results folders it compares; "-in-domain" when they are in-domain


def paired_test(a: np.ndarray, b: np.ndarray, seed: int = SEED) -> tuple[float, float, float, float]:
    """Paired comparison of two rows' per-query scores.

    Args:
        a: Scores of one row, one per query.
        b: Scores of the other row for the same queries, in the same order.
        seed: Seed of the resampling, so a rerun gives the same interval and p-value.

    Returns:
        mean(a - b), the low and high ends of its 95% percentile bootstrap interval, and the two-sided p-value of a
        paired randomisation test (each query's difference flipped in sign at random; every flip is enumerated
        when there are at most `RESAMPLES`). Identical scores give (0.0, 0.0, 0.0, 1.0).

    Raises:
        ValueError: If `a` and `b` differ in length.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one value per query in both rows, got {a.shape} and {b.shape}")
    diff = a - b
    if np.allclose(diff, 0):
        return 0.0, 0.0, 0.0, 1.0
    # numpy, not scipy.stats.permutation_test / bootstrap: the same tests, vectorised; a full run needs ~140 of them
    rng, n = np.random.default_rng(seed), len(diff)
    exact = 2**n <= RESAMPLES
    if exact:  # few queries: every sign flip
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = rng.choice(np.array([-1.0, 1.0]), size=(RESAMPLES, n))
    extreme = np.sum(np.abs(signs @ diff / n) >= abs(diff.mean()) * (1 - 1e-9))  # tolerance: equal sums in float
    p = extreme / len(signs) if exact else (extreme + 1) / (RESAMPLES + 1)  # random flips: the observed one counts too
    low, high = np.percentile(diff[rng.integers(0, n, size=(RESAMPLES, n))].mean(axis=1), [2.5, 97.5])
    return float(diff.mean()), float(low), float(high), float(p)


def aligned(per_query: dict, task: str, split: str, row: str, other: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-query nDCG@10 of two rows on one task, paired by query id.

    Raises:
        ValueError: If the two rows were scored on different queries.
    """
    a, b = per_query[task, split, row], per_query[task, split, other]
    if set(a.index) != set(b.index):
        raise ValueError(f"{row} and {other} were scored on different queries of {task} {split}")
    return a.to_numpy(dtype=float), b.reindex(a.index).to_numpy(dtype=float)


def add_statistics(rows: pd.DataFrame, per_query: dict[tuple[str, str, str], pd.Series], reference: str,
                   baseline: str = BASELINE) -> pd.DataFrame:
    """Retention and paired tests of every row against the reference and the baseline.

    Args:
        rows: Long form, columns task, split, method, metric, value (other columns are carried over); needs the
            metric ndcg_at_10.
        per_query: (task, split, row) -> that row's nDCG@10 per query, indexed by query id.
        reference: The row retention is measured against ("float", or "float_adapted" in-domain).
        baseline: A second row every row is tested against.

    Returns:
        `rows` plus, per task, split and row: `retention` (nDCG@10 / the reference's) when the reference was run, and
        for each of reference and baseline that has per-query scores: `delta_vs_<it>` (mean per-query difference),
        `delta_vs_<it>_ci_low`, `delta_vs_<it>_ci_high` (95% bootstrap interval) and `p_vs_<it>` (paired
        randomisation test), from `paired_test`.
    """
    ndcg = rows[rows.metric == "ndcg_at_10"]
    score = ndcg.set_index(["task", "split", "method"]).value
    extra = []
    for task, split, row in score.index:
        if (task, split, reference) in score.index:
            extra.append((task, split, row, "retention", score[task, split, row] / score[task, split, reference]))
        for base in dict.fromkeys((reference, baseline)):
            if (task, split, row) in per_query and (task, split, base) in per_query:
                delta, low, high, p = paired_test(*aligned(per_query, task, split, row, base))
                extra += [(task, split, row, f"delta_vs_{base}", delta), (task, split, row, f"delta_vs_{base}_ci_low", low),
                          (task, split, row, f"delta_vs_{base}_ci_high", high), (task, split, row, f"p_vs_{base}", p)]
    extra = pd.DataFrame(extra, columns=["task", "split", "method", "metric", "value"])
    # other columns (e.g. protocol) are copied from the row's own ndcg_at_10 record
    extra = extra.merge(ndcg.drop(columns=["metric", "value"]), on=["task", "split", "method"], how="left")
    return pd.concat([rows, extra[rows.columns]], ignore_index=True)


def column_labels(rows: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(task, split) -> its column label: the task's name, or "<task> <split>" when a task has several splits."""
    pairs = list(dict.fromkeys(zip(rows.task, rows.split)))
    splits = Counter(task for task, _ in pairs)
    return {(task, split): task if splits[task] == 1 else f"{task} {split}" for task, split in pairs}


def metric_table(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric as a frame: a row per row name (first-seen order), a column per task label (NaN where missing)."""
    labels = column_labels(rows)
    wide = rows[rows.metric == metric].set_index(["method", "task", "split"]).value.unstack(["task", "split"])
    wide = wide.reindex(index=list(dict.fromkeys(rows.method)), columns=pd.MultiIndex.from_tuples(labels))
    wide.columns = list(labels.values())
    return wide


def pareto_optimal(nbytes, quality) -> np.ndarray:
    """True where no point with fewer or equal bytes has a higher quality, nor one with fewer bytes an equal quality.

    Rows tied in both bytes and quality are all optimal; a row that only matches a smaller one is not. NaN quality is
    never optimal.
    """
    nbytes, quality = np.asarray(nbytes, dtype=float), np.asarray(quality, dtype=float)
    return np.array([not np.isnan(q) and not np.any(((nbytes <= b) & (quality > q)) | ((nbytes < b) & (quality == q)))
                     for b, q in zip(nbytes, quality)], dtype=bool)


def summarise(rows: pd.DataFrame, info: dict[str, dict]) -> pd.DataFrame:
    """A row per row name, sorted by bytes (then best first): bytes, nDCG@10 per task, mean, learned, pareto.

    `mean` is the mean nDCG@10 over tasks (NaN if the row lacks a task); `retention` (mean over tasks) is there when
    `rows` has it. `pareto` is `pareto_optimal` by bytes and mean.

    Raises:
        ValueError: If a row has no entry in `info`.
    """
    missing = [row for row in dict.fromkeys(rows.method) if row not in info]
    if missing:
        raise ValueError(f"no info (family, mode, learned) for rows {missing}")
    ndcg = metric_table(rows, "ndcg_at_10")
    table = pd.DataFrame({"bytes": metric_table(rows, "bytes_per_vector").max(axis=1)}).join(ndcg)
    table["mean"] = ndcg.mean(axis=1, skipna=False)
    if "retention" in set(rows.metric):
        table["retention"] = metric_table(rows, "retention").mean(axis=1, skipna=False)
    table["learned"] = [bool(info[row].get("learned", False)) for row in table.index]
    table["pareto"] = pareto_optimal(table.bytes, table["mean"])
    table["order"] = range(len(table))
    return table.sort_values(["bytes", "mean", "order"], ascending=[True, False, True]).drop(columns="order")


def budget_bytes(dim: int, bits: float) -> int:
    """Bytes per vector of a budget of `bits` per dimension at dimension `dim`."""
    return round(bits * dim / 8)


def budgets_for(dim: int, bits=BUDGET_BITS) -> tuple[int, ...]:
    """`budget_bytes` of each budget: (36, 48, ..., 384) at d = 384."""
    return tuple(budget_bytes(dim, b) for b in bits)


def format_bits(bits: float) -> str:
    """1 -> "1", 4/3 -> "1.33"."""
    return f"{bits:.3g}"


def goal_results(table: pd.DataFrame, info: dict[str, dict], dim: int, goals=GOALS) -> list[dict]:
    """Each goal of `goals` against the best row that keeps no float vectors within its budget at dimension `dim`
    (see GOALS): {budget, goal, best row, measured, verdict} as the tables print them, and `bytes`, the budget's bytes
    alone ("any bytes" for a goal on a mode); the verdict is "met" or by how many points of mean retention it is missed."""
    out = []
    for bits, target, mode in goals:
        if mode is None:
            budget = budget_bytes(dim, bits)
            nbytes, label = f"≤ {budget:,} B", f"≤ {budget:,} B ({format_bits(bits)} bit{'' if bits == 1 else 's'}/dim)"
            fits = table[[not info[row]["keeps_float"] for row in table.index]]
        else:
            budget, nbytes, label = np.inf, "any bytes", f"≤ {format_bits(bits)} bits/dim, {mode}"
            fits = table[[info[row]["mode"] == mode and info[row].get("information_bits", np.inf) <= bits + 1e-9 for row in table.index]]
        best = best_within(fits, budget)
        short = None if best is None else 100 * (target - table.retention[best])
        verdict = ("nothing fits" if best is None else "met" if short <= 0
                   else f"missed by {short:.1f} points" if short >= 0.05 else "missed by < 0.1 points")
        out.append({"budget": label,
                    "goal": f"≥ {target:.1%}".replace(".0%", "%"), "best row": best or "—",
                    "measured": "" if best is None else f"{table.retention[best]:.1%}", "verdict": verdict, "bytes": nbytes})
    return out


def goal_lines(table: pd.DataFrame, info: dict[str, dict], dim: int, goals=GOALS) -> list[str]:
    """Markdown lines: `goal_results` as a table (none without retention)."""
    if "retention" not in table:
        return []
    return ["### Against the frontier goals", "",
            "The best row that keeps no float vectors within each budget in bytes (or, for a goal on a search mode, among "
            "that mode's rows of codes with at most those bits per dimension), and its mean retention over tasks "
            "against the goal.", "",
            pd.DataFrame(goal_results(table, info, dim, goals)).drop(columns="bytes").to_markdown(index=False, disable_numparse=True), ""]


def best_within(table: pd.DataFrame, budget: float, learned_only: bool = False) -> str | None:
    """The row with the highest mean nDCG@10 among those with bytes <= budget (ties: the fewer bytes), or None."""
    fits = table[(table.bytes <= budget) & table["mean"].notna() & (table.learned | (not learned_only))]
    return None if fits.empty else fits["mean"].idxmax()  # first maximum in byte order


def format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_test(delta: float, p: float) -> str:
    """A paired test as the tables write it: "+0.0123 (0.045)*", * when p < ALPHA."""
    return f"{delta:+.4f} ({format_p(p)})" + ("*" if p < ALPHA else "")


def format_cell(value: float, fmt: str) -> str:
    return "" if pd.isna(value) else format(value, fmt)


def frontier_report(rows: pd.DataFrame, per_query: dict, title: str, reference: str, info: dict[str, dict], dim: int,
                    budgets=None, baseline: str = BASELINE) -> str:
    """Markdown: every row by bytes with the Pareto-optimal ones marked, the best row within each byte budget, the
    frontier goals, learned against training-free rows and the re-ranking depth.

    Args:
        rows: Long form, as returned by `add_statistics` (without its metrics there are no marks, retention or Δ).
        per_query: (task, split, row) -> per-query nDCG@10, for the paired tests of the budget table.
        title: The report's heading.
        reference: The row that retention and the * marks are against.
        info: Row name -> {"family", "mode", "learned", ...}; `learned` marks learned-threshold rows.
        dim: The embedding dimension: the budgets' bytes (`budgets_for`) and the frontier goals' (`goal_lines`).
        budgets: Bytes per vector of the budget table, instead of `budgets_for(dim)`.
        baseline: The row of the † marks and the Δ columns.

    Returns:
        The report. The first table has a row per row name: bytes, nDCG@10 per task, the mean, the mean retention,
        the difference from the baseline per task with its p-value, and a Pareto mark. The second has a row per
        budget: the best row that fits, its retention, the best learned-threshold row that fits, and the paired test
        of the one against the other per task.
    """
    all_rows, rows = rows, rows[~rows.method.map(lambda r: info.get(r, {}).get("extra", False))]  # depth rows: own table
    table = summarise(rows, info)
    lines = [f"## {title}", ""] + main_table_lines(rows, table, info, reference, baseline)
    lines += budget_table_lines(rows, table, per_query, budgets_for(dim) if budgets is None else budgets)
    lines += goal_lines(table, info, dim)
    lines += learned_table(rows, per_query, info, table)
    lines += depth_table(all_rows, info)
    return "\n".join(lines)


def main_table_lines(rows: pd.DataFrame, table: pd.DataFrame, info: dict[str, dict], reference: str, baseline: str) -> list[str]:
    """Markdown lines: every row by bytes, nDCG@10 per task marked where it differs from the reference (*) or the
    baseline (†), the mean, the retention, Δ and p against the baseline, and the Pareto mark."""
    labels, metrics = list(column_labels(rows).values()), set(rows.metric)
    out = pd.DataFrame({"row": table.index, "bytes": table.bytes.map("{:,.0f}".format)}, index=table.index)
    if all("describe" in info[row] for row in table.index):
        out.insert(1, "what it is", [info[row]["describe"] for row in table.index])
    for label in labels:
        out[label] = table[label].map(lambda v: format_cell(v, ".4f"))
    marks = []
    for base, mark in [(reference, "*"), (baseline, "†")]:
        if f"p_vs_{base}" in metrics:
            significant = metric_table(rows, f"p_vs_{base}").reindex(table.index) < ALPHA  # a row against itself: p = 1
            for label in labels:
                out[label] = out[label].where(~significant[label], out[label] + mark)
            marks.append(f"{mark} differs from {base}")
    explained = ["nDCG@10, rows by bytes per vector"]
    if marks:
        explained.append(f"{', '.join(marks)} (paired randomisation test, per-query nDCG@10, {RESAMPLES:,} resamples, p < {ALPHA})")
    out["mean"] = table["mean"].map(lambda v: format_cell(v, ".4f"))
    if "retention" in table:
        out["retention"] = table.retention.map(lambda v: format_cell(v, ".1%"))
        explained.append(f"retention: nDCG@10 / {reference}'s, mean over tasks")
    if f"delta_vs_{baseline}" in metrics:
        delta = metric_table(rows, f"delta_vs_{baseline}").reindex(table.index)
        p = metric_table(rows, f"p_vs_{baseline}").reindex(table.index)
        for label in labels:
            out[f"Δ {label} (p)"] = [f"{d:+.4f} ({format_p(q)})" if not pd.isna(d) and row != baseline else ""
                                     for row, d, q in zip(table.index, delta[label], p[label])]
        explained.append(f"Δ: nDCG@10 − {baseline}'s (p)")
    out["pareto"] = table.pareto.map({True: "◆", False: ""})
    explained.append("◆ Pareto-optimal: no row with fewer or equal bytes has a higher mean, nor a smaller row an equal one")
    align = ["left" if c in ("row", "what it is") else "right" for c in out.columns[:-1]] + ["center"]
    return ["; ".join(explained) + ".", "", out.to_markdown(index=False, disable_numparse=True, colalign=align), ""]


def budget_cells(rows: pd.DataFrame, per_query: dict, best: str | None, learned: str | None, tested: dict) -> dict:
    """Per task label: the best row against the best learned row (paired test, once per pair in `tested`), and
    whether it is significantly better on every task."""
    labels, split_of = list(column_labels(rows).values()), {label: key for key, label in column_labels(rows).items()}
    cells, better = {}, []
    for label in labels:
        task, split = split_of[label]
        if best is None or learned is None:
            cell = "—"
        elif best == learned:
            cell = "same row"
        elif (task, split, best) in per_query and (task, split, learned) in per_query:
            if (task, split, best, learned) not in tested:
                tested[task, split, best, learned] = paired_test(*aligned(per_query, task, split, best, learned))
            delta, _, _, p = tested[task, split, best, learned]
            cell = format_test(delta, p)
            better.append(delta > 0 and p < ALPHA)
        else:
            cell = "no per-query scores"
        cells[f"Δ {label} (p)"] = cell
    cells["sig. better"] = ("yes" if all(better) else "no") if len(better) == len(labels) else "—"
    return cells


def budget_table_lines(rows: pd.DataFrame, table: pd.DataFrame, per_query: dict, budgets) -> list[str]:
    """Markdown lines: per budget in bytes, the best row that fits, its bytes, mean and retention, the best
    learned-threshold row that fits, and the one tested against the other per task."""
    budget_rows, tested = [], {}  # a pair of rows is often the best at several budgets: test it once
    for budget in budgets:
        best, learned = best_within(table, budget), best_within(table, budget, learned_only=True)
        entry = {"budget": f"{budget:,} B", "best row": best or f"nothing fits in {budget:,} B", "bytes": "", "mean": ""}
        if "retention" in table:
            entry["retention"] = ""
        entry["best learned"] = learned or "—"
        if best is not None:
            entry.update(bytes=f"{table.bytes[best]:,.0f}", mean=f"{table['mean'][best]:.4f}")
            if "retention" in table:
                entry["retention"] = format_cell(table.retention[best], ".1%")
        budget_rows.append(entry | budget_cells(rows, per_query, best, learned, tested))
    budget_table = pd.DataFrame(budget_rows)
    align = ["left" if c in ("best row", "best learned") else "center" if c == "sig. better" else "right" for c in budget_table]
    return ["### Best row within each budget", "",
            "best row: highest mean nDCG@10 with bytes ≤ budget; best learned: the same among learned rows; "
            f"Δ: best row − best learned, per task (p; * p < {ALPHA}); sig. better: significantly better on every task.", "",
            budget_table.to_markdown(index=False, disable_numparse=True, colalign=align), ""]


def stale_lines(stale: dict[str, str]) -> str:
    """Markdown: the rows scored with a checkpoint that has changed since, and why (their numbers are not the
    checkpoint's any more: rerun them with --methods)."""
    return ("### Stale rows\n\nScored with a checkpoint that has changed or gone since; rerun their methods "
            "(evaluate_quantization_mteb.py --methods ...):\n\n" + "\n".join(f"- {row}: {why}" for row, why in stale.items()))


def trained_on(record: dict) -> str:
    """"; fitted and trained on beir-small/, pairs/" from the sources of the rows' checkpoints, or ""."""
    sources = sorted({s for entry in record.get("rows", {}).values() for s in entry.get("sources", [])})
    return f"; fitted and trained on {', '.join(sources)}" if sources else ""


def timing_section(record: dict, n_tasks: int, slow: float = 2.0) -> str:
    """Markdown: the time per row from the run record (search and scoring through mteb, every task; embeddings from
    the cache once encoded), and the rows over `slow` seconds per task."""
    per_task = {row: e["wall_s"] / n_tasks for row, e in record.get("rows", {}).items() if "wall_s" in e}
    over = [f"{row} {s:.1f} s" for row, s in sorted(per_task.items(), key=lambda kv: -kv[1]) if s > slow]
    return (f"### Time per row\n\n{n_tasks * sum(per_task.values()):.1f} s over {len(per_task)} rows and {n_tasks} tasks: "
            f"{sum(per_task.values()) / max(len(per_task), 1):.2f} s per row and task on average; over {slow:g} s per "
            f"task: {', '.join(over) if over else 'none'}.")


def learned_table(rows: pd.DataFrame, per_query: dict, info: dict[str, dict], table: pd.DataFrame) -> list[str]:
    """Markdown lines: every learned row against every training-free row of its family with the same bits per dimension
    and search mode (the codes' own searches; re-ranking hides the codes), per task (paired test): does learning the
    thresholds or codebooks earn its place?"""
    labels, split_of = list(column_labels(rows).values()), {label: key for key, label in column_labels(rows).items()}
    out = []
    for learned in [r for r in table.index if info[r].get("learned")]:
        for free in table.index:
            same = all(info[free].get(k) == info[learned].get(k) for k in ("family", "mode", "information_bits"))
            if info[free].get("learned") or not same or methods.MODES[info[learned]["mode"]].reranker:  # re-ranking hides the codes
                continue
            entry, wins = {"bits/dim": format_cell(info[learned].get("information_bits"), ".3g"), "mode": info[learned]["mode"],
                           "learned": learned, "training-free": free}, []
            for label in labels:
                task, split = split_of[label]
                if (task, split, learned) in per_query and (task, split, free) in per_query:
                    delta, _, _, p = paired_test(*aligned(per_query, task, split, learned, free))
                    entry[f"Δ {label} (p)"] = format_test(delta, p)
                    wins.append(delta > 0 and p < ALPHA)
                else:
                    entry[f"Δ {label} (p)"] = "no per-query scores"
            entry["learned sig. better on every task"] = ("yes" if all(wins) else "no") if len(wins) == len(labels) else "—"
            out.append(entry)
    if not out:
        return []
    frame = pd.DataFrame(out)
    return ["### Learned against training-free codes", "",
            "Each learned row (thresholds or codebooks) against each training-free row of its family with the same bits per "
            f"dimension and search mode: Δ = learned − training-free nDCG@10 per task (paired randomisation test; * p < {ALPHA}).", "",
            frame.to_markdown(index=False, disable_numparse=True), ""]


def depth_rows(rows: pd.DataFrame, info: dict[str, dict]) -> pd.DataFrame:
    """Mean retention of every rerank_int8 row by method and depth k (rows: methods, columns: k)."""
    if "retention" not in set(rows.metric):
        return pd.DataFrame()
    retention = metric_table(rows, "retention").mean(axis=1, skipna=False)
    picked = [r for r in retention.index if info[r]["mode"] == methods.DEPTH_MODE and "depth" in info[r]]
    if not picked:
        return pd.DataFrame()
    frame = pd.DataFrame([(info[r]["method"], info[r]["depth"], retention[r]) for r in picked], columns=["method", "k", "retention"])
    return frame.pivot(index="method", columns="k", values="retention")


def depth_table(rows: pd.DataFrame, info: dict[str, dict], target: float = DEPTH_TARGET) -> list[str]:
    """Markdown lines: how deep to re-rank. For the best method at 1 and at 2 bits per dimension (the highest mean
    retention over depths), the retention of its +rerank_int8 rows at each depth k, and the first k that reaches
    `target`."""
    by_depth = depth_rows(rows, info)
    if by_depth.empty or by_depth.shape[1] < 2:
        return []
    bits = {info[r]["method"]: info[r].get("information_bits") for r in info}
    out = []
    for width in sorted({bits[m] for m in by_depth.index}):
        group = by_depth[[bits[m] == width for m in by_depth.index]]
        best = group.mean(axis=1).idxmax()
        reached = [k for k in group.columns if group.loc[best, k] >= target]
        out.append({"bits/dim": f"{width:.3g}", "best method": best,
                    **{f"k={k}": format_cell(group.loc[best, k], ".1%") for k in group.columns},
                    f"first k ≥ {target:.0%}": str(reached[0]) if reached else f"none (max {group.loc[best].max():.1%})"})
    return ["### How deep to re-rank", "",
            "+rerank_int8: the Hamming top-k re-ranked with int8 documents; mean retention by depth k, for the best "
            "method (highest mean over depths) at each number of bits per dimension.", "",
            pd.DataFrame(out).to_markdown(index=False, disable_numparse=True), ""]


def depth_plot(rows: pd.DataFrame, info: dict[str, dict], title: str) -> bytes | None:
    """A PNG: mean retention of each rerank_int8 method against the depth k (log scale); None without depth rows."""
    by_depth = depth_rows(rows, info)
    if by_depth.empty or by_depth.shape[1] < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for method, r in by_depth.iterrows():
        ax.plot(list(r.index), list(r.values), marker="o", label=method)
    ax.axhline(DEPTH_TARGET, color="gray", linestyle="--", linewidth=0.8)
    ax.set(xscale="log", xlabel="re-ranking depth k (log scale)", ylabel="mean retention of float nDCG@10", title=title)
    ax.set_xticks(list(by_depth.columns), [str(k) for k in by_depth.columns])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def plot_panel(ax, panel: pd.DataFrame, label: str, info: dict[str, dict], colours: dict) -> None:
    """One task's panel: every row at its bytes and nDCG@10, the frontier as a step line, the frontier rows named."""
    on = panel[pareto_optimal(panel.bytes, panel[label])].sort_values("bytes")
    steps = on[on[label] > on[label].cummax().shift(fill_value=-np.inf)]  # one point per rise of the frontier
    ax.step([*steps.bytes, panel.bytes.max()], [*steps[label], steps[label].iloc[-1]], where="post",
            color="tab:cyan", alpha=0.6, linewidth=2, zorder=1)
    for row, r in panel.iterrows():
        colour, hollow = colours[info[row]["family"]], info[row].get("keeps_float", False)
        ax.plot(r.bytes, r[label], methods.MODES[info[row]["mode"]].marker, color=colour, markersize=7,
                markerfacecolor="none" if hollow else colour, zorder=2)
    # name the frontier rows up and to the left of their points, where no row can be (it would be on the frontier);
    # a name too close above the previous one is lifted and joined to its point by a thin line
    span = max(panel[label].max() - panel[label].min(), 1e-3)
    name_y = -np.inf
    for row, r in on.iterrows():
        name_y = max(r[label] + 0.01 * span, name_y + 0.05 * span)
        lifted = name_y > r[label] + 0.02 * span
        ax.annotate(row, (r.bytes, r[label]), xytext=(r.bytes / 1.06, name_y), ha="right", va="bottom", fontsize=7,
                    arrowprops=dict(arrowstyle="-", color="gray", linewidth=0.5) if lifted else None)
    ax.set(xscale="log", xlabel="bytes per vector (log scale)", ylabel="nDCG@10", title=label)
    left, right = panel.bytes.min() / 5, panel.bytes.max() * 1.5  # room on the left for the names
    ticks = [*PLOT_TICKS]
    while ticks[-1] < panel.bytes.max():
        ticks.append(2 * ticks[-1])  # 768, 1,536, ...
    ticks = [b for b in ticks if left <= b <= right]
    ax.set_xticks(ticks, [f"{b:,.0f}" for b in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlim(left, right)
    ax.set_ylim(panel[label].min() - 0.05 * span, max(panel[label].max(), name_y) + 0.08 * span)
    ax.grid(alpha=0.3)


def plot(rows: pd.DataFrame, title: str, info: dict[str, dict]) -> bytes:
    """nDCG@10 against bytes per vector, one panel per task.

    Args:
        rows: Long form with the metrics ndcg_at_10 and bytes_per_vector.
        title: The figure's title.
        info: Row name -> {"family", "mode", "keeps_float", ...}: colour per family, marker per mode (methods.MODES),
            hollow when the row keeps float vectors besides its codes.

    Returns:
        A PNG. Log-scale bytes; each panel's frontier (the best nDCG@10 reachable at each size) is a step line, and
        only the rows on it are named.
    """
    rows = rows[~rows.method.map(lambda r: info.get(r, {}).get("extra", False))]
    table, labels = summarise(rows, info), list(column_labels(rows).values())
    families = list(dict.fromkeys(info[row]["family"] for row in table.index))
    modes = list(dict.fromkeys(info[row]["mode"] for row in table.index))
    families.sort(key=lambda f: list(FAMILY_COLOURS).index(f) if f in FAMILY_COLOURS else len(FAMILY_COLOURS))
    modes.sort(key=list(methods.MODES).index)
    spare = iter(c for c in plt.get_cmap("tab20").colors if c not in FAMILY_COLOURS.values())
    colours = {f: FAMILY_COLOURS.get(f) or next(spare) for f in families}
    fig, axes = plt.subplots(1, len(labels), figsize=(6.5 * len(labels), 5.5), squeeze=False, layout="constrained")
    for ax, label in zip(axes[0], labels):
        plot_panel(ax, table[table[label].notna()], label, info, colours)
    fig.legend(handles=[Line2D([], [], marker="o", linestyle="", color=colours[f], label=f) for f in families],
               loc="outside right upper", fontsize=8, title="family", title_fontsize=8)
    fig.legend(handles=[Line2D([], [], marker=methods.MODES[m].marker, linestyle="", color="gray", label=m) for m in modes]
               + [Line2D([], [], marker="o", linestyle="", color="gray", markerfacecolor="none", label="keeps float vectors"),
                  Line2D([], [], color="tab:cyan", alpha=0.6, linewidth=2, label="frontier")],
               loc="outside right lower", fontsize=8, title="mode", title_fontsize=8)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def copy_sections(document: str) -> str:
    """`document` with each block `<!-- from <file>: <heading> -->` ... `<!-- end -->` replaced by that heading's table
    in the report file named, so README's and docs' tables are the results files' own, never typed by hand."""
    def table(match) -> str:
        path, heading = match.group(1), match.group(2)
        if not Path(path).is_file():
            raise UsageError(f"{path} does not exist (named in a '<!-- from' line)")
        text = Path(path).read_text()
        if heading not in text:
            raise UsageError(f"{path} has no heading {heading!r} (named in a '<!-- from' line)")
        start = text.index(heading)
        lines = text[start:].splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("|"))
        body = lines[first:first + len(list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:])))]
        return f"<!-- from {path}: {heading} -->\n" + "\n".join(body) + "\n<!-- end -->"

    return re.sub(r"<!-- from (\S+): (.+?) -->.*?<!-- end -->", table, document, flags=re.S)


# ---------------------------------------------------------------------------------------------------------------
# the cross-model report: several models' results folders side by side


def row_info(name: str, mode: str, dim: int) -> dict:
    """What the report needs to know of a row of method `name` in `mode` at dimension `dim`, from the registry."""
    return dict(method=name, family=methods.family_of(name, dim), mode=mode, learned=methods.entry(name).learned,
                keeps_float=methods.keeps_float(mode), bytes=methods.row_bytes(name, dim, mode),
                describe=methods.describe(name, dim), information_bits=methods.information_bits(name, dim))


def registry_info(row_names, dim: int, record: dict | None = None) -> tuple[dict[str, dict], list[str]]:
    """`info` for each row name the registry has at dimension `dim` (method, family, mode, learned, keeps_float,
    information_bits, as the evaluation builds it; a re-ranking row also its depth: "<row>@k" k (and extra), any other
    the depth its run record says, else methods.RERANK_K, which every run used before records said it), and the names
    it does not have (rows of an older registry)."""
    known = {row: (name, mode) for name in methods.METHODS if methods.applies(name, dim) is None
             for row, mode in methods.rows_of(name, dim).items()}
    info, unknown = {}, []
    for row in dict.fromkeys(row_names):
        base, at, depth = row.partition("@")
        if base not in known or (at and not depth.isdigit()):
            unknown.append(row)
            continue
        info[row] = row_info(*known[base], dim)
        if at:
            info[row] |= dict(depth=int(depth), extra=True)
        elif methods.MODES[info[row]["mode"]].reranker:
            info[row] |= dict(depth=(record or {}).get("rows", {}).get(row, {}).get("depth", methods.RERANK_K), extra=False)
    return info, unknown


@dataclass
class ModelResults:
    """One results folder as the cross-model report reads it. `table`: `summarise` of its rows (depth rows left out);
    `per_query`: empty when the folder has no per_query.csv.gz; `unknown`: rows the registry no longer has."""

    folder: Path
    label: str
    dim: int
    rows: pd.DataFrame
    info: dict
    table: pd.DataFrame
    per_query: dict
    unknown: list


def model_label(folder: Path) -> str:
    """"all-MiniLM-L6-v2" for results/sentence-transformers__all-MiniLM-L6-v2, "… in-domain" for its in-domain/."""
    name, protocol = (folder.parent.name, folder.name) if folder.name in PROTOCOLS else (folder.name, "transfer")
    return name.split("__")[-1] + ("" if protocol == "transfer" else f" {protocol}")


def check_per_query(per_query: dict, rows: pd.DataFrame, path: Path) -> None:
    """Raise UsageError unless every row's per-query nDCG@10 averages to its nDCG@10 in latest.csv (one run wrote both)."""
    ndcg = rows[rows.metric == "ndcg_at_10"].set_index(["task", "split", "method"]).value
    for key, scores in per_query.items():
        if key not in ndcg.index or abs(scores.mean() - ndcg[key]) > 1e-4:
            held = f"{ndcg[key]:.4f}" if key in ndcg.index else "no such row"
            raise UsageError(f"{path} is not from the run of latest.csv ({' '.join(key)}: mean nDCG@10 {scores.mean():.4f}, "
                             f"latest.csv {held}); rerun the evaluation")


def read_results(folder: Path) -> ModelResults:
    """A results folder written by the evaluation: latest.csv, per_query.csv.gz when there, and each row's info from the
    registry at the model's dimension (the float row's bytes / 4).

    Raises:
        UsageError: If the folder, its latest.csv or what the report needs from it (nDCG@10, bytes, retention, a
            float row) is missing, or per_query.csv.gz does not match latest.csv.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    if not (folder / "latest.csv").is_file():
        raise UsageError(f"{folder} has no latest.csv (the evaluation writes it: evaluate_quantization_mteb.py --output {folder})")
    rows = results.read_latest(folder / results.LATEST)
    missing = {"ndcg_at_10", "bytes_per_vector", "retention"} - set(rows.metric)
    missing = missing or (set() if pd.api.types.is_numeric_dtype(rows.value) else {"numeric values"})
    if missing:
        raise UsageError(f"{folder / 'latest.csv'} has no {', '.join(sorted(missing))}; is it the evaluation's latest.csv?")
    float_bytes = rows[(rows.method == "float") & (rows.metric == "bytes_per_vector")].value
    if float_bytes.empty:
        raise UsageError(f"{folder / 'latest.csv'} has no float row (its bytes give the model's dimension)")
    dim = int(float_bytes.iloc[0]) // 4
    info, unknown = registry_info(rows.method, dim)
    rows = rows[rows.method.isin(info)]
    per_query = read_per_query(folder / PER_QUERY) if (folder / PER_QUERY).is_file() else {}
    per_query = {key: scores for key, scores in per_query.items() if key[2] in info}
    check_per_query(per_query, rows, folder / PER_QUERY)
    table = summarise(rows[~rows.method.map(lambda r: info[r].get("extra", False))], info)
    return ModelResults(folder, model_label(folder), dim, rows, info, table, per_query, unknown)


def searchable(model: ModelResults) -> pd.DataFrame:
    """The model's summary rows that keep no float vectors: the candidates of the budget tables."""
    return model.table[[not model.info[row]["keeps_float"] for row in model.table.index]]


def best_per_budget(models: list[ModelResults], bits=BUDGET_BITS) -> dict[float, list[str | None]]:
    """Bits per dimension -> each model's best row within that many bytes at its own dimension (`best_within` over
    `searchable` rows), None where nothing fits."""
    return {b: [best_within(searchable(model), budget_bytes(model.dim, b)) for model in models] for b in bits}


def budget_lines(models: list[ModelResults], winners: dict[float, list[str | None]]) -> list[str]:
    """Markdown lines: per budget in bits per dimension, each model's bytes there, best row and its mean retention,
    and whether the models agree."""
    out = []
    for bits, best in winners.items():
        entry = {"bits/dim": format_bits(bits)}
        for model, row in zip(models, best):
            entry[f"{model.label}: budget"] = f"{budget_bytes(model.dim, bits):,} B"
            entry[f"{model.label}: best row"] = row or "nothing fits"
            entry[f"{model.label}: retention"] = "" if row is None else format_cell(model.table.retention[row], ".1%")
        entry["same row"] = "—" if None in best else "yes" if len(set(best)) == 1 else "no"
        out.append(entry)
    return ["### Best row per budget, by model", "",
            "Budgets in bits per dimension, so each model's budget in bytes is at its own dimension. best row: highest "
            "mean nDCG@10 over the model's tasks within the budget, among rows that keep no float vectors (as in each "
            "model's own budget table); retention: mean over tasks; same row: every model's best is the same row (— "
            "where one has nothing that fits).", "",
            pd.DataFrame(out).to_markdown(index=False, disable_numparse=True), ""]


def goal_lines_by_model(models: list[ModelResults], goals=GOALS) -> list[str]:
    """Markdown lines: each model's `goal_results` side by side, a row per goal."""
    per_model = [goal_results(model.table, model.info, model.dim, goals) for model in models]
    out = []
    for i, (bits, _, mode) in enumerate(goals):
        entry = {"bits/dim": format_bits(bits) + (f", {mode}" if mode else ""), "goal": per_model[0][i]["goal"]}
        for model, result in zip(models, per_model):
            entry[f"{model.label}: budget"] = result[i]["bytes"]
            entry[f"{model.label}: best row"] = result[i]["best row"]
            entry[f"{model.label}: measured"] = result[i]["measured"]
            entry[model.label] = result[i]["verdict"]
        out.append(entry)
    return ["### The frontier goals, by model", "",
            "Each model's best row that keeps no float vectors within the budget in bytes at its own dimension (or, for a "
            "goal on a search mode, among that mode's rows of codes with at most those bits per dimension), and its mean "
            "retention over tasks against the goal.", "",
            pd.DataFrame(out).to_markdown(index=False, disable_numparse=True), ""]


def family_lines(models: list[ModelResults]) -> list[str]:
    """Markdown lines: every row all models ran (depth rows aside), by family then the first model's bytes: its bits
    per dimension, bytes and mean retention per model, and each other model's retention minus the first's."""
    first, order = models[0], list(FAMILY_COLOURS)
    shared = [row for row in first.table.index if all(row in model.table.index for model in models[1:])]
    shared.sort(key=lambda row: order.index(first.info[row]["family"]) if first.info[row]["family"] in order else len(order))
    out = []
    for row in shared:
        bits = dict.fromkeys(format_cell(model.info[row]["information_bits"], ".3g") for model in models)
        entry = {"family": first.info[row]["family"], "row": row, "bits/dim": " / ".join(bits)}
        entry |= {f"bytes {model.label}": f"{model.table.bytes[row]:,.0f}" for model in models}
        entry |= {f"retention {model.label}": format_cell(model.table.retention[row], ".1%") for model in models}
        for model in models[1:]:
            delta = model.table.retention[row] - first.table.retention[row]
            entry[f"Δ {model.label} − {first.label}"] = "" if pd.isna(delta) else f"{100 * delta:+.1f} pt"
        out.append(entry)
    if not out:
        return ["### Retention by family, by model", "", "No row was run for every model.", ""]
    return ["### Retention by family, by model", "",
            "Rows every model ran, by family, then by bytes at the first model's dimension. bits/dim: of the code (one "
            "value per model where they differ); bytes are at each model's own dimension, so a 768-d model's row stores "
            "twice a 384-d model's; retention: mean over tasks; Δ in percentage points.", "",
            pd.DataFrame(out).to_markdown(index=False, disable_numparse=True), ""]


def paired_cell(model: ModelResults, label: str, row: str, other: str) -> str:
    """Δ (row − other) and p of `paired_test` on one task of one model, as the budget tables write it, or why not."""
    key = {lab: key for key, lab in column_labels(model.rows).items()}.get(label)
    absent = [r for r in (row, other) if r not in model.table.index]
    if key is None:
        return "—"  # the model was not run on this task
    if absent:
        return f"{absent[0]} not run"
    if (*key, row) not in model.per_query or (*key, other) not in model.per_query:
        return "no per-query scores"
    delta, _, _, p = paired_test(*aligned(model.per_query, *key, row, other))
    return format_test(delta, p)


def difference_lines(models: list[ModelResults], winners: dict[float, list[str | None]]) -> list[str]:
    """Markdown lines: for each budget where the models' best rows differ, each pair of those rows (X, Y) tested
    within every model, per task (`paired_test` on per-query nDCG@10)."""
    labels = list(dict.fromkeys(label for model in models for label in column_labels(model.rows).values()))
    out = []
    for bits, best in winners.items():
        if None in best or len(set(best)) == 1:
            continue
        best_for = {row: ", ".join(m.label for m, b in zip(models, best) if b == row) for row in best}
        for x, y in itertools.combinations(dict.fromkeys(best), 2):
            for model in models:
                nbytes = [f"{model.table.bytes[r]:,.0f}" if r in model.table.index else "—" for r in (x, y)]
                entry = {"bits/dim": format_bits(bits), "X (best for)": f"{x} ({best_for[x]})",
                         "Y (best for)": f"{y} ({best_for[y]})", "in model": model.label, "bytes X / Y": " / ".join(nbytes)}
                entry |= {f"Δ {label} (p)": paired_cell(model, label, x, y) for label in labels}
                out.append(entry)
    table = pd.DataFrame(out) if out else pd.DataFrame([{"bits/dim": "every budget", "X (best for)": "the same best row in every model"}])
    return ["### Where the models' best rows differ", "",
            "For each budget (bits per dimension) where the models' best rows differ: X against Y within each model, Δ = X − Y nDCG@10 per "
            f"task (paired randomisation test on per-query nDCG@10, {RESAMPLES:,} resamples; * p < {ALPHA}). bytes: at "
            "that model's dimension; a row that does not fit a model's budget there can still be tested.", "",
            table.to_markdown(index=False, disable_numparse=True), ""]


def across_models_cell(models: list[ModelResults], rows: list[str], label: str, i: int) -> str:
    """Δ (models[i]'s row − the first model's row) and p of `paired_test` on one task, pairing each query with itself
    (the models answer the same queries), or why there is no test."""
    keys = [{lab: key for key, lab in column_labels(m.rows).items()}.get(label) for m in (models[0], models[i])]
    if None in keys:
        return "—"
    a, b = (m.per_query.get((*key, row)) for m, key, row in zip((models[0], models[i]), keys, (rows[0], rows[i])))
    if a is None or b is None:
        return "no per-query scores"
    if set(a.index) != set(b.index):
        return "different queries"
    delta, _, _, p = paired_test(b.to_numpy(), a.reindex(b.index).to_numpy())
    return format_test(delta, p)


def same_bytes_lines(models: list[ModelResults], bits=BUDGET_BITS) -> list[str]:
    """Markdown lines: at each budget in bytes (every model's budgets, `budgets_for` its dimension), each model's best
    row that keeps no float vectors and its mean nDCG@10 (not retention: the models are compared with each other),
    and each other model's best against the first's, per task, paired over the same queries."""
    labels = list(dict.fromkeys(label for model in models for label in column_labels(model.rows).values()))
    out = []
    for budget in sorted({b for model in models for b in budgets_for(model.dim, bits)}):
        best = [best_within(searchable(model), budget) for model in models]
        entry = {"budget": f"{budget:,} B"}
        for model, row in zip(models, best):
            entry[f"{model.label}: best row"] = row or "nothing fits"
            entry[f"{model.label}: nDCG@10"] = "" if row is None else f"{model.table['mean'][row]:.4f}"
        for i, model in enumerate(models[1:], start=1):
            for label in labels:
                entry[f"Δ {model.label} − {models[0].label}, {label} (p)"] = (
                    "—" if None in (best[0], best[i]) else across_models_cell(models, best, label, i))
        out.append(entry)
    return ["### Same bytes, either model", "",
            "For a store of a given size: each model's best row within the budget in bytes (rows that keep no float "
            "vectors), its mean nDCG@10 over tasks, and Δ nDCG@10 of each model's best against the first model's, per "
            f"task (paired randomisation test over the same queries, {RESAMPLES:,} resamples; * p < {ALPHA}).", "",
            pd.DataFrame(out).to_markdown(index=False, disable_numparse=True), ""]


def cross_model_report(models: list[ModelResults], bits=BUDGET_BITS) -> str:
    """Markdown: the best row per budget (bits per dimension) side by side, the frontier goals per model, every shared
    row's retention per model, paired tests within each model where the models' best rows differ, and the best row
    of each model at the same bytes, tested across models."""
    described = []
    for model in models:
        tasks = ", ".join(column_labels(model.rows).values())
        protocol = ", ".join(dict.fromkeys(model.rows.protocol)) if "protocol" in model.rows else "?"
        notes = [] if model.per_query else [f"no {PER_QUERY}: no paired tests"]
        notes += [f"left out, not in the registry: {', '.join(model.unknown)}"] if model.unknown else []
        described.append(f"{model.label} (d = {model.dim}; {tasks}; protocol {protocol}{'; ' if notes else ''}{'; '.join(notes)})")
    winners = best_per_budget(models, bits)
    lines = ["## Compression across models: " + " vs ".join(model.label for model in models), "",
             "From " + "; ".join(f"{model.folder}/latest.csv" for model in models) + ". " + "; ".join(described) + ".", ""]
    return "\n".join(lines + budget_lines(models, winners) + goal_lines_by_model(models) + family_lines(models)
                     + difference_lines(models, winners) + same_bytes_lines(models, bits))


def write_cross_model(folders: list[str], bits=BUDGET_BITS) -> Path:
    """Read each results folder, write the cross-model report to `CROSS_MODEL` in the folder that holds them all (named
    by the protocols other than transfer among the folders', so the transfer report is not overwritten), and return
    its path.

    Raises:
        UsageError: If fewer than two folders are given, one is given twice, or one cannot be read (`read_results`).
    """
    if len(folders) < 2:
        raise UsageError(f"--compare needs at least two results folders (results/<model-slug>), got {len(folders)}")
    paths = [Path(folder).absolute() for folder in folders]
    if len(set(paths)) < len(paths):
        raise UsageError(f"a results folder is given twice: {', '.join(folders)}")
    models = [read_results(Path(folder)) for folder in folders]
    labels = [model.label for model in models]
    for model in models:
        if labels.count(model.label) > 1:  # e.g. two copies of one model's results: name them by their folders
            model.label = str(model.folder)
    protocols = sorted({p.name for p in paths if p.name in PROTOCOLS} - {"transfer"})
    path = Path(os.path.commonpath([p.parent for p in paths])) / CROSS_MODEL.format("".join(f"-{p}" for p in protocols))
    write_atomic(path, cross_model_report(models, bits) + "\n")
    return path


def grouped(rows: list[str], dim: int, most: int = 12) -> str:
    """Row names for a status line: a method whose every row is listed becomes "<method> (all N rows)"; at most `most`
    names, then how many more."""
    names, left = [], list(rows)
    for name in methods.METHODS:
        own = [r for r in methods.table_rows(name, dim) if r in left] if methods.applies(name, dim) is None else []
        if len(own) > 1 and len(own) == len(methods.table_rows(name, dim)):
            names.append(f"{name} (all {len(own)} rows)")
            left = [r for r in left if r not in own]
    names += left
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def status_lines(results_dir: Path, checkpoints_dir: Path) -> tuple[list[str], bool]:
    """A line per model's results folder under `results_dir` (one with a run record or a checkpoints folder; each
    protocol): complete, or its missing and stale rows and its methods without a checkpoint, and the rows scored before
    run records (said, not counted against completeness); and whether every folder is complete."""
    folders = sorted(p.parent for pattern in ("*/latest.csv", *(f"*/{p}/latest.csv" for p in PROTOCOLS[1:]))
                     for p in Path(results_dir).glob(pattern))
    model_folder = lambda f: f.parent if f.name in PROTOCOLS else f  # noqa: E731
    folders = [f for f in folders if (f / results.RECORD).is_file() or (Path(checkpoints_dir) / model_folder(f).name).is_dir()]
    if not folders:
        raise UsageError(f"no model's results under {results_dir} (the evaluation writes <model-slug>/latest.csv)")
    lines, complete = [], True
    for folder in folders:
        s = results.status(folder, checkpoints_dir)
        problems = {k: s[k] for k in ("missing", "stale", "no_checkpoint") if s[k]}
        complete &= not problems
        said = [f"{len(v)} {k.replace('_', ' ')}: {grouped(v, s['dimension']) if k != 'stale' else '; '.join(v)}"
                for k, v in problems.items()]
        said += [f"{len(s['unrecorded'])} scored before run records (whether their checkpoints changed since is not "
                 f"known; a rerun records them): {grouped(s['unrecorded'], s['dimension'])}"] if s["unrecorded"] else []
        said += [f"{len(s['unknown'])} not in the registry (left out of reports): {', '.join(s['unknown'])}"] if s["unknown"] else []
        lines.append(f"{folder} (d = {s['dimension']}, {s['protocol']}): " + ("; ".join(said) if said else "complete"))
    return lines, complete


def main(argv: list[str]) -> None:
    """`--status [results] [checkpoints]`: each model's table against the registry (exit 1 unless complete);
    `--compare <folder> <folder> ...`: write the cross-model report; otherwise each argument is a markdown file whose
    `<!-- from ... -->` tables are refreshed from the results files. Bad input: one error line, exit 1."""
    if argv[:1] == ["--status"]:
        try:
            lines, complete = status_lines(Path(argv[1] if len(argv) > 1 else "results"),
                                           Path(argv[2] if len(argv) > 2 else "checkpoints"))
        except UsageError as e:
            sys.exit(f"error: {e}")
        print("\n".join(lines))
        sys.exit(0 if complete else 1)
    if argv[:1] == ["--compare"]:
        try:
            path = write_cross_model(argv[1:])
        except UsageError as e:
            sys.exit(f"error: {e}")
        print(f"wrote {os.path.relpath(path)}")
        return
    if "--compare" in argv:
        sys.exit("error: --compare comes first: python report.py --compare results/<model A> results/<model B>")
    for name in argv:
        try:
            updated = copy_sections(Path(name).read_text())
        except (UsageError, OSError) as e:
            sys.exit(f"error: {name}: {e}")
        write_atomic(Path(name), updated)


if __name__ == "__main__":  # python report.py README.md docs/*.md | --compare results/a results/b | --status
    main(sys.argv[1:])
