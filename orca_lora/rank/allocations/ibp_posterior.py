"""`ibp-posterior`: ranks from the posterior of a finished ibp-lora run (README, "Allocations against the field"), scaled
to this run's budget: what the data asked for, per module, reused as an allocation.

Score of adapted module m: its posterior rank in stage2.posterior_run's `metrics.json` (components with
q(z = 1) > 0.5); ranks ~ scores at the budget by `proportional_ranks` (`rank/budget.py`). A module the
posterior pruned to 0 still gets stage2.r_min (>= 1): stage 3's adapters refuse rank 0
(`adapters/inject.py` takes ranks in [1, min(d_out, d_in)]), so it cannot be left without an adapter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from orca_lora.rank.allocations.context import AllocationResult, GapAllocationInputs, block_mean_ranks
from orca_lora.rank.allocations.registry import register_allocation
from orca_lora.rank.budget import proportional_ranks
from orca_lora.rank.select import ModuleShape
from orca_lora.run_files import RunFiles, read_metrics


def read_posterior_ranks(run_dir: str | Path) -> dict[str, int]:
    """Module -> posterior rank of the finished ibp-lora run in `run_dir` (its metrics.json)."""
    run = RunFiles(Path(run_dir))
    if not run.is_finished():
        raise ValueError(f"stage2.posterior_run: {run.metrics} does not exist; point it at a finished "
                         "stage3.method=ibp-lora run's directory (finish that run first)")
    metrics = read_metrics(run)
    if metrics.posterior_ranks is None:
        raise ValueError(f"stage2.posterior_run: {run_dir} is a {metrics.method!r} run with no posterior ranks in its "
                         "metrics.json; point it at a finished stage3.method=ibp-lora run")
    return {name: int(rank) for name, rank in metrics.posterior_ranks.items()}


def check_posterior_modules(posterior: Mapping[str, int], shapes: Mapping[str, ModuleShape],
                            run_dir: str | Path) -> None:
    """The posterior run must have adapted exactly this run's modules (same body, same stage3.targets)."""
    missing, extra = sorted(set(shapes) - set(posterior)), sorted(set(posterior) - set(shapes))
    if missing or extra:
        parts = ([f"this run's {missing[:3]} are not in it"] if missing else []) + \
                ([f"its {extra[:3]} are not adapted here"] if extra else [])
        raise ValueError(f"stage2.posterior_run: {run_dir} adapted other modules than this run's stage3.targets: "
                         f"{', '.join(parts)}; use a posterior run with the same source body and stage3.targets")


@register_allocation("ibp-posterior", "stage2")
def ibp_posterior(inputs: GapAllocationInputs) -> AllocationResult:
    stage, budget = inputs.stage, inputs.required_budget()
    if stage.posterior_run is None:
        raise ValueError("stage2.allocation ibp-posterior needs stage2.posterior_run, a finished ibp-lora run's "
                         "directory")
    posterior = read_posterior_ranks(stage.posterior_run)
    check_posterior_modules(posterior, inputs.shapes, stage.posterior_run)
    scores = {name: float(posterior[name]) for name in inputs.shapes}
    ranks = proportional_ranks(scores, inputs.shapes, budget, stage.r_min, stage.r_max)
    return AllocationResult(ranks, block_mean_ranks(ranks, inputs.shapes, len(inputs.measured)), budget)
