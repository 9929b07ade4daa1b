"""Checkpoint integrity: every committed checkpoint carries the sha256 of each array and of its metadata, and a byte
changed anywhere in one (the length prefix, the header, the arrays) is refused with one line naming the file."""

import json

import numpy as np
import pytest
from safetensors.numpy import load as read_arrays
from safetensors.numpy import save

import checkpoints
import methods
from conftest import ROOT
from data import UsageError

COMMITTED = sorted((ROOT / "checkpoints").rglob("*.safetensors"))


def metadata(raw: bytes) -> dict:
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]


def one_per_family() -> list:
    """A committed checkpoint of each family (and family label), per model and protocol folder."""
    chosen = {}
    for path in COMMITTED:
        meta = metadata(path.read_bytes())
        key = (path.parent, methods.entry(meta["method"]).family.__name__, methods.family_of(meta["method"], int(meta["dimension"])))
        chosen.setdefault(key, path)
    return [pytest.param(p, id=str(p.relative_to(ROOT / "checkpoints"))) for p in chosen.values()]


def load_as_made(path, raw: bytes):
    """The checkpoint at `path` loaded as the method, model, dimension and protocol `raw`'s metadata says."""
    meta = metadata(raw)
    return checkpoints.load_checkpoint(path, meta["base_model"], int(meta["dimension"]), meta["protocol"], meta["method"])


def test_every_committed_checkpoint_carries_the_hashes_of_what_it_holds():
    assert len(COMMITTED) > 100
    for path in COMMITTED:
        raw = path.read_bytes()
        _, meta = load_as_made(path, raw)
        hashes = json.loads(meta[checkpoints.HASHES])
        assert hashes["arrays"] == {k: checkpoints.array_hash(v) for k, v in read_arrays(raw).items()}, path


@pytest.mark.parametrize("path", one_per_family())
def test_a_changed_byte_anywhere_is_refused_with_one_line_naming_the_file(path, tmp_path):
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    rng = np.random.default_rng(len(raw))
    positions = [*range(8), *rng.integers(8, header, 12), *rng.integers(header, len(raw), 20)]
    copy = tmp_path / path.name
    for position in positions:
        for flip in (0x01, 0xFF):  # one bit, every bit
            damaged = bytearray(raw)
            damaged[position] ^= flip
            copy.write_bytes(bytes(damaged))
            with pytest.raises(UsageError) as refused:
                load_as_made(copy, raw)
            message = str(refused.value)
            assert str(copy) in message and "\n" not in message, (position, flip, message)
    copy.write_bytes(raw)
    load_as_made(copy, raw)  # the same bytes load


def test_a_checkpoint_without_hashes_is_refused_and_the_fingerprint_follows_the_arrays_only(tmp_path):
    state = {"thresholds": np.zeros((4, 1), np.float32)}
    meta = {"base_model": "m", "method": "stage1_trained", "dimension": "4", "protocol": "transfer"}
    path = tmp_path / "a.safetensors"
    path.write_bytes(checkpoints.checkpoint_bytes(state, meta))
    checkpoints.load_checkpoint(path, "m", 4, "transfer", "stage1_trained")
    path.write_bytes(save(state, metadata=meta))  # written without them: nothing to check it against
    with pytest.raises(UsageError, match="has no content_sha256"):
        checkpoints.load_checkpoint(path, "m", 4, "transfer", "stage1_trained")
    same = checkpoints.fingerprint(state)
    assert checkpoints.fingerprint({"thresholds": np.ones((4, 1), np.float32)}) != same
    assert checkpoints.fingerprint({"thresholds": np.zeros((4, 1), np.float64)}) != same  # the dtype counts
    assert checkpoints.fingerprint({"thresholds": np.zeros((1, 4), np.float32)}) != same  # and the shape
    path.write_bytes(checkpoints.checkpoint_bytes(state, meta | {"date": "another day"}))
    assert checkpoints.checkpoint_fingerprint(path) == same  # metadata alone leaves it
