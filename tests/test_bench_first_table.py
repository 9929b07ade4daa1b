"""bench_first_table.py: both commands on a new 256-d model with empty caches, on the SciFact slice and 1,070 fitting
texts (enough for every method at 256-d)."""

import json
import subprocess
import sys

import pandas as pd
import pytest

import methods
import results
from conftest import ROOT

pytestmark = pytest.mark.slow
DIM = 256


@pytest.fixture(scope="module")
def measured(task_with_ties, train_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("first-table")
    done = subprocess.run([sys.executable, str(ROOT / "bench_first_table.py"), "--tasks", "SciFact", "--data-dir",
                           task_with_ties, "--train-data", train_data, "--work", work,
                           "--training-options", "--random-inits 0 --epochs 1"],  # every method, trained briefly
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return work, done.stdout, json.loads(done.stdout.splitlines()[-1])


def test_the_evaluation_scores_every_row_that_needs_no_training_and_fits_what_it_needs(measured):
    work, _, costs = measured
    evaluation = costs["evaluation"]
    applies = [n for n in methods.METHODS if methods.applies(n, DIM) is None and "transfer" in methods.entry(n).protocols]
    untrained = {row for n in applies if methods.entry(n).learned or methods.entry(n).slow_fit  # named, not made
                 for row in methods.table_rows(n, DIM)}
    table = pd.read_csv(work / "evaluation" / "results" / "latest.csv")
    assert set(table.method) == set(results.expected_rows(DIM, "transfer")) - untrained
    assert evaluation["rows"] == len(set(table.method))
    fitted = [n for n in applies if methods.entry(n).fitted_on == "texts" and not methods.entry(n).slow_fit]
    assert evaluation["fits"] == len(fitted)
    assert sorted(p.stem for p in (work / "evaluation" / "checkpoints").glob("*/*.safetensors")) == sorted(fitted)


def test_the_training_command_fits_and_trains_every_method_from_an_empty_cache(measured):
    work, _, costs = measured
    applies = [n for n in methods.METHODS if methods.applies(n, DIM) is None and methods.entry(n).fitted_on != "nothing"
               and "transfer" in methods.entry(n).protocols and not methods.entry(n).slow_fit]
    assert costs["training"]["methods"] == len(applies)
    assert sorted(p.stem for p in (work / "training" / "checkpoints").glob("*/*.safetensors")) == sorted(applies)
    assert list((work / "training" / "cache").iterdir())  # it encoded into its own cache, not the evaluation's


def test_the_parts_add_up_within_each_process(measured):
    """Encoding and what follows it are parts of the command's process: their CPU seconds cannot exceed the whole's
    (measured by the operating system over the child process), and encoding is a real share of it."""
    _, stdout, costs = measured
    for name, c in (("evaluation", costs["evaluation"]), ("training", costs["training"])):
        rest = c.get("fitting and training") or {k: c["fitting"][k] + c["scoring"][k] for k in ("seconds", "cpu_seconds")}
        assert 0 < c["encoding"]["cpu_seconds"] and c["encoding"]["cpu_seconds"] + rest["cpu_seconds"] <= c["whole"]["cpu_seconds"] + 1, name
        assert f"| {name} | CPU |" in stdout and f"| {name} | wall |" in stdout


def test_a_work_folder_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "old").write_text("")
    done = subprocess.run([sys.executable, str(ROOT / "bench_first_table.py"), "--work", tmp_path], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip() == f"error: {tmp_path} is not empty (the caches must start empty)"
