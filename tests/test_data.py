"""data.py's readers on bad input (one line naming file, line and first id) and on the real shared data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
from conftest import ROOT, write_beir

# appended to the tiny set of conftest (corpus d1-d8 on lines 1-8, queries q1-q6 on lines 1-6, qrels/test.tsv a
# header and q1-q6 on lines 2-7), so every new line has a known number
REFUSED = {
    "duplicate document ids": ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": "b"}\n{"_id": "d1", "text": "c"}\n',
                               "corpus.jsonl:9: duplicate document id 'd1' (and 1 more)"),
    "integer and string id": ("corpus.jsonl", '{"_id": 9, "text": "a"}\n{"_id": "9", "text": "b"}\n', "corpus.jsonl:10: duplicate document id '9'"),
    "duplicate query id": ("queries.jsonl", '\n{"_id": "q2", "text": "again"}\n', "queries.jsonl:8: duplicate query id 'q2'"),
    "empty query text": ("queries.jsonl", '{"_id": "q7", "text": ""}\n{"_id": "q8", "text": " \\t"}\n{"_id": "q9", "text": ""}\n',
                         "queries.jsonl:7: query 'q7' has empty text (and 2 more)"),
    "qrels, unknown document": ("qrels/test.tsv", "q1\td99\t1\nq2\td98\t1\nq3\td99\t2\n",
                                "qrels/test.tsv:8: document 'd99' is not in corpus.jsonl (and 1 more)"),
    "qrels, unknown query": ("qrels/test.tsv", "q1\td2\t0\nx1\td1\t1\nx1\td2\t1\n", "qrels/test.tsv:9: query 'x1' is not in queries.jsonl"),
    "qrels, repeated pair": ("qrels/test.tsv", "q1\td1\t2\n", "qrels/test.tsv:8: repeated (query, document) pair ('q1', 'd1')"),
    "number as text": ("corpus.jsonl", '{"_id": "d9", "title": "T", "text": 42}\n', "corpus.jsonl:9: 'text' must be a string, not a number"),
    "list as title": ("corpus.jsonl", '{"_id": "d9", "title": ["T"], "text": "x"}\n', "corpus.jsonl:9: 'title' must be a string, not a list"),
    "object as query": ("queries.jsonl", '{"_id": "q7", "text": {"en": "x"}}\n', "queries.jsonl:7: 'text' must be a string, not an object"),
    "float id": ("corpus.jsonl", '{"_id": 1.5, "text": "x"}\n', "corpus.jsonl:9: '_id' must be a string or an integer, not a number"),
    "boolean id": ("queries.jsonl", '{"_id": true, "text": "x"}\n', "queries.jsonl:7: '_id' must be a string or an integer, not true/false"),
    "missing text": ("corpus.jsonl", '\n{"_id": "d9", "title": "T"}\n', "corpus.jsonl: record 9 lacks 'text' (line 10)"),
    # a byte that is not UTF-8 is named by file and line
    "not utf-8 corpus": ("corpus.jsonl", b'{"_id": "d9", "text": "caf\xe9"}\n', "corpus.jsonl:9: not UTF-8 (byte 0xe9 at column 27)"),
    "not utf-8 queries": ("queries.jsonl", b'{"_id": "q7", "text": "\xff"}\n', "queries.jsonl:7: not UTF-8 (byte 0xff at column 24)"),
    "not utf-8 qrels": ("qrels/test.tsv", b"q1\td\x80\t1\n", "qrels/test.tsv:8: not UTF-8 (byte 0x80 at column 5)"),
}


@pytest.mark.parametrize("file, extra, message", REFUSED.values(), ids=REFUSED.keys())
def test_bad_beir_data_is_refused_with_file_line_and_id(tiny_beir, file, extra, message):
    folder = tiny_beir / "scifact"
    with open(folder / file, "ab" if isinstance(extra, bytes) else "a") as f:
        f.write(extra)
    with pytest.raises(data.UsageError) as refused:
        data.load_beir(folder, "test")
    assert str(refused.value) == f"{folder}/{message}"


def test_every_split_is_checked_and_split_none_checks_the_files_it_reads(tiny_beir):
    folder = tiny_beir / "scifact"
    with open(folder / "queries.jsonl", "a") as f:
        f.write('{"_id": "q1", "text": "again"}\n')
    with pytest.raises(data.UsageError, match=r"queries.jsonl:7: duplicate query id 'q1'$"):
        data.load_beir(folder)  # training reads beir-small corpora this way
    write_beir(folder, {"d1": {"title": "T", "text": "x"}}, {"q1": "a question"}, [("q1", "d1", 1)])
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tgone\t1\n")
    with pytest.raises(data.UsageError, match=r"dev.tsv:3: document 'gone' is not in corpus.jsonl$"):
        data.task_query_splits(folder)  # the validation qrels of training
    (folder / "qrels" / "dev.tsv").unlink()
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\t1\n")
    with pytest.raises(data.UsageError, match=r"train.tsv:3: query 'q2' is not in queries.jsonl$"):
        data.task_query_splits(folder)


def test_the_no_relevant_document_check_comes_before_unknown_queries(tiny_beir):
    (tiny_beir / "scifact" / "qrels" / "test.tsv").write_text("x1\td1\t1\nq1\td1\t0\n")
    with pytest.raises(data.UsageError, match="test.tsv: no query of queries.jsonl has a relevant document"):
        data.load_beir(tiny_beir / "scifact", "test")


def test_documents_with_a_title_only_are_kept_and_empty_ones_are_shown(tiny_beir, capsys):
    folder = tiny_beir / "scifact"
    with open(folder / "corpus.jsonl", "a") as f:
        f.write('{"_id": "d9", "title": "Only a title", "text": ""}\n')
    corpus = data.load_beir(folder, "test")[0]
    assert corpus["d9"] == {"title": "Only a title", "text": ""} and capsys.readouterr().err == ""
    with open(folder / "corpus.jsonl", "a") as f:
        f.write('{"_id": "d10", "text": ""}\n{"_id": "d11", "title": null, "text": " "}\n')
    corpus = data.load_beir(folder, "test")[0]
    assert corpus["d10"] == {"title": "", "text": ""} and len(corpus) == 11
    assert capsys.readouterr().err == (f"warning: {folder}/corpus.jsonl:10: document 'd10' has neither title nor text "
                                       "(and 1 more); kept as an empty text\n")


def rewrite(folder: Path, bom: bool, crlf: bool) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_bytes().replace(b"\n", b"\r\n" if crlf else b"\n")
            path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text)


@pytest.mark.parametrize("bom, crlf", [(True, False), (False, True), (True, True)])
def test_bom_and_crlf_read_as_the_clean_files(tiny_beir, tmp_path, bom, crlf):
    clean = tiny_beir / "scifact"
    (clean / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(1, 6)))
    pairs_dir = tmp_path / "clean_train" / "pairs"
    pairs_dir.mkdir(parents=True)
    (pairs_dir / "a.jsonl").write_text('{"anchor": "caf\u00e9", "positive": "coffee"}\n{"anchor": "tea", "positive": "chai"}\n')
    (pairs_dir / "b.jsonl").write_text('{"sentence1": "x", "sentence2": "y", "score": 4.5}\n')
    expected = [data.load_beir(clean, "test"), data.load_beir(clean), data.task_query_splits(clean),
                data.load_training_data(pairs_dir.parent)]
    (tmp_path / "copy").mkdir()
    for source in (clean, pairs_dir.parent):
        target = tmp_path / "copy" / source.name
        subprocess.run(["cp", "-r", source, target], check=True)
        rewrite(target, bom, crlf)
    copy = tmp_path / "copy" / "scifact"
    assert (copy / "corpus.jsonl").read_bytes() != (clean / "corpus.jsonl").read_bytes()
    got = [data.load_beir(copy, "test"), data.load_beir(copy), data.task_query_splits(copy),
           data.load_training_data(tmp_path / "copy" / "clean_train")]
    assert got == expected
    assert [list(part) for result in got[:2] for part in result] == [list(part) for result in expected[:2] for part in result]  # order too


@pytest.mark.parametrize("content, message", [
    (b'{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": 3}\n', "x.jsonl:2: 'positive' must be a string, not a number"),
    (b'{"anchor": "a", "positive": "b"}\n\n{"anchor": "c"}\n', "x.jsonl: record 2 lacks 'positive' (line 3)"),
    (b'{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": " "}\n', "x.jsonl:2: empty 'positive' in a pair"),
    (b'{"sentence1": "a", "sentence2": null}\n', "x.jsonl: record 1 lacks 'sentence2' (line 1)"),
    (b'{"anchor": "a", "positive": "b"}\n{"anchor": "caf\xe9", "positive": "b"}\n', "x.jsonl:2: not UTF-8 (byte 0xe9 at column 16)"),
    (b'{"anchor": "a", "positive": "b"}\n{"anchor": "a", "positive": "b"\n', "x.jsonl:2: not a JSON object"),
])
def test_bad_pair_files_are_refused_with_file_and_line(tmp_path, content, message):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "x.jsonl").write_bytes(content)
    with pytest.raises(data.UsageError) as refused:
        data.load_training_data(tmp_path)
    assert str(refused.value) == f"{tmp_path}/pairs/{message}"


def test_in_domain_training_refuses_train_qrels_naming_an_unknown_document(tiny_beir, tmp_path):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "x.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    (tiny_beir / "scifact" / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\tMED-1\t1\n")
    assert data.load_training_data(tmp_path, "transfer", ["SciFact"], beir_dir=tiny_beir)[0] == {"pairs/x": [("a", "b")]}
    with pytest.raises(data.UsageError, match=r"scifact/qrels/train.tsv:3: document 'MED-1' is not in corpus.jsonl$"):
        data.load_training_data(tmp_path, "in-domain", ["SciFact"], beir_dir=tiny_beir)


@pytest.mark.slow
def test_the_evaluation_refuses_bad_data_before_it_loads_the_model(tiny_beir, tmp_path):
    with open(tiny_beir / "scifact" / "corpus.jsonl", "ab") as f:
        f.write(b'{"_id": "d9", "text": "caf\xe9"}\n')
    # a model that cannot load: had the model come first, the error would name it instead of the data
    result = subprocess.run([sys.executable, "evaluate_quantization_mteb.py", "--tasks", "SciFact", "--data-dir", str(tiny_beir),
                             "--methods", "float", "--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "results"),
                             "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tiny_beir}/scifact/corpus.jsonl:9: not UTF-8 (byte 0xe9 at column 27)"


# the published counts (../shared/data/beir/SOURCES.md): documents, then per split (queries, judgements)
PUBLISHED = {
    "nfcorpus": (3633, {"test": (323, 12334), "dev": (324, 11385), "train": (2590, 110575)}),
    "scifact": (5183, {"test": (300, 339), "train": (809, 919)}),
}


@pytest.mark.parametrize("task", PUBLISHED)
def test_the_real_evaluated_tasks_pass_every_check(shared_beir, task):
    documents, splits = PUBLISHED[task]
    assert sorted(p.stem for p in (shared_beir / task / "qrels").glob("*.tsv")) == sorted(splits)
    for split, (n_queries, n_judgements) in splits.items():
        corpus, queries, qrels = data.load_beir(shared_beir / task, split)
        assert (len(corpus), len(queries), sum(map(len, qrels.values()))) == (documents, n_queries, n_judgements)
    assert all(data.task_query_splits(shared_beir / task).values())


def test_the_real_training_data_passes_every_check(shared_beir):
    small = sorted(p for p in (shared_beir.parent / "beir-small").iterdir() if p.is_dir())
    assert [p.name for p in small] == ["business-reports", "dbpedia", "msmarco"]
    for folder in small:
        for split in [p.stem for p in (folder / "qrels").glob("*.tsv")]:
            assert data.load_beir(folder, split)[2]
    for protocol in data.PROTOCOLS:
        pairs, texts = data.load_training_data(shared_beir.parent, protocol)
        assert len([k for k in pairs | texts if k.startswith("pairs/")]) == 11
        assert all(isinstance(t, str) and t.strip() for v in pairs.values() for pair in v for t in pair)
