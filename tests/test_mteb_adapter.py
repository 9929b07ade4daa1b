"""mteb_adapter.py: the private parts of mteb this tool relies on still exist and still behave as the code assumes.
When mteb changes, these fail first, naming the installed mteb version."""

import math

import mteb
import numpy as np
import pytest
from mteb.models.model_meta import ModelMeta, ScoringFunction

import encoders
import methods
import mteb_adapter
from conftest import TINY_DOCS, TINY_QUERIES
from data import document_text

VERSION = f"mteb {mteb.__version__} (adapters tested with {mteb_adapter.TESTED_WITH})"


def test_the_private_pieces_are_there():
    mteb_adapter.check_mteb()  # raises UsageError naming the version when one is gone


def test_ndcg_of_hand_made_rankings_is_the_hand_computed_value():
    results = {
        "graded": {"d1": 0.9, "d2": 0.8, "d3": 0.7},  # relevant d1 (1) at rank 1 and d3 (2) at rank 3
        "second": {"d1": 0.9, "d2": 0.8},  # the only relevant document at rank 2
        "tie": {"a": 1.0, "b": 1.0},  # tied scores: pytrec_eval orders by document id, descending: b, then a
        "eleventh": {f"x{i:02d}": 1 - i / 100 for i in range(10)} | {"d1": 0.0},  # below the cut-off
    }
    qrels = {"graded": {"d1": 1, "d3": 2, "d9": 0}, "second": {"d2": 1}, "tie": {"a": 1}, "eleventh": {"d1": 1},
             "unranked": {"d1": 1}}
    # gain = relevance (trec_eval), discount log2(rank + 1); ideal: relevance 2 first, then 1
    graded = (1 / math.log2(2) + 2 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
    want = {"eleventh": 0.0, "graded": graded, "second": 1 / math.log2(3), "tie": 1 / math.log2(3)}
    per_query = mteb_adapter.per_query_ndcg(results, qrels)
    assert list(per_query.index) == sorted(want), VERSION  # a query with no ranking is left out, not counted as 0
    np.testing.assert_allclose(per_query.to_numpy(), [want[q] for q in sorted(want)], atol=1e-5, err_msg=VERSION)
    assert mteb_adapter.ndcg_at_10(results, qrels) == pytest.approx(np.mean(list(want.values())), abs=1e-5), VERSION


def test_a_local_task_keeps_its_name_and_evaluator_and_reads_the_folder(tiny_beir):
    [task] = mteb_adapter.get_retrieval_tasks(["SciFact"], tiny_beir)
    assert task.metadata.name == "SciFact" and task.metadata.main_score == "ndcg_at_10", VERSION
    assert mteb_adapter.task_qrels(task, "test") == {q: {d: 1} for q, (_, d) in TINY_QUERIES.items()}, VERSION
    texts = mteb_adapter.task_texts(task)
    assert texts["document"] == [document_text({"title": t, "text": x}) for t, x in TINY_DOCS.values()], VERSION
    assert texts["query"] == [q for q, _ in TINY_QUERIES.values()] and task.data_loaded, VERSION


def test_a_row_through_mteb_returns_the_ranking_methods_rank_gives(tiny_beir, tmp_path, model):
    """RowSearch (an mteb SearchProtocol model) around a row's MethodIndex: mteb's score, the ranking it keeps, and
    methods.rank on the same embeddings agree, and the row's name is mteb's revision."""
    [task] = mteb_adapter.get_retrieval_tasks(["SciFact"], tiny_beir)
    meta = ModelMeta.create_empty(overwrites=dict(name="local/minilm", revision="float", embed_dim=384,
                                                  similarity_fn_name=ScoringFunction.COSINE, framework=["PyTorch"]))
    method = methods.make_method("stage1_zero", 384)
    base = encoders.BaseModel(encoders.DEFAULT_MODEL, tmp_path)
    search = mteb_adapter.RowSearch(mteb_adapter.TaskEmbeddings(base), "stage1_zero+asym", methods.MethodIndex(method, "asym"), meta)
    assert isinstance(search, mteb.SearchProtocol), VERSION
    assert search.mteb_model_meta.revision == "stage1_zero+asym", VERSION
    result = mteb.evaluate(search, tasks=[task], cache=None, show_progress_bar=False)
    ranking = search.rankings["SciFact", "test"]

    docs = model.encode([document_text({"title": t, "text": x}) for t, x in TINY_DOCS.values()])  # independent encoding
    queries = model.encode([q for q, _ in TINY_QUERIES.values()])
    expected = methods.rank(method, "asym", docs, queries, list(TINY_DOCS), list(TINY_QUERIES))
    assert set(ranking) == set(expected), VERSION
    for q in expected:
        assert set(ranking[q]) == set(expected[q]), VERSION
        np.testing.assert_allclose([ranking[q][d] for d in expected[q]], list(expected[q].values()), atol=1e-4, err_msg=VERSION)
    qrels = mteb_adapter.task_qrels(task, "test")  # mteb's own layout, once it has converted the local data
    assert qrels == {q: {d: 1} for q, (_, d) in TINY_QUERIES.items()}, VERSION
    assert result.task_results[0].get_score() == pytest.approx(mteb_adapter.ndcg_at_10(ranking, qrels), abs=1e-9), VERSION
    assert mteb_adapter.per_query_ndcg(ranking, qrels).mean() == pytest.approx(mteb_adapter.ndcg_at_10(ranking, qrels)), VERSION


def test_task_prompts_are_mtebs_choice(tmp_path):
    """task_prompt gives what mteb's get_prompt_name picks: task-and-kind before task before kind."""

    class Prompted:
        prompts = {"query": "query: ", "document": "passage: ", "SciFact-query": "Retrieve a claim's evidence: "}

    assert mteb_adapter.task_prompt(Prompted, "SciFact", "query") == "Retrieve a claim's evidence: "
    assert mteb_adapter.task_prompt(Prompted, "SciFact", "document") == "passage: "
    assert mteb_adapter.task_prompt(Prompted, "NFCorpus", "query") == "query: "

    class Plain:
        prompts = {}

    assert mteb_adapter.task_prompt(Plain, "SciFact", "query") is None
