"""How much retrieval quality survives binary quantisation? Evaluate float and quantised embeddings on MTEB retrieval.

Read top to bottom: arguments -> base model -> the method table -> tasks -> evaluate -> report.

    python evaluate_quantization_mteb.py --tasks NFCorpus SciFact --data-dir ../shared/data/beir
"""

import argparse
import datetime
import json
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
import scipy.stats  # noqa: E402
import torch  # noqa: E402
from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores  # noqa: E402
from mteb.models.cache_wrappers import CachedEmbeddingWrapper  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.models.search_wrappers import SearchEncoderWrapper  # noqa: E402

from data import PROTOCOLS, UsageError, check_writable, find_task_folder, load_beir, write_atomic  # noqa: E402
from encoders import CACHE_DIR, DEFAULT_MODEL, load_base_model, model_slug  # noqa: E402
from methods import build_binary_index, pack_codes, rescore_search  # noqa: E402
from quantization_modules import QuantizationModuleStage1, checkpoint_path, load_quantizer, to_signed  # noqa: E402

# defaults (override on the command line)
CHECKPOINTS_DIR = "checkpoints"
OUTPUT_DIR = "results"
BATCH_SIZE = 32
RESCORE_K = 50  # Hamming candidates re-ranked with float vectors in the +rescore rows
METHODS = ["float", "stage1_zero", "stage1_trained", "stage1_rotated", "stage2_trained"]  # in-domain adds float_adapted
MODES = {"hamming": "", "rescore": "+rescore", "asym": "+asym"}  # search mode -> suffix of the row name
RESAMPLES = 10_000  # paired randomisation test and bootstrap interval over per-query nDCG@10
ALPHA = 0.05
SEED = 0


class BinaryIndex:
    """An mteb search backend over packed binary codes: faiss IndexBinaryFlat, exact Hamming distance.

    It receives float embeddings from the shared encoder and quantises them itself. Modes:
      hamming: rank by Hamming distance (score = bits - 2 * distance, the dot product of ±1 codes);
      rescore: the Hamming top-k re-ranked by float query . float document (float documents are kept), then the rest
               of the Hamming list, so metrics at cut-offs above k are those of the Hamming ranking below the head;
      asym:    the query's float margins (x - thresholds; per pair, the larger) . the document's ±1 code (no float
               documents kept).
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
            scores, ids = rescore_search(self.index, self.float_docs, queries, self._codes(queries), k, top_k)
            return scores.tolist(), ids.tolist()
        codes = faiss_codes(self.index)[:, : self.quantizer.bits_per_vector]
        float_queries = self.quantizer.margins(torch.from_numpy(queries))
        scores, ids = torch.topk(float_queries @ to_signed(torch.from_numpy(codes)).T, top_k, dim=1)
        return scores.tolist(), ids.tolist()

    def clear(self) -> None:
        self.index, self.float_docs = None, None


class RowSearch(SearchEncoderWrapper):
    """mteb's SearchEncoderWrapper for one row of the table: exact float search, or a BinaryIndex backend.

    It keeps each task's rankings in memory for the per-query significance tests.
    """

    def __init__(self, encoder, row: str, index: BinaryIndex | None = None):
        super().__init__(encoder, index_backend=index)
        self.mteb_model_meta = encoder.mteb_model_meta.model_copy(update=dict(revision=row))
        self.rankings = {}

    def search(self, queries, *, task_metadata, hf_split, **kwargs):
        results = super().search(queries, task_metadata=task_metadata, hf_split=hf_split, **kwargs)
        self.rankings[task_metadata.name, hf_split] = results
        return results

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
    p.add_argument("--checkpoints", type=Path, default=Path(CHECKPOINTS_DIR), help="reads <dir>/<model-slug>/[in-domain/]<method>.safetensors")
    p.add_argument("--data-dir", type=Path, help="folder of BEIR task folders (scifact/, nfcorpus/); default: MTEB's hub loader")
    p.add_argument("--protocol", default="transfer", choices=PROTOCOLS, help="which checkpoints: transfer, or in-domain (adds float_adapted)")
    p.add_argument("--output", type=Path, help=f"default: {OUTPUT_DIR}/ (transfer), {OUTPUT_DIR}/in-domain/ (in-domain)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to evaluate (default: all)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="search modes of the binary methods")
    p.add_argument("--rescore-k", type=int, default=RESCORE_K, help="Hamming candidates re-ranked by float (+rescore rows)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR), help="float embedding cache (one pass per text)")
    args = p.parse_args(argv)
    args.output = args.output or Path(OUTPUT_DIR) / ("" if args.protocol == "transfer" else args.protocol)
    if args.rescore_k < 10:
        p.error(f"--rescore-k must be at least 10 (nDCG@10 needs ten documents), got {args.rescore_k}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
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
        else:  # loaded once here, so mteb keeps it across rows (and its qrels stay readable for significance)
            try:
                task.load_data()
            except Exception as e:  # noqa: BLE001 - offline, no such dataset, hub errors: all need --data-dir
                raise UsageError(f"cannot load {task.metadata.name} from the Hugging Face hub ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); give --data-dir with a local BEIR copy") from None
    return tasks


def load_local_task(task, data_dir: Path) -> None:
    """Fill a task's data from `data_dir/<name>/` (matched case-insensitively); it keeps its MTEB name and evaluator."""
    folder = find_task_folder(data_dir, task.metadata.name)
    task.corpus, task.queries, task.relevant_docs = {}, {}, {}
    for split in task.eval_splits:
        task.corpus[split], task.queries[split], task.relevant_docs[split] = load_beir(folder, split)
    task.data_loaded = True



