"""Shared fixtures: the real packaged model, a tiny BEIR folder written here, a slice of the real SciFact, real
fitting texts, and one run of the real training command whose checkpoints the other tests load.

Two tiers. A test is slow when it needs a fixture that runs the commands on real data (SLOW_FIXTURES) or is marked
`slow` itself (it runs a command in a process of its own, or encodes real texts): the full suite runs every test, the
edit loop's tier `pytest -m "not slow"` the others, in a couple of minutes."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_BEIR = SHARED_DATA / "beir"
FITTING_PAIRS = 540  # quora pairs: 1,070 fitting texts, as 10-bit PQ's 1,024 centroids per sub-quantiser need 1,024
FEW_PAIRS = 300  # 592 texts: fewer than 1,024 dimensions, so OPQ (minutes at d = 1,024) is refused in one line there

import data  # noqa: E402
import encoders  # noqa: E402
import evaluate_quantization_mteb  # noqa: E402
import methods  # noqa: E402
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


SLOW_FIXTURES = {"fitted", "fitted_in_domain", "evaluated", "task_embeddings", "scifact_slice", "task_with_ties", "shared_copy",
                 "in_domain_task", "embedding_cache", "projection_model", "bench", "tiny", "tiny_training"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the commands on real data or in a process of their own (full suite only)")


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def write_beir(folder: Path, corpus: dict, queries: dict, qrels: list[tuple[str, str, int]], split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id, doc in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": doc["title"], "text": doc["text"]}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    write_qrels(folder, split, qrels)
    return folder


def write_qrels(folder: Path, split: str, qrels: list[tuple[str, str, int]]) -> None:
    with open(folder / "qrels" / f"{split}.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))


def require(path: Path) -> Path:
    """A path under ../shared; a skip when it is absent, a failure when REQUIRE_SHARED_DATA is set (as in CI)."""
    if not path.exists():
        if os.environ.get("REQUIRE_SHARED_DATA"):
            pytest.fail(f"{path} is missing and REQUIRE_SHARED_DATA is set")
        pytest.skip(f"{path} is not here")
    return path


@pytest.fixture(scope="session")
def model():
    """The packaged MiniLM as sentence-transformers loads it."""
    return encoders.load_base_model(encoders.DEFAULT_MODEL)


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
        require(SHARED_BEIR / task)
    return SHARED_BEIR


def beir_slice(source: Path, folder: Path, n_queries: int, n_others: int) -> Path:
    """The first `n_queries` test queries of a BEIR folder (by id), their relevant documents and `n_others` other
    documents, written to `folder` (test qrels only)."""
    corpus, queries, qrels = data.load_beir(source, "test")
    qids = sorted(qrels, key=lambda q: (len(q), q))[:n_queries]  # numeric ids in numeric order
    relevant = list(dict.fromkeys(d for q in qids for d in qrels[q]))  # in a fixed order, run after run
    others = [d for d in corpus if d not in relevant][:n_others]
    return write_beir(folder, {d: corpus[d] for d in [*relevant, *others]}, {q: queries[q] for q in qids},
                      [(q, d, s) for q in qids for d, s in qrels[q].items()])


@pytest.fixture(scope="session")
def scifact_slice(tmp_path_factory, shared_beir) -> Path:
    """The first 60 SciFact test queries, their relevant documents and 400 other documents, from ../shared."""
    return beir_slice(shared_beir / "scifact", tmp_path_factory.mktemp("slice") / "scifact", 60, 400).parent


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    """One float-embedding cache for the session: each real text is encoded once, whichever test asks first."""
    return tmp_path_factory.mktemp("embeddings")


def first_pairs(folder: Path, n: int) -> Path:
    """A --train-data folder: pairs/quora.jsonl, the first n pairs of the shared quora duplicates."""
    source = require(SHARED_DATA / "pairs" / "quora-duplicates.jsonl")
    (folder / "pairs").mkdir()
    with open(source) as f:
        (folder / "pairs" / "quora.jsonl").write_text("".join(next(f) for _ in range(n)))
    return folder


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """FITTING_PAIRS pairs: every method of the registry can be fitted on their texts at d = 384."""
    return first_pairs(tmp_path_factory.mktemp("train"), FITTING_PAIRS)


@pytest.fixture(scope="session")
def few_train_data(tmp_path_factory) -> Path:
    """FEW_PAIRS pairs (592 texts), for the projections to 256 and 1,024 dimensions."""
    return first_pairs(tmp_path_factory.mktemp("train-few"), FEW_PAIRS)


def slice_copy(scifact_slice: Path, folder: Path, duplicates: int = 0) -> tuple[Path, dict]:
    """The SciFact slice copied to `folder`/scifact, with `duplicates` relevant documents repeated under new ids (exact
    ties for every method). Returns (data dir, test qrels)."""
    corpus, queries, qrels = data.load_beir(scifact_slice / "scifact", "test")
    relevant = list(dict.fromkeys(d for q in sorted(qrels, key=int) for d in qrels[q]))[:duplicates]
    corpus |= {f"copy-{d}": corpus[d] for d in relevant}
    write_beir(folder / "scifact", corpus, queries, [(q, d, s) for q in qrels for d, s in qrels[q].items()])
    return folder, qrels


@pytest.fixture(scope="session")
def task_with_ties(scifact_slice, tmp_path_factory) -> Path:
    """The SciFact slice plus exact copies of 10 relevant documents, with its test qrels also as qrels/dev.tsv: the
    training command validates on exactly the queries the evaluation reports, and every method has tied scores."""
    folder, qrels = slice_copy(scifact_slice, tmp_path_factory.mktemp("ties"), duplicates=10)
    shutil.copy(folder / "scifact" / "qrels" / "test.tsv", folder / "scifact" / "qrels" / "dev.tsv")
    return folder


one_faiss_thread = methods.one_faiss_thread  # also on two cores shared with other jobs: two threads made k-means
# and PCA 2-10x slower and lsh's rotation 100x (bench_search.py pins its own threads too)


@pytest.fixture
def faiss_one_thread():
    """A test on one faiss thread (see one_faiss_thread); for the modules that say so with pytestmark."""
    with one_faiss_thread():
        yield


OPENED: list[Path] | None = None  # while a list, every file Python opens is appended (an audit hook: nothing escapes it)


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(Path(os.fsdecode(args[0])).resolve())


sys.addaudithook(_record_opens)


def run_training(args: list[str]) -> SimpleNamespace:
    """The training command with `args`, recording every file it opens, every text it embeds (with its kind and
    task prompt) and the number of rows each fit and each training receives."""
    global OPENED
    embedded, fitted_rows = [], {}

    def spy(owner, name, record):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            record(*args, **kwargs)
            return original(*args, **kwargs)
        patch.setattr(owner, name, wrapper)

    with pytest.MonkeyPatch.context() as patch:
        spy(encoders.BaseModel, "embed", lambda self, texts, kind, task_prompt=None, desc=None: embedded.append((desc, kind, list(texts))))
        for cls in (methods.FaissCodes, methods.PCA, methods.ThresholdCodes):
            spy(cls, "fit", lambda self, x: fitted_rows.__setitem__(self.name, len(x)))
        spy(qm, "train_candidates", lambda build, x, *a, **k: fitted_rows.__setitem__(type(build()).__name__, len(x)))
        out, OPENED = io.StringIO(), []
        try:
            with contextlib.redirect_stdout(out), one_faiss_thread():
                qm.main(args)
        finally:
            opened, OPENED = OPENED, None
    return SimpleNamespace(stdout=out.getvalue(), opened=opened, embedded=embedded, fitted_rows=fitted_rows)


@pytest.fixture(scope="session")
def fitted(train_data, task_with_ties, embedding_cache, tmp_path_factory) -> SimpleNamespace:
    """The training command, transfer, on the real fitting texts: every fitted and trained method of the registry
    (two candidates each, two epochs) and the slow fits, named, validated on task_with_ties. `.checkpoints` is its --out
    folder; `.opened`, `.embedded`, `.fitted_rows` and `.stdout` record what it opened, embedded, fitted on and printed."""
    out = tmp_path_factory.mktemp("checkpoints")
    every = [name for name, e in methods.METHODS.items() if e.fitted_on != "nothing"]
    run = run_training(["--train-data", str(train_data), "--data-dir", str(task_with_ties), "--tasks", "SciFact",
                        "--out", str(out), "--cache-dir", str(embedding_cache), "--random-inits", "0", "--epochs", "2",
                        "--methods", *every])
    run.checkpoints, run.data_dir = out, task_with_ties
    return run


@pytest.fixture(scope="session")
def in_domain_task(scifact_slice, tmp_path_factory) -> Path:
    """The SciFact slice with its 60 queries split three ways: dev (validation), train (in-domain training), test."""
    folder, qrels = slice_copy(scifact_slice, tmp_path_factory.mktemp("in-domain"))
    qids = sorted(qrels, key=int)
    for split, chosen in (("dev", qids[:20]), ("train", qids[20:40]), ("test", qids[40:])):
        write_qrels(folder / "scifact", split, [(q, d, s) for q in chosen for d, s in qrels[q].items()])
    return folder


@pytest.fixture(scope="session")
def fitted_in_domain(train_data, in_domain_task, embedding_cache, tmp_path_factory) -> SimpleNamespace:
    """The training command, in-domain, for stage1_trained and int8 (its +rerank_int8 row needs it): as `fitted`."""
    out = tmp_path_factory.mktemp("checkpoints-in-domain")
    run = run_training(["--train-data", str(train_data), "--data-dir", str(in_domain_task), "--tasks", "SciFact",
                        "--protocol", "in-domain", "--methods", "stage1_trained", "int8", "--out", str(out),
                        "--cache-dir", str(embedding_cache), "--random-inits", "0", "--epochs", "2"])
    run.checkpoints, run.data_dir = out, in_domain_task
    return run


def evaluate(*args) -> str:
    """The evaluation command with `args`; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), one_faiss_thread():
        evaluate_quantization_mteb.main([str(a) for a in args])
    return out.getvalue()


