"""Unit tests of the quantisers, the loss, training, checkpoints and the BEIR reader."""

import numpy as np
import pytest
import torch
from sentence_transformers.util.quantization import quantize_embeddings

import data as data_module
import encoders
import quantization_modules as qm


def random_embeddings(n=200, dim=384, seed=0):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


def test_bits_per_vector():
    assert qm.QuantizationModuleStage1(384).bits_per_vector == 384
    assert qm.QuantizationModuleStage2(384).bits_per_vector == 288
    x = random_embeddings()
    assert qm.QuantizationModuleStage1(384).quantize(x).shape == (200, 384)
    assert qm.QuantizationModuleStage2(384).quantize(x).shape == (200, 288)
    assert qm.QuantizationModuleStage2(384)(x).shape == (200, 288)


def test_zero_thresholds_give_sign_bits_as_sentence_transformers_packs_them():
    x = random_embeddings()
    bits = qm.QuantizationModuleStage1(384).quantize(x).numpy()
    assert np.array_equal(bits, x.numpy() > 0)
    assert np.array_equal(np.packbits(bits, axis=1), quantize_embeddings(x.numpy(), "ubinary"))


def test_stage2_truth_table():
    quantizer = qm.QuantizationModuleStage2(8, temperature=1000.0)
    quantizer.thresholds.data = torch.tensor([0, 0, 0, 0, 0.5, -0.5, 0.1, 0.1])
    # dims 4..7 form the pairs (4, 5) and (6, 7); the bit is 0 only when both are at or under their thresholds
    cases = {(0.4, -0.6): 0, (0.6, -0.6): 1, (0.4, -0.4): 1, (0.6, -0.4): 1}
    for (a, b), want in cases.items():
        x = torch.tensor([[1.0, -1.0, 0.2, -0.2, a, b, 0.0, 0.2]])
        bits = quantizer.quantize(x)[0].tolist()
        assert bits == [True, False, True, False, bool(want), True], (a, b)
        soft = quantizer(x)[0]
        assert torch.allclose(soft, torch.tensor(bits, dtype=torch.float32), atol=1e-3)
        assert (quantizer.margins(x)[0] > 0).tolist() == bits  # the asymmetric query agrees with the bits


def test_loss_is_zero_for_identical_inputs_and_positive_otherwise():
    x = random_embeddings()
    assert qm.similarity_preservation_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert qm.similarity_preservation_loss(x, random_embeddings(seed=1)).item() > 1e-4


def test_training_lowers_the_loss_on_shifted_data():
    # Embeddings with a shared offset: sign bits are then mostly 1; learned thresholds should follow the offset.
    x = random_embeddings(512) + 0.05
    losses = qm.train_quantizer(qm.QuantizationModuleStage1(384), x, epochs=15, batch_size=128, lr=5e-3)
    assert losses[-1] < 0.8 * losses[0]
    for train in (qm.train_quantization_stage1, qm.train_quantization_stage2):
        quantizer = train(x, epochs=2, batch_size=256)
        assert quantizer.thresholds.abs().sum() > 0


def test_checkpoint_round_trip_and_refusals(tmp_path):
    quantizer = qm.QuantizationModuleStage2(384, temperature=7.0)
    quantizer.thresholds.data = torch.linspace(-0.1, 0.1, 384)
    path = qm.checkpoint_path(tmp_path, "org/model", "stage2")
    qm.save_quantizer(path, quantizer, {"base_model": "org/model", "training_sources": {"a": 3}})
    loaded, meta = qm.load_quantizer(path, "org/model", 384)
    assert isinstance(loaded, qm.QuantizationModuleStage2) and loaded.temperature == 7.0
    assert torch.equal(loaded.thresholds, quantizer.thresholds)
    assert meta["training_sources"] == '{"a": 3}' and meta["method"] == "stage2"

    with pytest.raises(data_module.UsageError, match="trained for model 'org/model'"):
        qm.load_quantizer(path, "org/other", 384)
    with pytest.raises(data_module.UsageError, match="dimension 384"):
        qm.load_quantizer(path, "org/model", 768)
    with pytest.raises(data_module.UsageError, match="train one with"):
        qm.load_quantizer(tmp_path / "missing.safetensors", "org/model", 384)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"thresholds": quantizer.thresholds.data}, pickled)
    with pytest.raises(data_module.UsageError, match="pickled checkpoints are refused"):
        qm.load_quantizer(pickled, "org/model", 384)
    assert qm.load_quantizer(path, "org/model", 384, method="stage2")[1]["method"] == "stage2"
    with pytest.raises(data_module.UsageError, match="holds a stage2 quantiser, not stage1"):  # a file copied to the wrong name
        qm.load_quantizer(path, "org/model", 384, method="stage1")
    meta = qm.safe_open(str(path), framework="pt").metadata()
    qm.save_file({"limits": torch.zeros(384)}, str(path), metadata=meta)
    with pytest.raises(data_module.UsageError, match="holds no thresholds tensor"):
        qm.load_quantizer(path, "org/model", 384)