def per_query_ndcg(rankings: dict, task, split: str) -> pd.Series:
    """nDCG@10 of every query, recomputed with mteb's metric from the rankings one row produced."""
    qrels = task.dataset["default"][split]["relevant_docs"]
    scores = calculate_retrieval_scores(rankings, qrels, [10]).all_scores
    return pd.Series({qid: s["ndcg_cut_10"] for qid, s in scores.items()}).sort_index()


def paired_test(a: np.ndarray, b: np.ndarray, seed: int = SEED) -> tuple[float, float, float, float]:
    """Mean of a - b over queries, its 95% bootstrap interval, and a two-sided paired randomisation p-value."""
    diff = a - b
    if np.allclose(diff, 0):
        return 0.0, 0.0, 0.0, 1.0
    low, high = scipy.stats.bootstrap((diff,), np.mean, n_resamples=RESAMPLES, method="percentile", random_state=seed).confidence_interval
    # one sample with permutation_type "samples": scipy flips the sign of each query's difference (swaps the pair)
    p = scipy.stats.permutation_test((diff,), lambda d, axis: np.mean(d, axis=axis), permutation_type="samples",
                                     n_resamples=RESAMPLES, vectorized=True, random_state=seed).pvalue
    return float(diff.mean()), float(low), float(high), float(p)


