"""The quickstart's wall time per stage, from one full run into a temporary directory.

Data and the offline source body come from `data/` (built on first use, like `make demo`); the
run itself starts from nothing each time, so every stage runs. Prints each stage's seconds and its
share of the pipeline, and writes bench/results/pipeline.json and the run's gaps-and-ranks figure (the one
the README shows) as bench/results/<config>_gaps_and_ranks.png.

    .venv/bin/python bench/bench_pipeline.py [--config configs/quickstart.yaml] [--set KEY=VALUE ...]
"""
import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from orca_lora.config_load import load_config
from orca_lora.files import strict_json_text, write_atomic, write_text_atomic
from orca_lora.pipeline import run_pipeline
from orca_lora.reports.run_plots import plot_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "pipeline.json"


def repository_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it: results then read the same on any machine."""
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        config = load_config(args.config, [f"data_root={ROOT / 'data'}", *args.set, f"output.root={runs}",
                                           "trainer.enable_progress_bar=false"])
        load_before = list(os.getloadavg())
        start = time.perf_counter()
        result = run_pipeline(config)
        wall = time.perf_counter() - start
        drawn = {path.name: path for path in plot_run(result.directory)}  # as `orca-lora run` draws them
        figure = RESULTS.parent / f"{args.config.stem}_gaps_and_ranks.png"
        write_atomic(figure, lambda temporary: shutil.copyfile(drawn["gaps_and_ranks.png"], temporary))
    metrics = result.metrics
    stages = metrics.stage_seconds
    # what is not a stage: loading data and the body, building the model, metrics and plots
    stages["outside stages"] = wall - sum(stages.values())
    environment = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                   "threads": torch.get_num_threads(), "load_average_before": load_before,
                   "load_average_after": list(os.getloadavg())}
    print(" ".join(f"{k} {v}" for k, v in environment.items()))
    print(f"{'part':<16}{'seconds':>10}{'share':>8}")
    for name, seconds in stages.items():
        print(f"{name:<16}{seconds:>10.1f}{seconds / wall:>8.1%}")
    print(f"{'pipeline':<16}{wall:>10.1f}{1:>8.0%}   test error {metrics.test_error:.4f}")
    record = {"environment": environment, "config": repository_path(args.config), "set": args.set, "wall_s": wall,
              "seconds": stages, "shares": {name: seconds / wall for name, seconds in stages.items()},
              "test_error": metrics.test_error}
    write_text_atomic(args.output, strict_json_text(record))


if __name__ == "__main__":
    main()
