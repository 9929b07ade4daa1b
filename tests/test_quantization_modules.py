"""The quantisers, the losses, training, checkpoints, and the training command (conftest `fitted`: one real run on
real fitting texts): what it reads, what it fits on, and that what it writes loads and scores."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sentence_transformers.util.quantization import quantize_embeddings

import data as data_module
import encoders
import methods
import mteb_adapter
import quantization_modules as qm
from conftest import PROGRESS_BAR, TINY_DOCS, interrupt
from encoders import DEFAULT_MODEL

pytestmark = pytest.mark.usefixtures("faiss_one_thread")


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
    with pytest.raises(ValueError, match="divisible by 4, got 382"):
        qm.QuantizationModuleStage2(382)


def test_zero_thresholds_give_sign_bits_as_sentence_transformers_packs_them():
    x = random_embeddings()
    bits = qm.QuantizationModuleStage1(384).quantize(x).numpy()
    assert np.array_equal(bits, x.numpy() > 0)
    assert np.array_equal(methods.pack_codes(bits), quantize_embeddings(x.numpy(), "ubinary"))


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
        margins = quantizer.margins(x)[0]
        assert (margins > 0).tolist() == bits  # the asymmetric query agrees with the bits
        assert margins[4].item() == pytest.approx(max(a - 0.5, b + 0.5))  # a pair's margin: the larger of its two


def test_similarity_loss_on_a_case_computed_by_hand():
    # float rows (1, 0) and (1, 1): cosine 1/sqrt(2); codes (1, 1) and (1, 1): cosine 1. The two off-diagonal entries
    # differ by 1 - 1/sqrt(2), the diagonal ones by 0: MSE over the 4 entries = 2 (1 - 1/sqrt(2))^2 / 4
    float_emb = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    codes = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert qm.similarity_preservation_loss(float_emb, codes).item() == pytest.approx((1 - 2**-0.5) ** 2 / 2, rel=1e-6)
    # scale does not matter (cosines), and codes that keep the angles exactly cost nothing
    assert qm.similarity_preservation_loss(3 * float_emb, codes).item() == pytest.approx((1 - 2**-0.5) ** 2 / 2, rel=1e-6)
    assert qm.similarity_preservation_loss(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), torch.tensor([[2.0, 0.0], [0.0, -5.0]])).item() \
        == pytest.approx(0.0, abs=1e-7)


def test_training_moves_the_thresholds_to_where_code_cosines_match_float_cosines():
    # Embeddings with a known offset o: every float cosine carries |o|^2, so the codes should agree more often than
    # sign bits do (0.52 here against 0.74). The loss can only get there by moving each threshold away from its
    # offset (the bit then equals the offset's sign more often): t_d opposite in sign to o_d.
    g = torch.Generator().manual_seed(0)
    offset = 0.2 * torch.randn(64, generator=g)
    x = torch.nn.functional.normalize(torch.randn(2048, 64, generator=g), dim=1) + offset
    train, held_out = x[:1024], x[1024:]

    def code_loss_and_mean_cosine(quantizer):
        codes = qm.to_signed(quantizer.quantize(held_out))
        cosines = torch.nn.functional.normalize(codes, dim=1) @ torch.nn.functional.normalize(codes, dim=1).T
        mean_cosine = (cosines.sum() - len(codes)).item() / len(codes) / (len(codes) - 1)  # off the diagonal
        return qm.similarity_preservation_loss(held_out, codes).item(), mean_cosine

    unit = torch.nn.functional.normalize(held_out, dim=1)
    float_cosine = ((unit @ unit.T).sum() - len(unit)).item() / len(unit) / (len(unit) - 1)
    quantizer = qm.QuantizationModuleStage1(64)
    before, before_cosine = code_loss_and_mean_cosine(quantizer)
    qm.train_quantizer(quantizer, train, epochs=20, batch_size=256, lr=1e-2, verbose=False)
    after, after_cosine = code_loss_and_mean_cosine(quantizer)
    assert abs(before_cosine - float_cosine) > 0.15 and abs(after_cosine - float_cosine) < 0.03
    assert after < 0.25 * before  # on held-out embeddings, with the hard bits that search uses
    t, large = quantizer.thresholds.detach(), offset.abs() > 0.1
    assert (torch.sign(t[large]) == -torch.sign(offset[large])).float().mean() > 0.9


def test_straight_through_is_hard_forward_and_sigmoid_backward():
    quantizer = qm.QuantizationModuleStage1(384, temperature=10.0)
    quantizer.thresholds.data = 0.01 * torch.randn(384, generator=torch.Generator().manual_seed(1))
    quantizer.straight_through = True
    x = random_embeddings()
    soft = quantizer(x)
    assert torch.equal(soft, quantizer.quantize(x).float())
    soft.sum().backward()
    s = torch.sigmoid(10.0 * (x - quantizer.thresholds.detach()))  # d/dt sigmoid(T (x - t)) = -T s (1 - s)
    torch.testing.assert_close(quantizer.thresholds.grad, (-10.0 * s * (1 - s)).sum(0), rtol=1e-4, atol=1e-5)


def test_info_nce_prefers_matched_pairs():
    x = qm.to_signed(qm.QuantizationModuleStage1(384)(random_embeddings(64)))
    matched = qm.info_nce_loss(x, x)
    shuffled = qm.info_nce_loss(x, x[torch.randperm(64, generator=torch.Generator().manual_seed(0))])
    assert matched < 0.1 < shuffled


def test_each_activation_trains_and_the_best_validation_candidate_is_kept():
    x = random_embeddings(300) + 0.02
    pairs = (torch.arange(0, 300, 2), torch.arange(1, 300, 2), torch.arange(150) % 3)
    for activation in qm.ACTIVATIONS:
        quantizer = qm.QuantizationModuleStage1(384)
        losses = qm.train_quantizer(quantizer, x, pairs, epochs=2, batch_size=64, activation=activation,
                                    contrastive_weight=1.0, verbose=False)
        assert len(losses) == 2 and not quantizer.straight_through
        assert quantizer.temperature == (qm.ANNEAL[1] if activation == "anneal" else qm.TEMPERATURE)
    # a validation that prefers thresholds near 0.01: the kept quantiser is the candidate that scored best
    score = lambda quantizer: -float((quantizer.thresholds.detach() - 0.01).abs().mean())  # noqa: E731
    best, init, scores = qm.train_candidates(lambda: qm.QuantizationModuleStage1(384), x, lambda q: {"tiny": score(q)},
                                             n_random=2, epochs=1)
    assert set(scores) == {"zero", "median", "random0", "random1"}
    assert init == max(scores, key=lambda k: scores[k]["mean"]) and score(best) == scores[init]["tiny"]
    assert len({round(v["mean"], 9) for v in scores.values()}) == 4  # the candidates really differ


def test_rotation_stays_orthogonal_keeps_cosines_and_round_trips(tmp_path):
    x = random_embeddings(300)
    pairs = (torch.arange(0, 300, 2), torch.arange(1, 300, 2), torch.arange(150) % 3)
    quantizer = qm.QuantizationModuleStage1Rotated(384)
    assert quantizer.method == "stage1_rotated" and torch.equal(quantizer.quantize(x), x > 0)  # starts as sign bits
    qm.train_quantizer(quantizer, x, pairs, epochs=3, batch_size=64, lr=1e-2, contrastive_weight=1.0, verbose=False)
    r = quantizer.rotation.detach()
    assert (r - torch.eye(384)).abs().max() > 1e-3  # it learned something
    assert torch.allclose(r @ r.T, torch.eye(384), atol=1e-4)  # and is still a rotation: float cosines are unchanged
    assert torch.allclose((x @ r.T) @ (x @ r.T).T, x @ x.T, atol=1e-4)
    assert torch.equal(quantizer.quantize(x), x @ r.T - quantizer.thresholds > 0)
    path = qm.checkpoint_path(tmp_path, DEFAULT_MODEL, "stage1_rotated")
    qm.save_quantizer(path, quantizer, {"base_model": DEFAULT_MODEL})
    loaded, meta = qm.load_quantizer(path, DEFAULT_MODEL, 384, qm.QuantizationModuleStage1Rotated, "transfer")
    assert meta["method"] == "stage1_rotated" and torch.equal(loaded.rotation, quantizer.rotation)
    assert torch.equal(loaded.quantize(x), quantizer.quantize(x)) and torch.equal(loaded.margins(x), quantizer.margins(x))
    assert list(qm.QuantizationModuleStage1(384).state_dict()) == ["thresholds"]  # plain thresholds keep no rotation


def test_checkpoint_round_trip_and_refusals(tmp_path):
    quantizer = qm.QuantizationModuleStage2(384, temperature=7.0)
    quantizer.thresholds.data = torch.linspace(-0.1, 0.1, 384)
    path = qm.checkpoint_path(tmp_path, "org/model", "stage2")
    assert path == tmp_path / "org__model" / "stage2.safetensors"
    in_domain = qm.checkpoint_path(tmp_path, "org/model", "stage2", "in-domain")
    assert in_domain == tmp_path / "org__model" / "in-domain" / "stage2.safetensors"
    qm.save_quantizer(path, quantizer, {"base_model": "org/model", "protocol": "transfer", "training_sources": {"a": 3}})
    loaded, meta = qm.load_quantizer(path, "org/model", 384, qm.QuantizationModuleStage2, "transfer")
    assert isinstance(loaded, qm.QuantizationModuleStage2) and loaded.temperature == 7.0 and not loaded.training
    assert torch.equal(loaded.thresholds, quantizer.thresholds)
    assert json.loads(meta["training_sources"]) == {"a": 3} and meta["method"] == "stage2"

    refusals = [
        (("org/other", 384, qm.QuantizationModuleStage2, "transfer"), "was made for model 'org/model', not 'org/other'"),
        (("org/model", 768, qm.QuantizationModuleStage2, "transfer"), "is for dimension 384, but org/model gives 768"),
        (("org/model", 384, qm.QuantizationModuleStage1, "transfer"), "holds a stage2 checkpoint, not stage1"),
        (("org/model", 384, qm.QuantizationModuleStage2, "in-domain"), "made under protocol 'transfer', not 'in-domain'"),
    ]
    for args, message in refusals:
        with pytest.raises(data_module.UsageError, match=message):
            qm.load_quantizer(path, *args)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"thresholds": quantizer.thresholds.data}, pickled)
    with pytest.raises(data_module.UsageError, match="pickled checkpoints are refused"):
        qm.load_quantizer(pickled, "org/model", 384, qm.QuantizationModuleStage2)
    meta = safe_open(str(path), framework="pt").metadata()
    save_file({"limits": torch.zeros(384)}, str(path), metadata=meta)
    with pytest.raises(data_module.UsageError, match=r"holds tensors \{'limits': \(384,\)\}, but a stage2 quantiser"):
        qm.load_quantizer(path, "org/model", 384, qm.QuantizationModuleStage2)
    save_file({"thresholds": torch.zeros(384)}, str(path), metadata=meta | {"method": "stage1_rotated"})
    with pytest.raises(data_module.UsageError, match=r"holds tensors \{'thresholds': \(384,\)\}, but a stage1_rotated"):
        qm.load_quantizer(path, "org/model", 384, qm.QuantizationModuleStage1Rotated)


def test_a_missing_checkpoint_names_a_training_command_that_accepts_it(tmp_path):
    for name in methods.LEARNED + ["pq48"]:
        with pytest.raises(data_module.UsageError) as refused:
            methods.load_method(name, 384, DEFAULT_MODEL, tmp_path, "transfer")
        command = str(refused.value).split("make one with: python quantization_modules.py ")[1].split()
        assert command[command.index("--methods") + 1] == name


def test_training_data_is_balanced_and_transfer_never_reads_evaluated_tasks(tiny_beir, monkeypatch):
    data = tiny_beir.parent / "train"
    (data / "pairs").mkdir(parents=True)
    (data / "pairs" / "big.jsonl").write_text("".join(f'{{"anchor": "a{i}", "positive": "p{i}"}}\n' for i in range(100)))
    (data / "beir-small").mkdir()
    (data / "beir-small" / "tiny").symlink_to(tiny_beir / "scifact")
    (tiny_beir / "scifact" / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(1, 6)))
    read = []
    for name in ("_read_jsonl", "load_qrels"):
        original = getattr(data_module, name)
        monkeypatch.setattr(data_module, name, lambda path, *a, _f=original, **k: read.append((str(path), a[:1])) or _f(path, *a, **k))

    pairs, texts = data_module.load_training_data(data, "transfer", ["SciFact"], max_per_source=10, beir_dir=tiny_beir)
    assert {k: len(v) for k, v in pairs.items()} == {"pairs/big": 10} and {k: len(v) for k, v in texts.items()} == {"beir-small/tiny": 8}
    assert (pairs, texts) == data_module.load_training_data(data, "transfer", ["SciFact"], max_per_source=10, beir_dir=tiny_beir)
    assert read and not any(p.startswith(str(tiny_beir)) for p, _ in read)  # the evaluated tasks' folder: never

    read.clear()
    pairs, texts = data_module.load_training_data(data, "in-domain", ["SciFact"], max_per_source=10, beir_dir=tiny_beir)
    splits = data_module.task_query_splits(tiny_beir / "scifact")
    assert len(splits["validation"]) == 1 and len(splits["train"]) == 4  # 20% of the 5 train queries held out
    assert len(pairs["in-domain/SciFact"]) == 4 and ("test",) not in [split for _, split in read]
    assert list(pairs) == ["in-domain/SciFact"] and len(texts["pairs/big"]) == 20  # general pairs only as texts


@pytest.mark.parametrize("folder", ["nfcorpus", "scifact"])
def test_training_and_validation_queries_never_meet_test_queries(folder, shared_beir):
    splits = data_module.task_query_splits(shared_beir / folder)
    test = set(data_module.load_qrels(shared_beir / folder, "test"))
    validation, train = set(splits["validation"]), set(splits["train"])
    assert validation and train and not (validation & test) and not (train & test) and not (validation & train)
    if folder == "scifact":  # no dev split: a seeded 20% of train, the same every time
        assert len(validation) == round(0.2 * 809) and splits == data_module.task_query_splits(shared_beir / folder)


def fitted_names() -> list[str]:
    return [name for name in methods.METHODS if methods.make_method(name, 384).fitted_on != "nothing"]


def checkpoint_metadata(run, name: str, protocol: str = "transfer") -> dict:
    path = qm.checkpoint_path(run.checkpoints, DEFAULT_MODEL, methods.make_method(name, 384).checkpoint, protocol)
    return safe_open(str(path), framework="pt").metadata()


def test_transfer_training_fits_every_method_on_transfer_texts_and_reads_no_test_qrels(fitted, train_data):
    folder = fitted.data_dir / "scifact"
    corpus, queries, _ = data_module.load_beir(folder)
    # files of the evaluated task: its corpus and queries (validation ranks against them) and its dev qrels. Not test.
    opened = {p.relative_to(folder.resolve()) for p in fitted.opened if p.is_relative_to(folder.resolve())}
    assert (folder / "qrels" / "test.tsv").is_file()
    assert {str(p) for p in opened} == {"corpus.jsonl", "queries.jsonl", "qrels/dev.tsv"}
    # what every method was fitted or trained on: the texts of the transfer pairs, none of the task's texts
    fitting = [texts for cache, texts in fitted.embedded if cache == "_training"]
    assert len(fitting) == 1
    pair_texts = {t for line in (train_data / "pairs" / "quora.jsonl").read_text().splitlines() for t in json.loads(line).values()}
    task_texts = {data_module.document_text(d) for d in corpus.values()} | set(queries.values())
    assert set(fitting[0]) <= pair_texts and not set(fitting[0]) & task_texts and len(fitting[0]) > 500
    trained = {"stage1_trained": "stage1", "stage1_rotated": "stage1_rotated", "stage2_trained": "stage2"}
    assert fitted.fitted_rows == {trained.get(n, n): len(fitting[0]) for n in fitted_names()}
    # and every checkpoint says so
    written = sorted(p.stem for p in (fitted.checkpoints / encoders.model_slug(DEFAULT_MODEL)).glob("*.safetensors"))
    assert written == sorted(methods.make_method(n, 384).checkpoint for n in fitted_names())
    for name in fitted_names():
        meta = checkpoint_metadata(fitted, name)
        assert json.loads(meta["training_sources"]) == {"pairs/quora": 300} and meta["protocol"] == "transfer", name
        assert json.loads(meta["validation_query_ids"]) == {"SciFact": list(data_module.load_qrels(folder, "dev"))}


def test_in_domain_training_adds_the_train_queries_and_still_reads_no_test_qrels(fitted_in_domain):
    folder = fitted_in_domain.data_dir / "scifact"
    opened = {str(p.relative_to(folder.resolve())) for p in fitted_in_domain.opened if p.is_relative_to(folder.resolve())}
    assert opened == {"corpus.jsonl", "queries.jsonl", "qrels/dev.tsv", "qrels/train.tsv"}
    train, dev = data_module.load_qrels(folder, "train"), data_module.load_qrels(folder, "dev")
    for name in ("stage1_trained", "int8"):
        meta = checkpoint_metadata(fitted_in_domain, name, "in-domain")
        assert meta["protocol"] == "in-domain"
        assert json.loads(meta["training_sources"]) == {"in-domain/SciFact": sum(s > 0 for d in train.values() for s in d.values()),
                                                        "pairs/quora": 600}  # the general pairs become texts
        assert json.loads(meta["validation_query_ids"]) == {"SciFact": list(dev)} and not set(dev) & set(train)
    assert not (fitted_in_domain.checkpoints / encoders.model_slug(DEFAULT_MODEL) / "stage1.safetensors").exists()


def test_every_checkpoint_the_training_command_writes_loads_and_scores(fitted, task_embeddings):
    qrels = data_module.load_qrels(fitted.data_dir / "scifact", "dev")  # what the command validated on (here = test)
    task = {k: task_embeddings[k] for k in ("docs", "queries", "doc_ids", "query_ids")}
    ndcg = lambda method: mteb_adapter.ndcg_at_10(methods.rank(method, next(iter(method.modes)), **task), qrels)  # noqa: E731
    float_ndcg = ndcg(methods.make_method("float", 384))
    assert 0.7 < float_ndcg < 0.95
    for name in fitted_names():
        method, meta = methods.load_method(name, 384, DEFAULT_MODEL, fitted.checkpoints, "transfer", modes=[])
        score = ndcg(method)
        assert 0.8 * float_ndcg < score <= float_ndcg + 0.02, name
        if name in methods.LEARNED:  # the training command chose it on this very ranking: the same number
            validation = json.loads(meta["validation_ndcg_at_10"])
            assert score == pytest.approx(validation[meta["initialisation"]]["SciFact"], abs=1e-9), name
            assert validation[meta["initialisation"]]["mean"] == max(v["mean"] for v in validation.values())


def test_loss_weights_that_train_nothing_are_refused(tmp_path):
    for args in (["--sim-weight", "0", "--methods", "stage1_trained"], ["--contrastive-weight", "-1", "--methods", "stage1_rotated"],
                 ["--sim-weight", "nan", "--methods", "stage1_trained"]):
        with pytest.raises(SystemExit) as exit_info:
            qm.main(["--train-data", str(tmp_path), "--data-dir", str(tmp_path), "--out", str(tmp_path / "ck"), *args])
        assert str(exit_info.value).startswith("error: ") and "loss weights must be >= 0 and not both 0" in str(exit_info.value)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--random-inits", "-1"], "--random-inits must be at least 0"),
    (["--max-per-source", "0"], "--max-per-source must be at least 1"),
    (["--in-domain-pairs", "0"], "--in-domain-pairs must be at least 1"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--methods", "stage1"], "invalid choice: 'stage1'"),  # registry names only
    (["--methods", "float"], "invalid choice: 'float'"),  # nothing to fit
])
def test_training_command_refuses_bad_arguments_before_any_work(tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        qm.main(["--train-data", str(tmp_path / "no-data"), "--out", str(tmp_path / "ck"), *args])
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert not (tmp_path / "ck").exists()


def test_training_command_refuses_an_unwritable_folder_or_no_validation_queries_before_training(tmp_path, tiny_beir):
    (tmp_path / "a_file").write_text("")
    for option in ("--out", "--cache-dir"):
        with pytest.raises(SystemExit) as exit_info:
            qm.main(["--train-data", str(tmp_path / "no-data"), "--out", str(tmp_path / "ck"), "--cache-dir", str(tmp_path / "cache"),
                     option, str(tmp_path / "a_file" / "sub"), "--methods", "stage1_trained"])
        assert "is not writable" in str(exit_info.value) and str(exit_info.value).startswith("error: ")
    # a task with only test qrels: nothing to choose candidates on
    train = tmp_path / "train"
    (train / "pairs").mkdir(parents=True)
    (train / "pairs" / "p.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    with pytest.raises(SystemExit) as exit_info:
        qm.main(["--train-data", str(train), "--data-dir", str(tiny_beir), "--tasks", "SciFact", "--out", str(tmp_path / "ck"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert str(exit_info.value).startswith("error: SciFact: no validation queries")
    assert not list((tmp_path / "ck").rglob("*.safetensors"))


def test_embed_texts_reads_other_caches_instead_of_encoding_again(tmp_path, model):
    texts = ["a first sentence", "a second sentence"]
    first = encoders.embed_texts(model, texts, tmp_path / "task_documents")
    again = encoders.embed_texts(None, texts[::-1], tmp_path / "training", also=[tmp_path / "task_documents"])  # no model needed
    assert np.array_equal(again, first[::-1])


def test_too_few_fitting_texts_for_a_codebook_is_one_line_and_writes_nothing(tmp_path, task_with_ties, embedding_cache):
    """pq48 learns 256 centroids per sub-quantiser: faiss refuses fewer texts; the command says so in one line."""
    train = tmp_path / "train"
    (train / "pairs").mkdir(parents=True)
    (train / "pairs" / "p.jsonl").write_text("".join(json.dumps({"anchor": f"question {i}", "positive": f"answer number {i}"}) + "\n"
                                                     for i in range(50)))
    with pytest.raises(SystemExit) as exit_info:
        qm.main(["--train-data", str(train), "--data-dir", str(task_with_ties), "--tasks", "SciFact", "--methods", "int8", "pq48",
                 "--out", str(tmp_path / "ck"), "--cache-dir", str(embedding_cache)])
    message = str(exit_info.value)
    assert message == "error: pq48: cannot be fitted on 100 texts (Number of training points (100) should be at least as " \
                      "large as number of clusters (256))", message
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").rglob("*.safetensors"))  # not even int8's


@pytest.fixture
def tiny_training(tmp_path, tiny_beir) -> list:
    """The smallest data the training command takes: the tiny set with its test qrels also as dev (validation), and
    (title, text) pairs of its documents as the transfer pairs. Returns the command's data and cache arguments."""
    shutil.copy(tiny_beir / "scifact" / "qrels" / "test.tsv", tiny_beir / "scifact" / "qrels" / "dev.tsv")
    (tmp_path / "train" / "pairs").mkdir(parents=True)
    (tmp_path / "train" / "pairs" / "tiny.jsonl").write_text(
        "".join(json.dumps({"anchor": title, "positive": text}) + "\n" for title, text in TINY_DOCS.values()))
    return ["--train-data", tmp_path / "train", "--data-dir", tiny_beir, "--tasks", "SciFact", "--cache-dir", tmp_path / "cache"]