def report(rows: pd.DataFrame, title: str, reference: str) -> str:
    """Markdown: nDCG@10 per task x method with a mean row and significance marks, then per method: bits, bytes,
    retention vs `reference`, and the paired differences against `reference` and stage1_zero."""
    order = list(dict.fromkeys(rows.method))
    wide = rows.pivot_table(index="method", columns=["metric", "task"], values="value").reindex(order)
    ndcg = wide["ndcg_at_10"].T
    ndcg.loc["mean"] = ndcg.mean()
    cells, marks = ndcg.map("{:.4f}".format), []
    for base, mark in [(reference, "*"), ("stage1_zero", "†")]:
        if f"p_vs_{base}" in wide:
            significant = (wide[f"p_vs_{base}"].T < ALPHA).reindex(index=cells.index, columns=cells.columns, fill_value=False)
            cells = cells.where(~significant, cells + mark)
            marks.append(f"{mark} differs from {base}")
    marks = f" Marks: {', '.join(marks)} (paired randomisation test over per-query nDCG@10, {RESAMPLES:,} resamples, p < {ALPHA})" if marks else ""
    lines = [f"## {title}", "", f"nDCG@10.{marks}", "", cells.to_markdown(), ""]
    per_method = pd.DataFrame({"bits": wide["bits_per_vector"].iloc[:, 0], "bytes": wide["bytes_per_vector"].iloc[:, 0]}).astype(int)
    if "retention" in wide:
        for task in wide["retention"].columns:
            per_method[f"{task} retention"] = wide["retention"][task].map("{:.1%}".format)
        per_method["mean retention"] = wide["retention"].mean(axis=1).map("{:.1%}".format)
    for base in (reference, "stage1_zero"):
        if f"delta_vs_{base}" in wide:
            for task in wide[f"delta_vs_{base}"].columns:
                per_method[f"{task} Δ vs {base} [95% CI] p"] = [
                    f"{wide[f'delta_vs_{base}'][task][m]:+.4f} [{wide[f'delta_vs_{base}_ci_low'][task][m]:+.4f}, "
                    f"{wide[f'delta_vs_{base}_ci_high'][task][m]:+.4f}] {wide[f'p_vs_{base}'][task][m]:.3f}" for m in order]
    lines += [(f"Cost, retention vs {reference} (nDCG@10 of the method / nDCG@10 of {reference}) and paired differences in nDCG@10"
               if "retention" in wide else "Cost and paired differences in nDCG@10"),
              "", per_method.to_markdown(), ""]
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
        check_writable(args.cache_dir, "embedding cache folder")

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
        metadata = {}

        def trained(stage):
            quantizer, metadata[stage] = load_quantizer(checkpoint_path(args.checkpoints, args.model, stage, args.protocol), args.model, dim,
                                                        args.protocol, stage)
            return quantizer

        method_table = {
            "float": lambda: None,
            # in-domain: the float model through the same learned transform. Thresholds learn none and an orthogonal
            # rotation leaves every cosine unchanged, so it is the float model (a non-orthogonal map would change it)
            "float_adapted": lambda: None,
            "stage1_zero": lambda: QuantizationModuleStage1(dim).eval(),
            "stage1_trained": lambda: trained("stage1"),
            "stage1_rotated": lambda: trained("stage1_rotated"),
            "stage2_trained": lambda: trained("stage2"),
        }
        wanted = [m for m in method_table if m in args.methods or (m == "float_adapted" and args.protocol == "in-domain" and "float" in args.methods)]
        quantizers = {m: method_table[m]() for m in wanted}
    except UsageError as e:
        sys.exit(f"error: {e}")
    reference = "float_adapted" if "float_adapted" in quantizers else "float"

    # every row is the shared float encoder, searched either exactly (float) or through a binary index
    rows_to_run = {}  # row name -> (mteb model, bits per vector, bytes per vector)
    for method, quantizer in quantizers.items():
        if quantizer is None:
            rows_to_run[method] = (RowSearch(cached, method), 32 * dim, 4 * dim)
            continue
        for mode in args.modes:
            index, row = BinaryIndex(quantizer, mode, args.rescore_k), method + MODES[mode]
            rows_to_run[row] = (RowSearch(cached, row, index), quantizer.bits_per_vector, index.bytes_per_vector(dim))

    # evaluate every task x row through mteb; mteb's own JSON goes under <output>/mteb
    records, timings, per_query = [], {}, {}
    result_cache = mteb.ResultCache(args.output / "mteb")
    for row, (model, bits, nbytes) in rows_to_run.items():
        start = time.time()
        result = mteb.evaluate(model, tasks=tasks, cache=result_cache, overwrite_strategy="always",
                               encode_kwargs={"batch_size": args.batch_size}, show_progress_bar=False)
        timings[row] = time.time() - start
        for task, task_result in zip(tasks, result.task_results):
            for split, scores in task_result.scores.items():
                for name, value in scores[0].items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        records.append((task_result.task_name, split, row, name, float(value)))
                records += [(task_result.task_name, split, row, "bits_per_vector", float(bits)),
                            (task_result.task_name, split, row, "bytes_per_vector", float(nbytes))]
                per_query[task_result.task_name, split, row] = per_query_ndcg(model.rankings[task_result.task_name, split], task, split)
        print(f"{row}: {timings[row]:.1f}s")
    rows = pd.DataFrame(records, columns=["task", "split", "method", "metric", "value"])

    # retention and paired significance against the reference (float, or float_adapted in-domain) and stage1_zero
    ndcg = rows[rows.metric == "ndcg_at_10"].set_index(["task", "split", "method"]).value
    extra = []
    for (task, split, row), scores in per_query.items():
        if reference in rows_to_run:
            extra.append((task, split, row, "retention", ndcg[task, split, row] / ndcg[task, split, reference]))
        for base in (reference, "stage1_zero"):
            if base in rows_to_run:
                delta, low, high, p = paired_test(scores.to_numpy(), per_query[task, split, base].to_numpy())
                extra += [(task, split, row, f"delta_vs_{base}", delta), (task, split, row, f"delta_vs_{base}_ci_low", low),
                          (task, split, row, f"delta_vs_{base}_ci_high", high), (task, split, row, f"p_vs_{base}", p)]
    rows = pd.concat([rows, pd.DataFrame(extra, columns=rows.columns)], ignore_index=True)
    rows.insert(0, "protocol", args.protocol)

    # report: markdown to stdout and results/, long-form CSV, and the quality-vs-bytes picture
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    sources = sorted({s.split("/")[0] + "/" for meta in metadata.values() for s in json.loads(meta.get("training_sources", "{}"))})
    trained_on = f"; trained on {', '.join(sources)}" if sources else ""
    title = f"{args.model} on {', '.join(t.metadata.name for t in tasks)}, protocol {args.protocol}{trained_on} ({stamp})"
    markdown = report(rows, title, reference)
    print("\n" + markdown)
    csv = rows.to_csv(index=False, float_format="%.6g")
    picture = plot(rows, f"{args.model}, protocol {args.protocol}: quality vs bytes")
    for name in (f"{stamp}.csv", "latest.csv"):
        write_atomic(args.output / name, csv)
    for name in (f"{stamp}.md", "latest.md"):
        write_atomic(args.output / name, markdown + "\n")
    write_atomic(args.output / "quality_vs_bytes.png", picture)
    print(f"wrote {args.output / (stamp + '.csv')}, latest.csv, latest.md and quality_vs_bytes.png; timings (s): "
          + ", ".join(f"{m} {s:.1f}" for m, s in timings.items()))


if __name__ == "__main__":
    main()
