"""Unit tests of the quantisers, the loss, training, checkpoints and the BEIR reader."""

import numpy as np
import pytest
import torch
from sentence_transformers.util.quantization import quantize_embeddings

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

    with pytest.raises(qm.UsageError, match="trained for model 'org/model'"):
        qm.load_quantizer(path, "org/other", 384)
    with pytest.raises(qm.UsageError, match="dimension 384"):
        qm.load_quantizer(path, "org/model", 768)
    with pytest.raises(qm.UsageError, match="train one with"):
        qm.load_quantizer(tmp_path / "missing.safetensors", "org/model", 384)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"thresholds": quantizer.thresholds.data}, pickled)
    with pytest.raises(qm.UsageError, match="pickled checkpoints are refused"):
        qm.load_quantizer(pickled, "org/model", 384)


def test_load_beir_reads_and_rejects(tiny_beir):
    corpus, queries, qrels = qm.load_beir(tiny_beir / "scifact", "test")
    assert len(corpus) == 8 and len(queries) == 6 and qrels["q1"] == {"d1": 1}
    with pytest.raises(qm.UsageError, match="missing qrels file"):
        qm.load_beir(tiny_beir / "scifact", "dev")
    with pytest.raises(qm.UsageError, match="data folder not found"):
        qm.load_beir(tiny_beir / "nope", "test")
    with open(tiny_beir / "scifact" / "qrels" / "test.tsv", "a") as f:
        f.write("q1 d2 1\n")
    with pytest.raises(qm.UsageError, match=r"test.tsv:8: malformed qrels line"):
        qm.load_beir(tiny_beir / "scifact", "test")


def test_training_texts_are_balanced_and_exclude_evaluated_tasks(tiny_beir):
    data = tiny_beir.parent / "train"
    (data / "pairs").mkdir(parents=True)
    (data / "pairs" / "big.jsonl").write_text("".join(f'{{"anchor": "a{i}", "positive": "p{i}"}}\n' for i in range(100)))
    (data / "beir-small").mkdir()
    (data / "beir-small" / "tiny").symlink_to(tiny_beir / "scifact")
    sources = qm.load_training_texts(data, max_per_source=10)
    assert {k: len(v) for k, v in sources.items()} == {"pairs/big": 10, "beir-small/tiny": 8}
    assert sources == qm.load_training_texts(data, max_per_source=10)  # seeded