def test_load_beir_reads_and_rejects(tiny_beir):
    corpus, queries, qrels = data_module.load_beir(tiny_beir / "scifact", "test")
    assert len(corpus) == 8 and len(queries) == 6 and qrels["q1"] == {"d1": 1}
    with pytest.raises(data_module.UsageError, match="missing qrels file"):
        data_module.load_beir(tiny_beir / "scifact", "dev")
    with pytest.raises(data_module.UsageError, match="data folder not found"):
        data_module.load_beir(tiny_beir / "nope", "test")
    with open(tiny_beir / "scifact" / "qrels" / "test.tsv", "a") as f:
        f.write("q1 d2 1\n")
    with pytest.raises(data_module.UsageError, match=r"test.tsv:8: malformed qrels line"):
        data_module.load_beir(tiny_beir / "scifact", "test")


@pytest.mark.parametrize("file, content, message", [
    ("corpus.jsonl", '{"_id": "d1", "title": "no text"}\n', r"corpus.jsonl: record 1 lacks 'text'"),
    ("corpus.jsonl", "[1, 2]\n", r"corpus.jsonl:1: not a JSON object"),
    ("corpus.jsonl", "", "holds no documents"),
    ("queries.jsonl", '{"text": "no id"}\n', r"queries.jsonl: record 1 lacks '_id'"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\n", "no query of queries.jsonl has a relevant document"),
    ("qrels/test.tsv", "x1\td1\t1\n", "no query of queries.jsonl has a relevant document"),
    ("qrels/test.tsv", "q1\td1\t0\n", "no query of queries.jsonl has a relevant document"),
])
def test_load_beir_names_the_file_of_unusable_data(tiny_beir, file, content, message):
    (tiny_beir / "scifact" / file).write_text(content)
    with pytest.raises(data_module.UsageError, match=message):
        data_module.load_beir(tiny_beir / "scifact", "test")


def test_training_data_is_balanced_and_transfer_never_reads_evaluated_tasks(tiny_beir, monkeypatch):
    data = tiny_beir.parent / "train"
    (data / "pairs").mkdir(parents=True)
    (data / "pairs" / "big.jsonl").write_text("".join(f'{{"anchor": "a{i}", "positive": "p{i}"}}\n' for i in range(100)))
    (data / "beir-small").mkdir()
    (data / "beir-small" / "tiny").symlink_to(tiny_beir / "scifact")
    (data / "beir").mkdir()
    (data / "beir" / "scifact").symlink_to(tiny_beir / "scifact")
    (tiny_beir / "scifact" / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(1, 6)))
    read = []
    for name in ("_read_jsonl", "load_qrels"):
        original = getattr(data_module, name)
        monkeypatch.setattr(data_module, name, lambda path, *a, _f=original: read.append(str(path)) or _f(path, *a))

    pairs, texts = data_module.load_training_data(data, "transfer", ["SciFact"], max_per_source=10)
    assert {k: len(v) for k, v in pairs.items()} == {"pairs/big": 10} and {k: len(v) for k, v in texts.items()} == {"beir-small/tiny": 8}
    assert (pairs, texts) == data_module.load_training_data(data, "transfer", ["SciFact"], max_per_source=10)  # seeded
    assert read and not any("/beir/" in p for p in read)

    read.clear()
    pairs, texts = data_module.load_training_data(data, "in-domain", ["SciFact"], max_per_source=10)
    splits = data_module.task_query_splits(data / "beir" / "scifact")
    assert len(splits["validation"]) == 1 and len(splits["train"]) == 4  # 20% of the 5 train queries held out
    assert len(pairs["in-domain/SciFact"]) == 4 and not any(p.endswith("test.tsv") for p in read if "/beir/" in p)
    assert list(pairs) == ["in-domain/SciFact"] and len(texts["pairs/big"]) == 20  # general pairs only as texts


