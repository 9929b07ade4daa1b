"""Everything this tool asks of mteb beyond `mteb.evaluate` and `mteb.get_tasks`, kept together: each row as an mteb
`SearchProtocol` model, the task embeddings every row shares, and the few private pieces of mteb it needs.

mteb 2.x has no public function for per-query nDCG, for giving a task local data, for building a task's texts as its
search encodes them, or for the prompt it gives a task's texts. Each use is one function here; `check_mteb()` refuses,
in one line naming the mteb version, an mteb whose private pieces moved (both commands call it at start).
"""

import hashlib
import json

import mteb
import numpy as np
import pandas as pd
import pytrec_eval
from mteb.types import PromptType

from data import UsageError, find_task_folder, load_beir
from encoders import PLURAL

TESTED_WITH = "2.26"  # the mteb release these adapters were written against


def check_mteb() -> None:
    """Raise UsageError, one line naming the mteb version, if the private pieces used below are gone or changed.
    Both commands call it before any work."""
    try:
        from mteb._create_dataloaders import _retrieval_texts  # noqa: F401
        from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores  # noqa: F401
        from mteb.abstasks.retrieval import AbsTaskRetrieval
        from mteb.models.abs_encoder import AbsEncoder, get_prompt_name  # noqa: F401
    except ImportError as e:
        raise UsageError(f"mteb {mteb.__version__} is not supported (this tool was tested with {TESTED_WITH}): {e}") from None
    for owner, name in [(AbsTaskRetrieval, "convert_v1_dataset_format_to_v2"), (AbsEncoder, "validate_task_to_prompt_name")]:
        if not hasattr(owner, name):
            raise UsageError(f"mteb {mteb.__version__} is not supported (this tool was tested with {TESTED_WITH}): "
                             f"{owner.__name__}.{name} is gone")


def task_prompt(base, task_name: str, kind: str) -> str | None:
    """The prompt mteb gives a task's texts of `kind` ("query", "document") for a model with `base.prompts`: by task
    name and kind, task name, task type and kind, task type, then kind (mteb's get_prompt_name); None when mteb
    finds none (sentence-transformers' own choice then applies, encoders.BaseModel.prompt)."""
    from mteb.models.abs_encoder import AbsEncoder, get_prompt_name

    if not base.prompts:
        return None
    prompts, _ = AbsEncoder.validate_task_to_prompt_name(base.prompts, raise_for_invalid_keys=False)
    name = get_prompt_name(prompts, mteb.get_task(task_name).metadata, PromptType(kind)) if prompts else None
    return prompts.get(name) if name else None


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


def load_local_task(task, data_dir) -> None:
    """Fill a task's data from `data_dir/<name>/` (BEIR layout, matched case-insensitively). mteb 2.x still converts
    its v1 attributes (corpus, queries, relevant_docs) to its own layout, so the task keeps its name and evaluator."""
    folder = find_task_folder(data_dir, task.metadata.name)
    task.corpus, task.queries, task.relevant_docs = {}, {}, {}
    for split in task.eval_splits:
        task.corpus[split], task.queries[split], task.relevant_docs[split] = load_beir(folder, split)
    task.data_loaded = True
    task.convert_v1_dataset_format_to_v2(num_proc=None)  # mteb 2.x's layout, as mteb would convert it before evaluating


class TaskEmbeddings:
    """The float embeddings of each task's documents and queries: the texts as mteb builds them, with the prompts mteb
    gives them, read through the base model's cache once per task, split and subset, then kept for every row."""

    def __init__(self, base):
        self.base, self.arrays = base, {}

    def get(self, dataset, prompt_type, task_metadata, hf_split: str, hf_subset: str) -> np.ndarray:
        from mteb._create_dataloaders import _retrieval_texts

        key = task_metadata.name, hf_split, hf_subset, prompt_type
        if key not in self.arrays:
            kind = prompt_type.value
            self.arrays[key] = self.base.embed(_retrieval_texts(dataset, prompt_type), kind,
                                               task_prompt(self.base, task_metadata.name, kind),
                                               desc=f"encoding {task_metadata.name} {PLURAL[kind]}")
        return self.arrays[key]


class RowSearch:
    """One row of the table as an mteb search model (mteb's public SearchProtocol: index, search, mteb_model_meta):
    the shared float embeddings, stored and searched as the row's method does (`index_backend`, a MethodIndex). It
    keeps each task's ranking for the per-query significance tests; the row's name is mteb's model revision."""

    def __init__(self, embeddings: TaskEmbeddings, row: str, index, meta):
        self.embeddings, self.index_backend, self.doc_ids, self.rankings = embeddings, index, [], {}
        self.mteb_model_meta = meta.model_copy(update=dict(revision=row))

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
        results = {q: {doc_ids[j]: float(s) for j, s in zip(row_ids, row_scores)}
                   for q, row_ids, row_scores in zip(queries["id"], ids.tolist(), scores.tolist())}
        self.rankings[task_metadata.name, hf_split] = results
        return results


def task_texts(task) -> dict[str, list[str]]:
    """Every text mteb will encode for a loaded retrieval task, by kind ("query", "document"), as its dataloaders build
    them (documents as title and text joined, queries with their instructions)."""
    from mteb._create_dataloaders import _retrieval_texts

    texts = {"query": [], "document": []}
    for subset in task.dataset.values():
        for split in task.eval_splits:
            texts["query"] += _retrieval_texts(subset[split]["queries"], PromptType.query)
            texts["document"] += _retrieval_texts(subset[split]["corpus"], PromptType.document)
    return {kind: list(dict.fromkeys(t)) for kind, t in texts.items()}


def task_fingerprints(task) -> dict[str, dict]:
    """For each evaluated split of a loaded retrieval task ("SciFact test"): sha256 over its documents' and queries'
    ids and texts (as mteb builds them) and its relevance judgements, with how many documents and queries it has. Rows
    of a table are comparable only when scored on the same fingerprint."""
    from mteb._create_dataloaders import _retrieval_texts

    out = {}
    for split in task.eval_splits:
        digest, documents, queries = hashlib.sha256(), 0, 0
        for subset_name, subset in sorted(task.dataset.items()):
            corpus, questions = subset[split]["corpus"], subset[split]["queries"]
            qrels = {q: dict(sorted(d.items())) for q, d in sorted(subset[split]["relevant_docs"].items())}
            digest.update(json.dumps([subset_name, list(corpus["id"]), list(_retrieval_texts(corpus, PromptType.document)), list(questions["id"]),
                                      list(_retrieval_texts(questions, PromptType.query)), qrels]).encode())
            documents, queries = documents + len(corpus), queries + len(questions)
        out[f"{task.metadata.name} {split}"] = dict(fingerprint=digest.hexdigest(), documents=documents, queries=queries)
    return out


def task_scores(task_result) -> dict[str, dict]:
    """{split: {metric: value}} of an mteb TaskResult (its first subset), numbers only."""
    return {split: {k: v for k, v in scores[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for split, scores in task_result.scores.items()}


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
