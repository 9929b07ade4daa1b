"""The torch quantisers, their losses and training loop, and the training command (conftest `fitted`: one real run
on real fitting texts): that a quantiser's hard codes are its registry method's codes after export, what the command
reads and fits on, which candidate it keeps, and that bad arguments and Ctrl-C leave the checkpoints as they were."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sentence_transformers.util.quantization import quantize_embeddings

import checkpoints
import data as data_module
import methods
import mteb_adapter
import quantization_modules as qm
from conftest import FITTING_PAIRS, ROOT, TINY_DOCS, interrupt, text_lines
from encoders import DEFAULT_MODEL, model_slug

pytestmark = pytest.mark.usefixtures("faiss_one_thread")
TRAINED = [name for name, e in methods.METHODS.items() if e.fitted_on == "training"]  # the registry's learned quantisers
THRESHOLDS = [name for name in TRAINED if issubclass(methods.METHODS[name].family, methods.ThresholdCodes)]  # learned bits


def random_embeddings(n=200, dim=384, seed=0) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


def hard_bits(quantizer, x) -> np.ndarray:
    """The quantiser's code as training's straight-through forward gives it: hard bits, read at 0.5."""
    quantizer.straight_through = True
    try:
        with torch.no_grad():
            return (quantizer.soft_bits(torch.as_tensor(x, dtype=torch.float32)) > 0.5).numpy()
    finally:
        quantizer.straight_through = False


def signed(bits: torch.Tensor) -> torch.Tensor:
    """0/1 bits -> -1/+1, so that a dot product is bits - 2 * Hamming distance."""
    return 2 * bits.float() - 1


def registry_bits(method, x) -> np.ndarray:
    """The bits a registry method stores for `x` (its packed code, unpacked, padding cut)."""
    return np.unpackbits(method.encode(np.asarray(x, np.float32)), axis=1)[:, : method.code_bits_per_vector].astype(bool)


def exported(name: str, quantizer, x) -> object:
    """The registry method `name` holding what the quantiser exports (as the training command saves it)."""
    method = methods.make_method(name, quantizer.embedding_dim)
    method.load_state(quantizer.export(torch.as_tensor(x, dtype=torch.float32)), Path(f"<{name} exported>"))
    return method


def thermometer(bits: np.ndarray, levels: int) -> np.ndarray:
    """Each dimension's levels - 1 bits with the set ones first: the registry's order of a thermometer code. A
    quantiser whose thresholds crossed in training has the same bits in another order (the same Hamming distances)."""
    n = len(bits)
    return (-np.sort(-bits.reshape(n, -1, levels - 1).astype(np.int8), axis=2)).reshape(n, -1).astype(bool)


# ---------------------------------------------------------------------------------------------------------------
# the quantisers' codes


def test_zero_thresholds_give_sign_bits_as_sentence_transformers_packs_them():
    x = random_embeddings()
    assert np.array_equal(hard_bits(qm.QuantizationModuleStage1(384), x), x.numpy() > 0)
    assert np.array_equal(methods.make_method("stage1_zero", 384).encode(x.numpy()), quantize_embeddings(x.numpy(), "ubinary"))


def test_stage2_truth_table():
    quantizer = qm.QuantizationModuleStage2(8)
    quantizer.thresholds.data = torch.tensor([0, 0, 0, 0, 0.5, -0.5, 0.1, 0.1])[:, None]
    # dims 4..7 form the pairs (4, 5) and (6, 7); the pair's bit is 0 only when both are at or under their thresholds
    cases = {(0.4, -0.6): 0, (0.6, -0.6): 1, (0.4, -0.4): 1, (0.6, -0.4): 1, (0.5, -0.5): 0}
    x = torch.tensor([[1.0, -1.0, 0.2, -0.2, a, b, 0.0, 0.2] for a, b in cases])
    want = np.array([[1, 0, 1, 0, bit, 1] for bit in cases.values()], dtype=bool)
    assert np.array_equal(hard_bits(quantizer, x), want)
    assert np.array_equal(registry_bits(exported("stage2_trained", quantizer, x), x), want)
    with pytest.raises(ValueError, match="divisible by 4, got 382"):
        qm.QuantizationModuleStage2(382)


def test_a_value_exactly_on_a_threshold_gives_bit_0_in_the_hard_forward_as_in_the_registry():
    thresholds = torch.tensor([[0.1, 0.2, 0.3], [-0.2, -0.1, 0.0], [0.0, 0.25, 0.4], [0.3, 0.5, 0.6]])
    for name in THRESHOLDS:
        quantizer = qm.make_quantizer(name, 4)
        levels = quantizer.levels
        quantizer.thresholds.data = thresholds[:, : levels - 1].clone()
        for k in range(levels - 1):  # each value on its k-th threshold: above the ones below it, not above this one
            on = thresholds[:, k][None].clone()
            above = torch.from_numpy(np.nextafter(on.numpy(), np.float32(1)))
            bits, bits_above = hard_bits(quantizer, on), hard_bits(quantizer, above)
            assert bits.sum() < bits_above.sum(), name  # one ulp above it, the threshold's bit is set
            assert np.array_equal(bits, registry_bits(exported(name, quantizer, on), on)), name
            assert np.array_equal(bits_above, registry_bits(exported(name, quantizer, on), above)), name
            if not isinstance(quantizer, qm.QuantizationModuleStage2):  # (a soft pair ORs two 0.5s into 0.75)
                with torch.no_grad():  # the soft code on a threshold is 0.5: read at 0.5, bit 0 as well
                    assert np.array_equal(quantizer.soft_bits(on).numpy() > 0.5, bits), name
                    assert np.array_equal(quantizer(on).numpy() > 0, bits), name  # forward: the same code as +-1
    quantizer = qm.QuantizationModuleStage1(4)
    quantizer.thresholds.data = thresholds[:, :1].clone()
    assert not hard_bits(quantizer, thresholds[:, 0][None]).any()


@pytest.mark.parametrize("name", THRESHOLDS)
def test_each_torch_quantisers_hard_code_is_its_registry_methods_code_after_export(name):
    """Random thresholds (unsorted, for more than two levels) and a random rotation: the quantiser trained with is the
    method searched with. The values are kept 1e-3 from every threshold, so float rounding cannot flip a bit."""
    d, g = 64, torch.Generator().manual_seed(3)
    quantizer = qm.make_quantizer(name, d)
    assert quantizer.levels == methods.settings(name, d).levels
    quantizer.thresholds.data = 0.1 * torch.randn(d, quantizer.levels - 1, generator=g)
    rotation = torch.eye(d)
    if hasattr(quantizer, "rotation"):
        rotation = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
        quantizer.rotation.data = rotation.clone()
    values = 0.15 * torch.randn(500, d, generator=g)
    while (near := (values[:, :, None] - quantizer.thresholds.detach()[None]).abs().min(dim=2).values < 1e-3).any():
        values[near] = 0.15 * torch.randn(int(near.sum()), generator=g)
    x = values @ rotation  # the quantiser compares x @ rotation.T = values
    module, registry = hard_bits(quantizer, x), registry_bits(exported(name, quantizer, x), x)
    assert module.shape == registry.shape == (500, methods.METHODS[name].family.code_bits(d, methods.settings(name, d)))
    assert np.array_equal(thermometer(module, quantizer.levels), registry)
    hamming = lambda b: (b[:, None, :] != b[None, :, :]).sum(2)  # noqa: E731 - what the search ranks by
    assert np.array_equal(hamming(module[:50]), hamming(registry[:50]))


def test_straight_through_is_hard_forward_and_sigmoid_backward():
    quantizer = qm.QuantizationModuleStage1(384, temperature=10.0)
    quantizer.thresholds.data = 0.01 * torch.randn(384, 1, generator=torch.Generator().manual_seed(1))
    quantizer.straight_through = True
    x = random_embeddings()
    soft = quantizer.soft_bits(x)
    torch.testing.assert_close(soft, (x > quantizer.thresholds.detach()[:, 0]).float())
    torch.testing.assert_close(quantizer(x), 2 * soft - 1)  # what the losses compare: the code as +-1
    soft.sum().backward()
    s = torch.sigmoid(10.0 * (x - quantizer.thresholds.detach()[:, 0]))  # d/dt sigmoid(T (x - t)) = -T s (1 - s)
    torch.testing.assert_close(quantizer.thresholds.grad[:, 0], (-10.0 * s * (1 - s)).sum(0), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the losses


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


def test_info_nce_is_two_sided_as_computed_by_hand():
    """(cross-entropy of each anchor over the positives + of each positive over the anchors) / 2, on a case where the
    two sides differ (the logits matrix is not symmetric)."""
    anchors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positives = np.array([[1.0, 0.2], [0.5, 1.0], [-1.0, 1.0]])
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731

    def cross_entropy(logits):  # mean over rows of -log softmax(row)[its own column]
        return float(np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits)))

    for temperature in (0.5, qm.NCE_TEMPERATURE):
        logits = unit(anchors) @ unit(positives).T / temperature
        one_sided, two_sided = cross_entropy(logits), (cross_entropy(logits) + cross_entropy(logits.T)) / 2
        assert abs(one_sided - two_sided) > 0.04  # the case tells them apart
        got = qm.info_nce_loss(torch.tensor(anchors, dtype=torch.float32), torch.tensor(positives, dtype=torch.float32),
                               **({"temperature": temperature} if temperature != qm.NCE_TEMPERATURE else {}))
        assert got.item() == pytest.approx(two_sided, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# training


class Recording(qm.QuantizationModuleStage1):
    """Stage 1 that keeps every batch the training loop passes through it."""

    def __init__(self, dim):
        super().__init__(dim)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return super().forward(x)


def test_training_samples_pairs_from_every_source_equally_whatever_its_size():
    """1,000 pairs from one source, 10 from another: the anchors the loop feeds the contrastive loss come from each
    about equally often (a uniform draw over pairs would give the small source 1%)."""
    g = torch.Generator().manual_seed(0)
    sizes = {0: 1000, 1: 10}
    source = torch.cat([torch.full((n,), s) for s, n in sizes.items()])
    anchors, positives, x = (torch.randn(len(source), 16, generator=g) for _ in range(3))
    row_source = {tuple(row.tolist()): int(s) for row, s in zip(anchors, source)}
    quantizer = Recording(16)
    qm.train_quantizer(quantizer, x[:128], (anchors, positives, source), epochs=5, batch_size=4, contrastive_weight=1.0,
                       verbose=False)
    drawn = [row_source[tuple(row.tolist())] for batch in quantizer.seen for row in batch if tuple(row.tolist()) in row_source]
    assert len(drawn) == 5 * 32 * 4  # every step draws a batch of anchors
    assert 0.4 < np.mean(drawn) < 0.6, np.bincount(drawn)


def test_training_moves_the_thresholds_to_where_code_cosines_match_float_cosines():
    # Embeddings with a known offset o: every float cosine carries |o|^2, so the codes should agree more often than
    # sign bits do (0.52 here against 0.74). The loss can only get there by moving each threshold away from its
    # offset (the bit then equals the offset's sign more often): t_d opposite in sign to o_d.
    g = torch.Generator().manual_seed(0)
    offset = 0.2 * torch.randn(64, generator=g)
    x = torch.nn.functional.normalize(torch.randn(2048, 64, generator=g), dim=1) + offset
    train, held_out = x[:1024], x[1024:]

    def code_loss_and_mean_cosine(quantizer):
        codes = signed(torch.from_numpy(hard_bits(quantizer, held_out)))
        cosines = torch.nn.functional.normalize(codes, dim=1) @ torch.nn.functional.normalize(codes, dim=1).T
        mean_cosine = (cosines.sum() - len(codes)).item() / len(codes) / (len(codes) - 1)  # off the diagonal
        return qm.similarity_preservation_loss(held_out, codes).item(), mean_cosine

    unit = torch.nn.functional.normalize(held_out, dim=1)
    float_cosine = ((unit @ unit.T).sum() - len(unit)).item() / len(unit) / (len(unit) - 1)
    quantizer = qm.QuantizationModuleStage1(64)
    before, before_cosine = code_loss_and_mean_cosine(quantizer)
    losses = qm.train_quantizer(quantizer, train, epochs=20, batch_size=256, lr=1e-2, verbose=False)
    after, after_cosine = code_loss_and_mean_cosine(quantizer)
    assert len(losses) == 20 and losses[-1] < losses[0]
    assert abs(before_cosine - float_cosine) > 0.15 and abs(after_cosine - float_cosine) < 0.03
    assert after < 0.25 * before  # on held-out embeddings, with the hard bits that search uses
    t, large = quantizer.thresholds.detach()[:, 0], offset.abs() > 0.1
    assert (torch.sign(t[large]) == -torch.sign(offset[large])).float().mean() > 0.9


@pytest.mark.parametrize("name", [n for n in THRESHOLDS if methods.settings(n, 32).levels > 2])
def test_a_multi_level_quantiser_learns_and_its_export_round_trips_through_a_checkpoint(name, tmp_path):
    """Thermometer codes at 3 and 4 levels, started at a random candidate's thresholds (the quantiles moved at random,
    crossing some): training lowers the similarity loss, per epoch and on the whole set with the hard codes; the
    checkpoint it exports loads as the registry method, whose codes are the quantiser's hard codes."""
    d = 32
    quantizer = qm.make_quantizer(name, d)
    assert isinstance(quantizer, qm.QuantizationModuleMultiLevel) and quantizer.levels in (3, 4)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(1024, d, generator=g) + 0.3 * torch.randn(d, generator=g), dim=1)
    quantizer.thresholds.data = qm.initial_thresholds("random0", x, quantizer.levels, 0)
    hard_loss = lambda: qm.similarity_preservation_loss(x, signed(torch.from_numpy(hard_bits(quantizer, x)))).item()  # noqa: E731
    before = hard_loss()
    losses = qm.train_quantizer(quantizer, x, epochs=8, batch_size=128, lr=1e-2, verbose=False)
    assert len(losses) == 8 and losses[-1] < 0.95 * losses[0], losses
    assert hard_loss() < 0.85 * before
    path = checkpoints.checkpoint_path(tmp_path, DEFAULT_MODEL, name)
    checkpoints.save_checkpoint(path, quantizer.export(x), {"base_model": DEFAULT_MODEL, "method": name, "dimension": str(d),
                                                            "protocol": "transfer"})
    method, meta = checkpoints.load_method(name, d, DEFAULT_MODEL, tmp_path, "transfer")
    assert isinstance(method, methods.ThresholdCodes) and method.levels == quantizer.levels and meta["method"] == name
    assert np.array_equal(registry_bits(method, x), thermometer(hard_bits(quantizer, x), quantizer.levels))
    # each level decodes to the mean of the training values in it (what asym scores with)
    levels = method.quantize(x.numpy())
    j, level = 0, int(np.bincount(levels[:, 0]).argmax())
    assert method.recon[j, level] == pytest.approx(float(x[levels[:, 0] == level, j].mean()), rel=1e-5)


