"""How much retrieval quality survives binary quantisation? Evaluate float and quantised embeddings on MTEB retrieval.

Read top to bottom: arguments -> base model -> the method table -> tasks -> evaluate -> report.

    python evaluate_quantization_mteb.py --tasks NFCorpus SciFact --data-dir ../shared/data/beir
"""

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mteb  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from mteb.models.cache_wrappers import CachedEmbeddingWrapper  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.models.search_wrappers import SearchEncoderWrapper  # noqa: E402

from quantization_modules import (  # noqa: E402
    CACHE_DIR,
    DEFAULT_MODEL,
    QuantizationModuleStage1,
    UsageError,
    build_binary_index,
    checkpoint_path,
    load_base_model,
    load_beir,
    load_quantizer,
    model_slug,
    pack_codes,
    rescore_search,
    to_signed,
)

# defaults (override on the command line)
CHECKPOINTS_DIR = "checkpoints"
OUTPUT_DIR = "results"
BATCH_SIZE = 32
RESCORE_K = 50  # Hamming candidates re-ranked with float vectors in the +rescore rows
METHODS = ["float", "stage1_zero", "stage1_trained", "stage2_trained"]
MODES = {"hamming": "", "rescore": "+rescore", "asym": "+asym"}  # search mode -> suffix of the row name


