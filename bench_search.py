"""Search benchmark: every row of the registry (methods.METHODS, each method in each search mode), timed through the
evaluation's own search, methods.MethodIndex, against the machine's memory bandwidth.

Each registry method that applies at the dimension is built with methods.make_method, fitted on a sample of the
documents when its entry is fitted on texts (one faiss thread, as the training command fits), and added with
MethodIndex(method, mode, rerank_k, reranker).add_documents: the rows the evaluation reports, searched by the code
it searches with. Learned methods (fitted_on "training") run as their family fits them, where their training starts
(thresholds as constructed: zero, identity rotation, evenly spaced levels; codebooks by k-means); their search does the
same work whatever the learned values, so the timing holds for trained ones.
A re-ranking mode is timed at each --rerank-depths k (the depth study); its rows share one build, which does not depend
on k. A re-ranking mode gathers from its re-ranker (methods.MODES), fitted like the evaluation's. float_adapted is skipped: the same
declaration as float (a registry method that repeats an earlier one's family, settings and fitting is timed once).

Every row is timed with faiss (OpenMP) and BLAS on 1 thread and on all of them; each row's best configuration is
compared against float's best, for one query (p50 of --single calls, which take turns: query i on every row and
configuration, then i + 1, so a slow spell of this shared machine falls on all alike) and for one batch of --queries.
The same run measures memory read bandwidth per thread count, and gives each row its floor: the bytes one query must
read (methods.row_bytes for every document; for a re-ranking row the scanned codes of every document plus k rows of
its re-ranker's documents) divided by the all-thread bandwidth. Exhaustive search of many vectors is bound by memory,
so the floor is the limit a time should be read against. All top-10. The last line of stdout is JSON.

Rows that scan every code once per query (faiss's PQ, scalar-quantiser, RaBitQ and binary scanners; the asym rows
of threshold codes are a faiss PQ scan too, methods.ThresholdCodes.adc_index) are timed on a batch of SCAN_QUERIES
and scaled to --queries (marked *); flat float and fast-scan indexes, which faiss batches, on all of them. A slow row
gets fewer one-query calls (it stops taking turns after SINGLE_SECONDS and at least MIN_SINGLE calls). At N =
1,000,000 the OPQ fits take minutes: the output says per row how long its fit and build took, and --methods times a
subset. Memory at N = 1,000,000, d = 384: the rows hold about 13 GB (float's matrix and index
3 GB, the two casts 1.5 GB; the re-ranking rows share the float matrix and one int8 store), plus about 6 GB for a
moment while threshold codes are built (methods.levels_of) or PQ with 16-dimension sub-vectors encodes (faiss's
distance tables): about 19 GB at most, estimated from a run at 200,000, which peaked at 6.4 GB.

    python bench_search.py                         # 1,000,000 random unit vectors, dimension 384, every method
    python bench_search.py --n 20000               # a quick run
    python bench_search.py --methods float stage1_zero int8 --rerank-depths 50
    python bench_search.py --embeddings emb.npy    # cached float embeddings (float32 .npy, one row per vector)
"""

import argparse
import copy
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
from tabulate import tabulate
from threadpoolctl import ThreadpoolController
from tqdm import tqdm

import fitting
import methods
from data import UsageError

# defaults (override on the command line)
N = 1_000_000
DIM = 384
QUERIES = 1000  # batch size of the throughput measurement
SINGLE = 20  # one-query calls per row and configuration for the p50 latency
SEED = 0
TOP = 10
MIN_N = 256  # PQ fits 256 centroids per sub-quantiser on the sample
TRAIN = 50_000  # sampled documents the text-fitted methods are fitted on
SCAN_QUERIES = 50  # batch of the rows that scan every code once per query, scaled to --queries
SINGLE_SECONDS = 10.0  # a slow row's one-query calls stop after this much time per configuration...
MIN_SINGLE = 3  # ...and at least this many calls
CHUNK = 100_000  # rows per step when generating and normalising: no big temporaries
THREADS = faiss.omp_get_max_threads()  # "all threads": one per core unless OMP_NUM_THREADS says otherwise
BANDWIDTH_BYTES = 2**30  # the array the bandwidth is measured on: far larger than the caches
BANDWIDTH_REPEATS = 5
QUERY_NOISE = 0.01  # --embeddings: per-component noise on sampled rows, so a query is near its document, not equal
BLAS = ThreadpoolController()  # numpy's OpenBLAS keeps its own threads: the numpy scans follow the configuration too


