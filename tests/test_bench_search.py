"""The search benchmark: it times every registry row through the evaluation's own search (methods.MethodIndex), with
the bytes the registry declares and the built row stores, its JSON summary and best configurations, the bandwidth per
thread count, and one-line errors. Real code at small N (d = 64, every method fitted on the documents); no timing
asserts (times depend on the machine). Expected rows, bytes and rankings come from methods.py's registry, the built
rows and methods.rank, never from a list kept here."""

import contextlib
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import bench_search as bs
import methods

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--n", "1100", "--dim", "64", "--queries", "12", "--single", "2", "--rerank-depths", "20", "10"]


@pytest.fixture(scope="module")
def bench():
    """One in-process run over the whole registry: its arguments, JSON summary, rows (each with its MethodIndex) and
    printed tables."""
    args = bs.parse_args(ARGS)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(bs, "BANDWIDTH_BYTES", 2**22)  # small: the test is about what is measured, not how fast
        result, rows = bs.run(args)
    return args, json.loads(json.dumps(result)), rows, out.getvalue()


def declaration(name, d):
    e = methods.METHODS[name]
    return e.family, methods.settings(name, d), e.fitted_on, e.quantizer


def table(printed: str, title: str) -> dict[str, dict[str, str]]:
    """The printed github table after the line starting with `title`: row name -> {header: cell}."""
    lines = printed[printed.index(title):].splitlines()[1:]
    split = lambda line: [cell.strip() for cell in line.strip("|").split("|")]  # noqa: E731
    header, body = split(lines[0]), []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        body.append(split(line))
    return {cells[0]: dict(zip(header, cells)) for cells in body}


def test_json_keys_and_best_configurations(bench):
    args, result, _, _ = bench
    assert set(result) == {"n", "dim", "top", "queries", "train", "bandwidth_gbs", "reference", "skipped", "seconds",
                           "rows"}
    assert (result["n"], result["dim"], result["reference"]) == (1100, 64, "float")
    configs = {bs.config_name(t) for t in (1, bs.THREADS)}
    for name, row in result["rows"].items():
        assert set(row) == {"method", "mode", "rerank_k", "bytes", "reads", "floor_ms", "configs", "single_config",
                            "single_ms", "batch_config", "batch_s", "single_calls", "queries_timed", "fit_s",
                            "build_s"}, name
        assert set(row["configs"]) == configs, name
        p50 = {c: times["p50_ms"] for c, times in row["configs"].items()}
        batch = {c: times["batch_s"] for c, times in row["configs"].items()}
        assert row["single_config"] == min(p50, key=p50.get) and row["single_ms"] == min(p50.values()) > 0, name
        assert row["batch_config"] == min(batch, key=batch.get) and row["batch_s"] == min(batch.values()) > 0, name
        assert row["floor_ms"] == pytest.approx(1000 * row["reads"] / (result["bandwidth_gbs"][str(bs.THREADS)] * 1e9))
        assert 1 <= row["single_calls"] <= args.single and 1 <= row["queries_timed"] <= args.queries


def test_every_registry_row_is_benchmarked(bench):
    args, result, _, _ = bench
    d, depths = args.dim, [10, 20]
    twins = {name: reason.removeprefix("the same search as ") for name, reason in result["skipped"].items()
             if reason.startswith("the same search as ")}
    expected = set()
    for name in methods.METHODS:
        if methods.applies(name, d) is not None:
            assert name in result["skipped"], name
        elif name in twins:  # skipped only as a repeat of a method that is benchmarked
            assert declaration(name, d) == declaration(twins[name], d) and twins[name] not in twins, name
        else:
            for mode in methods.modes_of(name, d):
                expected |= {(name, mode, k) for k in (depths if mode.startswith("rerank") else [None])}
    got = {(row["method"], row["mode"], row["rerank_k"]) for row in result["rows"].values()}
    assert got == expected
    timed = sorted({name for name, _, _ in got})
    assert len({repr(declaration(name, d)) for name in timed}) == len(timed)  # no search timed twice (float_adapted)
    assert "float_adapted" in twins


def test_methods_are_fitted_as_the_training_command_fits_them(bench):
    """A method fitted on texts is fitted on the sample; a learned one as its family fits it, where its training
    starts: thresholds as constructed (their fit learns nothing), codebooks by k-means; one fitted on nothing as built."""
    args, _, rows, _ = bench
    for row in rows:
        fresh, state = methods.make_method(row["method"], args.dim).state(), row["index"].method.state()
        same = state.keys() == fresh.keys() and all(np.array_equal(state[k], fresh[k]) for k in state)
        assert same == (not fit_learns(row["method"], args.dim)), row["row"]


