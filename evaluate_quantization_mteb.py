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

import mteb
import numpy as np
import pandas as pd
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.cache_wrappers import CachedEmbeddingWrapper
from mteb.models.model_meta import ModelMeta, ScoringFunction

from quantization_modules import (
    CACHE_DIR,
    DEFAULT_MODEL,
    QuantizationModuleStage1,
    UsageError,
    checkpoint_path,
    load_base_model,
    load_beir,
    load_quantizer,
    model_slug,
    to_signed,
)

# defaults (override on the command line)
CHECKPOINTS_DIR = "checkpoints"
OUTPUT_DIR = "results"
BATCH_SIZE = 32
METHODS = ["float", "stage1_zero", "stage1_trained", "stage2_trained"]  # the rows of every table, in this order


class QuantizedEncoder(AbsEncoder):
    """Binary codes from a shared float encoder, returned as ±1 and scored by dot product.

    For ±1 codes, dot = bits_per_vector - 2 * Hamming distance, so mteb ranks exactly as a Hamming search over the
    packed codes would (unlike mteb's CompressionWrapper, which scores 0/1 vectors by cosine).
    """

    def __init__(self, float_encoder, quantizer: QuantizationModuleStage1, method: str):
        self.float_encoder = float_encoder
        self.quantizer = quantizer
        self.mteb_model_meta = float_encoder.mteb_model_meta.model_copy(
            update=dict(revision=method, embed_dim=quantizer.bits_per_vector, similarity_fn_name=ScoringFunction.DOT_PRODUCT)
        )

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        x = self.float_encoder.encode(
            inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset, prompt_type=prompt_type, **kwargs
        )
        return to_signed(self.quantizer.quantize(torch.as_tensor(np.asarray(x), dtype=torch.float32))).numpy()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage dump
    p.add_argument("--tasks", nargs="+", required=True, help="MTEB retrieval task names, e.g. NFCorpus SciFact")
    p.add_argument("--model", default=DEFAULT_MODEL, help="SentenceTransformer name or path (default: packaged MiniLM)")
    p.add_argument("--checkpoints", type=Path, default=Path(CHECKPOINTS_DIR), help="reads <dir>/<model-slug>/stage{1,2}.safetensors")
    p.add_argument("--data-dir", type=Path, help="folder of BEIR task folders (scifact/, nfcorpus/); default: MTEB's hub loader")
    p.add_argument("--output", type=Path, default=Path(OUTPUT_DIR))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="rows to evaluate (default: all)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--cache-dir", type=Path, default=Path(CACHE_DIR), help="float embedding cache (one pass per text)")
    return p.parse_args(argv)


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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def report(rows: pd.DataFrame, bits: dict[str, int], title: str) -> str:
    """Markdown: nDCG@10 per task x method with a mean row, then retention vs float with bits per vector."""
    ndcg = rows[rows.metric == "ndcg_at_10"].pivot_table(index="task", columns="method", values="value")
    ndcg = ndcg[[m for m in METHODS if m in ndcg.columns]]
    ndcg.loc["mean"] = ndcg.mean()
    lines = [f"## {title}", "", "nDCG@10", "", ndcg.to_markdown(floatfmt=".4f"), ""]
    if "float" in ndcg.columns:
        retention = ndcg.drop(index="mean").div(ndcg.drop(index="mean")["float"], axis=0).T
        retention.columns = [f"{c} retention" for c in retention.columns]
        retention.insert(0, "bits_per_vector", [bits[m] for m in retention.index])
        retention["mean retention"] = retention.iloc[:, 1:].mean(axis=1)
        lines += ["Retention vs float (nDCG@10 of the method / nDCG@10 of float)", "",
                  retention.to_markdown(floatfmt=("", ".0f") + (".1%",) * (retention.shape[1] - 1)), ""]
    return "\n".join(lines)


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
        encoders = {m: cached if q is None else QuantizedEncoder(cached, q, m) for m, q in quantizers.items()}
        bits = {m: 32 * dim if q is None else q.bits_per_vector for m, q in quantizers.items()}
    except UsageError as e:
        sys.exit(f"error: {e}")

    # evaluate every task x method through mteb; mteb's own JSON goes under <output>/mteb
    records, timings = [], {}
    result_cache = mteb.ResultCache(args.output / "mteb")
    for method, encoder in encoders.items():
        start = time.time()
        result = mteb.evaluate(encoder, tasks=tasks, cache=result_cache, overwrite_strategy="always",
                               encode_kwargs={"batch_size": args.batch_size}, show_progress_bar=False)
        timings[method] = time.time() - start
        for task_result in result.task_results:
            for split, scores in task_result.scores.items():
                for name, value in scores[0].items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        records.append((task_result.task_name, split, method, name, float(value)))
        records += [(t.metadata.name, t.eval_splits[0], method, "bits_per_vector", float(bits[method])) for t in tasks]
        print(f"{method}: {timings[method]:.1f}s")
    rows = pd.DataFrame(records, columns=["task", "split", "method", "metric", "value"])

    # report: markdown to stdout and results/, long-form CSV to results/<timestamp>.csv and results/latest.csv
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    markdown = report(rows, bits, f"{args.model} on {', '.join(t.metadata.name for t in tasks)} ({stamp})")
    print("\n" + markdown)
    csv = rows.to_csv(index=False, float_format="%.6g")
    for name in (f"{stamp}.csv", "latest.csv"):
        write_atomic(args.output / name, csv)
    for name in (f"{stamp}.md", "latest.md"):
        write_atomic(args.output / name, markdown + "\n")
    print(f"wrote {args.output / (stamp + '.csv')}, {args.output / 'latest.csv'} and .md; timings (s): "
          + ", ".join(f"{m} {s:.1f}" for m, s in timings.items()))


if __name__ == "__main__":
    main()