def previous_checkpoints(out: Path) -> dict[str, bytes]:
    """Stand-ins for an earlier run's int8, Stage 1 and Stage 2 checkpoints in `out`; returns every file under `out`."""
    for stem in ("int8", "stage1", "stage2"):
        path = qm.checkpoint_path(out, DEFAULT_MODEL, stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"the previous run's {stem}".encode())
    return files_under(out)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


INTERRUPTED = "interrupted; no checkpoint was written (a rerun encodes nothing the cache already holds)"


def test_ctrl_c_during_training_prints_one_line_exits_130_and_writes_no_checkpoint(tiny_training, tmp_path):
    """A real SIGINT while Stage 1's candidates train (the progress bar shows the first of 10 done; int8 is fitted)."""
    previous = previous_checkpoints(tmp_path / "ck")
    code, stderr = interrupt("quantization_modules.py", [*tiny_training, "--out", tmp_path / "ck", "--methods", "int8",
                                                         "stage1_trained", "--random-inits", "8", "--epochs", "100"],
                             b"| 1/", "stderr")
    assert (code, stderr) == (130, [INTERRUPTED])  # one line: no traceback
    assert files_under(tmp_path / "ck") == previous


def test_an_interrupted_training_run_leaves_the_previous_checkpoints_byte_identical(tiny_training, tmp_path, monkeypatch,
                                                                                    capsys):
    """Ctrl-C while the last learned method trains, after int8 was fitted and Stage 1 trained: none of their new
    checkpoints is written, so the new Stage 1 never sits beside the old Stage 2."""
    previous, real, trained = previous_checkpoints(tmp_path / "ck"), qm.train_candidates, []

    def interrupted_at_the_last(build, *args, **kwargs):
        trained.append(build().method)
        if len(trained) == 2:
            raise KeyboardInterrupt
        return real(build, *args, **kwargs)

    monkeypatch.setattr(qm, "train_candidates", interrupted_at_the_last)
    with pytest.raises(SystemExit) as exit_info:
        qm.main([*map(str, tiny_training), "--out", str(tmp_path / "ck"), "--methods", "int8", "stage1_trained",
                 "stage2_trained", "--random-inits", "0", "--epochs", "1"])
    assert exit_info.value.code == 130 and trained == ["stage1", "stage2"]
    stderr = capsys.readouterr().err
    assert [line for line in stderr.splitlines() if line.strip() and not PROGRESS_BAR.match(line)] == [INTERRUPTED]
    assert files_under(tmp_path / "ck") == previous


def test_a_training_failure_after_the_writability_check_leaves_no_new_checkpoint_folder(tiny_beir, tmp_path):
    """The checkpoint folder is proved writable first, but created only when the checkpoints are written: a task
    without validation queries, found after the check, leaves no empty folder (nor its parent) behind."""
    (tmp_path / "train" / "pairs").mkdir(parents=True)
    (tmp_path / "train" / "pairs" / "p.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    with pytest.raises(SystemExit, match="error: SciFact: no validation queries"):
        qm.main(["--train-data", str(tmp_path / "train"), "--data-dir", str(tiny_beir), "--tasks", "SciFact",
                 "--out", str(tmp_path / "new" / "ck"), "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "new").exists()
