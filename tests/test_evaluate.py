"""End-to-end tests of evaluate_quantization_mteb.py: every method through mteb, Hamming-exact scoring, bad input."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sentence_transformers.util.quantization import quantize_embeddings

import evaluate_quantization_mteb as ev
import encoders
import quantization_modules as qm
from conftest import ROOT, TINY_DOCS, TINY_QUERIES


@pytest.fixture
def checkpoints(tmp_path, model):
    """Every quantiser trained briefly on the tiny texts' real embeddings, saved as the command line would."""
    texts = [t + " " + x for t, x in TINY_DOCS.values()] + [q for q, _ in TINY_QUERIES.values()]
    embeddings = encoders.embed_texts(model, texts, tmp_path / "cache" / "_training")
    for method, build in qm.QUANTIZERS.items():
        quantizer = build(embeddings.shape[1])
        qm.train_quantizer(quantizer, embeddings, epochs=3, batch_size=8, verbose=False)
        qm.save_quantizer(qm.checkpoint_path(tmp_path / "ckpt", qm.DEFAULT_MODEL, method), quantizer, {"base_model": qm.DEFAULT_MODEL})
    return tmp_path / "ckpt"


def run(tmp_path, *args):
    ev.main(["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "results"), *map(str, args)])


def test_every_method_end_to_end(tmp_path, tiny_beir, checkpoints, capsys):
    run(tmp_path, "--tasks", "SciFact", "--data-dir", tiny_beir, "--checkpoints", checkpoints)
    out = capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "results" / "latest.csv")
    assert list(rows.columns) == ["protocol", "task", "split", "method", "metric", "value"]
    assert set(rows.protocol) == {"transfer"}
    rows_run = ["float"] + [m + suffix for m in ev.METHODS[1:] for suffix in ("", "+rescore", "+asym")]
    assert list(rows.method.unique()) == rows_run
    assert set(rows.task) == {"SciFact"} and set(rows.split) == {"test"}
    for metric in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        values = rows[rows.metric == metric].set_index("method").value
        assert len(values) == len(rows_run) == 13 and values.between(0, 1).all(), metric
    ndcg = rows[rows.metric == "ndcg_at_10"].set_index("method").value
    assert ndcg["float"] > 0.9  # each tiny query has one obvious document
    nbytes = rows[rows.metric == "bytes_per_vector"].set_index("method").value.to_dict()
    assert nbytes == {"float": 1536, **{m + s: b for m, b in [("stage1_zero", 48), ("stage1_trained", 48), ("stage1_rotated", 48),
                                                              ("stage2_trained", 36)] for s in ("", "+asym")},
                      "stage1_zero+rescore": 1584, "stage1_trained+rescore": 1584, "stage1_rotated+rescore": 1584,
                      "stage2_trained+rescore": 1572}
    # significance: per-query nDCG@10 recomputed from mteb's rankings averages to mteb's own number
    metric = lambda name: rows[rows.metric == name].set_index("method").value  # noqa: E731
    assert metric("delta_vs_float")["float"] == 0 and metric("p_vs_float")["float"] == 1
    for row in rows_run:
        assert metric("delta_vs_float")[row] == pytest.approx(ndcg[row] - ndcg["float"], abs=1e-4)
        assert metric("delta_vs_stage1_zero")[row] == pytest.approx(ndcg[row] - ndcg["stage1_zero"], abs=1e-4)
        assert metric("delta_vs_float_ci_low")[row] <= metric("delta_vs_float")[row] <= metric("delta_vs_float_ci_high")[row]
        assert 0 <= metric("p_vs_stage1_zero")[row] <= 1
    retention = rows[rows.metric == "retention"].set_index("method").value
    assert retention["float"] == 1 and retention["stage1_zero"] == pytest.approx(ndcg["stage1_zero"] / ndcg["float"])
    assert "| mean" in out and "retention" in out and "Δ vs stage1_zero" in out and "protocol transfer" in out
    assert (tmp_path / "results" / "latest.md").read_text().startswith("## ")
    assert len(list((tmp_path / "results" / "mteb").rglob("SciFact.json"))) == 13
    assert (tmp_path / "results" / "quality_vs_bytes.png").read_bytes().startswith(b"\x89PNG")

    # a rerun encodes nothing: every text is in the cache
    cache_files = {p: p.stat().st_mtime for p in (tmp_path / "cache").rglob("vectors.npy")}
    run(tmp_path, "--tasks", "SciFact", "--data-dir", tiny_beir, "--checkpoints", checkpoints, "--methods", "float")
    assert cache_files and cache_files == {p: p.stat().st_mtime for p in (tmp_path / "cache").rglob("vectors.npy")}


def hamming_scores(query_emb: np.ndarray, doc_emb: np.ndarray) -> np.ndarray:
    """Bits minus twice the popcount of XOR-ed packed sign codes: what a Hamming index ranks by."""
    q, d = quantize_embeddings(query_emb, "ubinary"), quantize_embeddings(doc_emb, "ubinary")
    distance = np.unpackbits(q[:, None, :] ^ d[None, :, :], axis=2).sum(axis=2, dtype=np.int64)
    return query_emb.shape[1] - 2 * distance


def assert_scores_are_hamming(query_emb: np.ndarray, doc_emb: np.ndarray) -> None:
    """The faiss-backed stage1_zero index scores every returned document by bits - 2 * popcount(q XOR d)."""
    index = ev.BinaryIndex(qm.QuantizationModuleStage1(query_emb.shape[1]), "hamming")
    index.add_documents(doc_emb, [str(i) for i in range(len(doc_emb))])
    scores, ids = index.search(query_emb, top_k=len(doc_emb))
    expected = hamming_scores(query_emb, doc_emb)
    for i in range(len(query_emb)):
        assert sorted(ids[i]) == list(range(len(doc_emb)))
        assert scores[i] == expected[i, ids[i]].tolist() and scores[i] == sorted(scores[i], reverse=True)


def test_binary_scores_are_hamming_over_packed_codes(model):
    queries = model.encode([q for q, _ in TINY_QUERIES.values()])
    docs = model.encode([t + " " + x for t, x in TINY_DOCS.values()])
    assert_scores_are_hamming(queries, docs)


def test_rescoring_everything_is_float_ranking_and_asym_keeps_no_floats(model):
    queries = model.encode([q for q, _ in TINY_QUERIES.values()])
    docs = model.encode([t + " " + x for t, x in TINY_DOCS.values()])
    rescore = ev.BinaryIndex(qm.QuantizationModuleStage1(384), "rescore", rescore_k=len(docs))
    rescore.add_documents(docs, list(TINY_DOCS))
    scores, ids = rescore.search(queries, top_k=len(docs))
    float_scores = queries @ docs.T
    assert np.array_equal(np.array(ids), np.argsort(-float_scores, axis=1))
    assert np.allclose(scores, np.sort(float_scores, axis=1)[:, ::-1], atol=1e-6)
    # mteb asks for more than k: the re-ranked head, then the rest of the Hamming list (recall@100 etc. stay honest)
    head = ev.BinaryIndex(qm.QuantizationModuleStage1(384), "rescore", rescore_k=3)
    head.add_documents(docs, list(TINY_DOCS))
    _, ids = head.search(queries, top_k=len(docs))
    _, hamming_ids = head.index.search(head._codes(queries), len(docs))
    assert np.array(ids).shape == (len(queries), len(docs)) and np.array_equal(np.array(ids)[:, 3:], hamming_ids[:, 3:])

    asym = ev.BinaryIndex(qm.QuantizationModuleStage2(384), "asym")
    asym.add_documents(docs, list(TINY_DOCS))
    assert asym.float_docs is None and asym.bytes_per_vector(384) == 36 and rescore.bytes_per_vector(384) == 48 + 1536
    scores, ids = asym.search(queries, top_k=3)
    doc_codes = qm.to_signed(asym.quantizer.quantize(torch.from_numpy(docs)))
    expected = asym.quantizer.margins(torch.from_numpy(queries)) @ doc_codes.T
    assert np.allclose(scores, np.take_along_axis(expected.numpy(), np.array(ids), 1), atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "SciFactt"], "SciFact"),  # mteb suggests the close name
    (["--tasks", "Banking77Classification"], "only Retrieval tasks"),
    (["--tasks", " "], "no task names"),
    (["--tasks"], "expected at least one argument"),
    (["--tasks", "SciFact", "--data-dir", "/nonexistent"], "data folder not found"),
    (["--tasks", "NFCorpus", "--data-dir", "{data}"], "no folder for NFCorpus"),
    (["--tasks", "SciFact", "--rescore-k", "5"], "--rescore-k must be at least 10"),
    (["--tasks", "SciFact", "--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_input_before_any_work(tmp_path, tiny_beir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, *[a.replace("{data}", str(tiny_beir)) for a in args])
    error = str(exit_info.value.code) + capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "\n" not in error.strip()
    assert not (tmp_path / "results" / "latest.csv").exists()


def test_bad_checkpoints_and_data_are_refused(tmp_path, tiny_beir, checkpoints):
    def refused(message, *extra, checkpoints_dir=checkpoints):
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, "--tasks", "SciFact", "--data-dir", tiny_beir, "--checkpoints", checkpoints_dir, *extra)
        assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
        assert not (tmp_path / "results" / "latest.csv").exists()

    refused("train one with: python quantization_modules.py", checkpoints_dir=tmp_path / "empty")
    stage2 = qm.checkpoint_path(checkpoints, qm.DEFAULT_MODEL, "stage2")
    other = qm.QuantizationModuleStage2(384)
    qm.save_quantizer(stage2, other, {"base_model": "someone/else"})
    refused("trained for model 'someone/else'")
    qm.save_quantizer(stage2, other, {"base_model": qm.DEFAULT_MODEL, "protocol": "in-domain"})
    refused("trained under protocol 'in-domain', not 'transfer'")
    torch.save({"thresholds": other.thresholds.data}, stage2)
    refused("pickled checkpoints are refused")
    qm.save_quantizer(stage2, other, {"base_model": qm.DEFAULT_MODEL})
    stage1 = qm.checkpoint_path(checkpoints, qm.DEFAULT_MODEL, "stage1")
    stage1.rename(stage1.with_suffix(".bak"))
    stage1.write_bytes(stage2.read_bytes())  # a Stage 2 file under Stage 1's name
    refused("holds a stage2 quantiser, not stage1")
    stage1.with_suffix(".bak").replace(stage1)
    (tmp_path / "a_file").write_text("")
    refused("output folder", "--output", tmp_path / "a_file" / "results")
    refused("embedding cache folder", "--cache-dir", tmp_path / "a_file" / "cache")
    with open(tiny_beir / "scifact" / "qrels" / "test.tsv", "a") as f:
        f.write("q1\td1\n")
    refused("malformed qrels line")
    (tiny_beir / "scifact" / "qrels" / "test.tsv").unlink()
    refused("missing qrels file")


def test_command_line_error_is_one_line_without_traceback():
    result = subprocess.run([sys.executable, "evaluate_quantization_mteb.py", "--tasks", "NFCorpuss"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "NFCorpus" in result.stderr


def test_hub_failure_is_one_line_pointing_to_data_dir(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # no download, even online
    result = subprocess.run([sys.executable, "evaluate_quantization_mteb.py", "--tasks", "SciFact", "--methods", "float",
                             "--output", str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot load SciFact") and "--data-dir" in result.stderr
    assert not (tmp_path / "results").exists()


def test_report_names_only_the_references_it_has(tmp_path, tiny_beir):
    run(tmp_path, "--tasks", "SciFact", "--data-dir", tiny_beir, "--methods", "stage1_zero", "--modes", "hamming", "asym")
    markdown = (tmp_path / "results" / "latest.md").read_text()
    assert "† differs from stage1_zero" in markdown and "differs from float" not in markdown and "retention" not in markdown


def test_paired_test_is_the_exact_sign_flip_test_on_small_samples():
    import itertools
    rng = np.random.default_rng(0)
    a, b = rng.random(10), rng.random(10)
    diff = a - b
    flips = np.array(list(itertools.product([1, -1], repeat=10)))  # 1,024 < 10,000 resamples: scipy enumerates them all
    exact = np.mean(np.abs((flips * diff).mean(axis=1)) >= abs(diff.mean()) - 1e-12)
    delta, low, high, p = ev.paired_test(a, b)
    assert delta == pytest.approx(diff.mean()) and low <= delta <= high and p == pytest.approx(exact)
    assert ev.paired_test(a, a) == (0.0, 0.0, 0.0, 1.0)