def test_the_rotation_stays_orthogonal_and_keeps_every_float_cosine():
    x = random_embeddings(300)
    pairs = (x[0::2], x[1::2], torch.arange(150) % 3)
    quantizer = qm.QuantizationModuleStage1Rotated(384)
    assert np.array_equal(hard_bits(quantizer, x), x.numpy() > 0)  # starts as sign bits
    qm.train_quantizer(quantizer, x, pairs, epochs=3, batch_size=64, lr=1e-2, contrastive_weight=1.0, verbose=False)
    r = quantizer.rotation.detach()
    assert (r - torch.eye(384)).abs().max() > 1e-3  # it learned something
    assert torch.allclose(r @ r.T, torch.eye(384), atol=1e-4)  # and is still a rotation: float cosines are unchanged
    assert torch.allclose((x @ r.T) @ (x @ r.T).T, x @ x.T, atol=1e-4)
    assert np.array_equal(hard_bits(quantizer, x), (x @ r.T - quantizer.thresholds.detach()[:, 0] > 0).numpy())


def test_each_activation_trains_and_the_best_validation_candidate_is_kept():
    x = random_embeddings(300) + 0.02
    pairs = (x[0::2], x[1::2], torch.arange(150) % 3)
    for activation in qm.ACTIVATIONS:
        quantizer = qm.QuantizationModuleStage1(384)
        losses = qm.train_quantizer(quantizer, x, pairs, epochs=2, batch_size=64, activation=activation,
                                    contrastive_weight=1.0, verbose=False)
        assert len(losses) == 2 and not quantizer.straight_through
        assert quantizer.temperature == (qm.ANNEAL[1] if activation == "anneal" else qm.TEMPERATURE)
    # a validation that prefers thresholds near 0.01: the kept quantiser is the candidate that scored best
    scored = []

    def validate(quantizer):
        score = -float((quantizer.thresholds.detach() - 0.01).abs().mean())
        scored.append((quantizer, score))
        return {"tiny": score}

    best, init, scores = qm.train_candidates(lambda: qm.QuantizationModuleStage1(384), x, validate, n_random=2, epochs=1)
    assert list(scores) == qm.QuantizationModuleStage1(8).candidate_inits(2) == ["zero", "median", "random0", "random1"]
    assert [s["tiny"] for s in scores.values()] == [s for _, s in scored]
    winner = max(range(len(scored)), key=lambda i: scored[i][1])
    assert best is scored[winner][0] and init == list(scores)[winner] and scores[init]["mean"] == scored[winner][1]
    assert 0 < winner < len(scored) - 1  # neither the first nor the last candidate: the order does not decide it
    assert len({round(s, 9) for _, s in scored}) == 4  # the candidates really differ


