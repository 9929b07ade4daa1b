"""The shape of the code a newcomer relies on: imports form a chain with no cycle and no import hidden in a function,
importing the evaluation builds nothing, the registry is readable without building, README stays short and speaks of
the tool, and every measured number in README and docs/ is one the results files hold."""

import ast
import json
import re
import subprocess
import sys

import pandas as pd
import pytest

import checkpoints
import methods
import quantization_modules
import report
from conftest import ROOT
from encoders import model_slug

MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def repo_imports(path) -> tuple[set[str], set[str]]:
    """(the repository's modules a file imports at its top level, those it imports inside a function or class)."""
    top, nested = set(), set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found = {n.split(".")[0] for n in names} & set(MODULES)
            (top if node in tree.body else nested).update(found)
    return top, nested


def test_imports_form_a_chain_without_cycles_or_hidden_imports():
    graph = {}
    for name, path in MODULES.items():
        top, nested = repo_imports(path)
        assert not nested, f"{name}.py imports {sorted(nested)} inside a function"
        graph[name] = top
    order, done = [], set()

    def visit(name, stack):
        assert name not in stack, f"import cycle: {' -> '.join([*stack, name])}"
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, [*stack, name])
            done.add(name)
            order.append(name)

    for name in sorted(graph):
        visit(name, [])
    layers = ["data", "embedding_cache", "encoders", "methods", "checkpoints", "mteb_adapter", "quantization_modules"]
    for i, name in enumerate(layers):
        assert not graph[name] & set(layers[i + 1:]), f"{name}.py imports a higher layer: {graph[name] & set(layers[i + 1:])}"


def test_importing_the_evaluation_builds_no_faiss_object():
    code = """
import faiss
built = []
for name in ("index_factory", "IndexFlatIP", "IndexBinaryFlat", "PCAMatrix", "RandomRotationMatrix", "IndexScalarQuantizer",
             "IndexPQ", "IndexRaBitQ", "OPQMatrix"):
    setattr(faiss, name, lambda *a, name=name, **k: built.append(name))
import evaluate_quantization_mteb, quantization_modules, library, bench_search
print("built:", built)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "built: []"


def test_the_registry_is_read_without_building_and_names_real_quantisers():
    for name, entry in methods.METHODS.items():
        for d in (256, 384, 768, 1024):
            assert methods.modes_of(name, d) and methods.describe(name, d)
            for mode in methods.modes_of(name, d):
                assert methods.row_bytes(name, d, mode) > 0
        if entry.fitted_on == "training":
            assert entry.learned and isinstance(getattr(quantization_modules, entry.quantizer), type), name


def test_readme_is_short_and_speaks_of_the_tool_only():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for words in (r"\bsessions?\b", r"\bissue #?\d", r"\bhelper", r"\bsubagent"):
            assert not re.search(words, text, re.I), f"{path.name}: {words}"


MEASURED = re.compile(r"(?<![\d.])(0\.\d{4}|\d{1,3}\.\d%)(?![\d])")  # nDCG@10 values and retentions as the reports print them


def test_every_measured_number_in_readme_and_docs_is_in_a_results_file():
    results = "\n".join(p.read_text() for p in (ROOT / "results").rglob("*.md"))
    held = set(MEASURED.findall(results))
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in docs:
        for number in MEASURED.findall(path.read_text()):
            assert number in held, f"{path.name}: {number} is in no results/**/*.md"


def test_the_number_check_can_fail(tmp_path):
    assert MEASURED.findall("kept 97.3% (0.6229 against 1.5%, not 10.25%)") == ["97.3%", "0.6229", "1.5%"]


def test_readme_and_docs_tables_are_the_results_files_own():
    """Each `<!-- from <results file>: <heading> -->` block holds that file's table as it is now (python report.py
    README.md docs/*.md refreshes them)."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert report.copy_sections(text) == text, f"{path.name}: a table differs from its results file"


@pytest.mark.parametrize("protocol", ["transfer", "in-domain"])
def test_every_committed_model_has_every_registry_row_from_its_committed_checkpoints(protocol):
    """For each model under checkpoints/, in each protocol: every fitted or trained registry method of the protocol that
    applies at its dimension has a checkpoint that loads as the evaluation loads it, and the protocol's latest.csv has
    every registry row at that dimension (adding a method without refitting and rerunning each committed model fails)."""
    folders = sorted(p for p in (ROOT / "checkpoints").iterdir() if p.is_dir())
    assert len(folders) >= 2, folders
    for folder in folders:
        raw = next(folder.glob("*.safetensors")).read_bytes()
        model = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["base_model"]
        assert model_slug(model) == folder.name
        results = ROOT / "results" / folder.name / ("" if protocol == "transfer" else protocol)
        rows = pd.read_csv(results / "latest.csv")
        dim = int(rows[(rows.method == "float") & (rows.metric == "bytes_per_vector")].value.iloc[0]) // 4
        ran = set(rows.method)
        for name, entry in methods.METHODS.items():
            if methods.applies(name, dim) or protocol not in entry.protocols:
                continue
            if entry.fitted_on != "nothing":
                checkpoints.load_method(name, dim, model, ROOT / "checkpoints", protocol)
            missing = set(methods.rows_of(name, dim)) - ran
            assert not missing, f"{folder.name} {protocol}: no results for {sorted(missing)}"
