"""Cost at scale, measured: the evaluation's own rows on synthetic tasks of 100k, 300k and 1M documents, timed per row,
with the peak memory of each run, the slope of each row's time in the corpus size, and what that projects for an MS
MARCO-sized task (8.8M documents, 6,980 queries).

Why synthetic and planted: encoding a million texts takes hours on a CPU, and the cost measured here is everything
after encoding. For each size a BEIR folder named scifact/ (so it is read as MTEB's SciFact task) is written to a
temporary folder, and seeded vectors for exactly the texts the evaluation will ask for (its keys: the prompt it applies
and the text as mteb builds it) are planted in a temporary embedding cache. `evaluate_quantization_mteb.py` then runs
on it in a process of its own, so each size's peak memory is its own; it finds every text cached and never loads the
model. The vectors are unit vectors clustered around seeded centres, and each query lies near its relevant documents.

Per row: mteb's evaluation_time and phases (index = the row's store built from the float documents, search = the
queries searched, scoring = mteb's metrics), from the JSON mteb writes per row, and the process's CPU seconds while
the row ran (on a machine shared with other jobs, wall time says how busy the machine was as much as what the row
costs; CPU time much less so). A row's time is fitted as a + b * documents; its index part is projected by
documents, the rest by documents and queries (search scans every document once per query). The last line of stdout
is JSON; `--report` prints the report again from it.

    python bench_scale.py                                 # 100k, 300k, 1M documents, 300 queries
    python bench_scale.py --sizes 100000 300000           # quicker: slopes without the 1M check
    python bench_scale.py --methods float stage1_zero --modes        # each method's own search only
    python bench_scale.py --report out.txt                # the report again from a run's output
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

import methods
import results
from checkpoints import CHECKPOINTS_DIR, checkpoint_path, save_checkpoint
from data import UsageError, document_text
from embedding_cache import EmbeddingCache, cache_key
from encoders import DEFAULT_MODEL, BaseModel, model_slug
from mteb_adapter import task_prompt

# defaults (override on the command line)
SIZES = [100_000, 300_000, 1_000_000]
QUERIES = 300
METHODS = ["float", "float16", "int8", "pq1b", "rabitq", "stage1_zero", "lsh", "lloyd2b", "quantile2b", "pca_half"]
SEED = 0
DIM = 384  # the default MiniLM's
TASK = "SciFact"  # the folder is named scifact/: mteb reads it as its SciFact task
CENTRES = 4096  # clusters of the synthetic documents
DOC_NOISE = 0.5  # norm of a document's offset from its centre: documents of a cluster are ~0.8 cosine apart
QUERY_NOISE = 3.0  # norm of a query's offset from the mean of its relevant documents: nDCG@10 ~0.7 at 100k (float)
MAX_RELEVANT = 3  # relevant documents per query: 1 to this many, from one cluster
SHARD = 100_000  # documents planted per cache shard: memory holds one shard
FIT = 20_000  # planted documents a missing checkpoint is fitted on
MIN_SIZE = 1_000
MSMARCO = (8_841_823, 6_980)  # MS MARCO passage: documents, dev queries
MEMORY_GOAL = 3.0  # peak RSS at most this many times the float matrix, at 1M documents and above
LINEAR_TOLERANCE = 0.2  # slope from the second to the largest size within 20% of the slope of the two smallest
LOAD_GOAL = 3.0  # seconds to load a cache of 1M texts
ROOT = Path(__file__).resolve().parent


def normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows, in place (float32)."""
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def synthetic_task(n: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The centres (CENTRES, DIM), each document's cluster (n,), and each query's relevant documents: a random
    document and up to MAX_RELEVANT - 1 others from its cluster."""
    rng = np.random.default_rng([seed, 0])
    centres = normalise(rng.standard_normal((CENTRES, DIM), dtype=np.float32))
    cluster = rng.integers(0, CENTRES, n)
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(CENTRES + 1))
    relevant = []
    for first in rng.choice(n, queries, replace=False):
        members = order[starts[cluster[first]] : starts[cluster[first] + 1]]
        others = members[members != first]
        extra = rng.choice(others, min(len(others), int(rng.integers(0, MAX_RELEVANT))), replace=False)
        relevant.append(np.concatenate([[first], extra]).astype(np.int64))
    return centres, cluster, relevant


def document_vectors(centres: np.ndarray, cluster: np.ndarray, start: int, stop: int, seed: int) -> np.ndarray:
    """Documents start..stop-1 (stop - start <= SHARD, start a multiple of SHARD): centre plus noise, unit, seeded."""
    rng = np.random.default_rng([seed, 1, start // SHARD])
    noise = rng.standard_normal((stop - start, DIM), dtype=np.float32) * np.float32(DOC_NOISE / np.sqrt(DIM))
    return normalise(centres[cluster[start:stop]] + noise)


def prompts(base: BaseModel) -> dict[str, str]:
    """The prompt the evaluation applies to the task's queries and documents ("" for the default MiniLM)."""
    return {kind: base.prompt(kind, task_prompt(base, TASK, kind)) for kind in ("query", "document")}


def plant(folder: Path, cache_dir: Path, n: int, queries: int, seed: int) -> dict:
    """Write <folder>/scifact/ (corpus.jsonl, queries.jsonl, qrels/test.tsv) and plant in <cache_dir>/<model-slug>/
    one vector per text, a shard of SHARD documents at a time. Returns the document cache keys and the first FIT
    document vectors (what a missing checkpoint is fitted on)."""
    task = folder / TASK.lower()
    (task / "qrels").mkdir(parents=True)
    base = BaseModel(DEFAULT_MODEL, cache_dir)
    prompt = prompts(base)
    centres, cluster, relevant = synthetic_task(n, queries, seed)
    wanted = np.unique(np.concatenate(relevant))  # the relevant documents' vectors make the queries
    kept, keys, sample = {}, [], None
    with open(task / "corpus.jsonl", "w") as corpus, tqdm(total=n, unit=" docs", desc=f"planting {n:,} documents") as bar:
        for start in range(0, n, SHARD):
            stop = min(n, start + SHARD)
            vectors = document_vectors(centres, cluster, start, stop, seed)
            docs = [{"title": f"title {i}", "text": f"doc {i}"} for i in range(start, stop)]
            corpus.write("".join(json.dumps({"_id": f"d{i}", **doc}) + "\n" for i, doc in zip(range(start, stop), docs)))
            shard_keys = [cache_key(prompt["document"], document_text(doc)) for doc in docs]
            base.cache.append(shard_keys, vectors)
            keys += shard_keys
            for i in wanted[(wanted >= start) & (wanted < stop)]:
                kept[i] = vectors[i - start].copy()  # not a view: the shard is freed
            sample = vectors[:FIT].copy() if sample is None else sample
            bar.update(stop - start)
    rng = np.random.default_rng([seed, 2])
    noise = rng.standard_normal((queries, DIM), dtype=np.float32) * np.float32(QUERY_NOISE / np.sqrt(DIM))
    query_vectors = normalise(np.stack([np.mean([kept[i] for i in r], axis=0) for r in relevant]) + noise)
    texts = [f"query {j}" for j in range(queries)]
    base.cache.append([cache_key(prompt["query"], t) for t in texts], query_vectors)
    with open(task / "queries.jsonl", "w") as f:
        f.write("".join(json.dumps({"_id": f"q{j}", "text": t}) + "\n" for j, t in enumerate(texts)))
    with open(task / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q{j}\td{i}\t1\n" for j, r in enumerate(relevant) for i in r))
    return dict(keys=keys, sample=sample)


def time_cache(cache_dir: Path, keys: list[bytes]) -> dict[str, float]:
    """Wall and CPU seconds to load the planted cache (its index; vectors are memory-mapped), then to read every
    document's vector (as the evaluation does once per task). The page cache is warm: the files were just written."""
    cache = EmbeddingCache(cache_dir / model_slug(DEFAULT_MODEL))
    clocks = [(time.perf_counter(), time.process_time())]
    cache.load()
    clocks.append((time.perf_counter(), time.process_time()))
    cache.get(keys)
    clocks.append((time.perf_counter(), time.process_time()))
    (w0, c0), (w1, c1), (w2, c2) = clocks
    return dict(cache_load_s=w1 - w0, cache_load_cpu_s=c1 - c0, cache_get_s=w2 - w1, cache_get_cpu_s=c2 - c1)


def needed_checkpoints(names: list[str], modes) -> list[str]:
    """The methods whose checkpoints the rows read: fitted or trained ones, and their re-rankers'."""
    rerankers = [methods.MODES[mode].reranker for name in names for mode in methods.rows_of(name, DIM, modes).values()]
    return [m for m in dict.fromkeys(names + [r for r in rerankers if r]) if methods.entry(m).fitted_on != "nothing"]


def prepare_checkpoints(names: list[str], source: Path, folder: Path, sample: np.ndarray) -> dict[str, str]:
    """Copy each needed checkpoint from `source` to `folder`; one that is missing there and fitted on texts is fitted
    here on the planted sample (its search costs the same: the fitted values change the codes, not the work). Returns
    where each came from."""
    origin = {}
    for name in names:
        path, target = checkpoint_path(source, DEFAULT_MODEL, name), checkpoint_path(folder, DEFAULT_MODEL, name)
        if path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            origin[name] = str(path)
            continue
        method = methods.make_method(name, DIM)
        method.fit(sample)
        save_checkpoint(target, method.state(), {"base_model": DEFAULT_MODEL, "method": name, "dimension": str(DIM),
                                                 "protocol": "transfer", "description": methods.describe(name, DIM),
                                                 "fitted_on": f"{len(sample):,} planted synthetic vectors (bench_scale.py)"})
        origin[name] = f"fitted here on {len(sample):,} planted vectors ({path} is missing)"
    return origin


def evaluate(data_dir: Path, cache_dir: Path, checkpoints: Path, output: Path, names: list[str], modes) -> dict:
    """Run the evaluation in a process of its own, with --no-encode (a text the planting missed stops it with an
    error rather than hours of encoding), and measure it: wall and CPU seconds and peak RSS of the whole process (the
    kernel's, from wait4). Each row's seconds, CPU seconds and peak RSS come from the run record the evaluation writes
    (results.RECORD), its phases and nDCG@10 from mteb's JSON. Its output is shown as it runs, never parsed."""
    command = [sys.executable, "-u", str(ROOT / "evaluate_quantization_mteb.py"), "--tasks", TASK, "--data-dir",
               str(data_dir), "--cache-dir", str(cache_dir), "--checkpoints", str(checkpoints), "--output", str(output),
               "--no-encode", "--methods", *names] + ([] if modes is None else ["--modes", *modes])
    start = time.perf_counter()
    # OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep rather than spin, so CPU time counts work (same results).
    # oom_score_adj 1000: if memory runs out, the kernel stops this run, not another job on the machine
    child = subprocess.Popen(command, cwd=ROOT, stdout=sys.stderr, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                             preexec_fn=lambda: Path("/proc/self/oom_score_adj").write_text("1000"))
    nice = os.getpriority(os.PRIO_PROCESS, child.pid)
    stderr = []  # shown as it comes; the last "error:" line is the evaluation's one-line error, if it fails

    def echo():
        for raw in child.stderr:
            stderr.append(raw.decode(errors="replace").rstrip("\n"))
            sys.stderr.buffer.write(raw)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not the largest of all children so far
    reader.join()
    wall, code = time.perf_counter() - start, os.waitstatus_to_exitcode(status)
    if code == -9:
        raise UsageError(f"the evaluation was killed (SIGKILL, out of memory?) at {gb(1024 * usage.ru_maxrss)} GB RSS, after {wall:.0f} s")
    if code:
        why = next((e for e in reversed(stderr) if e.startswith("error:")), stderr[-1] if stderr else "no message")
        raise UsageError(f"the evaluation failed (exit {code}): {why.removeprefix('error: ')}")
    record = json.loads((output / results.RECORD).read_text())
    return dict(rows=read_rows(output, record), wall=wall, peak_rss=1024 * usage.ru_maxrss, cpu=usage.ru_utime + usage.ru_stime,
                nice=[nice], before_rows_rss=next(iter(record["runs"].values()))["peak_rss_before_rows_bytes"])


def read_rows(output: Path, record: dict) -> dict[str, dict]:
    """Each row's seconds and phases, and nDCG@10, from the JSON mteb wrote (<output>/mteb/results/<model>/<row>/),
    with its CPU seconds and peak RSS from the run record, in the record's order."""
    phase_names = {"Encoding corpus": "index", "Encoding queries": "search", "Scoring": "scoring"}
    rows = {}
    for path in (output / "mteb" / "results").glob(f"*/*/{TASK}.json"):
        result = json.loads(path.read_text())
        phases = {name: 0.0 for name in phase_names.values()}
        for phase in result.get("evaluation_phases") or []:
            if phase["name"] in phase_names:
                phases[phase_names[phase["name"]]] += phase["end"] - phase["start"]
        rows[path.parent.name] = dict(seconds=result["evaluation_time"], **phases,
                                      ndcg_at_10=result["scores"]["test"][0]["ndcg_at_10"])
    if missing := [row for row in record["rows"] if row not in rows]:
        raise UsageError(f"mteb wrote no {TASK}.json for {', '.join(missing)} under {output / 'mteb'}")
    return {row: rows[row] | dict(cpu=entry["cpu_s"], peak_rss_sampled=entry["peak_rss_bytes"])
            for row, entry in record["rows"].items()}


def line_fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(a, b) of seconds = a + b * documents: least squares (the line through them, for two sizes)."""
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    return float(a), float(b)


def linearity(sizes: list[int], seconds: list[float], tolerance: float = LINEAR_TOLERANCE) -> dict:
    """The slope (s per document) from the two smallest sizes, what it predicts for the largest, and the slope from
    the second size to the largest: linear if the two slopes agree within `tolerance`."""
    (n1, n2, n3), (t1, t2, t3) = (sizes[0], sizes[1], sizes[-1]), (seconds[0], seconds[1], seconds[-1])
    slope, later = (t2 - t1) / (n2 - n1), (t3 - t2) / (n3 - n2)
    ratio = later / slope if slope > 0 else float("nan")
    return dict(slope=slope, predicted=t2 + slope * (n3 - n2), measured=t3, later_slope=later, ratio=ratio,
                linear=bool(abs(ratio - 1) <= tolerance))


def per_million_per_thousand(seconds_per_document: float, queries: int) -> float:
    """Seconds per document over `queries` queries -> seconds per 1M documents per 1,000 queries."""
    return seconds_per_document * 1e6 * 1000 / queries


def project(sizes: list[int], index: list[float], rest: list[float], queries: int, target=MSMARCO) -> dict:
    """A row's seconds at `target` (documents, queries): its index part fitted in documents, the rest (search,
    scoring) fitted in documents and scaled by target queries / `queries`."""
    n, q = target
    (a_index, b_index), (a_rest, b_rest) = line_fit(sizes, index), line_fit(sizes, rest)
    index_s, rest_s = a_index + b_index * n, (a_rest + b_rest * n) * q / queries
    return dict(index=index_s, search_and_scoring=rest_s, total=index_s + rest_s)


def gb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e9:.2f}"


def machine() -> dict:
    return dict(cores=os.cpu_count(), memory_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                load_average=os.getloadavg()[0])


def size_lines(n: int, r: dict, queries: int, family: dict) -> list[str]:
    """Markdown lines for one size: every row's seconds, phases, slope, CPU seconds and peak RSS, then the whole run's."""
    nan = float("nan")
    table = [[row, family[row], v["seconds"], v["index"], v["search"], v["scoring"],
              per_million_per_thousand(v["seconds"] / n, queries), v["cpu"], gb(v["peak_rss_sampled"])]
             for row, v in r["rows"].items()]
    return [f"### {n:,} documents", "",
            tabulate(table, ["row", "family", "seconds", "index s", "search s", "scoring s", "s / 1M docs / 1k queries",
                             "CPU s", "peak RSS GB (sampled)"], floatfmt=".2f", tablefmt="github", missingval="-"),
            "", f"Rows {sum(v['seconds'] for v in r['rows'].values()):.1f} s; the whole evaluation {r['wall']:.1f} s "
                f"({r['cpu']:.0f} CPU s, {r['cpu'] / r['wall']:.0%} of a core on average, at nice "
                f"{'/'.join(map(str, r['nice'])) or '?'}; with task loading, cache check, statistics, report); "
                f"peak RSS {gb(r['peak_rss'])} GB ({r['peak_rss'] / (4 * DIM * n):.2f}x the float matrix of "
                f"{gb(4 * DIM * n)} GB), {gb(r['before_rows_rss'])} GB before the first row. Planting {r['plant_s']:.1f} s; "
                f"cache of {n + queries:,} texts: load() {r['cache_load_s']:.2f} s ({r.get('cache_load_cpu_s', nan):.2f} "
                f"CPU s), then every document's vector {r['cache_get_s']:.2f} s ({r.get('cache_get_cpu_s', nan):.2f} CPU "
                "s). The first row's index time includes reading the task's float embeddings from the cache once for all "
                "rows. CPU s and peak RSS: the evaluation's run record (its process's CPU time while the row ran, its "
                "resident memory sampled every 0.05 s); CPU time is less sensitive to other jobs than wall time.", ""]


def memory_lines(per_size: dict) -> list[str]:
    """Markdown lines: peak RSS per size against the float matrix, and the memory goal at 1M and above."""
    memory = [[n, gb(4 * DIM * n), gb(r["peak_rss"]), r["peak_rss"] / (4 * DIM * n), gb(r["before_rows_rss"]),
               ("yes" if r["peak_rss"] <= MEMORY_GOAL * 4 * DIM * n else "NO") if n >= 1_000_000 else "-"]
              for n, r in sorted(per_size.items())]
    return ["### Peak memory", "", tabulate(memory, ["documents", "float matrix GB", "peak RSS GB", "x float matrix",
                                                     "before the rows GB", f"<= {MEMORY_GOAL:g}x (1M and above)"],
                                             floatfmt=".2f", intfmt=",", tablefmt="github"), ""]


def linearity_lines(per_size: dict, rows: list[str], queries: int, family: dict) -> tuple[list[str], dict, dict]:
    """Markdown lines: each row's slope from the two smallest sizes, checked at the largest, in wall and CPU seconds;
    and those checks."""
    sizes = sorted(per_size)
    checks = {row: linearity(sizes, [per_size[n]["rows"][row]["seconds"] for n in sizes]) for row in rows}
    cpu = {row: linearity(sizes, [per_size[n]["rows"][row]["cpu"] for n in sizes])
           for row in rows if all(per_size[n]["rows"][row]["cpu"] is not None for n in sizes)}
    table = [[row, family[row], per_million_per_thousand(c["slope"], queries), c["predicted"], c["measured"],
              per_million_per_thousand(c["later_slope"], queries), c["ratio"], "yes" if c["linear"] else "NO",
              cpu[row]["ratio"] if row in cpu else None, ("yes" if cpu[row]["linear"] else "NO") if row in cpu else None]
             for row, c in checks.items()]
    return [f"### Linearity: slope from {sizes[0]:,} and {sizes[1]:,}, checked at {sizes[-1]:,}", "",
            tabulate(table, ["row", "family", "slope s / 1M docs / 1k q", f"predicted s at {sizes[-1]:,}", "measured s",
                             f"slope {sizes[1]:,} -> {sizes[-1]:,}", "ratio", f"within {LINEAR_TOLERANCE:.0%}",
                             "CPU s: ratio", "within"], floatfmt=".2f", tablefmt="github", missingval="-"),
            "", "ratio: the slope from the second size to the largest over the slope of the two smallest (1: linear).",
            ""], checks, cpu


def projection_lines(per_size: dict, rows: list[str], queries: int, family: dict) -> tuple[list[str], dict]:
    """Markdown lines: the slope per family, and every row's projection to MS MARCO with its assumptions."""
    sizes = sorted(per_size)
    by_family = {}
    for row in rows:
        slope = line_fit(sizes[:2], [per_size[n]["rows"][row]["seconds"] for n in sizes[:2]])[1]
        by_family.setdefault(family[row], []).append(per_million_per_thousand(slope, queries))
    target = project_all(per_size, sizes, rows, queries)
    table = [[row, family[row], p["index"], p["search_and_scoring"], p["total"], p["total"] / 3600,
              p["cpu"] / 3600 if "cpu" in p else None] for row, p in target["rows"].items()]
    cpu = [p["cpu"] for p in target["rows"].values() if "cpu" in p]
    table.append(["all rows", "", sum(p["index"] for p in target["rows"].values()),
                  sum(p["search_and_scoring"] for p in target["rows"].values()), target["rows_total"],
                  target["rows_total"] / 3600, sum(cpu) / 3600 if len(cpu) == len(rows) else None])
    return [f"### Slope per family (s per 1M documents per 1,000 queries, from {sizes[0]:,} and {sizes[1]:,})", "",
            tabulate([[f, len(v), min(v), max(v)] for f, v in by_family.items()], ["family", "rows", "lowest", "highest"],
                     floatfmt=".2f", tablefmt="github"), "",
            f"### Projection to MS MARCO ({MSMARCO[0]:,} documents, {MSMARCO[1]:,} queries)", "",
            tabulate(table, ["row", "family", "index s", "search + scoring s", "total s", "hours", "CPU hours"],
                     floatfmt=".1f", tablefmt="github", missingval="-"), "",
            f"Fitted on {', '.join(f'{n:,}' for n in sizes)} documents (least squares, a + b x documents; search and "
            f"scoring scaled by {MSMARCO[1]:,} / {queries:,} queries). The whole evaluation adds "
            f"{target['overhead']:.0f} s outside the rows (task loading and the rest, fitted in documents), "
            f"{target['whole'] / 3600:.1f} h in all. Peak RSS, fitted in documents: {gb(target['peak_rss'])} GB "
            f"(the float matrix alone {gb(4 * DIM * MSMARCO[0])} GB; the rankings the evaluation keeps grow with "
            "queries too and are not in this fit).", ""], target


def goal_checks(per_size: dict, queries: int, summary: dict) -> dict[str, bool]:
    """The memory and cache-load goals at 1M documents and above, and linearity, where measured."""
    goals, large = {}, [n for n in sorted(per_size) if n >= 1_000_000]
    if large:
        goals["memory"] = all(per_size[n]["peak_rss"] <= MEMORY_GOAL * 4 * DIM * n for n in large)
        goals["cache_load"] = all(per_size[n]["cache_load_s"] <= LOAD_GOAL * (n + queries) / 1e6 for n in large)
        if all("cache_load_cpu_s" in per_size[n] for n in large):
            goals["cache_load_cpu"] = all(per_size[n]["cache_load_cpu_s"] <= LOAD_GOAL * (n + queries) / 1e6 for n in large)
    if "linearity" in summary:
        goals["linear"] = all(c["linear"] for c in summary["linearity"].values())
        goals["linear_cpu"] = all(c["linear"] for c in summary["linearity_cpu"].values())
    return goals


def report(per_size: dict, queries: int, names: list[str], origin: dict, machine_info: dict) -> tuple[str, dict]:
    """The markdown (per size, memory, linearity, projection, goals) and the JSON summary."""
    sizes = sorted(per_size)
    rows = [row for row in per_size[sizes[0]]["rows"] if all(row in per_size[n]["rows"] for n in sizes)]
    family = {row: methods.family_of(row.split("+")[0], DIM) for row in rows}
    out = [f"## Cost at scale: {len(rows)} rows of {', '.join(names)} on synthetic {TASK}-shaped tasks", "",
           f"{queries:,} queries (1 to {MAX_RELEVANT} relevant documents each); d = {DIM} float32 unit vectors around "
           f"{CENTRES:,} seeded centres, planted in the evaluation's cache (nothing encoded); run by "
           f"evaluate_quantization_mteb.py in a process of its own per size. Machine: {machine_info['cores']} cores, "
           f"{machine_info['memory_gb']:.0f} GB; load average "
           + ", ".join(f"{per_size[n]['load_average']:.1f}" for n in sizes) + " at the start of each size (the "
           "evaluation uses up to all cores itself: a load before it starts is other jobs'). Wall-clock times, one run "
           "each. Checkpoints: " + ("; ".join(f"{k} {v}" for k, v in origin.items()) or "none needed") + ".", ""]
    for n in sizes:
        out += size_lines(n, per_size[n], queries, family)
    out += memory_lines(per_size)
    summary = dict(sizes=sizes, queries=queries, dim=DIM, methods=names, machine=machine_info, checkpoints=origin,
                   per_size={str(n): {k: v for k, v in per_size[n].items() if k != "folder"} for n in sizes})
    if len(sizes) >= 3:
        lines, summary["linearity"], summary["linearity_cpu"] = linearity_lines(per_size, rows, queries, family)
        out += lines
    if len(sizes) >= 2:
        lines, summary["projection"] = projection_lines(per_size, rows, queries, family)
        out += lines
    summary["goals"] = goals = goal_checks(per_size, queries, summary)
    if goals:
        out += ["Goals: " + "; ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()) + "."]
    return "\n".join(out), summary


def project_all(results: dict, sizes: list[int], rows: list[str], queries: int) -> dict:
    """Every row's MS MARCO projection, their sum, the time outside the rows and the peak RSS, fitted in documents."""
    projected = {}
    for row in rows:
        measured = [results[n]["rows"][row] for n in sizes]
        projected[row] = project(sizes, [m["index"] for m in measured], [m["seconds"] - m["index"] for m in measured],
                                 queries)
        if all(m["cpu"] is not None for m in measured):  # CPU s split into index and the rest as the wall time is
            share = [m["index"] / m["seconds"] for m in measured]
            projected[row]["cpu"] = project(sizes, [m["cpu"] * f for m, f in zip(measured, share)],
                                            [m["cpu"] * (1 - f) for m, f in zip(measured, share)], queries)["total"]
    total = sum(p["total"] for p in projected.values())
    a, b = line_fit(sizes, [results[n]["wall"] - sum(v["seconds"] for v in results[n]["rows"].values()) for n in sizes])
    overhead = a + b * MSMARCO[0]
    a_rss, b_rss = line_fit(sizes, [results[n]["peak_rss"] for n in sizes])
    return dict(rows=projected, rows_total=total, overhead=overhead, whole=total + overhead,
                peak_rss=a_rss + b_rss * MSMARCO[0])


def run(args) -> dict:
    """Check the arguments, then per size: plant, time the cache, evaluate, clean up; then the report."""
    sizes = sorted(set(args.sizes))
    if bad := [n for n in sizes if n < max(MIN_SIZE, args.queries)]:
        raise UsageError(f"--sizes must be at least {MIN_SIZE:,} documents and at least --queries ({args.queries:,}), "
                         f"got {bad[0]:,}")
    if args.queries < 1:
        raise UsageError(f"--queries must be at least 1, got {args.queries}")
    names = list(dict.fromkeys(args.methods))
    for name in names:
        if "transfer" not in methods.entry(name).protocols:  # entry(): an unknown name is one line
            raise UsageError(f"{name} runs only in-domain; this benchmark runs the transfer protocol")
        if reason := methods.applies(name, DIM):
            raise UsageError(f"{name} does not apply at dimension {DIM} ({reason})")
    needed = needed_checkpoints(names, args.modes)
    for name in needed:
        path = checkpoint_path(args.checkpoints, DEFAULT_MODEL, name)
        if methods.entry(name).fitted_on == "training" and not path.is_file():
            raise UsageError(f"{name} is trained and {path} is missing: train it (python quantization_modules.py "
                             f"--methods {name}) or leave it out")
    info, per_size, origin = machine(), {}, {}
    checkpoints = Path(tempfile.mkdtemp(prefix="bench-scale-checkpoints-"))
    try:
        for n in sizes:
            folder = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-"))
            try:
                load = os.getloadavg()[0]
                start = time.perf_counter()
                planted = plant(folder / "data", folder / "cache", n, args.queries, args.seed)
                plant_s = time.perf_counter() - start
                if not origin and needed:
                    origin = prepare_checkpoints(needed, args.checkpoints, checkpoints, planted["sample"])
                cache_times = time_cache(folder / "cache", planted.pop("keys"))
                del planted
                print(f"evaluating {n:,} documents", file=sys.stderr)
                if len(per_size) >= 2:  # the peak RSS so far, fitted in documents, against what the machine has free
                    a, b = line_fit(list(per_size), [r["peak_rss"] for r in per_size.values()])
                    free = 1024 * int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))
                    if a + b * n > free:
                        print(f"warning: it may need {gb(a + b * n)} GB and {gb(free)} GB are available; if memory runs "
                              "out, the kernel stops it first", file=sys.stderr)
                measured = evaluate(folder / "data", folder / "cache", checkpoints, folder / "out", names, args.modes)
                per_size[n] = measured | cache_times | dict(plant_s=plant_s, load_average=load,
                                                           folder=str(folder) if args.keep else None)
            finally:
                if not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept: {checkpoints} and " + ", ".join(f"{n:,}: {r['folder']}" for n, r in per_size.items()),
                  file=sys.stderr)
        else:
            shutil.rmtree(checkpoints, ignore_errors=True)
    markdown, summary = report(per_size, args.queries, names, origin, info)
    print(markdown)
    summary["folders"] = {str(n): r["folder"] for n, r in per_size.items()} if args.keep else {}
    summary["checkpoints_folder"] = str(checkpoints) if args.keep else None
    return summary