@pytest.mark.parametrize("folder", ["nfcorpus", "scifact"])
def test_training_and_validation_queries_never_meet_test_queries(folder, shared_beir):
    splits = data_module.task_query_splits(shared_beir / folder)
    test = set(data_module.load_qrels(shared_beir / folder, "test"))
    validation, train = set(splits["validation"]), set(splits["train"])
    assert validation and train and not (validation & test) and not (train & test) and not (validation & train)
    if folder == "scifact":  # no dev split: a seeded 20% of train, the same every time
        assert len(validation) == round(0.2 * 809) and splits == data_module.task_query_splits(shared_beir / folder)


def test_info_nce_prefers_matched_pairs():
    x = qm.to_signed(qm.QuantizationModuleStage1(384)(random_embeddings(64)))
    matched = qm.info_nce_loss(x, x)
    shuffled = qm.info_nce_loss(x, x[torch.randperm(64, generator=torch.Generator().manual_seed(0))])
    assert matched < 0.1 < shuffled


def test_straight_through_is_hard_forward_with_gradients():
    quantizer = qm.QuantizationModuleStage1(384, temperature=10.0)
    quantizer.straight_through = True
    x = random_embeddings()
    soft = quantizer(x)
    assert torch.equal(soft, quantizer.quantize(x).float())
    soft.sum().backward()
    assert quantizer.thresholds.grad.abs().sum() > 0


def test_training_with_pairs_and_each_activation_and_choice_on_validation():
    x = random_embeddings(300)
    pairs = (torch.arange(0, 300, 2), torch.arange(1, 300, 2), torch.arange(150) % 3)
    for activation in qm.ACTIVATIONS:
        quantizer = qm.QuantizationModuleStage1(384)
        losses = qm.train_quantizer(quantizer, x, pairs, epochs=2, batch_size=64, activation=activation, contrastive_weight=1.0, verbose=False)
        assert len(losses) == 2 and quantizer.thresholds.abs().sum() > 0 and not quantizer.straight_through
        assert quantizer.temperature == (qm.ANNEAL[1] if activation == "anneal" else qm.TEMPERATURE)
    validation = {"tiny": dict(query_emb=x[:20] + 0.01, doc_emb=x, query_ids=[f"q{i}" for i in range(20)],
                               doc_ids=[f"d{i}" for i in range(300)], qrels={f"q{i}": {f"d{i}": 1} for i in range(20)})}
    assert qm.retrieval_ndcg_at_10(None, **validation["tiny"]) == pytest.approx(1.0)
    best, init, scores = qm.train_candidates(lambda: qm.QuantizationModuleStage1(384), x, validation, n_random=2, epochs=1)
    assert set(scores) == {"zero", "median", "random0", "random1"} and scores[init]["mean"] == max(v["mean"] for v in scores.values())


def test_embed_texts_reads_other_caches_instead_of_encoding_again(tmp_path, model):
    texts = ["a first sentence", "a second sentence"]
    first = encoders.embed_texts(model, texts, tmp_path / "task_documents")
    again = encoders.embed_texts(None, texts[::-1], tmp_path / "training", also=[tmp_path / "task_documents"])  # no model needed
    assert np.array_equal(again, first[::-1])


