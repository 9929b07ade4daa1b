"""Search benchmark: float32 exact search vs packed binary codes (Stage 1, Stage 2), binary + rescoring, and the
compressed families faiss has (int8 / int4 scalar quantisation, PQ, PQ fast scan, RaBitQ, RaBitQ fast scan).

Every method is timed in every configuration a user could pick: one index or shards (one index per core, searched
at once and merged), each with 1 OpenMP thread or all of them. Each method's best configuration is compared against
float's best, for one query (p50) and for a batch. The same run measures the machine's memory read bandwidth and
gives each method its floor: the bytes one query must read divided by the all-core bandwidth. Exhaustive search over
many vectors is bound by memory, so the floor is the physical limit a time should be read against. All top-10. The
last line of stdout is JSON: per method its best configuration's times, plus the bandwidth and two floors.

    python bench_search.py                        # 1,000,000 random unit vectors, dimension 384
    python bench_search.py --n 20000              # a quick run
    python bench_search.py --embeddings emb.npy   # cached float embeddings (float32 .npy, one row per vector)
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
from tabulate import tabulate

from data import UsageError
from methods import BinaryCodes, build_binary_index, rescore_search
from quantization_modules import QuantizationModuleStage1, QuantizationModuleStage2

# defaults (override on the command line)
N = 1_000_000
DIM = 384
QUERIES = 1000  # batch size of the throughput measurement: one search call with all of them
SINGLE = 20  # one-query search calls per configuration for the p50 latency
RESCORE_K = 50  # Hamming candidates re-ranked by float (or int8) dot product
SEED = 0
TOP = 10
CHUNK = 100_000  # rows per step when generating, normalising and quantising: no big temporaries
THREADS = faiss.omp_get_max_threads()  # "all threads": faiss's default, one per core unless OMP_NUM_THREADS says
SHARDS = THREADS  # the second layout: one shard per core; --shards 1 times one index only
TRAIN = 50_000  # sample the trained families (scalar quantisers, PQ, RaBitQ) are trained on
SCAN_QUERIES = 50  # batch of the families whose faiss search scans every code once per query: scaled to --queries
BANDWIDTH_BYTES = 2**30  # the array the bandwidth is measured on: far larger than the caches
BANDWIDTH_REPEATS = 5
QUERY_NOISE = 0.01  # --embeddings: per-component noise on sampled rows, so a query is near its document, not equal
IP = faiss.METRIC_INNER_PRODUCT

# the faiss families: key -> (table name, index over float vectors, batched). Not batched: faiss scans all codes once
# per query, so the batch time is linear in queries and is timed on SCAN_QUERIES of them.
FAMILIES = {
    "int8": ("int8 IndexScalarQuantizer", lambda d: faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, IP),
             False),
    "int4": ("int4 IndexScalarQuantizer", lambda d: faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_4bit, IP),
             False),
    "pq": ("PQ 8-bit IndexPQ", lambda d: faiss.IndexPQ(d, d // 8, 8, IP), False),  # d / 8 bytes, as binary
    "pq_fastscan": ("PQ 4-bit IndexPQFastScan", lambda d: faiss.IndexPQFastScan(d, d // 4, 4, IP), True),
    "rabitq": ("RaBitQ IndexRaBitQ", lambda d: faiss.IndexRaBitQ(d, IP), False),
    "rabitq_fastscan": ("RaBitQ IndexRaBitQFastScan", lambda d: faiss.IndexRaBitQFastScan(d, IP), True),
}


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


def load_data(n: int, dim: int, queries: int, seed: int, embeddings=None) -> tuple[np.ndarray, np.ndarray]:
    """Documents (n, dim) and queries (queries, dim), unit float32: random, or the first n rows of a .npy file."""
    rng = np.random.default_rng(seed)
    if embeddings is None:
        return random_unit_vectors(n, dim, rng), random_unit_vectors(queries, dim, rng)
    path = Path(embeddings)
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
    docs = normalise_rows(np.array(source[:n], dtype=np.float32))
    # queries: sampled documents plus noise, so each has a true near neighbour as real queries do
    q = docs[rng.integers(0, n, queries)] + QUERY_NOISE * rng.standard_normal((queries, dim), dtype=np.float32)
    return docs, normalise_rows(q)


def read_bandwidth(threads: int, nbytes: int, repeats: int) -> float:
    """GB/s at which `threads` cores read memory: the best of `repeats` max-reductions of a float32 array of `nbytes`
    (far larger than the caches), each thread over its own slice (numpy releases the GIL). Max is the fastest numpy
    reduction here (sum is slower) and runs about 3x faster on an array that fits in cache: this is memory's speed."""
    parts = np.array_split(np.ones(nbytes // 4, dtype=np.float32), threads)
    best = np.inf
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def encode(quantizer, x: np.ndarray) -> np.ndarray:
    """Packed codes of float vectors from one of the project's quantisers, through the registry's BinaryCodes.encode:
    the evaluation's and load_encoder's own quantise-then-pack, in chunks."""
    method = BinaryCodes(x.shape[1], quantizer)
    return np.concatenate([method.encode(x[s : s + CHUNK]) for s in range(0, len(x), CHUNK)])


def float_index(docs: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    return index


def trained_family(key: str, docs: np.ndarray, rng: np.random.Generator):
    """An empty faiss index of family `key`, trained on a sample of TRAIN documents."""
    index = FAMILIES[key][1](docs.shape[1])
    faiss.omp_set_num_threads(1)  # k-means ran 2-12x slower on two threads than on one while other jobs used the cores
    index.train(docs[np.sort(rng.choice(len(docs), min(TRAIN, len(docs)), replace=False))])
    faiss.omp_set_num_threads(THREADS)
    return index


def filled(trained, rows: np.ndarray):
    """A copy of a trained, empty faiss index with `rows` added (serialised and read back: clone_index cannot copy
    every family)."""
    index = faiss.deserialize_index(faiss.serialize_index(trained))
    index.add(rows)
    return index


class Shards:
    """Indexes over consecutive row ranges, searched at once (one thread each) and merged by faiss: same results and
    memory as one index. faiss.IndexShards does this too, but its worker threads keep OpenMP's default thread count
    whatever the caller set with omp_set_num_threads, so "shards, 1 thread each" cannot be asked of it. Here each
    shard's search runs with the caller's setting; a test checks the results against faiss.IndexShards.

    Shard 0 runs in the calling thread, shard j in a thread of its own pinned to the j-th CPU: when other jobs keep
    every core busy, an unpinned thread woke on the caller's core and one float query took 124 ms instead of 78."""

    def __init__(self, parts: list):
        self.parts, self.ntotal = parts, sum(part.ntotal for part in parts)
        self.offsets = np.cumsum([0] + [part.ntotal for part in parts[:-1]])
        self.keep_max = not isinstance(parts[0], faiss.IndexBinary)  # similarity: larger is better; Hamming: smaller
        cpus = sorted(os.sched_getaffinity(0))
        self.threads = [ThreadPoolExecutor(1, initializer=os.sched_setaffinity, initargs=(0, {cpus[j % len(cpus)]}))
                        for j in range(1, len(parts))]

    def search(self, x: np.ndarray, k: int):
        threads = faiss.omp_get_max_threads()  # per thread in OpenMP: pass the caller's on

        def one(part):
            faiss.omp_set_num_threads(threads)
            return part.search(x, k)

        others = [thread.submit(one, part) for thread, part in zip(self.threads, self.parts[1:])]
        results = [self.parts[0].search(x, k)] + [future.result() for future in others]
        distances = np.stack([d for d, _ in results])
        ids = np.stack([np.where(i >= 0, i + offset, -1) for (_, i), offset in zip(results, self.offsets)])
        return faiss.merge_knn_results(distances, ids, keep_max=self.keep_max)


def sharded(build, rows: np.ndarray, shards: int):
    """`build(rows)` as one index, or split into `shards` searched at once."""
    parts = [build(part) for part in np.array_split(rows, shards)]
    return parts[0] if shards == 1 else Shards(parts)


def decoded_rows(codec, codes: np.ndarray):
    """The rows rescore_search gathers, from a faiss codec's codes: ids (q, k) -> decoded float32 (q, k, d)."""
    return lambda ids: codec.sa_decode(codes[ids.ravel()]).reshape(*ids.shape, codec.d)


def config_name(shards: int, threads: int) -> str:
    plural = "s" if threads > 1 else ""
    return f"1 index, {threads} thread{plural}" if shards == 1 else f"{shards} shards, {threads} thread{plural} each"


def seconds(search, rows: slice, threads: int) -> float:
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    search(rows)
    return time.perf_counter() - start


def time_searches(searches: list, single: int, batch_sizes: list) -> list[tuple[float, float]]:
    """Per (search, threads): p50 ms over `single` one-query calls, and seconds for one call with its batch size.

    The one-query calls take turns (query i on every method and configuration, then query i + 1), after one warm-up
    call each, so a slow spell of this shared machine, or the after-effects of the search timed before, falls on all
    alike.
    """
    for search, threads in searches:
        seconds(search, slice(0, 1), threads)
    times = [[seconds(search, slice(i, i + 1), threads) for search, threads in searches] for i in range(single)]
    p50 = 1000 * np.median(np.array(times), axis=0)
    batch = [seconds(search, slice(0, size), threads) for (search, threads), size in zip(searches, batch_sizes)]
    faiss.omp_set_num_threads(THREADS)
    return list(zip(p50.tolist(), batch))


def build_methods(docs, q, rescore_k, shards, rng) -> list[dict]:
    """Every method: its key, table name, bytes per vector, bytes one query must read, whether faiss batches its
    queries, and per layout (number of shards) a search over a slice of the queries."""
    n, dim = docs.shape
    stage1, stage2 = QuantizationModuleStage1(dim), QuantizationModuleStage2(dim)  # untrained: thresholds all zero
    codes1, codes2, q1, q2 = encode(stage1, docs), encode(stage2, docs), encode(stage1, q), encode(stage2, q)
    trained = {key: trained_family(key, docs, rng) for key in FAMILIES}
    int8_codes = trained["int8"].sa_encode(docs)  # the store binary + int8 rescoring reads its k candidates from
    layouts = list(dict.fromkeys([1, shards]))
    flat = {s: sharded(float_index, docs, s) for s in layouts}
    binary1 = {s: sharded(build_binary_index, codes1, s) for s in layouts}
    binary2 = {s: sharded(build_binary_index, codes2, s) for s in layouts}
    b1, b2, f = codes1.shape[1], codes2.shape[1], docs.itemsize * dim
    methods = [
        dict(key="float", name="float32 IndexFlatIP", bytes=f, reads=n * f, batched=True,
             search={s: lambda r, i=flat[s]: i.search(q[r], TOP) for s in layouts}),
        dict(key="binary", name=f"stage1 {stage1.bits_per_vector} bits IndexBinaryFlat", bytes=b1, reads=n * b1,
             batched=True, search={s: lambda r, i=binary1[s]: i.search(q1[r], TOP) for s in layouts}),
        dict(key="stage2", name=f"stage2 {stage2.bits_per_vector} bits IndexBinaryFlat", bytes=b2, reads=n * b2,
             batched=True, search={s: lambda r, i=binary2[s]: i.search(q2[r], TOP) for s in layouts}),
        dict(key="rescore", name=f"stage1 top-{rescore_k} + float rescore", bytes=b1 + f,
             reads=n * b1 + rescore_k * f, batched=True,
             search={s: lambda r, i=binary1[s]: rescore_search(i, docs, q[r], q1[r], rescore_k, TOP) for s in layouts}),
        dict(key="rescore_int8", name=f"stage1 top-{rescore_k} + int8 rescore", bytes=b1 + dim,
             reads=n * b1 + rescore_k * dim, batched=True,
             search={s: lambda r, i=binary1[s], rows=decoded_rows(trained["int8"], int8_codes):
                     rescore_search(i, rows, q[r], q1[r], rescore_k, TOP) for s in layouts}),
    ]
    for key, (name, _, batched) in FAMILIES.items():
        indexes = {s: sharded(lambda rows, t=trained[key]: filled(t, rows), docs, s) for s in layouts}
        size = trained[key].code_size  # as faiss stores it, per-vector factors included (RaBitQ)
        methods.append(dict(key=key, name=name, bytes=size, reads=n * size, batched=batched,
                            search={s: lambda r, i=indexes[s]: i.search(q[r], TOP) for s in layouts}))
    return methods


def run(n, dim=DIM, queries=QUERIES, single=SINGLE, rescore_k=RESCORE_K, seed=SEED, embeddings=None,
        shards=SHARDS) -> dict:
    """Measure the bandwidth, build every method in each layout, time each configuration, print the tables, and
    return the summary that becomes the JSON line."""
    for bad, message in [(n < 256, f"--n must be at least 256 (PQ trains 256 centroids on the documents), got {n}"),
                         (dim < 8 or dim % 8, f"--dim must be a positive multiple of 8 (PQ's 8-dimension sub-vectors, "
                                              f"Stage 2 pairs), got {dim}"),
                         (rescore_k < TOP, f"--rescore-k must be at least {TOP}, got {rescore_k}"),
                         (rescore_k > n, f"--rescore-k {rescore_k} is more than --n {n}"),
                         (queries < 1 or single < 1, f"--queries and --single must be positive, got {queries}, "
                                                     f"{single}"),
                         (shards < 1 or n < shards * TOP, f"--shards must be 1 to n / {TOP}, got {shards}")]:
        if bad:
            raise UsageError(message)
    bandwidth = {t: read_bandwidth(t, BANDWIDTH_BYTES, BANDWIDTH_REPEATS)  # before the data fills memory
                 for t in dict.fromkeys([1, THREADS])}
    docs, q = load_data(n, dim, max(queries, single), seed, embeddings)
    methods = build_methods(docs, q, rescore_k, shards, np.random.default_rng(seed))
    configs = [(s, t) for s in dict.fromkeys([1, shards]) for t in dict.fromkeys([1, THREADS])]
    for m in methods:
        m["timed"] = queries if m["batched"] else min(queries, SCAN_QUERIES)  # the batch it is timed on
    searches = [(m["search"][s], t) for m in methods for s, t in configs]
    timings = iter(time_searches(searches, single, [m["timed"] for m in methods for _ in configs]))
    for m in methods:  # per configuration (p50 ms, seconds per `queries` queries); the floor; the best of each
        m["configs"] = {config_name(s, t): (ms, sec * queries / m["timed"])
                        for (s, t), (ms, sec) in zip(configs, timings)}
        m["floor_ms"] = 1000 * m["reads"] / (bandwidth[THREADS] * 1e9)
        m["single"] = min(m["configs"].items(), key=lambda config: config[1][0])
        m["batch"] = min(m["configs"].items(), key=lambda config: config[1][1])
    data = f"embeddings {embeddings}" if embeddings else f"random unit vectors (seed {seed})"
    print(f"{n:,} vectors, dim {dim}, {data}; top-{TOP}; p50 of {single} single queries; batch of {queries:,} "
          f"queries (families that scan once per query: {min(queries, SCAN_QUERIES)}, scaled); memory read bandwidth "
          + ", ".join(f"{t} core{'s' if t > 1 else ''} {gbs:.1f} GB/s" for t, gbs in bandwidth.items())
          + f"; floor = bytes read per query / {bandwidth[THREADS]:.1f} GB/s; wall-clock times on this machine")
    print_tables(methods, n, queries)
    return summary(methods, n, bandwidth[THREADS])


def print_tables(methods: list[dict], n: int, queries: int) -> None:
    """Every configuration's times, then each method's best against float's best."""
    names = list(methods[0]["configs"])  # threads: OpenMP threads per index or shard
    for title, column in [("single query: p50 ms", 0), (f"batch: seconds per {queries:,} queries", 1)]:
        print(f"\nEvery configuration, {title}")
        print(tabulate([[m["name"]] + [times[column] for times in m["configs"].values()] for m in methods],
                       ["method"] + names, floatfmt=".2f", tablefmt="github"))
    float_ms, float_s = methods[0]["single"][1][0], methods[0]["batch"][1][1]
    rows = []
    for m in methods:
        (single_config, (single_ms, _)), (batch_config, (_, batch_s)) = m["single"], m["batch"]
        rows.append([m["name"], m["bytes"], n * m["bytes"] / 2**20, m["reads"] / 1e6, m["floor_ms"], single_config,
                     single_ms, single_ms / m["floor_ms"], float_ms / single_ms, batch_config, m["timed"], batch_s,
                     queries / batch_s, float_s / batch_s])
    print("\nEach method's best configuration against float's best:")
    print(tabulate(rows, floatfmt=".2f", tablefmt="github", intfmt=",",
                   headers=["method", "bytes/vec", "MiB", "MB read/query", "floor ms", "single: best configuration",
                            "p50 ms", "x floor", "speed-up", "batch: best configuration", "queries timed",
                            f"s / {queries:,} q", "queries/s", "speed-up"]))


def summary(methods: list[dict], n: int, bandwidth_gbs: float) -> dict:
    """The JSON line: the keys the benchmark has always had (now each method's best configuration), the all-core
    bandwidth and the float and binary floors."""
    result = {"n": n}
    for m in methods[:4]:  # float, binary, stage2, rescore
        (single_config, (single_ms, _)), (batch_config, (_, batch_s)) = m["single"], m["batch"]
        result |= {f"{m['key']}_single_ms": single_ms, f"{m['key']}_single_layout": single_config,
                   f"{m['key']}_batch_s": batch_s, f"{m['key']}_batch_layout": batch_config}
        if m["key"] != "rescore":  # rescoring holds the binary index and the float store; its sum is in the table
            result[f"{m['key']}_bytes"] = m["bytes"]
    return result | {"bandwidth_gbs": bandwidth_gbs, "float_floor_ms": methods[0]["floor_ms"],
                     "binary_floor_ms": methods[1]["floor_ms"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--n", type=int, default=N, help="number of document vectors")
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--queries", type=int, default=QUERIES, help="batch size of the throughput measurement")
    p.add_argument("--single", type=int, default=SINGLE, help="one-query calls per configuration for the p50 latency")
    p.add_argument("--rescore-k", type=int, default=RESCORE_K, help="Hamming candidates re-ranked by float or int8")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--embeddings", type=Path, help="float .npy matrix to use instead of random vectors")
    p.add_argument("--shards", type=int, default=SHARDS, help="shards of the second layout (1: one index only)")
    args = p.parse_args(argv)
    try:
        result = run(args.n, args.dim, args.queries, args.single, args.rescore_k, args.seed, args.embeddings,
                     args.shards)
    except UsageError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
