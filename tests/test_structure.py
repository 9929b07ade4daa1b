"""The shape of the code a newcomer relies on: imports form a chain with no cycle and no import hidden in a function,
importing the evaluation builds nothing, the registry is readable without building, README stays short and speaks of
the tool, and every measured number in README and docs/ is one the results files hold."""

import ast
import re
import subprocess
import sys

import pytest

import methods
import quantization_modules
import report
from conftest import ROOT

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
    layers = ["data", "embedding_cache", "encoders", "methods", "checkpoints", "results", "mteb_adapter", "fitting",
              "quantization_modules"]
    for i, name in enumerate(layers):
        assert not graph[name] & set(layers[i + 1:]), f"{name}.py imports a higher layer: {graph[name] & set(layers[i + 1:])}"


@pytest.mark.slow
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
            assert entry.learned and issubclass(quantization_modules.Quantizer.classes[entry.quantizer], quantization_modules.Quantizer), name
        for d in (256, 384, 768):
            assert set(methods.modes_of(name, d)) <= set(methods.MODES), name  # every mode is declared in the one table


def test_every_reranker_is_a_registry_method_that_needs_no_training():
    for mode, declared in methods.MODES.items():
        if declared.reranker:
            assert methods.entry(declared.reranker).fitted_on in ("nothing", "texts"), mode


def test_a_family_that_leaves_out_part_of_the_protocol_cannot_be_declared():
    with pytest.raises(TypeError, match="must declare its own code_bytes, describe, label, information_bits, applies"):
        type("Undescribed", (methods.Float,), {})  # a Float subclass would inherit "float" and 32 bits
    with pytest.raises(TypeError, match="lacks"):
        methods.Entry(type("Half", (methods.Family,), {name: staticmethod(lambda *a: None) for name in methods.Family.DESCRIBED_BY_EACH}))
    with pytest.raises(TypeError, match="exactly when it names a quantizer"):
        methods.Entry(methods.ThresholdCodes, fitted_on="training")


def test_no_function_is_longer_than_60_lines_unless_a_comment_says_why():
    """A function does one job and fits on a screen; a longer one says why in a comment starting "# long:"."""
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                body = lines[node.lineno - 1 : node.end_lineno]
                assert any(line.strip().startswith("# long:") for line in body), f"{path.name}: {node.name} is {len(body)} lines"


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