# ---------------------------------------------------------------------------------------------------------------
# training data


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


# ---------------------------------------------------------------------------------------------------------------
# the training command


def fitted_names(protocol: str = "transfer") -> list[str]:
    return [n for n, e in methods.METHODS.items() if e.fitted_on != "nothing" and protocol in e.protocols]


def test_the_training_command_makes_slow_fits_only_when_named():
    slow = [n for n in fitted_names() if methods.entry(n).slow_fit]
    assert slow and not set(slow) & set(qm.parse_args([]).methods)
    assert set(qm.parse_args([]).methods) == set(fitted_names()) - set(slow)
    assert qm.parse_args(["--methods", *slow]).methods == slow


def checkpoint_metadata(run, name: str, protocol: str = "transfer") -> dict:
    path = checkpoints.checkpoint_path(run.checkpoints, DEFAULT_MODEL, name, protocol)
    return safe_open(str(path), framework="np").metadata()


def embedded(run, desc: str) -> list[str]:
    return [text for d, _, texts in run.embedded if d == desc for text in texts]


def test_transfer_training_fits_every_method_on_transfer_texts_and_reads_no_test_qrels(fitted, train_data):
    folder = fitted.data_dir / "scifact"
    corpus, queries, _ = data_module.load_beir(folder)
    # files of the evaluated task: its corpus and queries (validation ranks against them) and its dev qrels. Not test.
    opened = {str(p.relative_to(folder.resolve())) for p in fitted.opened if p.is_relative_to(folder.resolve())}
    assert (folder / "qrels" / "test.tsv").is_file()
    assert opened == {"corpus.jsonl", "queries.jsonl", "qrels/dev.tsv"}
    # what every method was fitted or trained on: the texts of the transfer pairs, none of the task's texts
    fitting = embedded(fitted, "encoding fitting texts")
    pair_texts = {t for line in (train_data / "pairs" / "quora.jsonl").read_text().splitlines() for t in json.loads(line).values()}
    task_texts = {data_module.document_text(d) for d in corpus.values()} | set(queries.values())
    assert set(fitting) <= pair_texts and not set(fitting) & task_texts and len(fitting) > 500
    assert set(embedded(fitted, "encoding training anchors")) <= pair_texts
    quantizers = {methods.METHODS[n].quantizer for n in TRAINED}
    starts = ["kmeans"] if "LearnedPQ" in quantizers else []  # codebooks start from the training-free k-means fit
    assert fitted.fitted_rows == {n: len(fitting) for n in [*fitted_names(), *starts] if n not in TRAINED} | dict.fromkeys(quantizers, len(fitting))
    # and every checkpoint says so
    written = sorted(p.stem for p in (fitted.checkpoints / model_slug(DEFAULT_MODEL)).glob("*.safetensors"))
    assert written == sorted(fitted_names())
    for name in fitted_names():
        meta = checkpoint_metadata(fitted, name)
        assert json.loads(meta["training_sources"]) == {"pairs/quora": FITTING_PAIRS} and meta["protocol"] == "transfer", name
        assert json.loads(meta["validation_query_ids"]) == {"SciFact": list(data_module.load_qrels(folder, "dev"))}
        assert meta["method"] == name and meta["dimension"] == "384"


