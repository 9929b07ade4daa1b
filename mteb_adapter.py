"""The few places where this tool needs more of mteb than its public API, kept together.

mteb 2.x has no public function for per-query nDCG, no public way to give a task local data, and no public way to
build a task's texts as its search encodes them. Each use is one function here; `check_mteb()` fails loudly, naming
the mteb version, when an upgrade moves what they rely on (a test calls it). Everything else is public: each row is
an mteb `SearchProtocol` model run by `mteb.evaluate`.
"""

import mteb
import numpy as np
import pandas as pd
import pytrec_eval
from mteb.types import PromptType

from data import UsageError, find_task_folder, load_beir

TESTED_WITH = "2.26"  # the mteb release these adapters were written against


def check_mteb() -> None:
    """Raise RuntimeError naming the mteb version if the private pieces used below are gone or changed."""
    try:
        from mteb._create_dataloaders import _retrieval_texts, create_dataloader  # noqa: F401
        from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores  # noqa: F401
        from mteb.abstasks.retrieval import AbsTaskRetrieval
    except ImportError as e:
        raise RuntimeError(f"mteb {mteb.__version__} (adapters tested with {TESTED_WITH}): {e}") from None
    if not hasattr(AbsTaskRetrieval, "convert_v1_dataset_format_to_v2"):
        raise RuntimeError(f"mteb {mteb.__version__} (adapters tested with {TESTED_WITH}) lacks convert_v1_dataset_format_to_v2")


def retrieval_scores(results: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]):
    """mteb's own retrieval metrics (pytrec_eval) of a ranking {query: {doc: score}}; `.all_scores` per query."""
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    return calculate_retrieval_scores(results, qrels, [10])


def ndcg_at_10(results: dict, qrels: dict) -> float:
    """Mean nDCG@10 over the queries of `qrels` that `results` ranks (mteb leaves out a query without results), as mteb
    reports it."""
    return retrieval_scores(results, qrels).ndcg["NDCG@10"]


def per_query_ndcg(results: dict, qrels: dict) -> pd.Series:
    """nDCG@10 of every query that `results` ranks, indexed by query id: pytrec_eval's `ndcg_cut_10`, the number mteb
    averages into its score (calculate_retrieval_scores would also compute every other metric: seconds per row)."""
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(results)
    return pd.Series({qid: s["ndcg_cut_10"] for qid, s in scores.items()}).sort_index()


def task_qrels(task, split: str) -> dict[str, dict[str, int]]:
    """A loaded retrieval task's relevance judgements for a split (mteb 2.x's dataset layout)."""
    return task.dataset["default"][split]["relevant_docs"]


def task_texts(task) -> dict[str, list[str]]:
    """Every text mteb will encode for a loaded retrieval task, by prompt type ("query", "document"): documents as
    title and text joined, queries with their instructions, exactly as mteb's dataloaders build them."""
    from mteb._create_dataloaders import _retrieval_texts
    from mteb.types import PromptType

    if task.dataset is None:  # local data arrives in mteb's v1 attributes; mteb converts them before evaluating
        task.convert_v1_dataset_format_to_v2(num_proc=None)
    texts = {"query": [], "document": []}
    for subset in task.dataset.values():
        for split in task.eval_splits:
            texts["query"] += _retrieval_texts(subset[split]["queries"], PromptType.query)
            texts["document"] += _retrieval_texts(subset[split]["corpus"], PromptType.document)
    return {kind: list(dict.fromkeys(t)) for kind, t in texts.items()}


def load_local_task(task, data_dir) -> None:
    """Fill a task's data from `data_dir/<name>/` (BEIR layout, matched case-insensitively). mteb 2.x still converts
    its v1 attributes (corpus, queries, relevant_docs) to its own layout, so the task keeps its name and evaluator."""
    folder = find_task_folder(data_dir, task.metadata.name)
    task.corpus, task.queries, task.relevant_docs = {}, {}, {}
    for split in task.eval_splits:
        task.corpus[split], task.queries[split], task.relevant_docs[split] = load_beir(folder, split)
    task.data_loaded = True


class TaskEmbeddings:
    """The float embeddings of each task's documents and queries, built by mteb's own dataloader and read through the
    cached encoder once per task, split and subset, then kept in memory for every row (each row otherwise rebuilds
    the dataloader and reads the cache again: most of a warm row's time)."""

    def __init__(self, encoder, batch_size: int):
        self.encoder, self.batch_size, self.arrays = encoder, batch_size, {}

    def get(self, dataset, prompt_type, task_metadata, hf_split: str, hf_subset: str) -> np.ndarray:
        from mteb._create_dataloaders import create_dataloader

        key = task_metadata.name, hf_split, hf_subset, prompt_type
        if key not in self.arrays:
            loader = create_dataloader(dataset, task_metadata=task_metadata, prompt_type=prompt_type, batch_size=self.batch_size)
            self.arrays[key] = np.asarray(self.encoder.encode(loader, task_metadata=task_metadata, hf_split=hf_split,
                                                              hf_subset=hf_subset, prompt_type=prompt_type,
                                                              batch_size=self.batch_size), dtype=np.float32)
        if len(self.arrays[key]) != len(dataset):
            raise RuntimeError(f"{task_metadata.name} {hf_split}: {len(dataset)} {prompt_type.value}s, {len(self.arrays[key])} embeddings")
        return self.arrays[key]


class RowSearch:
    """One row of the table as an mteb search model (mteb's public SearchProtocol: index, search, mteb_model_meta):
    the shared float embeddings, stored and searched as the row's method does (`index_backend`, a MethodIndex). It
    keeps each task's ranking for the per-query significance tests; the row's name is mteb's model revision."""

    def __init__(self, embeddings: TaskEmbeddings, row: str, index):
        self.embeddings, self.index_backend, self.doc_ids, self.rankings = embeddings, index, [], {}
        self.mteb_model_meta = embeddings.encoder.mteb_model_meta.model_copy(update=dict(revision=row))

    def index(self, corpus, *, task_metadata, hf_split: str, hf_subset: str, **kwargs) -> None:
        docs = self.embeddings.get(corpus, PromptType.document, task_metadata, hf_split, hf_subset)
        self.doc_ids = list(corpus["id"])
        self.index_backend.add_documents(docs, self.doc_ids)

    def search(self, queries, *, task_metadata, hf_split: str, hf_subset: str, top_k: int, top_ranked=None, **kwargs) -> dict:
        if top_ranked is not None:
            raise UsageError(f"{task_metadata.name} re-ranks given candidates; only full-corpus retrieval is supported")
        embeddings = self.embeddings.get(queries, PromptType.query, task_metadata, hf_split, hf_subset)
        scores, ids = self.index_backend.search(embeddings, top_k)
        self.index_backend.clear()
        doc_ids = self.doc_ids
        results = {q: {doc_ids[j]: s for j, s in zip(row_ids, row_scores)} for q, row_ids, row_scores in zip(queries["id"], ids, scores)}
        self.rankings[task_metadata.name, hf_split] = results
        return results


def get_retrieval_tasks(names: list[str], data_dir=None) -> list:
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