# ---------------------------------------------------------------------------------------------------------------
# data


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Scale each row of a float32 matrix to unit length, in place, a chunk at a time."""
    for s in range(0, len(x), CHUNK):
        x[s : s + CHUNK] /= np.maximum(np.linalg.norm(x[s : s + CHUNK], axis=1, keepdims=True), 1e-12)
    return x


def random_unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, CHUNK):  # drawn straight as float32: no float64 copy of the whole matrix
        x[s : s + CHUNK] = rng.standard_normal((min(CHUNK, n - s), dim), dtype=np.float32)
    return normalise_rows(x)


def open_embeddings(path: Path, n: int, dim: int) -> np.ndarray:
    """The .npy matrix at `path`, memory-mapped and checked (before anything slow runs)."""
    if not path.is_file():
        raise UsageError(f"embeddings file not found: {path}")
    try:
        source = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        raise UsageError(f"{path} is not a .npy matrix numpy can read without pickle") from None
    if not isinstance(source, np.ndarray):  # an .npz archive: several arrays, not one matrix
        raise UsageError(f"{path} is an .npz archive, not one .npy matrix")
    if source.ndim != 2 or source.shape[1] != dim:
        raise UsageError(f"{path} has shape {source.shape}, want (rows, {dim}); set --dim to match")
    if n > len(source):
        raise UsageError(f"--n {n:,} is more than the {len(source):,} rows in {path}")
    return source


def load_data(n: int, dim: int, queries: int, seed: int, embeddings: Path | None = None):
    """Documents (n, dim) and queries (queries, dim), unit float32: random, or the first n rows of a .npy file."""
    rng = np.random.default_rng(seed)
    if embeddings is None:
        return random_unit_vectors(n, dim, rng), random_unit_vectors(queries, dim, rng)
    docs = normalise_rows(np.array(open_embeddings(embeddings, n, dim)[:n], dtype=np.float32))
    # queries: sampled documents plus noise, so each has a true near neighbour as real queries do
    q = docs[rng.integers(0, n, queries)] + QUERY_NOISE * rng.standard_normal((queries, dim), dtype=np.float32)
    return docs, normalise_rows(q)


def read_bandwidth(threads: int, nbytes: int, repeats: int, read=np.max) -> float:
    """GB/s at which `threads` cores read memory: the best of `repeats` passes of `read` (numpy max, the fastest
    reduction here; about 3x faster on an array that fits in cache, so this is memory's speed) over a float32 array
    of `nbytes`, each thread over its own slice (numpy releases the GIL). A barrier starts each pass's slices together,
    so they run at once on `threads` threads of the pool, never one after the other on one."""
    parts = np.array_split(np.ones(nbytes // 4, dtype=np.float32), threads)
    best = np.inf
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            barrier = threading.Barrier(threads)

            def read_together(part, barrier=barrier):
                barrier.wait()
                return read(part)

            start = time.perf_counter()
            list(pool.map(read_together, parts))
            best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# the rows


def same_as(name: str, d: int) -> str | None:
    """The earlier registry method whose search `name` repeats (same family, settings and fitting), or None.
    float_adapted is float under another protocol's name."""
    e = methods.entry(name)
    for other, o in methods.METHODS.items():
        if other == name:
            return None
        same = (o.family, o.fitted_on, o.quantizer) == (e.family, e.fitted_on, e.quantizer)
        if same and methods.settings(other, d) == methods.settings(name, d):
            return other
    return None


def plan_rows(names: list[str], d: int, depths: list[int]) -> tuple[list[dict], dict[str, str]]:
    """The rows to time, in registry order: each method in each of its modes, a re-ranking mode once per depth; and
    the methods skipped, with why. Static: nothing is built."""
    rows, skipped = [], {}
    for name in methods.METHODS:
        if name not in names:
            continue
        if reason := methods.applies(name, d):
            skipped[name] = f"does not apply at dimension {d} ({reason})"
        elif twin := same_as(name, d):
            skipped[name] = f"the same search as {twin}"
        else:
            for mode in methods.modes_of(name, d):
                for k in depths if methods.MODES[mode].reranker else [None]:
                    rows.append(dict(row=methods.row_name(name, mode, d) + (f" k={k}" if k else ""), method=name, mode=mode, k=k))
    return rows, skipped


def fitted(name: str, d: int, sample: np.ndarray):
    """The registry method fitted on `sample` as the training command fits it (a learned method: as its family fits
    it, where its training starts: its search does the same work whatever the learned values)."""
    return fitting.fit(name, sample) if methods.entry(name).fitted_on != "nothing" else methods.make_method(name, d)


class SharedCodes:
    """A re-ranker of the re-ranking rows, encoding the documents once: every such row's build asks for the same
    codes (int8: 384 MB at 1M, d = 384), so they share one array. Everything else is the re-ranker's own."""

    def __init__(self, method, docs: np.ndarray):
        self.method, self.docs, self.codes = method, docs, None

    def encode(self, x: np.ndarray) -> np.ndarray:
        if x is not self.docs:
            return self.method.encode(x)
        if self.codes is None:
            self.codes = self.method.encode(x)
        return self.codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.method.decode(codes)


def query_bytes(name: str, d: int, mode: str, n: int, k: int | None) -> int:
    """Bytes one query must read: every document's row; for a re-ranking row, every document's codes and k rows of
    its re-rank store."""
    row, reranker = methods.row_bytes(name, d, mode), methods.MODES[mode].reranker
    if reranker is None:
        return n * row
    store = methods.row_bytes(reranker, d, methods.own_mode(reranker, d))
    return n * (row - store) + min(k, n) * store


def build_rows(rows: list[dict], docs: np.ndarray, seed: int, skipped: dict[str, str]) -> list[dict]:
    """Fit each method (once) and build each row through MethodIndex.add_documents; the depths of a re-ranking row
    share one build. Adds per row: index, bytes, reads, fit_s (its method's), build_s. A method that cannot be fitted
    on the sample (e.g. more centroids than documents) is one line and joins `skipped`. Returns the rows built."""
    n, d = docs.shape
    sample = docs[np.sort(np.random.default_rng(seed).choice(n, min(TRAIN, n), replace=False))]
    fits, builds, rerankers, built = {}, {}, {}, []
    bar = tqdm(rows, desc="building rows", unit=" rows", file=sys.stderr)
    for row in bar:
        name, mode = row["method"], row["mode"]
        bar.set_postfix_str(row["row"])
        if name in skipped:
            continue
        if name not in fits:
            start = time.perf_counter()
            try:
                fits[name] = (fitted(name, d, sample), time.perf_counter() - start)
            except UsageError as e:  # faiss refused: as the training command says it
                skipped[name] = str(e).removeprefix(f"{name}: ").replace(" texts (", " documents (")
                tqdm.write(f"{name}: skipped, {skipped[name]}")
                continue
        if (reranker := methods.MODES[mode].reranker) and reranker not in rerankers:
            rerankers[reranker] = SharedCodes(fitted(reranker, d, sample), docs)
        if (name, mode) not in builds:
            start = time.perf_counter()
            index = methods.MethodIndex(fits[name][0], mode, row["k"] or methods.RERANK_K, rerankers.get(reranker))
            index.add_documents(docs)
            builds[name, mode] = (index, time.perf_counter() - start)
        index = copy.copy(builds[name, mode][0])  # shares the stored documents; only rerank_k differs
        index.rerank_k = row["k"] or methods.RERANK_K
        row |= dict(index=index, bytes=methods.row_bytes(name, d, mode), reads=query_bytes(name, d, mode, n, row["k"]),
                    fit_s=fits[name][1], build_s=builds[name, mode][1])
        built.append(row)
    return built


# ---------------------------------------------------------------------------------------------------------------
# timing


def search(row: dict, queries: np.ndarray):
    """What is timed: the row's MethodIndex.search, as the evaluation calls it."""
    return row["index"].search(queries, TOP)


def batched(row: dict) -> bool:
    """Whether faiss batches the row's queries: a flat float index (one matrix product) or a fast-scan index (blocks of
    queries share each code read). Every other row scans every code once per query."""
    return isinstance(row["index"].stored.get("index"), (faiss.IndexFlat, faiss.IndexFastScan))


def config_name(threads: int) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}"


