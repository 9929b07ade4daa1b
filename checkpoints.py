"""Checkpoints of every fitted or trained method: where they live, writing them, and loading a method with its state.

A checkpoint is a safetensors file (no pickles) at `<dir>/<model-slug>/[in-domain/]<method>.safetensors`: the arrays
the method's `state()` returned, plus metadata saying what made them (base model, dimension, protocol, registry name,
fitting or training sources, seed, date; trained ones also loss, initialisation and validation scores). Loading
refuses, with one line naming the file, a checkpoint that is missing, not safetensors, or made for another model,
dimension, protocol or method.
"""

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


def checkpoint_bytes(state: dict[str, np.ndarray], metadata: dict) -> bytes:
    """A checkpoint file's bytes: the arrays, and metadata values as strings (dicts and lists as JSON)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata=meta)


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

