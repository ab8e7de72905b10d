"""Generation time of every generated task, in seconds per 1,000 samples (train + test), at 32 x 32.

Each task is built from an empty data root (so nothing is read from a cache) with n_train = n_test
= `--samples` / 2; the figure is the median over rounds of the build time scaled to 1,000 samples
(the build includes normalisation, tensors and the cache write). On a shared machine the numbers
are noisy; compare tasks within one run.

    python bench/bench_tasks.py [--samples 2000] [--rounds 2]

Prints one table and writes bench/results/tasks.json.
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from orca_lora.choices import TASKS
from orca_lora.config import TaskConfig
from orca_lora.data.tasks import build_task
from orca_lora.files import strict_json_text, write_text_atomic

RESULTS = Path(__file__).parent / "results" / "tasks.json"
NOT_GENERATED = ("cifar10", "cifar100")


def seconds_per_thousand(name: str, samples: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        config = TaskConfig(name=name, n_train=samples // 2, n_test=samples - samples // 2)
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            build_task(config, root)
            times.append((time.perf_counter() - start) * 1000 / samples)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="samples per build (digits: at most 1,797)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for name in (task for task in TASKS if task not in NOT_GENERATED):
        samples = min(args.samples, 1797) if name == "digits" else args.samples
        results[name] = seconds_per_thousand(name, samples, args.rounds)
        print(f"{name:<20} {results[name]:8.2f} s / 1,000 samples")
    machine = platform.processor() or platform.machine()
    write_text_atomic(RESULTS, strict_json_text({"setting": vars(args), "machine": machine,
                                                "seconds_per_1000": results}))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