def use_threads(threads: int) -> None:
    faiss.omp_set_num_threads(threads)
    BLAS.limit(limits=threads, user_api="blas")


def seconds(row: dict, queries: np.ndarray, threads: int) -> float:
    use_threads(threads)
    start = time.perf_counter()
    search(row, queries)
    return time.perf_counter() - start


def time_rows(rows: list[dict], queries: np.ndarray, thread_counts: list[int], single: int, batch: int) -> None:
    """Per row and thread count: p50 ms of one-query calls and seconds for a batch of `batch` queries. Adds per row
    configs {name: (p50 ms, batch seconds)}, calls (one-query calls per configuration) and timed (batch queries timed;
    fewer than `batch` are scaled).

    One warm-up call each; then the one-query calls take turns (query i on every row and configuration, then query
    i + 1), a row dropping out once it has had MIN_SINGLE calls and SINGLE_SECONDS; then the batches."""
    pairs = [(row, t) for row in rows for t in thread_counts]
    bar = tqdm(total=(2 + single) * len(pairs), desc="timing rows", unit=" calls", file=sys.stderr)
    for row, t in pairs:
        seconds(row, queries[:1], t)
        bar.update()
    times = [[] for _ in pairs]
    for i in range(single):
        for j, (row, t) in enumerate(pairs):
            if i < MIN_SINGLE or sum(times[j]) < SINGLE_SECONDS:
                times[j].append(seconds(row, queries[i : i + 1], t))
            bar.update()
    for j, (row, t) in enumerate(pairs):
        row["timed"] = batch if batched(row) else min(batch, SCAN_QUERIES)
        row["calls"] = len(times[j])
        row.setdefault("configs", {})[config_name(t)] = (
            1000 * float(np.median(times[j])), seconds(row, queries[: row["timed"]], t) * batch / row["timed"])
        bar.update()
    bar.close()
    use_threads(THREADS)


