"""The encoders as a library (load_encoder): what they return, how they score it, the README snippet, a quiet run."""

import re
import subprocess
import sys

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

import encoders
import methods
import quantization_modules as qm
from conftest import ROOT, TINY_DOCS, TINY_QUERIES

DOCS = [t + " " + x for t, x in TINY_DOCS.values()]
QUERIES = [q for q, _ in TINY_QUERIES.values()]


@pytest.fixture(scope="module")
def zero():
    return encoders.load_encoder("stage1_zero", device="cpu")


def test_stage1_zero_codes_are_sentence_transformers_quantize_embeddings(zero, model):
    floats = model.encode(DOCS)
    assert np.array_equal(zero.encode(DOCS, precision="float32"), floats)
    assert np.array_equal(zero.encode(DOCS), quantize_embeddings(floats, "ubinary"))
    assert np.array_equal(zero.encode(DOCS, precision="binary"), quantize_embeddings(floats, "binary"))
    assert zero.bits_per_vector == 384 and zero.bytes_per_vector == 48
    with pytest.raises(ValueError, match="int8"):
        zero.encode(DOCS, precision="int8")


def test_codes_equal_what_the_evaluation_indexes(model):
    """For every method fitted on nothing, encode() gives the bytes the evaluation's index stores for the same texts."""
    floats = model.encode(DOCS)
    for name in ["stage1_zero", "lsh384", "float16", "bfloat16"]:
        encoder = encoders.Encoder(model, methods.make_method(name, 384))
        index = methods.MethodIndex(encoder.method, next(iter(encoder.method.modes)))
        index.add_documents(floats, list(TINY_DOCS))
        stored = index.stored["index"]
        if name in ("stage1_zero", "lsh384"):
            stored_bytes = methods.faiss.vector_to_array(stored.xb).reshape(stored.ntotal, stored.code_size)
        else:
            stored_bytes = methods.faiss.vector_to_array(stored.codes).reshape(stored.ntotal, stored.code_size)
        assert np.array_equal(encoder.encode(DOCS), stored_bytes), name
        assert encoder.bytes_per_vector == index.bytes_per_vector == stored.code_size, name


def test_similarity_is_hamming_and_orders_as_the_evaluation(zero, model):
    docs, queries = zero.encode(DOCS), zero.encode(QUERIES)
    bits = np.unpackbits(queries[:, None, :] ^ docs[None, :, :], axis=2).sum(axis=2).astype(np.int64)  # a popcount written here
    scores = zero.similarity(queries, docs)
    assert np.array_equal(scores, 384 - 2 * bits)
    assert np.array_equal(zero.similarity(zero.encode(QUERIES, precision="binary"), zero.encode(DOCS, precision="binary")), scores)
    # float queries: the first search mode (Hamming) of the evaluation's own index gives the same scores
    ranking = methods.rank(zero.method, "hamming", model.encode(DOCS), model.encode(QUERIES), list(TINY_DOCS), list(TINY_QUERIES))
    float_scores = zero.similarity(zero.encode(QUERIES, precision="float32"), docs)
    for i, qid in enumerate(TINY_QUERIES):
        assert {d: float_scores[i, j] for j, d in enumerate(TINY_DOCS)} == pytest.approx(ranking[qid])
    assert all(np.argmax(scores[i]) == list(TINY_DOCS).index(d) for i, (_, d) in enumerate(TINY_QUERIES.values()))


def test_a_trained_encoder_refuses_a_checkpoint_of_another_model_or_dimension(tmp_path):
    path = qm.checkpoint_path(tmp_path, encoders.DEFAULT_MODEL, "stage1")
    qm.save_quantizer(path, qm.QuantizationModuleStage1(384), {"base_model": "someone/else"})
    with pytest.raises(qm.UsageError, match="made for model 'someone/else'") as refused:
        encoders.load_encoder("stage1_trained", checkpoints=tmp_path, device="cpu")
    assert "\n" not in str(refused.value)
    qm.save_quantizer(path, qm.QuantizationModuleStage1(768), {"base_model": encoders.DEFAULT_MODEL})
    with pytest.raises(qm.UsageError, match="is for dimension 768, but .* gives 384"):
        encoders.load_encoder("stage1_trained", checkpoints=tmp_path, device="cpu")


def test_readme_snippet_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Use a trained quantiser in your own code\n.*?```python\n(.*?)```", readme, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[0 1]" in result.stdout or "[0, 1]" in result.stdout  # each query finds its own document first


def test_a_run_shows_progress_in_texts_and_none_of_the_silenced_warnings(tmp_path, tiny_beir):
    many = tmp_path / "data" / "scifact"  # enough documents for a progress bar: the tiny set plus 300 filler texts
    with open(many / "corpus.jsonl", "a") as f:
        f.writelines(f'{{"_id": "filler{i}", "title": "", "text": "Filler document number {i} about nothing."}}\n' for i in range(300))
    result = subprocess.run([sys.executable, "evaluate_quantization_mteb.py", "--tasks", "SciFact", "--data-dir", str(tiny_beir),
                             "--methods", "float", "stage1_zero", "--modes", "--cache-dir", str(tmp_path / "cache"),
                             "--output", str(tmp_path / "results"), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "SciFact: 314 texts (308 documents, 6 queries), 0 cached, 314 to encode" in out
    assert re.search(r"encoding SciFact documents: 100%.*308/308.*texts/s", out)
    assert "device cpu" in out
    for noise in ("FutureWarning", "UserWarning", "DeprecationWarning", "Initialized empty", "Standardizing text corpus"):
        assert noise not in out, noise