def fit_learns(name: str, d: int) -> bool:
    """Whether the method's own fit, on other data (seeded unit vectors), changes its state: k-means, quantiles and
    PCA do; one-bit thresholds (learned only by training) and a method fitted on nothing do not."""
    if methods.entry(name).fitted_on == "nothing":
        return False
    x = np.random.default_rng(1).standard_normal((2000, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fresh, method = methods.make_method(name, d), methods.make_method(name, d)
    with methods.one_faiss_thread():
        method.fit(x)
    state, before = method.state(), fresh.state()
    return state.keys() != before.keys() or not all(np.array_equal(state[k], before[k]) for k in state)


def test_bytes_per_vector_are_the_registrys_and_the_built_rows(bench):
    args, result, rows, printed = bench
    best = table(printed, "Each row's best configuration")
    assert set(best) == {row["row"] for row in rows}
    for row in rows:
        stored = row["index"].stored
        declared = methods.row_bytes(row["method"], args.dim, row["mode"])
        assert int(best[row["row"]]["bytes/vec"].replace(",", "")) == result["rows"][row["row"]]["bytes"] == declared
        assert methods.stored_bytes(stored) == args.n * declared, row["row"]
        if "rerank" in stored:  # every document's codes, then k rows of the re-ranker's documents
            reads = stored["index"].code_size * args.n + row["k"] * stored["rerank"].nbytes // args.n
        else:
            reads = methods.stored_bytes(stored)
        assert result["rows"][row["row"]]["reads"] == reads, row["row"]


def test_bandwidth_is_measured_per_thread_count(bench):
    _, result, _, _ = bench
    assert set(result["bandwidth_gbs"]) == {"1", str(bs.THREADS)}
    assert all(gbs > 0 for gbs in result["bandwidth_gbs"].values())
    for threads in (1, 2):
        seen = []

        def read(part):
            seen.append((threading.get_ident(), part.size))
            return part.max()

        assert bs.read_bandwidth(threads, 2**22, 3, read=read) > 0
        assert len({ident for ident, _ in seen}) == threads  # each pass: one slice per thread
        assert len(seen) == 3 * threads
        assert sum(size for _, size in seen[:threads]) == 2**22 // 4  # the slices cover the array


def test_timed_search_is_the_evaluations_rank(bench):
    """The benchmark times what the table reports: each row's timed search ranks as methods.rank does (a fresh
    MethodIndex of the same fitted method, the evaluation's code path) on the same documents and queries."""
    args, _, rows, _ = bench
    docs, queries = bs.load_data(args.n, args.dim, max(args.queries, args.single), args.seed)
    ids = list(range(args.n))
    with methods.one_faiss_thread():
        for row in rows:
            index = row["index"]
            reranker = index.reranker.method if index.reranker is not None else None  # the re-ranker itself
            ranking = methods.rank(index.method, row["mode"], docs, queries, ids, list(range(len(queries))), top=bs.TOP,
                                   rerank_k=row["k"] or methods.RERANK_K, reranker=reranker)
            _, timed = bs.search(row, queries)
            np.testing.assert_array_equal(timed, [list(ranking[q]) for q in range(len(queries))], err_msg=row["row"])


def bench_command(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench_search.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_command_line_ends_with_one_json_line():
    proc = bench_command("--n", "1000", "--dim", "64", "--methods", "stage1_zero", "int8", "pq1.67b", "--rerank-depths", "10",
                         "50", "--queries", "10", "--single", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # 1,024 centroids per sub-quantiser from 1,000 documents: one line, and the other rows are timed
    assert "pq1.67b: skipped, cannot be fitted on 1,000 documents" in proc.stdout
    assert result["skipped"]["pq1.67b"].startswith("cannot be fitted") and not any(r.startswith("pq1.67b") for r in result["rows"])
    assert {"float", "stage1_zero", "stage1_zero+rerank_int8 k=50", "int8+asym"} <= set(result["rows"])  # float: always
    assert "| stage1_zero+rerank k=10 " in proc.stdout and "building rows" in proc.stderr  # the table, the progress bar


BAD_INPUT = {  # small runs: were a check gone, the run would be short and end with exit 0 or a traceback
    "n": ["--n", "15"],
    "depth": ["--n", "300", "--dim", "64", "--methods", "float", "--rerank-depths", "5"],
    "method": ["--n", "300", "--methods", "float", "nope"],
    "npz": ["--n", "300", "--embeddings", "NPZ"],
    "depth above n": ["--n", "300", "--dim", "64", "--methods", "float", "--rerank-depths", "400"],
    "not a number": ["--n", "abc"],
}


@pytest.mark.slow
@pytest.mark.parametrize("args", BAD_INPUT.values(), ids=BAD_INPUT)
def test_bad_input_is_one_error_line(args, tmp_path):
    np.savez(tmp_path / "emb.npz", x=np.ones((400, 384), np.float32))
    proc = bench_command(*[str(tmp_path / "emb.npz") if a == "NPZ" else a for a in args])
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if args == ["--n", "15"]:  # --n is what is wrong, not the default depths (200 > 15)
        assert proc.stderr.startswith("error: --n must be at least"), proc.stderr