class BinaryIndex:
    """An mteb search backend over packed binary codes: faiss IndexBinaryFlat, exact Hamming distance.

    It receives float embeddings from the shared encoder and quantises them itself. Modes:
      hamming: rank by Hamming distance (score = bits - 2 * distance, the dot product of ±1 codes);
      rescore: the Hamming top-k re-ranked by float query . float document (float documents are kept);
      asym:    the query's soft ±1 code (no hard rounding) . the document's ±1 code (no float documents kept).
    """

    def __init__(self, quantizer: QuantizationModuleStage1, mode: str = "hamming", rescore_k: int = RESCORE_K):
        self.quantizer, self.mode, self.rescore_k = quantizer, mode, rescore_k
        self.clear()

    def bytes_per_vector(self, dim: int) -> int:
        code_bytes = -(-self.quantizer.bits_per_vector // 8)
        return code_bytes + 4 * dim if self.mode == "rescore" else code_bytes

    def _codes(self, x: np.ndarray) -> np.ndarray:
        return pack_codes(self.quantizer.quantize(torch.from_numpy(x)))

    def add_documents(self, embeddings, idxs: list[str]) -> None:
        docs = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
        self.index = build_binary_index(self._codes(docs))
        self.float_docs = docs if self.mode == "rescore" else None

    def search(self, embeddings, top_k: int, similarity_fn=None, top_ranked=None, query_idx_to_id=None):
        queries = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
        top_k = min(top_k, self.index.ntotal)
        if self.mode == "hamming":
            distances, ids = self.index.search(self._codes(queries), top_k)
            return (self.quantizer.bits_per_vector - 2 * distances).tolist(), ids.tolist()
        if self.mode == "rescore":
            k = min(self.rescore_k, self.index.ntotal)
            scores, ids = rescore_search(self.index, self.float_docs, queries, self._codes(queries), k, min(k, top_k))
            return scores.tolist(), ids.tolist()
        codes = faiss_codes(self.index)[:, : self.quantizer.bits_per_vector]
        soft_queries = to_signed(self.quantizer(torch.from_numpy(queries))).detach()
        scores, ids = torch.topk(soft_queries @ to_signed(torch.from_numpy(codes)).T, top_k, dim=1)
        return scores.tolist(), ids.tolist()

    def clear(self) -> None:
        self.index, self.float_docs = None, None


class IndexedSearch(SearchEncoderWrapper):
    """mteb's SearchEncoderWrapper with an index backend, named after its row."""

    def __init__(self, encoder, index: BinaryIndex, row: str):
        super().__init__(encoder, index_backend=index)
        self.mteb_model_meta = encoder.mteb_model_meta.model_copy(update=dict(revision=row))

    def _sort_full_corpus_results(self, *, sub_corpus_ids, **kwargs):
        # mteb indexes a datasets Column once per hit here (minutes for 300 queries x 1,000 hits); a list is instant
        return super()._sort_full_corpus_results(sub_corpus_ids=list(sub_corpus_ids), **kwargs)


def faiss_codes(index) -> np.ndarray:
    """The unpacked bits stored in a faiss binary index, (ntotal, padded bits)."""
    return np.unpackbits(faiss.vector_to_array(index.xb).reshape(index.ntotal, index.code_size), axis=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--tasks", nargs="+", required=True, help="MTEB retrieval task names, e.g. NFCorpus SciFact")
    p.add_argument("--model", default=DEFAULT_MODEL, help="SentenceTransformer name or path (default: packaged MiniLM)")
    p.add_argument("--checkpoints", type=Path, default=Path(CHECKPOINTS_DIR), help="reads <dir>/<model-slug>/stage{1,2}.safetensors")
    p.add_argument("--data-dir", type=Path, help="folder of BEIR task folders (scifact/, nfcorpus/); default: MTEB's hub loader")
    p.add_argument("--output", type=Path, default=Path(OUTPUT_DIR))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to evaluate (default: all)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="search modes of the binary methods")
    p.add_argument("--rescore-k", type=int, default=RESCORE_K, help="Hamming candidates re-ranked by float (+rescore rows)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR), help="float embedding cache (one pass per text)")
    args = p.parse_args(argv)
    if args.rescore_k < 10:
        p.error(f"--rescore-k must be at least 10 (nDCG@10 needs ten documents), got {args.rescore_k}")
    return args


def get_retrieval_tasks(names: list[str], data_dir: Path | None) -> list:
    """MTEB tasks by name, refusing non-retrieval ones; with `data_dir`, each reads its BEIR folder from there."""
    names = list(dict.fromkeys(n for n in names if n.strip()))
    if not names:
        raise UsageError("no task names given to --tasks")
    try:
        tasks = list(mteb.get_tasks(tasks=names))
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else str(e)) from None
    for task in tasks:
        if task.metadata.type != "Retrieval":
            raise UsageError(f"{task.metadata.name} is a {task.metadata.type} task; only Retrieval tasks are supported")
        if data_dir is not None:
            load_local_task(task, data_dir)
    return tasks


def load_local_task(task, data_dir: Path) -> None:
    """Fill a task's data from `data_dir/<name>/` (matched case-insensitively); it keeps its MTEB name and evaluator."""
    if not Path(data_dir).is_dir():
        raise UsageError(f"data folder not found: {data_dir}")
    folders = {p.name.lower(): p for p in Path(data_dir).iterdir() if p.is_dir()}
    folder = folders.get(task.metadata.name.lower())
    if folder is None:
        raise UsageError(f"no folder for {task.metadata.name} in {data_dir} (have: {', '.join(sorted(folders)) or 'none'})")
    task.corpus, task.queries, task.relevant_docs = {}, {}, {}
    for split in task.eval_splits:
        task.corpus[split], task.queries[split], task.relevant_docs[split] = load_beir(folder, split)
    task.data_loaded = True


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"output folder {folder} is not writable ({e.strerror})") from None


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def report(rows: pd.DataFrame, title: str) -> str:
    """Markdown: nDCG@10 per task x method with a mean row, then per method: bits, bytes and retention vs float."""
    order = list(dict.fromkeys(rows.method))
    wide = rows.pivot_table(index="method", columns=["metric", "task"], values="value").reindex(order)
    ndcg = wide["ndcg_at_10"].T
    ndcg.loc["mean"] = ndcg.mean()
    lines = [f"## {title}", "", "nDCG@10", "", ndcg.to_markdown(floatfmt=".4f"), ""]
    per_method = pd.DataFrame({"bits_per_vector": wide["bits_per_vector"].iloc[:, 0], "bytes_per_vector": wide["bytes_per_vector"].iloc[:, 0]})
    if "retention" in wide:
        for task in wide["retention"].columns:
            per_method[f"{task} retention"] = wide["retention"][task].map("{:.1%}".format)
        per_method["mean retention"] = wide["retention"].mean(axis=1).map("{:.1%}".format)
        lines += ["Cost and retention vs float (nDCG@10 of the method / nDCG@10 of float)", ""]
    lines += [per_method.to_markdown(floatfmt=".0f"), ""]
    return "\n".join(lines)