def test_in_domain_training_adds_the_train_queries_and_still_reads_no_test_qrels(fitted_in_domain):
    folder = fitted_in_domain.data_dir / "scifact"
    opened = {str(p.relative_to(folder.resolve())) for p in fitted_in_domain.opened if p.is_relative_to(folder.resolve())}
    assert opened == {"corpus.jsonl", "queries.jsonl", "qrels/dev.tsv", "qrels/train.tsv"}
    train, dev = data_module.load_qrels(folder, "train"), data_module.load_qrels(folder, "dev")
    _, queries, _ = data_module.load_beir(folder)
    test = data_module.load_qrels(folder, "test")
    anchors = set(embedded(fitted_in_domain, "encoding training anchors"))
    assert {q for q in train if q in queries} and anchors >= {queries[q] for q in train}  # train queries are anchors
    assert not anchors & {queries[q] for q in [*test, *dev]}  # validation and test queries never are
    for name in ("stage1_trained", "int8"):
        meta = checkpoint_metadata(fitted_in_domain, name, "in-domain")
        assert meta["protocol"] == "in-domain"
        assert json.loads(meta["training_sources"]) == {"in-domain/SciFact": sum(s > 0 for d in train.values() for s in d.values()),
                                                        "pairs/quora": 2 * FITTING_PAIRS}  # the general pairs become texts
        assert json.loads(meta["validation_query_ids"]) == {"SciFact": list(dev)} and not set(dev) & set(train)
    assert not checkpoints.checkpoint_path(fitted_in_domain.checkpoints, DEFAULT_MODEL, "stage1_trained").exists()


