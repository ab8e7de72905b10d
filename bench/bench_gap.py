"""Stage 2 (gap and rank) against one stage-3 training epoch, on the quickstart, side by side.

Stage 2 is one forward pass per held-out sample through the frozen body with hooks, a distance per
block with its permutation null and bootstrap interval, and the rank prior; a stage-3 epoch is forward + backward + AdamW over the training split with the LoRA
ranks stage 2 chose. Both use the quickstart's data, body and settings; each is timed `--repeats`
times, alternating, and the median kept.

    .venv/bin/python bench/bench_gap.py [--config configs/quickstart.yaml] [--repeats 3]
    .venv/bin/python bench/bench_gap.py --output bench/results/gap_spectral.json --set stage2.distance=spectral \
        --set stage2.max_samples=768 --set source.proxy_samples=2000 --set task.n_train=2000
        # the spectral gap needs 4 x the widest block (768) held out on each side

Target: stage 2, its null and interval included, cheaper than one stage-3 epoch (for mmd and spectral). Writes bench/results/gap.json.
The spectral gap's cut-offs come from data-free null simulations stored under data_root (once per
width and sample sizes): `stage2` reads them, as every run after the first at these sizes does;
`first stage2` pays them, as the first run on a machine does. mmd has no simulation: the two agree.
"""
import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from orca_lora.config_load import load_config
from orca_lora.data.tasks import build_task
from orca_lora.files import strict_json_text, write_text_atomic
from orca_lora.finetune.stage import prepare_model
from orca_lora.models.embedder import Embedder
from orca_lora.models.features import held_out_split
from orca_lora.models.model import build_orca_model
from orca_lora.models.source import load_source_body, source_proxy
from orca_lora.rank import stage as rank_stage
from orca_lora.rank.spectral import clear_calibration_cache
from orca_lora.run_files import RunFiles

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "gap.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set stage2.distance=spectral")
    args = parser.parse_args()
    config = load_config(args.config, [f"data_root={ROOT / 'data'}", *args.set])
    task = build_task(config.task, config.data_root)
    body = load_source_body(config.source, config.data_root)
    images, labels = source_proxy(config.source, config.data_root)
    embedder = Embedder.from_body(body, task.in_channels, generator=torch.Generator().manual_seed(config.seed))
    s3 = config.stage3

    held_out = config.stage2.max_samples
    source_gap = held_out_split(len(images), held_out, config.source.pretrain.seed, "the source proxy set").gap
    target_gap = held_out_split(len(task.train), held_out, config.task.data_seed, "the target's training split").gap
    inputs = rank_stage.GapInputs(body, embedder, replace(task, train=Subset(task.train, target_gap.tolist())),
                                  images[source_gap], labels[source_gap], s3.targets, s3.rank, config.seed,
                                  measure_seed=config.task.data_seed)

    stored_nulls = Path(tempfile.mkdtemp(prefix="bench_gap_nulls_"))

    def gap_and_rank(calibrations: Path | None = None) -> dict[str, int]:
        with tempfile.TemporaryDirectory() as directory:
            return rank_stage.run(config.stage2, replace(inputs, calibrations=calibrations), RunFiles(directory)).ranks

    def first_stage2() -> None:  # nothing stored: the spectral null simulations are paid
        gap_and_rank(Path(tempfile.mkdtemp(prefix="bench_gap_fresh_", dir=stored_nulls)))

    def later_stage2() -> None:  # the simulations read from disk, as every later run at these sizes
        gap_and_rank(stored_nulls)

    ranks = gap_and_rank(stored_nulls)
    # stage 3 wraps the body's Linears in adapters; stage 2 keeps measuring the unwrapped body
    model = build_orca_model(copy.deepcopy(body), task.in_channels, task.head, task.num_outputs, task.output_size, seed=config.seed)
    prepare_model(model, s3, ranks, config.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s3.lr)
    loader = DataLoader(task.train, batch_size=s3.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed))

    def training_epoch() -> None:
        for inputs, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            task.loss(task.output_transform(model(inputs)), targets).mean().backward()
            optimizer.step()

    times: dict[str, list[float]] = {"stage2": [], "stage2_first": [], "stage3_epoch": []}
    for _ in range(args.repeats):
        for name, work in (("stage2", later_stage2), ("stage2_first", first_stage2), ("stage3_epoch", training_epoch)):
            clear_calibration_cache()  # what a fresh process holds in memory: nothing
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    shutil.rmtree(stored_nulls)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["stage2"] / median["stage3_epoch"]
    first_ratio = median["stage2_first"] / median["stage3_epoch"]
    config_path = args.config.resolve()  # named relative to the repository: the same on any machine
    in_repository = config_path.is_relative_to(ROOT)
    setting = {"config": config_path.relative_to(ROOT).as_posix() if in_repository else str(config_path),
               "stage2_samples": config.stage2.max_samples, "stage2_distance": config.stage2.distance,
               "permutations": config.stage2.permutations, "bootstraps": config.stage2.bootstraps,
               "train_samples": len(task.train), "batch_size": s3.batch_size, "repeats": args.repeats,
               "threads": torch.get_num_threads()}
    environment = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                   "load_average": list(os.getloadavg())}
    print(" ".join(f"{k} {v}" for k, v in environment.items()), "|", json.dumps(setting))
    print(f"{'median seconds':<28}{'stage2':>10}{'first stage2':>14}{'stage3 epoch':>14}")
    print(f"{'':<28}{median['stage2']:>10.3f}{median['stage2_first']:>14.3f}{median['stage3_epoch']:>14.3f}")
    print(f"{'stage2 / stage3 epoch':<28}{ratio:>10.3f}   target < 1: {'met' if ratio < 1 else 'MISSED'}")
    print(f"{'first stage2 / stage3 epoch':<28}{first_ratio:>10.3f}   (spectral: its null simulations paid, once per "
          "width and sample sizes)")
    record = {"environment": environment, "setting": setting, "seconds": times, "median_s": median,
              "ratios": {"stage2 / stage3_epoch": ratio, "first stage2 / stage3_epoch": first_ratio}}
    write_text_atomic(args.output, strict_json_text(record))


if __name__ == "__main__":
    main()