# ---------------------------------------------------------------------------------------------------------------
# report


def best(row: dict) -> tuple[str, float, str, float]:
    """The row's best configuration for one query and for the batch: (name, p50 ms, name, batch seconds)."""
    single = min(row["configs"], key=lambda c: row["configs"][c][0])
    batch = min(row["configs"], key=lambda c: row["configs"][c][1])
    return single, row["configs"][single][0], batch, row["configs"][batch][1]


def print_tables(rows: list[dict], n: int, queries: int, bandwidth_gbs: float) -> None:
    """Every configuration's times, each row's best against float's best, and what each row's fit and build took."""
    names = list(rows[0]["configs"])
    for title, column in [("one query: p50 ms", 0), (f"batch: seconds per {queries:,} queries (* scaled)", 1)]:
        print(f"\nEvery configuration, {title}")
        print(tabulate([[r["row"]] + [times[column] for times in r["configs"].values()] for r in rows],
                       ["row"] + names, floatfmt=".3g", tablefmt="github"))
    _, float_ms, _, float_s = best(rows[0])
    table = []
    for r in rows:
        single_config, single_ms, batch_config, batch_s = best(r)
        floor_ms = 1000 * r["reads"] / (bandwidth_gbs * 1e9)
        table.append([r["row"], r["bytes"], n * r["bytes"] / 2**20, r["reads"] / 1e6, floor_ms, single_config,
                      r["calls"], single_ms, single_ms / floor_ms, float_ms / single_ms, batch_config,
                      f"{r['timed']:,}" + ("*" if r["timed"] < queries else ""), batch_s, queries / batch_s,
                      float_s / batch_s])
    print(f"\nEach row's best configuration against float's best (floor: MB read per query / {bandwidth_gbs:.1f} "
          f"GB/s):")
    print(tabulate(table, tablefmt="github", intfmt=",", colalign=["left"] + ["right"] * 14,
                   floatfmt=["", "", ".1f", ".3g", ".3g", "", "", ".3g", ".2f", ".2f", "", "", ".3g", ",.0f", ".2f"],
                   headers=["row", "bytes/vec", "MiB", "MB read/query", "floor ms", "one query: best", "calls",
                            "p50 ms", "x floor", "speed-up", "batch: best", "queries timed", f"s / {queries:,} q",
                            "queries/s", "speed-up"]))
    builds = {}
    for r in rows:
        builds.setdefault(r["row"].split(" k=")[0], (r["fit_s"], r["build_s"]))
    print("\nWhat each row took to build (fit: its method's, once, on one faiss thread; add_documents: all documents):")
    print(tabulate([[row, fit, build] for row, (fit, build) in builds.items()], ["row", "fit s", "add_documents s"],
                   floatfmt=".2f", tablefmt="github"))


def summary(rows: list[dict], args, bandwidth: dict, skipped: dict, seconds_total: float) -> dict:
    """The JSON line: the run's settings, the bandwidth per thread count, and per row its bytes, floor, times in every
    configuration and best configurations."""
    result = dict(n=args.n, dim=args.dim, top=TOP, queries=args.queries, train=min(TRAIN, args.n),
                  bandwidth_gbs={str(t): gbs for t, gbs in bandwidth.items()}, reference=rows[0]["row"],
                  skipped=skipped, seconds=seconds_total, rows={})
    for r in rows:
        single_config, single_ms, batch_config, batch_s = best(r)
        result["rows"][r["row"]] = dict(
            method=r["method"], mode=r["mode"], rerank_k=r["k"], bytes=r["bytes"], reads=r["reads"],
            floor_ms=1000 * r["reads"] / (bandwidth[THREADS] * 1e9),
            configs={c: dict(p50_ms=ms, batch_s=s) for c, (ms, s) in r["configs"].items()},
            single_config=single_config, single_ms=single_ms, batch_config=batch_config, batch_s=batch_s,
            single_calls=r["calls"], queries_timed=r["timed"], fit_s=r["fit_s"], build_s=r["build_s"])
    return result


