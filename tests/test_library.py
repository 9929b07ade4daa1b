"""The tool as a library (library.load_encoder): what it returns, how it scores it, the README snippet, a quiet run."""

import logging
import re
import subprocess
import sys

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

import checkpoints
import encoders
import library
import methods
from conftest import ROOT, TINY_DOCS, TINY_QUERIES
from data import UsageError

DOCS = [t + " " + x for t, x in TINY_DOCS.values()]
QUERIES = [q for q, _ in TINY_QUERIES.values()]


@pytest.fixture(scope="module")
def zero():
    return library.load_encoder("stage1_zero", device="cpu")


@pytest.fixture(scope="module")
def base(zero):
    return zero.base  # the loaded model, shared


def test_stage1_zero_codes_are_sentence_transformers_quantize_embeddings(zero, model):
    floats = model.encode(DOCS)
    assert np.array_equal(zero.encode(DOCS, precision="float32"), floats)
    assert np.array_equal(zero.encode(DOCS), quantize_embeddings(floats, "ubinary"))
    assert np.array_equal(zero.encode(DOCS, precision="binary"), quantize_embeddings(floats, "binary"))
    assert zero.bytes_per_vector == 48
    with pytest.raises(ValueError, match="int8"):
        zero.encode(DOCS, precision="int8")


@pytest.mark.parametrize("name", [n for n, e in methods.METHODS.items() if e.fitted_on == "nothing"])
def test_codes_equal_what_the_evaluation_indexes(name, model, base):
    """For every method fitted on nothing, encode() decodes to what the evaluation's row searches with, and its size
    is the row's bytes per vector."""
    floats = model.encode(DOCS)
    encoder = library.Encoder(base, methods.make_method(name, 384))
    codes = encoder.encode(DOCS)
    assert codes.nbytes // len(DOCS) == encoder.bytes_per_vector == methods.row_bytes(name, 384, encoder.mode)
    index = methods.MethodIndex(encoder.method, encoder.mode)
    index.add_documents(floats)
    assert methods.stored_bytes(index.stored) == codes.nbytes
    if "index" in index.stored and hasattr(index.stored["index"], "xb"):  # faiss binary index: the stored bytes
        stored = methods.faiss.vector_to_array(index.stored["index"].xb).reshape(len(DOCS), -1)
        assert np.array_equal(stored, codes)


def test_similarity_is_hamming_and_orders_as_the_evaluation(zero, model):
    docs, queries = zero.encode(DOCS), zero.encode(QUERIES)
    bits = np.unpackbits(queries[:, None, :] ^ docs[None, :, :], axis=2).sum(axis=2).astype(np.int64)  # a popcount written here
    scores = zero.similarity(queries, docs)
    assert np.array_equal(scores, 384 - 2 * bits)
    assert np.array_equal(zero.similarity(zero.encode(QUERIES, precision="binary"), zero.encode(DOCS, precision="binary")), scores)
    # float queries: the method's own search (Hamming) of the evaluation's own index gives the same scores
    ranking = methods.rank(zero.method, "hamming", model.encode(DOCS), model.encode(QUERIES), list(TINY_DOCS), list(TINY_QUERIES))
    float_scores = zero.similarity(zero.encode(QUERIES, "query", precision="float32"), docs)
    for i, qid in enumerate(TINY_QUERIES):
        assert {d: float_scores[i, j] for j, d in enumerate(TINY_DOCS)} == pytest.approx(ranking[qid])
    assert all(np.argmax(scores[i]) == list(TINY_DOCS).index(d) for i, (_, d) in enumerate(TINY_QUERIES.values()))


def test_a_fitted_encoder_refuses_a_checkpoint_of_another_model_or_dimension(tmp_path):
    method = methods.make_method("stage1_trained", 384)
    path = checkpoints.checkpoint_path(tmp_path, encoders.DEFAULT_MODEL, "stage1_trained")
    meta = {"base_model": "someone/else", "method": "stage1_trained", "dimension": "384", "protocol": "transfer"}
    checkpoints.save_checkpoint(path, method.state(), meta)
    with pytest.raises(UsageError, match="made for base_model 'someone/else'") as refused:
        library.load_encoder("stage1_trained", checkpoints=tmp_path, device="cpu")
    assert "\n" not in str(refused.value)
    checkpoints.save_checkpoint(path, method.state(), meta | {"base_model": encoders.DEFAULT_MODEL, "dimension": "768"})
    with pytest.raises(UsageError, match="made for dimension '768', not '384'"):
        library.load_encoder("stage1_trained", checkpoints=tmp_path, device="cpu")


@pytest.mark.slow
def test_readme_snippet_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Use it as a library\n.*?```python\n(.*?)```", readme, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[0 1]" in result.stdout or "[0, 1]" in result.stdout  # each query finds its own document first
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1  # a library prints only what it is asked


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_loading_leaves_the_libraries_progress_and_logs_on(verbose, monkeypatch):
    """What the libraries show while the model loads (whether a bar is drawn also depends on the terminal and the
    environment): their progress bars and info logs, off unless asked, as they were afterwards."""
    import transformers
    seen, original = [], library.BaseModel.__init__

    def spy(self, *args, **kwargs):
        seen.append((transformers.utils.logging.is_progress_bar_enabled(), logging.getLogger("transformers").level))
        original(self, *args, **kwargs)
    monkeypatch.setattr(library.BaseModel, "__init__", spy)
    transformers.utils.logging.enable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.INFO)
    library.load_encoder("stage1_zero", device="cpu", verbose=verbose)
    assert seen == [(True, logging.INFO)] if verbose else seen == [(False, logging.ERROR)]
    assert transformers.utils.logging.is_progress_bar_enabled() and logging.getLogger("transformers").level == logging.INFO


@pytest.mark.slow
def test_a_run_shows_progress_in_texts_and_none_of_the_silenced_warnings(tmp_path, tiny_beir):
    many = tmp_path / "data" / "scifact"  # enough documents for a progress bar: the tiny set plus 300 filler texts
    with open(many / "corpus.jsonl", "a") as f:
        f.writelines(f'{{"_id": "filler{i}", "title": "", "text": "Filler document number {i} about nothing."}}\n' for i in range(300))
    result = subprocess.run([sys.executable, "evaluate_quantization_mteb.py", "--tasks", "SciFact", "--data-dir", str(tiny_beir),
                             "--methods", "float", "stage1_zero", "--modes", "--rerank-depths", "--cache-dir", str(tmp_path / "cache"),
                             "--output", str(tmp_path / "results"), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "SciFact: 314 texts (308 documents, 6 queries), 0 cached, 314 to encode" in out
    assert re.search(r"encoding SciFact documents: 100%.*308/308.*texts/s", out)
    assert "device cpu" in out
    for noise in ("FutureWarning", "UserWarning", "DeprecationWarning", "Initialized empty", "Standardizing text corpus"):
        assert noise not in out, noise
