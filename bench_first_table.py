"""Time to a new model's first table, measured: a model the repository has no checkpoint for (by default the packaged
MiniLM followed by a seeded orthonormal projection to 256 dimensions), an empty embedding cache and an empty checkpoint
folder. The evaluation runs first, in a process of its own: it encodes the tasks and the fitting texts, fits every
method fitted on texts, scores every row it can, and names each learned method as not trained yet. Then the training
command, in a process of its own with an empty cache again: it encodes what it needs, fits and trains every method.

Each command's cost is read from its run record (what encoding took against everything after it) and, for the
whole process, from the operating system's CPU and wall clocks. On a machine shared with other jobs wall time says
how busy the machine was as much as what the work cost; CPU time much less so. Both are printed.

    python bench_first_table.py                              # 256-d projection, NFCorpus and SciFact, both commands
    python bench_first_table.py --skip-training              # the evaluation only
    python bench_first_table.py --model all-MiniLM-L6-v2 --tasks SciFact
"""

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sentence_transformers.sentence_transformer.modules import Dense

import encoders
from data import TASKS
from fitting import TRAIN_DATA

ROOT = Path(__file__).resolve().parent
DIM = 256  # the projection's dimension: a dimension no committed model has
SEED = 0
DATA_DIR = Path("../shared/data/beir")  # as the commands take it: relative to the repository


def save_projection(folder: Path, d: int = DIM, seed: int = SEED) -> Path:
    """The packaged MiniLM followed by a seeded 384 -> d linear map with orthonormal rows or columns, saved as a
    sentence-transformers folder: a real model of dimension d whose geometry is MiniLM's (up to the lost directions)."""
    model = encoders.load_base_model(encoders.DEFAULT_MODEL, "cpu")
    weight = torch.nn.init.orthogonal_(torch.empty(d, 384), generator=torch.Generator().manual_seed(seed))
    model.append(Dense(384, d, bias=False, activation_function=torch.nn.Identity(), init_weight=weight))
    model.save(str(folder))
    return folder


def timed(command: list) -> dict:
    """Run `command` (a tool of this repository) in its own process; its wall and CPU seconds, and its exit code."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(cpu, 1), "returncode": done.returncode}


def evaluation_cost(model: str, tasks: list[str], data_dir: Path, train_data: Path, work: Path) -> dict:
    out = work / "evaluation"
    whole = timed(["evaluate_quantization_mteb.py", "--model", model, "--tasks", *tasks, "--data-dir", data_dir, "--train-data", train_data,
                   "--checkpoints", out / "checkpoints", "--output", out / "results", "--cache-dir", out / "cache"])
    record = json.loads((out / "results" / "record.json").read_text())
    run = next(iter(record["runs"].values()))
    encoding = [run["encoding the tasks"], run.get("fitting texts", {"seconds": 0, "cpu_seconds": 0})]
    fits = [v for k, v in run.items() if k.startswith("fit ")]
    rows = list(record["rows"].values())
    return {"whole": whole, "rows": len(rows), "fits": len(fits),
            "encoding": {k: round(sum(e[k] for e in encoding), 1) for k in ("seconds", "cpu_seconds")},
            "encoding the tasks": run["encoding the tasks"],
            "fitting": {k: round(sum(f[k] for f in fits), 1) for k in ("seconds", "cpu_seconds")},
            "scoring": {"seconds": round(sum(r["wall_s"] for r in rows), 1), "cpu_seconds": round(sum(r["cpu_s"] for r in rows), 1)}}


def training_cost(model: str, tasks: list[str], data_dir: Path, train_data: Path, work: Path, options: list[str]) -> dict:
    out = work / "training"
    whole = timed(["quantization_modules.py", "--model", model, "--tasks", *tasks, "--data-dir", data_dir, "--train-data", train_data,
                   "--out", out / "checkpoints", "--cache-dir", out / "cache", *options])
    record = json.loads(next((out / "checkpoints").glob("*/record.json")).read_text())
    run = next(iter(record["runs"].values()))
    per_method = record["methods"]
    return {"whole": whole, "methods": len(per_method), "encoding": run["embedding"],
            "fitting and training": {k: round(sum(m[k] for m in per_method.values()), 1) for k in ("seconds", "cpu_seconds")},
            "slowest": sorted(((m["cpu_seconds"], name) for name, m in per_method.items()), reverse=True)[:5]}


def report(costs: dict) -> str:
    lines = ["| command | clock | encoding | everything else | whole process | whole ÷ encoding |", "|---|---|---|---|---|---|"]
    for name, c in costs.items():
        rest = c.get("fitting and training") or {k: round(c["fitting"][k] + c["scoring"][k], 1) for k in ("seconds", "cpu_seconds")}
        for clock in ("seconds", "cpu_seconds"):
            lines.append(f"| {name} | {'wall' if clock == 'seconds' else 'CPU'} | {c['encoding'][clock]:.0f} s | {rest[clock]:.0f} s "
                         f"| {c['whole'][clock]:.0f} s | {c['whole'][clock] / c['encoding'][clock]:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder or name (default: the packaged MiniLM projected to 256-d)")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--train-data", type=Path, default=TRAIN_DATA)
    p.add_argument("--work", type=Path, help="where the model, caches, checkpoints and tables go (default: a temporary folder)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--training-options", default="", help="more options for the training command, as one string "
                   "(e.g. '--epochs 1'; the default measures its defaults)")
    args = p.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="first-table-"))).resolve()
    args.data_dir, args.train_data = args.data_dir.resolve(), args.train_data.resolve()  # the commands run from here
    if args.work and any(work.iterdir() if work.is_dir() else []):
        sys.exit(f"error: {work} is not empty (the caches must start empty)")
    model = args.model or str(save_projection(work / f"minilm-{DIM}"))
    costs = {"evaluation": evaluation_cost(model, args.tasks, args.data_dir, args.train_data, work)}
    if costs["evaluation"]["whole"]["returncode"] != 0:
        sys.exit("error: the evaluation failed")
    if not args.skip_training:
        costs["training"] = training_cost(model, args.tasks, args.data_dir, args.train_data, work, shlex.split(args.training_options))
        if costs["training"]["whole"]["returncode"] != 0:
            sys.exit("error: the training command failed")
    print(report(costs))
    print(json.dumps({"model": model, "tasks": args.tasks, "work": str(work), **costs}))


if __name__ == "__main__":
    main()
