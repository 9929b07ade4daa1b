"""Checkpoints of every fitted or trained method: where they live, writing them, and loading a method with its state.

A checkpoint is a safetensors file (no pickles) at `<dir>/<model-slug>/[in-domain/]<method>.safetensors`: the arrays
the method's `state()` returned, plus metadata saying what made them (base model, dimension, protocol, registry name,
fitting or training sources, seed, date; trained ones also loss, initialisation and validation scores), and
`content_sha256`: the sha256 of every array (its dtype, shape and bytes) and of the rest of the metadata. Loading
refuses, with one line naming the file, a checkpoint that is missing, not safetensors, changed since it was written
(a hash that does not match), or made for another model, dimension, protocol or method.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

import methods
from data import UsageError, write_atomic
from encoders import model_slug

CHECKPOINTS_DIR = "checkpoints"


def checkpoint_path(checkpoints_dir: Path, model_name: str, method: str, protocol: str = "transfer") -> Path:
    """<dir>/<model-slug>/<method>.safetensors for transfer; <dir>/<model-slug>/in-domain/<method>.safetensors otherwise."""
    folder = Path(checkpoints_dir) / model_slug(model_name)
    return (folder if protocol == "transfer" else folder / protocol) / f"{method}.safetensors"


HASHES = "content_sha256"  # the metadata key of the hashes


def array_hash(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()


def metadata_hash(meta: dict[str, str]) -> str:
    """sha256 of the metadata, the hashes themselves left out."""
    return hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != HASHES}, sort_keys=True).encode()).hexdigest()


def fingerprint(tensors: dict[str, np.ndarray]) -> str:
    """A checkpoint's content: the hash of its arrays' hashes. A row scored with it is stale once this changes (a
    refit or retrained method); metadata alone does not change it."""
    return hashlib.sha256(json.dumps({k: array_hash(v) for k, v in sorted(tensors.items())}).encode()).hexdigest()


def checkpoint_fingerprint(path: Path) -> str | None:
    """`fingerprint` of the checkpoint file at `path`, or None when there is none that can be read."""
    try:
        return fingerprint(load(Path(path).read_bytes()))
    except (SafetensorError, OSError, ValueError):
        return None


def checkpoint_bytes(state: dict[str, np.ndarray], metadata: dict) -> bytes:
    """A checkpoint file's bytes: the arrays, and metadata values as strings (dicts and lists as JSON) with the hash of
    every array and of the metadata."""
    state = {k: np.ascontiguousarray(v) for k, v in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items() if k != HASHES}
    meta[HASHES] = json.dumps({"arrays": {k: array_hash(v) for k, v in state.items()}, "metadata": metadata_hash(meta)})
    return save(state, metadata=meta)


def check_hashes(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """Refuse (one line naming the file) a checkpoint whose arrays or metadata do not match the hashes it was written
    with: a byte changed since."""
    try:
        hashes = json.loads(meta[HASHES])
    except (KeyError, ValueError):
        raise UsageError(f"{path} has no {HASHES} (or a damaged one): it cannot be checked; fit or train it again") from None
    if set(hashes.get("arrays", {})) != set(tensors):
        raise UsageError(f"{path} holds arrays {sorted(tensors)}, its hashes name {sorted(hashes.get('arrays', {}))}")
    changed = [name for name, array in tensors.items() if array_hash(array) != hashes["arrays"][name]]
    changed += ["its metadata"] if metadata_hash(meta) != hashes.get("metadata") else []
    if changed:
        raise UsageError(f"{path} changed since it was written: {', '.join(changed)} no longer match their sha256")


def save_checkpoint(path: Path, state: dict[str, np.ndarray], metadata: dict) -> None:
    """Write a checkpoint whole or not at all."""
    write_atomic(path, checkpoint_bytes(state, metadata))


def load_checkpoint(path: Path, model_name: str, dim: int, protocol: str, method: str) -> tuple[dict, dict]:
    """A checkpoint's arrays and metadata, refusing one that is missing, not safetensors, made for another model,
    dimension, protocol or method, or holding non-finite floats. Each refusal is a UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        out = path.parents[1] if protocol == "transfer" else path.parents[2]
        raise UsageError(f"no checkpoint at {path}; make one with: python quantization_modules.py --model {model_name} "
                         f"--methods {method} --out {out}" + ("" if protocol == "transfer" else f" --protocol {protocol}"))
    try:
        raw = path.read_bytes()
        tensors = load(raw)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        meta = header.get("__metadata__", {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a safetensors checkpoint ({e}); pickled checkpoints are refused") from None
    check_hashes(path, tensors, meta)
    for key, want in [("base_model", model_name), ("method", method), ("dimension", str(dim)), ("protocol", protocol)]:
        if meta.get(key) != want:
            raise UsageError(f"{path} was made for {key} {meta.get(key)!r}, not {want!r}")
    for name, array in tensors.items():  # +inf is left to the method: a threshold no value is above (a hybrid's)
        if np.issubdtype(array.dtype, np.floating) and not (np.isfinite(array) | (array == np.inf)).all():
            raise UsageError(f"{path}: {name!r} holds {int((~np.isfinite(array)).sum())} non-finite values")
    return tensors, meta


def load_method(name: str, dim: int, model_name: str, checkpoints_dir: Path, protocol: str):
    """A registry method at `dim` with its state: from its checkpoint when it is fitted or trained. Returns (method,
    checkpoint metadata or {})."""
    method, meta = methods.make_method(name, dim), {}
    if methods.entry(name).fitted_on != "nothing":
        path = checkpoint_path(checkpoints_dir, model_name, name, protocol)
        tensors, meta = load_checkpoint(path, model_name, dim, protocol, name)
        method.load_state(tensors, path)
    return method, meta


TRAINING_RECORD = "record.json"  # beside a model's checkpoints: what each method's fit or training cost, per run


def update_training_record(folder: Path, run: str, run_entry: dict, method_entries: dict[str, dict]) -> None:
    """Add a training run to the record in a checkpoint folder: the run (its command, what embedding took) and, per
    method it made, its seconds and CPU seconds; the entries of methods it did not make stay."""
    path = Path(folder) / TRAINING_RECORD
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        record = {}  # a damaged record is written again; the checkpoints are what counts
    record["runs"] = record.get("runs", {}) | {run: run_entry}
    record["methods"] = record.get("methods", {}) | {name: {"run": run} | e for name, e in method_entries.items()}
    write_atomic(path, json.dumps(record, indent=1) + "\n")

