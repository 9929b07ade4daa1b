"""Search benchmark: float32 exact search vs packed binary codes (Stage 1, Stage 2) vs binary search + float rescoring.

For each method: index memory, single-query p50 latency and batch throughput, all top-10, with faiss. Each method is
timed in two layouts of the same exact search: one index, and the index split into one shard per faiss thread,
searched in parallel and merged (a one-query search of one index runs on one core; shards put every core on it).
Speed-ups compare against the faster float layout. Times are wall-clock on the machine that runs this, with faiss's
default thread count (OMP_NUM_THREADS changes it; on a busy machine threads wait for each other, so small searches
slow down). The last line of stdout is JSON: per method, its faster layout's times.

    python bench_search.py                        # 1,000,000 random unit vectors, dimension 384
    python bench_search.py --n 20000              # a quick run
    python bench_search.py --embeddings emb.npy   # cached float embeddings (float32 .npy, one row per vector)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from tabulate import tabulate

from methods import build_binary_index, pack_codes, rescore_search
from quantization_modules import (
    QuantizationModuleStage1,
    QuantizationModuleStage2,
    UsageError,
)

# defaults (override on the command line)
N = 1_000_000
DIM = 384
QUERIES = 1000  # batch size of the throughput measurement: one search call with all of them
SINGLE = 50  # one-query search calls for the p50 latency
RESCORE_K = 50  # Hamming candidates re-ranked by float dot product
SEED = 0
TOP = 10
CHUNK = 100_000  # rows per step when generating, normalising and quantising: no big temporaries
SHARDS = faiss.omp_get_max_threads()  # the second layout: one shard per thread; --shards 1 times one index only
QUERY_NOISE = 0.01  # --embeddings: per-component noise on sampled rows, so a query is near its document, not equal


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


def encode(quantizer, x: np.ndarray) -> np.ndarray:
    """Packed codes of float vectors from one of the project's quantisers, so the bit layout is theirs, not a copy."""
    return np.concatenate([pack_codes(quantizer.quantize(torch.from_numpy(x[s : s + CHUNK])).numpy())
                           for s in range(0, len(x), CHUNK)])


