"""Shared fixtures: the real packaged model, a tiny BEIR folder written here, and a slice of the real SciFact."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_BEIR = ROOT.parent / "shared" / "data" / "beir"

import quantization_modules as qm  # noqa: E402

# A tiny retrieval set: each query has one relevant document, the rest are distractors on other topics.
TINY_DOCS = {
    "d1": ("Photosynthesis", "Plants convert sunlight, water and carbon dioxide into glucose and oxygen."),
    "d2": ("Volcanoes", "A volcano erupts when molten rock from the mantle rises through the crust."),
    "d3": ("Vaccines", "Vaccines train the immune system to recognise a pathogen without causing disease."),
    "d4": ("Black holes", "A black hole is a region of spacetime where gravity prevents even light from escaping."),
    "d5": ("Bread", "Yeast ferments sugars in dough, producing carbon dioxide that makes bread rise."),
    "d6": ("Tides", "Ocean tides are caused mainly by the gravitational pull of the moon."),
    "d7": ("Insulin", "Insulin is a hormone made by the pancreas that lowers blood sugar."),
    "d8": ("Chess", "Chess is a two-player strategy game played on an eight by eight board."),
}
TINY_QUERIES = {
    "q1": ("How do plants make their food from light?", "d1"),
    "q2": ("Why does a volcano erupt?", "d2"),
    "q3": ("How do vaccines protect against infection?", "d3"),
    "q4": ("Can light escape from a black hole?", "d4"),
    "q5": ("What makes bread dough rise?", "d5"),
    "q6": ("What causes tides in the sea?", "d6"),
}


def write_beir(folder: Path, corpus: dict, queries: dict, qrels: list[tuple[str, str, int]], split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id, doc in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": doc["title"], "text": doc["text"]}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return folder


@pytest.fixture(scope="session")
def model():
    return qm.load_base_model(qm.DEFAULT_MODEL)


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    """A data dir holding scifact/ with the tiny set, so it is read as MTEB's SciFact task."""
    write_beir(
        tmp_path / "data" / "scifact",
        {k: {"title": t, "text": x} for k, (t, x) in TINY_DOCS.items()},
        {k: q for k, (q, _) in TINY_QUERIES.items()},
        [(q, d, 1) for q, (_, d) in TINY_QUERIES.items()],
    )
    return tmp_path / "data"


@pytest.fixture(scope="session")
def shared_beir() -> Path:
    """../shared/data/beir; a skip when it is absent, a failure when REQUIRE_SHARED_DATA is set (as in CI)."""
    for task in ("nfcorpus", "scifact"):
        if not (SHARED_BEIR / task).is_dir():
            if os.environ.get("REQUIRE_SHARED_DATA"):
                pytest.fail(f"{SHARED_BEIR / task} is missing and REQUIRE_SHARED_DATA is set")
            pytest.skip(f"{SHARED_BEIR / task} is not here")
    return SHARED_BEIR


@pytest.fixture(scope="session")
def scifact_slice(tmp_path_factory, shared_beir) -> Path:
    """The first 60 SciFact test queries, their relevant documents and 400 other documents, from ../shared."""
    source = shared_beir / "scifact"
    corpus, queries, qrels = qm.load_beir(source, "test")
    qids = sorted(qrels, key=int)[:60]
    relevant = {d for q in qids for d in qrels[q]}
    others = [d for d in corpus if d not in relevant][:400]
    folder = tmp_path_factory.mktemp("slice") / "scifact"
    write_beir(folder, {d: corpus[d] for d in [*relevant, *others]}, {q: queries[q] for q in qids},
               [(q, d, s) for q in qids for d, s in qrels[q].items()])
    return folder.parent
