"""README's "Add a method", run as written: its registry line added to a copy of the repository and its commands run
there by the shell, default paths included (`../shared/data` beside the copy holds small slices of the real data),
into a model's table that already holds rows. The new rows join the table, with the bytes faiss stores, and every row
that was there stays as it was."""

import json
import os
import re
import shutil
import subprocess

import faiss
import pandas as pd
import pytest

import checkpoints
import results
from conftest import FITTING_PAIRS, ROOT, SHARED_DATA, beir_slice, require
from encoders import DEFAULT_MODEL, model_slug

BASELINE = ["float", "stage1_zero", "lloyd2b"]  # the table before: lloyd2b is fitted on texts by the evaluation itself


def readme_steps() -> tuple[str, list[str]]:
    """The registry line and the shell commands of README's "Add a method"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Add a method"):]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    lines = [line for lang, code in blocks if lang == "python" for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    commands = [line for lang, code in blocks if lang == "bash" for line in code.splitlines() if line.strip()]
    assert len(lines) == 1 and commands, (lines, commands)
    return lines[0], commands


@pytest.fixture
def shared_copy(tmp_path, embedding_cache):
    """tmp/repo: the repository's code and README, its .venv, an embedding cache shared with the session; tmp/shared/
    data: the first quora pairs, and slices of NFCorpus and SciFact (each with its test qrels as dev: validation)."""
    repo, data = tmp_path / "repo", tmp_path / "shared" / "data"
    repo.mkdir()
    for path in [*ROOT.glob("*.py"), ROOT / "README.md", ROOT / "requirements.txt"]:
        shutil.copy(path, repo)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    (repo / ".cache").mkdir()
    (repo / ".cache" / "embeddings").symlink_to(embedding_cache)
    (data / "pairs").mkdir(parents=True)
    with open(require(SHARED_DATA / "pairs" / "quora-duplicates.jsonl")) as f:
        (data / "pairs" / "quora.jsonl").write_text("".join(next(f) for _ in range(FITTING_PAIRS)))
    for task, queries, others in (("scifact", 60, 400), ("nfcorpus", 40, 300)):
        folder = beir_slice(require(SHARED_DATA / "beir" / task), data / "beir" / task, queries, others)
        shutil.copy(folder / "qrels" / "test.tsv", folder / "qrels" / "dev.tsv")
    return repo


def shell(command: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the copy's modules, not the repository's
    run = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
    return run.stdout


def test_readme_add_a_method_runs_as_written(shared_copy):
    line, commands = readme_steps()
    name = re.match(r'\s*"([^"]+)"', line)[1]
    source = (shared_copy / "methods.py").read_text()
    end = source.index("\n}\n", source.index("\nMETHODS = {"))  # the registry's closing brace
    (shared_copy / "methods.py").write_text(source[: end + 1] + line + "\n" + source[end + 1 :])
    evaluation = next(c for c in commands if "evaluate_quantization_mteb.py" in c)
    shell(re.sub(r"--methods .*", "--methods " + " ".join(BASELINE), evaluation), shared_copy)  # the table before
    table = shared_copy / "results" / model_slug(DEFAULT_MODEL)
    before = pd.read_csv(table / results.LATEST)
    depth_before = depth_section((table / "latest.md").read_text())
    assert "| k=50 " in depth_before  # the rows re-ranked at the default depth are its k = 50 column
    for command in commands:
        shell(command, shared_copy)

    after = pd.read_csv(table / results.LATEST)
    assert set(after.method) == set(before.method) | {name} and name not in set(before.method)
    pd.testing.assert_frame_equal(after[after.method != name].reset_index(drop=True), before)  # every row as it was
    nbytes = after[(after.method == name) & (after.metric == "bytes_per_vector")].value
    spec = f"PQ{384 // 12}np"  # the line's d // 12 sub-quantisers, 8 bits each, at the default model's 384 dimensions
    assert set(nbytes) == {faiss.index_factory(384, spec, faiss.METRIC_INNER_PRODUCT).sa_code_size()}
    assert set(after[after.method == name].task) == {"NFCorpus", "SciFact"}
    record = json.loads((table / results.RECORD).read_text())
    checkpoint = shared_copy / "checkpoints" / model_slug(DEFAULT_MODEL) / f"{name}.safetensors"
    assert record["rows"][name]["checkpoints"] == {str(checkpoint.relative_to(shared_copy)): checkpoints.checkpoint_fingerprint(checkpoint)}
    assert len(record["runs"]) == 2 and {r["run"] for r in record["rows"].values()} == set(record["runs"])
    assert f"| {name} " in (table / "latest.md").read_text()
    assert depth_section((table / "latest.md").read_text()) == depth_before  # the rows it did not run, as they were


def depth_section(markdown: str) -> str:
    return markdown[markdown.index("### How deep to re-rank"):].split("\n### ")[0]