def plot(rows: pd.DataFrame, title: str) -> bytes:
    """nDCG@10 against bytes per vector (log x), one panel and one frontier line per task, one labelled marker per method."""
    ndcg = rows[rows.metric == "ndcg_at_10"].merge(
        rows[rows.metric == "bytes_per_vector"][["task", "method", "value"]].rename(columns={"value": "bytes"}), on=["task", "method"])
    tasks = list(dict.fromkeys(ndcg.task))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        group = ndcg[ndcg.task == task].sort_values(["bytes", "value"])
        frontier = group[group.value >= group.value.cummax()]  # the best quality reachable at each size
        ax.plot(frontier.bytes, frontier.value, "-", color="tab:blue", alpha=0.5, label=f"{task} frontier")
        for _, r in group.iterrows():
            ax.plot(r.bytes, r.value, "o", color="tab:blue")
            ax.annotate(r.method, (r.bytes, r.value), fontsize=7, xytext=(5, -3), textcoords="offset points")
        ax.set(xscale="log", xlabel="bytes per vector (log scale)", ylabel="nDCG@10", title=task)
        ax.set_xlim(group.bytes.min() / 1.5, group.bytes.max() * 3)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    with tempfile.TemporaryFile() as f:
        fig.savefig(f, format="png", dpi=120)
        plt.close(fig)
        f.seek(0)
        return f.read()


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        tasks = get_retrieval_tasks(args.tasks, args.data_dir)
        check_writable(args.output)

        # base model: one float encoder, cached on disk, shared by every method
        st_model = load_base_model(args.model)
        dim = st_model.get_embedding_dimension()
        float_encoder = mteb.models.SentenceTransformerEncoderWrapper(st_model)
        float_encoder.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=args.model if "/" in args.model else f"local/{args.model}", revision="float", embed_dim=dim,
            similarity_fn_name=ScoringFunction.COSINE, framework=["Sentence Transformers", "PyTorch"],
        ))
        cached = CachedEmbeddingWrapper(float_encoder, args.cache_dir / model_slug(args.model))

        # the method table: name -> how to build its quantiser (None = float). A new quantiser is one more line.
        def trained(stage):
            return load_quantizer(checkpoint_path(args.checkpoints, args.model, stage), args.model, dim)[0]

        method_table = {
            "float": lambda: None,
            "stage1_zero": lambda: QuantizationModuleStage1(dim).eval(),
            "stage1_trained": lambda: trained("stage1"),
            "stage2_trained": lambda: trained("stage2"),
        }
        quantizers = {m: build() for m, build in method_table.items() if m in args.methods}
    except UsageError as e:
        sys.exit(f"error: {e}")

    # every row is the shared float encoder, searched either exactly (float) or through a binary index
    rows_to_run = {}  # row name -> (mteb model, bits per vector, bytes per vector)
    for method, quantizer in quantizers.items():
        if quantizer is None:
            rows_to_run[method] = (cached, 32 * dim, 4 * dim)
            continue
        for mode in args.modes:
            index, row = BinaryIndex(quantizer, mode, args.rescore_k), method + MODES[mode]
            rows_to_run[row] = (IndexedSearch(cached, index, row), quantizer.bits_per_vector, index.bytes_per_vector(dim))

    # evaluate every task x row through mteb; mteb's own JSON goes under <output>/mteb
    records, timings = [], {}
    result_cache = mteb.ResultCache(args.output / "mteb")
    for row, (model, bits, nbytes) in rows_to_run.items():
        start = time.time()
        result = mteb.evaluate(model, tasks=tasks, cache=result_cache, overwrite_strategy="always",
                               encode_kwargs={"batch_size": args.batch_size}, show_progress_bar=False)
        timings[row] = time.time() - start
        for task_result in result.task_results:
            for split, scores in task_result.scores.items():
                for name, value in scores[0].items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        records.append((task_result.task_name, split, row, name, float(value)))
                records += [(task_result.task_name, split, row, "bits_per_vector", float(bits)),
                            (task_result.task_name, split, row, "bytes_per_vector", float(nbytes))]
        print(f"{row}: {timings[row]:.1f}s")
    rows = pd.DataFrame(records, columns=["task", "split", "method", "metric", "value"])
    if "float" in rows_to_run:
        ndcg = rows[rows.metric == "ndcg_at_10"]
        float_ndcg = ndcg[ndcg.method == "float"].set_index("task").value
        retention = ndcg.assign(metric="retention", value=ndcg.value / ndcg.task.map(float_ndcg))
        rows = pd.concat([rows, retention], ignore_index=True)

    # report: markdown to stdout and results/, long-form CSV, and the quality-vs-bytes picture
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    title = f"{args.model} on {', '.join(t.metadata.name for t in tasks)} ({stamp})"
    markdown = report(rows, title)
    print("\n" + markdown)
    csv = rows.to_csv(index=False, float_format="%.6g")
    picture = plot(rows, f"{args.model}: quality vs bytes")
    for name in (f"{stamp}.csv", "latest.csv"):
        write_atomic(args.output / name, csv)
    for name in (f"{stamp}.md", "latest.md"):
        write_atomic(args.output / name, markdown + "\n")
    write_atomic(args.output / "quality_vs_bytes.png", picture)
    print(f"wrote {args.output / (stamp + '.csv')}, latest.csv, latest.md and quality_vs_bytes.png; timings (s): "
          + ", ".join(f"{m} {s:.1f}" for m, s in timings.items()))


if __name__ == "__main__":
    main()