def rerun_report(path: Path) -> dict:
    """The report again from a run's JSON line (the last line of its output): e.g. after changing the report."""
    try:
        summary = json.loads(Path(path).read_text().strip().splitlines()[-1])
        results = {int(n): r for n, r in summary["per_size"].items()}
        names = summary.get("methods") or list(dict.fromkeys(row.split("+")[0] for r in results.values() for row in r["rows"]))
        markdown, new = report(results, summary["queries"], names, summary["checkpoints"], summary["machine"])
    except (OSError, IndexError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} does not end with this benchmark's JSON line ({type(e).__name__}: {e})") from None
    print(markdown)
    return new | {k: summary[k] for k in ("folders", "checkpoints_folder") if k in summary}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="corpus sizes, documents")
    p.add_argument("--queries", type=int, default=QUERIES)
    p.add_argument("--methods", nargs="+", default=METHODS, help=f"registry names (default: {' '.join(METHODS)})")
    p.add_argument("--modes", nargs="*", choices=methods.MODE_NAMES, metavar="MODE",
                   help="extra search modes, as the evaluation's --modes (default: all; none given: each method's own)")
    p.add_argument("--checkpoints", type=Path, default=ROOT / CHECKPOINTS_DIR,
                   help="where fitted methods' checkpoints are read (a missing one is fitted on planted vectors)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--keep", action="store_true", help="keep the temporary task, cache, results and checkpoints")
    p.add_argument("--report", type=Path, metavar="OUTPUT", help="measure nothing: the report again from a run's output")
    args = p.parse_args(argv)
    try:
        summary = rerun_report(args.report) if args.report else run(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
