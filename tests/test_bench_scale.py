"""The scale benchmark: a tiny run end to end (rows, times, memory), the planted vectors are exactly what the evaluation
reads (its float nDCG@10 against a brute force over the shards planted on disk), the slope fit and the projection on
hand-made timings, and bad input as one line. No timing asserts (times depend on the machine)."""

import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import bench_scale
import methods
from conftest import ROOT
from data import document_text, load_beir
from embedding_cache import KEY_BYTES, KEYS, VECTORS, cache_key
from encoders import DEFAULT_MODEL, BaseModel, model_slug
from mteb_adapter import ndcg_at_10

SIZE, QUERIES, CENTRES = 2000, 20, 50  # 50 centres: clusters of ~40 documents, so the ranking is not trivially right


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """One run of the command: 2,000 documents, 20 queries, float and stage1_zero in their own search only, its
    temporary folders kept (under this test's tmp folder). `.markdown`, `.summary` (the JSON line), `.folder`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("bench-scale")))
        patch.setattr(bench_scale, "CENTRES", CENTRES)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bench_scale.main(["--sizes", str(SIZE), "--queries", str(QUERIES), "--methods", "float", "stage1_zero",
                              "--modes", "--keep"])
    *markdown, last = out.getvalue().splitlines()
    summary = json.loads(last)
    return SimpleNamespace(markdown="\n".join(markdown), summary=summary, folder=Path(summary["folders"][str(SIZE)]))


def test_a_tiny_run_reports_every_row_its_times_and_the_peak_memory(tiny):
    result = tiny.summary["per_size"][str(SIZE)]
    expected = [row for name in ("float", "stage1_zero") for row in methods.rows_of(name, bench_scale.DIM, [])]
    assert list(result["rows"]) == expected
    for row, times in result["rows"].items():
        assert times["seconds"] > 0 and times["cpu"] > 0, row
        assert 0 <= times["index"] + times["search"] + times["scoring"] <= times["seconds"] + 1e-6, row
        assert f"| {row} " in tiny.markdown
    float_matrix = 4 * bench_scale.DIM * SIZE
    assert float_matrix < result["before_rows_rss"] <= result["peak_rss"] < 8e9  # the evaluation's process, not ours
    assert result["wall"] > sum(times["seconds"] for times in result["rows"].values())
    assert result["cpu"] > sum(times["cpu"] for times in result["rows"].values())
    assert result["cache_load_s"] > 0 and result["cache_get_s"] > 0
    assert f"peak RSS {result['peak_rss'] / 1e9:.2f} GB" in tiny.markdown
    assert tiny.summary["goals"] == {}  # one size below 1M: no goal applies


def read_planted(cache: Path) -> dict[bytes, np.ndarray]:
    """Every key and vector of the planted shards, read straight from the files (not through EmbeddingCache)."""
    planted = {}
    for keys_file in sorted(cache.glob("*" + KEYS)):
        raw = keys_file.read_bytes()
        vectors = np.load(keys_file.with_name(keys_file.name[: -len(KEYS)] + VECTORS))
        planted |= {raw[i : i + KEY_BYTES]: vectors[i // KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)}
    return planted


def test_the_planted_vectors_are_exactly_what_the_evaluation_reads(tiny, monkeypatch):
    corpus, queries, qrels = load_beir(tiny.folder / "data" / "scifact", "test")
    cache = tiny.folder / "cache"
    planted = read_planted(cache / model_slug(DEFAULT_MODEL))
    base = BaseModel(DEFAULT_MODEL, cache)  # the default MiniLM has no prompts: "" for both kinds
    docs = np.stack([planted[cache_key(base.prompt("document"), document_text(corpus[d]))] for d in corpus])
    query_vectors = np.stack([planted[cache_key(base.prompt("query"), queries[q])] for q in queries])
    assert len(planted) == len(docs) + len(query_vectors) == SIZE + QUERIES

    monkeypatch.setattr(bench_scale, "CENTRES", CENTRES)  # seeded: the shards hold what the generator gives
    centres, cluster, _ = bench_scale.synthetic_task(SIZE, QUERIES, bench_scale.SEED)
    np.testing.assert_array_equal(docs, bench_scale.document_vectors(centres, cluster, 0, SIZE, bench_scale.SEED))

    scores = query_vectors @ docs.T  # brute force: every query against every document
    top = np.argsort(-scores, axis=1, kind="stable")[:, :1000]
    doc_ids, query_ids = list(corpus), list(queries)
    ranking = {query_ids[j]: {doc_ids[i]: float(scores[j, i]) for i in top[j]} for j in range(len(query_ids))}
    brute_force = ndcg_at_10(ranking, qrels)
    assert 0.2 < brute_force < 0.99  # not trivially perfect: a wrong vector would show
    assert tiny.summary["per_size"][str(SIZE)]["rows"]["float"]["ndcg_at_10"] == pytest.approx(brute_force, abs=1e-5)


def test_the_slope_the_prediction_and_the_projection_on_hand_made_timings():
    sizes = [100_000, 300_000, 1_000_000]
    check = bench_scale.linearity(sizes, [2.0, 5.0, 15.0])
    assert check["slope"] == pytest.approx(3 / 200_000)  # (5 - 2) s over 200,000 more documents
    assert bench_scale.per_million_per_thousand(check["slope"], 300) == pytest.approx(50.0)  # 15 s per 1M x 1000/300
    assert check["predicted"] == pytest.approx(15.5)  # 5 + 700,000 x 1.5e-5
    assert check["later_slope"] == pytest.approx(10 / 700_000)
    assert check["ratio"] == pytest.approx((10 / 700_000) / (3 / 200_000)) and check["linear"]  # 0.952
    assert not bench_scale.linearity(sizes, [2.0, 5.0, 20.0])["linear"]  # 15 s over 700,000: ratio 1.43
    assert not bench_scale.linearity(sizes, [2.0, 5.0, 12.0])["linear"]  # ratio 0.67

    # index 1 s + 1e-5 s per document; search and scoring 0.5 s + 2e-5 s per document, for 300 queries
    index = [1 + 1e-5 * n for n in sizes]
    rest = [0.5 + 2e-5 * n for n in sizes]
    projected = bench_scale.project(sizes, index, rest, 300, target=(8_841_823, 6_980))
    assert projected["index"] == pytest.approx(1 + 1e-5 * 8_841_823)
    assert projected["search_and_scoring"] == pytest.approx((0.5 + 2e-5 * 8_841_823) * 6_980 / 300)
    assert projected["total"] == pytest.approx(projected["index"] + projected["search_and_scoring"])


@pytest.mark.parametrize("args, says", [
    (["--sizes", "10"], "--sizes must be at least 1,000"),
    (["--sizes", "2000", "--queries", "3000"], "at least --queries (3,000)"),
    (["--queries", "0"], "--queries must be at least 1"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", "float_adapted"], "runs only in-domain"),
    (["--modes", "fast"], "invalid choice"),
    (["--sizes", "many"], "invalid int value"),
])
def test_bad_input_is_one_error_line(args, says, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        bench_scale.main(args)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and says in message and "\n" not in message
    assert not list(tmp_path.iterdir())  # refused before anything was planted


@pytest.mark.slow
def test_bad_input_from_the_command_line_is_one_line_on_stderr():
    process = subprocess.run([sys.executable, "bench_scale.py", "--methods", "nope"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert process.returncode == 1 and process.stdout == ""
    assert process.stderr.splitlines() == [process.stderr.strip()] and process.stderr.startswith("error: unknown method")
