"""How much retrieval quality survives binary quantisation? Evaluate float and quantised embeddings on MTEB retrieval.

Read top to bottom: arguments -> tasks -> base model and its cache -> the methods' rows -> mteb -> statistics -> report.

    python evaluate_quantization_mteb.py --tasks NFCorpus SciFact --data-dir ../shared/data/beir
"""

import argparse
import datetime
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import mteb
import pandas as pd
from mteb.models.cache_wrappers import CachedEmbeddingWrapper
from mteb.models.model_meta import ModelMeta, ScoringFunction
from tqdm import tqdm

import report
from data import PROTOCOLS, UsageError, check_writable, write_atomic
from embedding_cache import EmbeddingCache, count_cached
from encoders import CACHE_DIR, DEFAULT_MODEL, embed_texts, load_base_model, model_slug, quiet_libraries
from methods import LEARNED, METHODS, PROBE_DIM, RESCORE_K, MethodIndex, load_method, make_method, rows_of
from mteb_adapter import RowSearch, TaskEmbeddings, get_retrieval_tasks, per_query_ndcg, task_qrels, task_texts

# defaults (override on the command line)
CHECKPOINTS_DIR = "checkpoints"
OUTPUT_DIR = "results"
BATCH_SIZE = 32
DEFAULT_METHODS = [m for m in METHODS if m != "float_adapted"]  # in-domain adds float_adapted beside float
ALL_MODES = list(dict.fromkeys(mode for name in METHODS for mode in make_method(name, PROBE_DIM).modes))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--tasks", nargs="+", required=True, help="MTEB retrieval task names, e.g. NFCorpus SciFact")
    p.add_argument("--model", default=DEFAULT_MODEL, help="SentenceTransformer name or path (default: packaged MiniLM)")
    p.add_argument("--checkpoints", type=Path, default=Path(CHECKPOINTS_DIR), help="reads <dir>/<model-slug>/[in-domain/]<method>.safetensors")
    p.add_argument("--data-dir", type=Path, help="folder of BEIR task folders (scifact/, nfcorpus/); default: MTEB's hub loader")
    p.add_argument("--protocol", default="transfer", choices=PROTOCOLS, help="which checkpoints: transfer, or in-domain (adds float_adapted)")
    p.add_argument("--output", type=Path, help=f"default: {OUTPUT_DIR}/ (transfer), {OUTPUT_DIR}/in-domain/ (in-domain)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=DEFAULT_METHODS, metavar="METHOD",
                   help=f"registry names (default: all): {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--modes", nargs="*", choices=ALL_MODES, metavar="MODE",
                   help=f"extra search modes to run where a method has them (default: all; a method's first mode always "
                        f"runs): {', '.join(ALL_MODES)}")
    p.add_argument("--rescore-k", type=int, default=RESCORE_K, help="first-stage candidates re-ranked (+rescore rows)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR), help="float embedding cache (one pass per text)")
    p.add_argument("--device", nargs="+", help="cuda, cuda:0, mps, cpu (default: the fastest here); several encode in parallel")
    p.add_argument("--verbose", action="store_true", help="show the libraries' warnings and logs")
    args = p.parse_args(argv)
    args.output = args.output or Path(OUTPUT_DIR) / ("" if args.protocol == "transfer" else args.protocol)
    if args.rescore_k < 10:
        p.error(f"--rescore-k must be at least 10 (nDCG@10 needs ten documents), got {args.rescore_k}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def missing_texts(tasks: list, slug_dir: Path) -> dict[tuple[str, str], list[str]]:
    """Say per task how many texts it has and how many are cached; return the texts of each (task, "query" or
    "document") cache that is not complete (mteb's CachedEmbeddingWrapper layout: <cache>/<model-slug>/<task>/<kind>)."""
    missing = {}
    for task in tasks:
        name, texts = task.metadata.name, task_texts(task)
        cached = {kind: count_cached(t, slug_dir / name / kind) for kind, t in texts.items()}
        total, done = sum(map(len, texts.values())), sum(cached.values())
        print(f"{name}: {total:,} texts ({len(texts['document']):,} documents, {len(texts['query']):,} queries), "
              f"{done:,} cached, {total - done:,} to encode")
        missing |= {(name, kind): t for kind, t in texts.items() if cached[kind] < len(t)}
    return missing


def cached_dimension(slug_dir: Path, tasks: list) -> int:
    """The embedding dimension, read from the cache of a task whose texts are all cached (no model needed)."""
    cache = EmbeddingCache(slug_dir / tasks[0].metadata.name / "document")
    cache.load()
    return cache.dim


class BaseEncoder:
    """The float encoder every row reads through the cache: mteb's SentenceTransformerEncoderWrapper around the base
    model, which is loaded only when a text must be encoded, so a warm run never loads it."""

    def __init__(self, load_model, meta: ModelMeta):
        self.load_model, self.mteb_model_meta, self.wrapper = load_model, meta, None

    def encode(self, inputs, **kwargs):
        if self.wrapper is None:
            self.wrapper = mteb.models.SentenceTransformerEncoderWrapper(self.load_model())
        return self.wrapper.encode(inputs, **kwargs)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    try:
        run(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted; a rerun resumes from the cache", file=sys.stderr)
        sys.exit(130)


def run(args) -> None:
    """arguments -> tasks -> base model and its cache -> methods and their rows -> mteb -> statistics -> report."""
    tasks = get_retrieval_tasks(args.tasks, args.data_dir)
    check_writable(args.output)
    check_writable(args.cache_dir, "embedding cache folder")

    # base model: one float encoder, cached on disk, shared by every method; every text encoded once, up front; a run
    # whose texts are all cached reads the dimension from the cache and never loads the model
    slug_dir, missing = args.cache_dir / model_slug(args.model), missing_texts(tasks, args.cache_dir / model_slug(args.model))
    load_model = functools.cache(lambda: load_base_model(args.model, args.device[0] if args.device else None))
    if missing:
        dim = load_model().get_embedding_dimension()
        print(f"device {load_model().device}" + (f" (+ {', '.join(args.device[1:])})" if args.device and len(args.device) > 1 else ""))
    else:
        dim = cached_dimension(slug_dir, tasks) or load_model().get_embedding_dimension()
    meta = ModelMeta.create_empty(overwrites=dict(
        name=args.model if "/" in args.model else f"local/{args.model}", revision="float", embed_dim=dim,
        similarity_fn_name=ScoringFunction.COSINE, framework=["Sentence Transformers", "PyTorch"],
    ))
    cached = CachedEmbeddingWrapper(BaseEncoder(load_model, meta), slug_dir, cache_backend=EmbeddingCache)

    # the methods, from the registry (fitted and trained ones with their checkpoints); each mode is a row
    names = args.methods + (["float_adapted"] if args.protocol == "in-domain" and "float" in args.methods else [])
    rows_to_run, info, metadata = {}, {}, {}  # row -> mteb model; row -> what the report needs; method -> checkpoint
    embeddings = TaskEmbeddings(cached, args.batch_size)  # read from the cache once per task, shared by every row
    for name in names:
        method, metadata[name] = load_method(name, dim, args.model, args.checkpoints, args.protocol, args.modes)
        method.rescore_k = args.rescore_k
        for row, mode in rows_of(name, method, args.modes).items():
            rows_to_run[row] = RowSearch(embeddings, row, MethodIndex(method, mode))
            info[row] = dict(method=name, family=method.family, mode=mode, learned=name in LEARNED,
                             keeps_float=mode == "rescore", bits=method.bits_per_vector)
    reference = "float_adapted" if "float_adapted" in rows_to_run else "float"
    print(f"{len(rows_to_run)} rows: {', '.join(rows_to_run)}")
    if missing and any(getattr(load_model(), "prompts", {}).values()):
        print("the model has prompts: mteb encodes the missing texts, each with the prompt its task and kind ask for")
    else:  # each missing text once, up front, with a progress bar in texts
        for (name, kind), texts in missing.items():
            embed_texts(load_model(), texts, slug_dir / name / kind, batch_size=args.batch_size, devices=args.device,
                        desc=f"encoding {name} {'queries' if kind == 'query' else 'documents'}")

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
            for split, scores in task_result.scores.items():
                for name, value in scores[0].items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        records.append((task_result.task_name, split, row, name, float(value)))
                records += [(task_result.task_name, split, row, "bits_per_vector", float(info[row]["bits"])),
                            (task_result.task_name, split, row, "bytes_per_vector", float(model.index_backend.bytes_per_vector))]
                per_query[task_result.task_name, split, row] = per_query_ndcg(model.rankings[task_result.task_name, split],
                                                                              task_qrels(task, split))
    rows = pd.DataFrame(records, columns=["task", "split", "method", "metric", "value"])

    # retention and paired significance against the reference (float, or float_adapted in-domain) and stage1_zero
    rows.insert(0, "protocol", args.protocol)
    rows = report.add_statistics(rows, per_query, reference)

    # report: markdown to stdout and the output folder, long-form CSV, the quality-vs-bytes picture, mteb's JSON
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    sources = sorted({s.split("/")[0] + "/" for meta in metadata.values() for s in json.loads(meta.get("training_sources", "{}"))})
    trained_on = f"; fitted and trained on {', '.join(sources)}" if sources else ""
    title = f"{args.model} on {', '.join(t.metadata.name for t in tasks)}, protocol {args.protocol}{trained_on} ({stamp})"
    markdown = report.frontier_report(rows, per_query, title, reference, info)
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
    for file, data in [("latest.csv", csv), ("latest.md", markdown + "\n"), ("quality_vs_bytes.png", picture)]:
        write_atomic(args.output / file, data)
    for path in Path(mteb_json.name).rglob("*.json"):
        write_atomic(args.output / "mteb" / path.relative_to(mteb_json.name), path.read_bytes())
    mteb_json.cleanup()
    print(f"wrote {args.output / (name + '.csv')}, latest.csv, latest.md, quality_vs_bytes.png and mteb/; "
          f"evaluation {sum(timings.values()):.1f}s over {len(timings)} rows (slowest: "
          + ", ".join(f"{m} {s:.1f}s" for m, s in sorted(timings.items(), key=lambda kv: -kv[1])[:3]) + ")")


if __name__ == "__main__":
    main()
