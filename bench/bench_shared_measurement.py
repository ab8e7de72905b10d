"""One slice of the rank-vs-gap study (configs/study_gap.yaml's settings, one task, its six ranks, one seed) as a
sweep, run by this tree (stage 2's measurement shared by the ranks) and by an earlier commit (`--before`, checked
out into a temporary git worktree: each rank measured its own gaps), alternating, `--repeats` times.

Both sweeps share stage 1 through the sweep's store as before; they differ in stage 2 only, so the table gives
stage 2's seconds summed over the slice's points (from each point's metrics.json) beside the sweep's wall time,
and their ratios after / before. Stage 3 trains `--epochs` (default 1: it is the same work on both sides).

    .venv/bin/python bench/bench_shared_measurement.py --before 0779489 [--task darcy] [--repeats 2]

Writes bench/results/shared_measurement.json.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from orca_lora.files import strict_json_text, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "shared_measurement.json"


def slice_sweep(task: str, epochs: int) -> dict:
    """The study's sweep file cut to one task, seed 0 and its LoRA ranks; stage 3 at `epochs`."""
    study = yaml.safe_load((ROOT / "configs" / "study_gap.yaml").read_text())
    return {"name": "slice", "base": str(ROOT / "configs" / study["base"]),
            "set": study["set"] + [f"trainer.max_epochs={epochs}"],
            "grids": [{"task": {task: {"task.name": task}}, "seed": [0], "stage3.rank": [1, 2, 4, 8, 16, 32]}]}


def run_slice(tree: Path, sweep_file: Path, runs: Path) -> dict:
    """Wall seconds of `orca-lora sweep` from `tree`'s code, and stage 2's seconds summed over its points."""
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    found = subprocess.run([sys.executable, "-c", "import orca_lora; print(orca_lora.__file__)"], cwd=tree,
                           env=environment, check=True, capture_output=True, text=True).stdout
    assert Path(found.strip()).is_relative_to(tree), f"{tree}: imported {found}"  # that tree's code, not ours
    command = [sys.executable, "-m", "orca_lora.cli", "sweep", str(sweep_file), "--set", f"output.root={runs}",
               "--set", f"data_root={ROOT / 'data'}"]
    start = time.perf_counter()
    subprocess.run(command, cwd=tree, env=environment, check=True, capture_output=True)
    wall = time.perf_counter() - start
    metrics = [json.loads(path.read_text()) for path in sorted((runs / "slice").glob("*/metrics.json"))]
    return {"wall_s": wall, "stage2_s": sum(m["stage_seconds"]["stage2"] for m in metrics), "points": len(metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit whose stage 2 measured once per point")
    parser.add_argument("--task", default="darcy")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    timings = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        before = scratch / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            sweep_file = scratch / "sweep_slice.yaml"
            sweep_file.write_text(yaml.safe_dump(slice_sweep(args.task, args.epochs)))
            for repeat in range(args.repeats):
                for side, tree in (("before", before), ("after", ROOT)):
                    timings[side].append(run_slice(tree, sweep_file, scratch / f"{side}{repeat}"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=True)
    median = {side: {key: statistics.median(t[key] for t in runs) for key in ("wall_s", "stage2_s")}
              for side, runs in timings.items()}
    environment = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(" ".join(f"{k} {v}" for k, v in environment.items()))
    print(f"{'':<8}{'stage 2 s':>11}{'sweep s':>10}   ({timings['after'][0]['points']} points, median of "
          f"{args.repeats})")
    for side in ("before", "after"):
        print(f"{side:<8}{median[side]['stage2_s']:>11.1f}{median[side]['wall_s']:>10.1f}")
    ratios = {key: median["after"][key] / median["before"][key] for key in ("stage2_s", "wall_s")}
    print(f"{'ratio':<8}{ratios['stage2_s']:>11.2f}{ratios['wall_s']:>10.2f}   (after / before)")
    record = {"environment": environment, "before": args.before, "task": args.task, "epochs": args.epochs,
              "timings": timings, "median": median, "ratios": ratios}
    write_text_atomic(args.output, strict_json_text(record))


if __name__ == "__main__":
    main()