def float_index(docs: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    return index


def sharded(shards_class, build, rows: np.ndarray, shards: int):
    """`build(rows)` split into `shards` indexes that faiss searches in parallel threads and merges: same results,
    same memory. faiss.IndexShards for float, faiss.IndexBinaryShards for codes; one shard is the plain index."""
    parts = [build(part) for part in np.array_split(rows, shards)]
    if shards == 1:
        return parts[0]
    index = shards_class(parts[0].d, True, True)  # threaded, successive ids: shard j holds rows after shard j - 1
    for part in parts:
        index.add_shard(part)
    return index


def seconds(search, rows: slice) -> float:
    start = time.perf_counter()
    search(rows)
    return time.perf_counter() - start


def time_searches(searches: list, single: int, queries: int) -> list[tuple[float, float]]:
    """Per search: p50 ms over `single` one-query calls, and seconds for one call with `queries` queries.

    The one-query calls take turns (query i on every method, then query i + 1), after one warm-up call each, so a
    slow spell of this shared machine, or the after-effects of the method timed before, falls on all methods alike.
    """
    for search in searches:
        search(slice(0, 1))
    times = [[seconds(search, slice(i, i + 1)) for search in searches] for i in range(single)]
    p50 = 1000 * np.median(np.array(times), axis=0)
    return [(float(ms), seconds(search, slice(0, queries))) for ms, search in zip(p50, searches)]


def run(n, dim=DIM, queries=QUERIES, single=SINGLE, rescore_k=RESCORE_K, seed=SEED, embeddings=None,
        shards=SHARDS) -> dict:
    """Build every index in each layout, time it, print the table, and return the summary that becomes the JSON line."""
    for bad, message in [(n < TOP, f"--n must be at least {TOP}, got {n}"),
                         (dim < 4 or dim % 4, f"--dim must be a positive multiple of 4 (Stage 2 pairs), got {dim}"),
                         (rescore_k < TOP, f"--rescore-k must be at least {TOP}, got {rescore_k}"),
                         (rescore_k > n, f"--rescore-k {rescore_k} is more than --n {n}"),
                         (queries < 1 or single < 1, f"--queries and --single must be positive, got {queries}, {single}"),
                         (shards < 1 or n < shards * TOP, f"--shards must be 1 to n / {TOP}, got {shards}")]:
        if bad:
            raise UsageError(message)
    docs, q = load_data(n, dim, max(queries, single), seed, embeddings)
    stage1, stage2 = QuantizationModuleStage1(dim), QuantizationModuleStage2(dim)  # untrained: thresholds all zero
    codes1, codes2, q1, q2 = encode(stage1, docs), encode(stage2, docs), encode(stage1, q), encode(stage2, q)
    searches, rows = [], []  # (JSON key, name, layout, search over a slice of the queries, index bytes) per layout
    for count in dict.fromkeys([1, shards]):
        layout = "1 index" if count == 1 else f"{count} shards"
        flat = sharded(faiss.IndexShards, float_index, docs, count)
        index1 = sharded(faiss.IndexBinaryShards, build_binary_index, codes1, count)
        index2 = sharded(faiss.IndexBinaryShards, build_binary_index, codes2, count)
        searches += [
            ("float", "float32 IndexFlatIP", layout, lambda r, f=flat: f.search(q[r], TOP), docs.nbytes),
            ("binary", f"stage1 {stage1.bits_per_vector} bits IndexBinaryFlat", layout,
             lambda r, i=index1: i.search(q1[r], TOP), codes1.nbytes),
            ("stage2", f"stage2 {stage2.bits_per_vector} bits IndexBinaryFlat", layout,
             lambda r, i=index2: i.search(q2[r], TOP), codes2.nbytes),
            ("rescore", f"stage1 top-{rescore_k} + float rescore (binary index + float store)", layout,
             lambda r, i=index1: rescore_search(i, docs, q[r], q1[r], rescore_k, TOP), codes1.nbytes + docs.nbytes),
        ]
    timings = time_searches([search for *_, search, _ in searches], single, queries)
    result = {"n": n}
    for (key, _, layout, _, nbytes), (single_ms, batch_s) in zip(searches, timings):  # each method's faster layout
        if single_ms < result.get(f"{key}_single_ms", np.inf):
            result |= {f"{key}_single_ms": single_ms, f"{key}_single_layout": layout}
        if batch_s < result.get(f"{key}_batch_s", np.inf):
            result |= {f"{key}_batch_s": batch_s, f"{key}_batch_layout": layout}
        if key != "rescore":  # rescoring holds the binary index and the float store; its sum is in the table
            result[f"{key}_bytes"] = nbytes // n
    order = [key for key, *_ in searches[:4]]  # the table: one method's layouts together
    for (key, name, layout, _, nbytes), (single_ms, batch_s) in sorted(zip(searches, timings),
                                                                      key=lambda s: order.index(s[0][0])):
        rows.append([name, layout, nbytes / 2**20, nbytes // n, single_ms, result["float_single_ms"] / single_ms,
                     batch_s, queries / batch_s, result["float_batch_s"] / batch_s, docs.nbytes / nbytes])
    data = f"embeddings {embeddings}" if embeddings else f"random unit vectors (seed {seed})"
    print(f"{n:,} vectors, dim {dim}, {data}; top-{TOP}; {queries:,} batch queries, p50 of {single} single queries; "
          f"faiss threads {faiss.omp_get_max_threads()}; wall-clock times on this machine; speed-ups against the "
          f"faster float layout")
    print(tabulate(rows, floatfmt=".3f", tablefmt="github",
                   headers=["method", "layout", "MiB", "bytes/vec", "single p50 ms", "speed-up", "batch s",
                            "queries/s", "speed-up", "memory: float/this"]))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--n", type=int, default=N, help="number of document vectors")
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--queries", type=int, default=QUERIES, help="batch size of the throughput measurement")
    p.add_argument("--single", type=int, default=SINGLE, help="one-query calls for the p50 latency")
    p.add_argument("--rescore-k", type=int, default=RESCORE_K, help="Hamming candidates re-ranked by float")
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