PROGRESS_BAR = re.compile(r"^[^|]*: *\d+%\|")  # a tqdm line: "rows:  17%|█▋        | 1/6 [00:00<00:01, 4.44 rows/s]"
CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal cursor moves: tqdm's nested bars clear a line with them


def text_lines(stream: str) -> list[str]:
    """The lines a user reads in `stream`: progress bars, and lines of blanks and cursor moves alone, left out."""
    return [line for line in stream.splitlines() if CURSOR.sub("", line).strip() and not PROGRESS_BAR.match(line)]


def interrupt(script: str, args: list, marker: bytes, stream: str = "stdout", env: dict | None = None) -> tuple[int, list[str]]:
    """Run `script` with `args` in its own process, as a user would, and press Ctrl-C (a real SIGINT) 0.1 s after its
    `stream` shows `marker` (long enough to be past the code that printed it). Returns the exit code and the lines
    written to stderr, progress bars left out."""
    process = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, bufsize=0, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    #   process has it, also when the tests run in the background (nohup, `&`), which starts them ignoring SIGINT
    seen = b""
    try:
        while marker not in seen and (byte := getattr(process, stream).read(1)):
            seen += byte
        assert marker in seen, f"{marker!r} never appeared: the run ended before it could be interrupted"
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # only if it is still running
    stderr = ((seen if stream == "stderr" else b"") + stderr).decode()
    return process.returncode, text_lines(stderr)