def test_the_kept_candidate_is_the_best_on_validation_and_its_checkpoint_scores_what_it_was_chosen_with(fitted, task_embeddings):
    """For every trained method: the checkpoint ranks the validation queries (here the dev = test qrels) with exactly
    the nDCG@10 stored for its initialisation, which is the best of the candidates'."""
    qrels = data_module.load_qrels(fitted.data_dir / "scifact", "dev")
    task = {k: task_embeddings[k] for k in ("docs", "queries", "doc_ids", "query_ids")}
    for name in TRAINED:
        method, meta = checkpoints.load_method(name, 384, DEFAULT_MODEL, fitted.checkpoints, "transfer")
        validation = json.loads(meta["validation_ndcg_at_10"])
        assert list(validation) == qm.make_quantizer(name, 384).candidate_inits(0), name
        assert validation[meta["initialisation"]]["mean"] == max(v["mean"] for v in validation.values()), name
        score = mteb_adapter.ndcg_at_10(methods.rank(method, methods.own_mode(name, 384), **task), qrels)
        assert score == pytest.approx(validation[meta["initialisation"]]["SciFact"], abs=1e-9), name
        assert f"{name}: chose init {meta['initialisation']} (validation mean nDCG@10 " in fitted.stdout


def test_loss_weights_that_train_nothing_are_refused(tmp_path):
    for args in (["--sim-weight", "0", "--methods", "stage1_trained"], ["--contrastive-weight", "-1", "--methods", "stage1_rotated"],
                 ["--sim-weight", "nan", "--methods", "stage1_trained"]):
        with pytest.raises(SystemExit) as exit_info:
            qm.main(["--train-data", str(tmp_path / "no-data"), "--data-dir", str(tmp_path), "--out", str(tmp_path / "ck"),
                     "--cache-dir", str(tmp_path / "cache"), *args])
        assert str(exit_info.value).startswith("error: ") and "loss weights must be >= 0 and not both 0" in str(exit_info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before reading or writing anything


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
    (["--protocol", "both"], "invalid choice: 'both'"),
])
def test_training_command_refuses_bad_arguments_before_any_work(tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        qm.main(["--train-data", str(tmp_path / "no-data"), "--out", str(tmp_path / "ck"), "--cache-dir", str(tmp_path / "cache"), *args])
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value) and "\n" not in str(exit_info.value)
    assert not list(tmp_path.iterdir())


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
    assert not (tmp_path / "ck").exists() and not (tmp_path / "cache").exists()  # nothing was encoded either