def test_rotation_stays_orthogonal_keeps_cosines_and_round_trips(tmp_path):
    x = random_embeddings(300)
    pairs = (torch.arange(0, 300, 2), torch.arange(1, 300, 2), torch.arange(150) % 3)
    quantizer = qm.QUANTIZERS["stage1_rotated"](384)
    assert quantizer.method == "stage1_rotated" and torch.equal(quantizer.quantize(x), x > 0)  # starts as sign bits
    qm.train_quantizer(quantizer, x, pairs, epochs=3, batch_size=64, lr=1e-2, contrastive_weight=1.0, verbose=False)
    r = quantizer.rotation.detach()
    assert (r - torch.eye(384)).abs().max() > 1e-3  # it learned something
    assert torch.allclose(r @ r.T, torch.eye(384), atol=1e-4)  # and is still a rotation: float cosines are unchanged
    assert torch.allclose((x @ r.T) @ (x @ r.T).T, x @ x.T, atol=1e-4)
    assert torch.equal(quantizer.quantize(x), x @ r.T - quantizer.thresholds > 0)
    path = qm.checkpoint_path(tmp_path, qm.DEFAULT_MODEL, "stage1_rotated")
    qm.save_quantizer(path, quantizer, {"base_model": qm.DEFAULT_MODEL})
    loaded, meta = qm.load_quantizer(path, qm.DEFAULT_MODEL, 384)
    assert meta["method"] == "stage1_rotated" and torch.equal(loaded.rotation, quantizer.rotation)
    assert torch.equal(loaded.quantize(x), quantizer.quantize(x)) and torch.equal(loaded.margins(x), quantizer.margins(x))
    assert list(qm.QuantizationModuleStage1(384).state_dict()) == ["thresholds"]  # plain thresholds keep no rotation


def test_checkpoint_without_its_rotation_and_training_that_trains_nothing_are_refused(tmp_path, capsys):
    path = tmp_path / "rotated.safetensors"
    qm.save_quantizer(path, qm.QuantizationModuleStage1(384), {"base_model": "org/model"})
    meta = qm.safe_open(str(path), framework="pt").metadata()
    qm.save_file({"thresholds": torch.zeros(384)}, str(path), metadata=meta | {"method": "stage1_rotated"})
    with pytest.raises(data_module.UsageError, match="does not hold the tensors of a stage1_rotated quantiser"):
        qm.load_quantizer(path, "org/model", 384)
    for args in (["--sim-weight", "0", "--methods", "stage1"], ["--contrastive-weight", "-1", "--methods", "stage1_rotated"],
                 ["--sim-weight", "nan", "--methods", "stage1"]):
        with pytest.raises(SystemExit) as exit_info:
            qm.main(["--data-dir", str(tmp_path), *args])
        assert str(exit_info.value).startswith("error: ") and "loss weights must be >= 0 and not both 0" in str(exit_info.value)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--random-inits", "-1"], "--random-inits must be at least 0"),
    (["--max-per-source", "0"], "--max-per-source must be at least 1"),
    (["--in-domain-pairs", "0"], "--in-domain-pairs must be at least 1"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--lr", "nan"], "--lr must be positive"),
])
def test_training_command_refuses_bad_numbers_before_any_work(tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        qm.main(["--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "ck"), *args])
    assert str(exit_info.value).startswith("error: " + message) and "\n" not in str(exit_info.value)
    assert not (tmp_path / "ck").exists()


def test_training_command_refuses_an_unwritable_folder_or_no_validation_queries_before_training(tmp_path, tiny_beir):
    (tmp_path / "a_file").write_text("")
    for option in ("--out", "--cache-dir"):
        with pytest.raises(SystemExit) as exit_info:
            qm.main(["--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "ck"), "--cache-dir", str(tmp_path / "cache"),
                     option, str(tmp_path / "a_file" / "sub"), "--methods", "stage1"])
        assert "is not writable" in str(exit_info.value) and str(exit_info.value).startswith("error: ")
    # a task with only test qrels: nothing to choose candidates on
    data = tiny_beir.parent / "train"
    (data / "pairs").mkdir(parents=True)
    (data / "pairs" / "p.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    (data / "beir").symlink_to(tiny_beir)
    with pytest.raises(SystemExit) as exit_info:
        qm.main(["--data-dir", str(data), "--tasks", "SciFact", "--out", str(tmp_path / "ck"), "--cache-dir", str(tmp_path / "cache")])
    assert str(exit_info.value).startswith("error: SciFact: no validation queries")
    assert not list((tmp_path / "ck").rglob("*.safetensors"))