# ---------------------------------------------------------------------------------------------------------------
# the command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--n", type=int, default=N, help="number of document vectors")
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--methods", nargs="+", default=list(methods.METHODS), choices=list(methods.METHODS),
                   metavar="METHOD", help="registry names (default: all; float is always timed, as the reference)")
    p.add_argument("--rerank-depths", nargs="+", type=int, default=list(methods.RERANK_DEPTHS),
                   help="depths k the re-ranking rows are timed at (first-stage candidates re-ranked)")
    p.add_argument("--queries", type=int, default=QUERIES, help="batch size of the throughput measurement")
    p.add_argument("--single", type=int, default=SINGLE, help="one-query calls per row and configuration (p50)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--embeddings", type=Path, help="float .npy matrix to use instead of random vectors")
    args = p.parse_args(argv)
    for bad, message in [  # --n first: `--n 15` alone is about --n, not about the default --rerank-depths
            (args.n < MIN_N, f"--n must be at least {MIN_N} (PQ fits {MIN_N} centroids on the documents), got "
                             f"{args.n}"),
            (args.dim < 1, f"--dim must be positive, got {args.dim}"),
            (min(args.rerank_depths) < TOP, f"--rerank-depths must be at least {TOP} (top-{TOP} is re-ranked), got "
                                            f"{min(args.rerank_depths)}"),
            (max(args.rerank_depths) > args.n, f"--rerank-depths {max(args.rerank_depths)} is more than --n {args.n}"),
            (args.queries < 1 or args.single < 1, f"--queries and --single must be positive, got {args.queries}, "
                                                  f"{args.single}")]:
        if bad:
            p.error(message)
    args.rerank_depths = sorted(set(args.rerank_depths))
    args.methods = ["float"] + [m for m in args.methods if m != "float"]  # the reference, always
    return args


def run(args) -> tuple[dict, list[dict]]:
    """Check the input, measure the bandwidth, build every row, time each configuration, print the tables, and return
    the summary that becomes the JSON line, and the rows (each with its MethodIndex)."""
    start = time.perf_counter()
    if args.embeddings is not None:
        open_embeddings(args.embeddings, args.n, args.dim)  # a bad file is one line now, not after the bandwidth
    rows, skipped = plan_rows(args.methods, args.dim, args.rerank_depths)
    for name, reason in skipped.items():
        print(f"{name}: skipped, {reason}")
    thread_counts = list(dict.fromkeys([1, THREADS]))
    bandwidth = {t: read_bandwidth(t, BANDWIDTH_BYTES, BANDWIDTH_REPEATS) for t in thread_counts}  # before the data
    docs, queries = load_data(args.n, args.dim, max(args.queries, args.single), args.seed, args.embeddings)
    rows = build_rows(rows, docs, args.seed, skipped)
    time_rows(rows, queries, thread_counts, args.single, args.queries)
    data = f"embeddings {args.embeddings}" if args.embeddings else f"random unit vectors (seed {args.seed})"
    learned = [m for m in dict.fromkeys(r["method"] for r in rows) if methods.entry(m).fitted_on == "training"]
    print(f"{args.n:,} vectors, dim {args.dim}, {data}; {len(rows)} rows, top-{TOP}, through "
          f"methods.MethodIndex.search. "
          f"One query: p50 of up to {args.single} calls per configuration (fewer for slow rows: 'calls'). Batch: "
          f"{args.queries:,} queries ({SCAN_QUERIES} for rows that scan every code once per query, scaled: *). "
          f"Fitted on {min(TRAIN, args.n):,} of the documents. Memory read bandwidth "
          + ", ".join(f"{config_name(t)} {gbs:.1f} GB/s" for t, gbs in bandwidth.items())
          + f"; floor = bytes read per query / {bandwidth[THREADS]:.1f} GB/s. Configurations: faiss and BLAS threads. "
          + (f"Learned methods ({', '.join(learned)}) where their training starts (thresholds as constructed, "
             f"codebooks by k-means): timing does not depend on the learned values. " if learned else "")
          + "Wall-clock times on this machine.")
    print_tables(rows, args.n, args.queries, bandwidth[THREADS])
    seconds_total = time.perf_counter() - start
    print(f"\nwhole run {seconds_total:.0f} s")
    return summary(rows, args, bandwidth, skipped, seconds_total), rows


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        result, _ = run(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