@pytest.fixture(scope="session")
def evaluated(fitted, embedding_cache, tmp_path_factory) -> SimpleNamespace:
    """The evaluation command on task_with_ties: every registry method in every mode, with the checkpoints of `fitted`.
    `.output` is its --output folder, `.rows` its latest.csv, `.stdout` what it printed."""
    import pandas as pd

    output = tmp_path_factory.mktemp("results")
    stdout = evaluate("--tasks", "SciFact", "--data-dir", fitted.data_dir, "--checkpoints", fitted.checkpoints,
                      "--cache-dir", embedding_cache, "--output", output)
    return SimpleNamespace(output=output, rows=pd.read_csv(output / "latest.csv"), stdout=stdout)


@pytest.fixture(scope="session")
def task_embeddings(fitted, embedding_cache) -> dict:
    """task_with_ties as the evaluation sees it: float embeddings of its documents and (test) queries, read from the
    session cache (nothing is encoded again), with ids and qrels; and the embeddings of the fitting texts."""
    corpus, queries, qrels = data.load_beir(fitted.data_dir / "scifact", "test")
    base = encoders.BaseModel(encoders.DEFAULT_MODEL, embedding_cache)
    fitting_texts = next(texts for desc, kind, texts in fitted.embedded if desc == "encoding fitting texts")
    return dict(docs=base.embed([data.document_text(corpus[d]) for d in corpus], "document"),
                queries=base.embed(list(queries.values()), "query"), fitting=base.embed(fitting_texts, "document"),
                doc_ids=list(corpus), query_ids=list(queries), qrels=qrels)