def test_too_few_fitting_texts_for_a_codebook_is_one_line_and_the_other_methods_go_on(tmp_path, task_with_ties, embedding_cache,
                                                                                        capsys):
    """pq1b learns 256 centroids per sub-quantiser: faiss refuses 100 texts; the command says so in one line, writes
    the checkpoints it could make, and none for pq1b."""
    train = tmp_path / "train"
    (train / "pairs").mkdir(parents=True)
    (train / "pairs" / "p.jsonl").write_text("".join(json.dumps({"anchor": f"question {i}", "positive": f"answer number {i}"}) + "\n"
                                                     for i in range(50)))
    qm.main(["--train-data", str(train), "--data-dir", str(task_with_ties), "--tasks", "SciFact", "--methods", "int8", "pq1b",
             "--out", str(tmp_path / "ck"), "--cache-dir", str(embedding_cache)])
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("pq1b")] == [
        "pq1b: skipped, cannot be fitted on 100 texts (Number of training points (100) should be at least as large as "
        "number of clusters (256))"]
    assert not text_lines(err)  # no traceback
    written = sorted(p.name for p in (tmp_path / "ck").rglob("*.safetensors"))
    assert written == ["int8.safetensors"] and "wrote 1 checkpoints" in out


def test_fewer_fitting_texts_than_dimensions_for_opq_is_one_line_not_a_crash(tiny_training, train_data, tmp_path):
    """opq1b at d = 384 on 299 texts: PQ48's 256 centroids can be fitted, OPQ's rotation cannot (faiss aborts the
    process below d points). The command must say so in one line, as for a codebook, and write int8's checkpoint; it
    runs in its own process, as a crash would take pytest down with it."""
    folder = tmp_path / "opq-train" / "pairs"
    folder.mkdir(parents=True)
    with open(train_data / "pairs" / "quora.jsonl") as f:
        (folder / "quora.jsonl").write_text("".join(next(f) for _ in range(150)))
    result = subprocess.run([sys.executable, "quantization_modules.py", *map(str, tiny_training), "--train-data", str(folder.parent),
                             "--out", str(tmp_path / "ck"), "--methods", "int8", "opq1b"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-500:]
    assert [line for line in result.stdout.splitlines() if line.startswith("opq1b")] == [
        "opq1b: skipped, cannot be fitted on 299 texts (OPQ needs at least 384 fitting texts, one per dimension)"]
    assert sorted(p.name for p in (tmp_path / "ck").rglob("*.safetensors")) == ["int8.safetensors"]


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
    for name in ("int8", "stage1_trained", "stage2_trained"):
        path = checkpoints.checkpoint_path(out, DEFAULT_MODEL, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"the previous run's {name}".encode())
    return files_under(out)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


INTERRUPTED = ("interrupted; no checkpoint was written (a rerun keeps the methods made so far and encodes nothing the "
               "cache already holds)")


def test_ctrl_c_during_training_prints_one_line_exits_130_and_writes_no_checkpoint(tiny_training, tmp_path):
    """A real SIGINT while Stage 1's first candidate trains (its progress bar has appeared at 0 of 10; int8 is fitted).
    3,000 epochs keep that candidate training for seconds, however fast the machine."""
    previous = previous_checkpoints(tmp_path / "ck")
    code, stderr = interrupt("quantization_modules.py", [*tiny_training, "--out", tmp_path / "ck", "--methods", "int8",
                                                         "stage1_trained", "--random-inits", "8", "--epochs", "3000"],
                             b"| 0/10", "stderr")
    assert (code, stderr) == (130, [INTERRUPTED])  # one line: no traceback
    assert files_under(tmp_path / "ck") == previous


def test_an_interrupted_training_run_leaves_the_previous_checkpoints_byte_identical(tiny_training, tmp_path, monkeypatch,
                                                                                    capsys):
    """Ctrl-C while the last learned method trains, after int8 was fitted and Stage 1 trained: none of their new
    checkpoints is written, so the new Stage 1 never sits beside the old Stage 2."""
    previous, real, trained = previous_checkpoints(tmp_path / "ck"), qm.train_candidates, []

    def interrupted_at_the_last(build, *args, **kwargs):
        trained.append(type(build()).__name__)
        if len(trained) == 2:
            raise KeyboardInterrupt
        return real(build, *args, **kwargs)

    monkeypatch.setattr(qm, "train_candidates", interrupted_at_the_last)
    with pytest.raises(SystemExit) as exit_info:
        qm.main([*map(str, tiny_training), "--out", str(tmp_path / "ck"), "--methods", "int8", "stage1_trained",
                 "stage2_trained", "--random-inits", "0", "--epochs", "1"])
    assert exit_info.value.code == 130 and trained == ["QuantizationModuleStage1", "QuantizationModuleStage2"]
    out, err = capsys.readouterr()
    assert "int8: fitted on " in out and "stage1_trained: chose init " in out  # they were made, then not written
    assert text_lines(err) == [INTERRUPTED]
    assert files_under(tmp_path / "ck") == previous


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    with safe_open(path, "np") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_a_rerun_after_an_interruption_keeps_what_was_made_and_ends_with_the_uninterrupted_checkpoints(tiny_training, tmp_path,
                                                                                                      monkeypatch, capsys):
    """Ctrl-C while Stage 2 trains, after int8 was fitted and Stage 1 trained: the rerun neither refits int8 nor
    retrains Stage 1, trains Stage 2, and writes the checkpoints an uninterrupted run writes (their arrays equal);
    the staging folder is then empty. A rerun with other settings (epochs) trains Stage 1 again."""
    args = [*map(str, tiny_training), "--methods", "int8", "stage1_trained", "stage2_trained", "--random-inits", "0", "--epochs", "2"]
    real_train, real_fit, trained, fitted = qm.train_candidates, methods.FaissCodes.fit, [], []

    def counting_train(build, *a, **k):
        trained.append(type(build()).__name__)
        if interrupt_at is not None and len(trained) == interrupt_at:
            raise KeyboardInterrupt
        return real_train(build, *a, **k)

    monkeypatch.setattr(qm, "train_candidates", counting_train)
    monkeypatch.setattr(methods.FaissCodes, "fit", lambda self, x: fitted.append(x.shape) or real_fit(self, x))
    interrupt_at = 2
    with pytest.raises(SystemExit) as exit_info:
        qm.main([*args, "--out", str(tmp_path / "ck")])
    assert exit_info.value.code == 130 and trained == ["QuantizationModuleStage1", "QuantizationModuleStage2"]
    assert len(fitted) == 1 and not (tmp_path / "ck").exists()
    staging = tmp_path / "cache" / qm.STAGING / model_slug(DEFAULT_MODEL)
    assert sorted(p.name for p in staging.iterdir()) == ["int8.safetensors", "stage1_trained.safetensors"]

    interrupt_at, trained[:], fitted[:] = None, [], []
    qm.main([*args, "--out", str(tmp_path / "ck")])
    out = capsys.readouterr().out
    assert trained == ["QuantizationModuleStage2"] and fitted == []  # int8 and Stage 1 kept, not made again
    assert "int8: kept from an interrupted run" in out and "stage1_trained: kept from an interrupted run" in out
    assert list(staging.iterdir()) == []

    qm.main([*args, "--out", str(tmp_path / "whole")])  # nothing staged now: an uninterrupted run makes every one
    assert trained == ["QuantizationModuleStage2", "QuantizationModuleStage1", "QuantizationModuleStage2"] and len(fitted) == 1
    for name in ("int8", "stage1_trained", "stage2_trained"):
        resumed, whole = (tensors_of(checkpoints.checkpoint_path(tmp_path / d, DEFAULT_MODEL, name)) for d in ("ck", "whole"))
        assert resumed.keys() == whole.keys() and all(np.array_equal(resumed[k], whole[k]) for k in whole), name

    interrupt_at, trained[:] = 2, []
    with pytest.raises(SystemExit):
        qm.main([*args, "--out", str(tmp_path / "ck")])
    trained[:], interrupt_at = [], None
    qm.main([*args[:-1], "3", "--out", str(tmp_path / "ck")])  # --epochs 3: the staged Stage 1 (2 epochs) is not kept
    assert trained == ["QuantizationModuleStage1", "QuantizationModuleStage2"]


def test_a_training_failure_after_the_writability_check_leaves_no_new_checkpoint_folder(tiny_beir, tmp_path):
    """The checkpoint folder is proved writable first, but created only when the checkpoints are written: a task
    without validation queries, found after the check, leaves no empty folder (nor its parent) behind."""
    (tmp_path / "train" / "pairs").mkdir(parents=True)
    (tmp_path / "train" / "pairs" / "p.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    with pytest.raises(SystemExit, match="error: SciFact: no validation queries"):
        qm.main(["--train-data", str(tmp_path / "train"), "--data-dir", str(tiny_beir), "--tasks", "SciFact",
                 "--out", str(tmp_path / "new" / "ck"), "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "new").exists()


def test_a_missing_checkpoint_names_a_training_command_that_accepts_it(tmp_path):
    for name in fitted_names():
        with pytest.raises(data_module.UsageError) as refused:
            checkpoints.load_method(name, 384, DEFAULT_MODEL, tmp_path, "transfer")
        command = str(refused.value).split("make one with: python quantization_modules.py ")[1].split()
        assert qm.parse_args(command).methods == [name]


# ---------------------------------------------------------------------------------------------------------------
# learned vector codes: product quantisation (and OPQ's rotation) trained by the same loop


def clustered(n=3000, d=64, seed=0) -> torch.Tensor:
    """Unit vectors around 40 centres (the same for every seed): structure a product quantiser can learn."""
    centres = torch.randn(40, d, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed + 1)
    return F.normalize(centres[torch.randint(0, 40, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("opq", [False, True])
def test_a_learned_product_quantiser_exported_to_faiss_codes_and_scores_as_its_hard_assignment(opq):
    """Random centroids (and a random rotation): faiss's index made by export() encodes every vector with the module's
    hard codes, save exact near-ties (two centroids within float rounding), and its asymmetric scores are the module's
    float query . decoded document."""
    d, g = 64, torch.Generator().manual_seed(1)
    quantizer = qm.LearnedPQ(d, methods.pq(d, d // 8, opq=opq))
    with torch.no_grad():
        quantizer.centroids.copy_(0.2 * torch.randn(quantizer.centroids.shape, generator=g))
        if opq:
            quantizer.rotation.copy_(torch.linalg.qr(torch.randn(d, d, generator=g))[0])
    x = clustered(500, d)
    method = methods.make_method("pq1b", d)
    method.load_state(quantizer.export(x), Path("<exported>"))
    faiss_codes, module_codes = method.encode(x.numpy()).astype(np.int64), quantizer.codes(x).numpy()
    distances = quantizer.distances(x).detach().numpy()
    for i, j in zip(*np.nonzero(faiss_codes != module_codes)):  # a different code only where it is as near
        assert abs(distances[i, j, faiss_codes[i, j]] - distances[i, j, module_codes[i, j]]) < 1e-5
    assert (faiss_codes == module_codes).mean() > 0.999
    quantizer.straight_through = True
    with torch.no_grad():
        decoded = quantizer(x)  # hard forward: each sub-vector's centroid
    queries = clustered(20, d, seed=5)
    scores, ids = method.search(method.build(x.numpy(), "asym"), queries.numpy(), 500, "asym")
    with torch.no_grad():
        expected = (quantizer.query(queries) @ decoded.T).numpy()
    np.testing.assert_allclose(scores, np.take_along_axis(expected, ids, 1), atol=1e-4)


def test_a_learned_product_quantiser_trains_from_k_means_and_its_checkpoint_round_trips(tmp_path):
    """Started at faiss's k-means (the training-free row's codebooks exactly), training lowers the asymmetric
    similarity loss on held-out vectors with the hard codes search uses; the checkpoint loads as the registry method and
    encodes as the module does."""
    d = 32  # 20,000 vectors: enough for 256 centroids per sub-quantiser to hold beyond the vectors they were fitted on
    x, held_out = clustered(20_000, d), clustered(2000, d, seed=3)
    quantizer = qm.LearnedPQ(d, methods.pq(d, d // 8))
    quantizer.initialise("kmeans", x, 0)
    kmeans = methods.make_method("pq1b", d)
    kmeans.fit(x.numpy())
    assert np.array_equal(kmeans.encode(held_out.numpy()).astype(np.int64), quantizer.codes(held_out).numpy())

    def hard_loss(v):
        quantizer.straight_through = True
        with torch.no_grad():
            return qm.similarity_preservation_loss(v, quantizer(v), quantizer.query(v)).item()

    before = hard_loss(x[:2000]), hard_loss(held_out)
    losses = qm.train_quantizer(quantizer, x, epochs=6, batch_size=256, lr=1e-3, verbose=False)
    after = hard_loss(x[:2000]), hard_loss(held_out)
    assert losses[-1] < 0.99 * losses[0] and after[0] < 0.99 * before[0] and after[1] < 0.99 * before[1], (losses, before, after)
    path = checkpoints.checkpoint_path(tmp_path, DEFAULT_MODEL, "pq1b")
    checkpoints.save_checkpoint(path, quantizer.export(x), {"base_model": DEFAULT_MODEL, "method": "pq1b", "dimension": str(d),
                                                            "protocol": "transfer"})
    method, _ = checkpoints.load_method("pq1b", d, DEFAULT_MODEL, tmp_path, "transfer")
    assert (method.encode(held_out.numpy()).astype(np.int64) == quantizer.codes(held_out).numpy()).mean() > 0.999
