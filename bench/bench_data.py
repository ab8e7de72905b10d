"""Darcy generation per sample: the direct-solve path against the batched PCG path, side by side.

- old: FNO's recipe as `generate_darcy` ran it before, one SuperLU factorisation per sample
  (`sample_grf`, threshold, `solve_darcy`).
- new: `generate_darcy` as it is, batches of fields solved by `solve_darcy_pcg` (CG preconditioned
  by the fast-sine-transform Laplacian, rtol 1e-12).

Both draw the same coefficients from the same seed. Rounds alternate old and new so drifting
machine load hits them alike; each figure is the median over rounds of seconds per sample.
Accuracy: relative L2 of the PCG solution against the direct one (float64), and how many float32
entries of the stored fields differ. At the largest resolution, where the time goes: GRF draw,
matrix assembly, SuperLU factorisation plus solve, PCG solve.

    python bench/bench_data.py [--rounds 3] [--seed 0]

Prints one table with the ratio old / new and the 0.5 s target check, and writes bench/results/data.json.
"""

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse.linalg

from orca_lora.data import darcy, darcy_solver
from orca_lora.files import strict_json_text, write_text_atomic

RESULTS = Path(__file__).parent / "results" / "data.json"
SAMPLES = {64: 48, 85: 32, 141: 12, 421: 3}  # per round: about 0.5 s of the old path at each size
TARGET_RESOLUTION, TARGET_SECONDS = 421, 0.5


def direct_generation(n_samples: int, resolution: int, seed: int) -> darcy.DarcyFields:
    fields = darcy.sample_grf(n_samples, resolution, np.random.default_rng(seed))
    a = np.where(fields >= 0, darcy.HIGH_COEFF, darcy.LOW_COEFF)
    u = np.stack([darcy_solver.solve_darcy(coefficient) for coefficient in a])
    return darcy.DarcyFields(a=a.astype(np.float32), u=u.astype(np.float32))


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_interleaved(resolution: int, n_samples: int, seed: int, rounds: int) -> dict:
    """Median seconds per sample of each path, after one warm-up round, and how their stored fields compare."""
    runs = {
        "old": lambda: direct_generation(n_samples, resolution, seed),
        "new": lambda: darcy.generate_darcy(n_samples, resolution, seed),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    fields: dict[str, darcy.DarcyFields] = {}
    for round_index in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            fields[name] = run()
            if round_index > 0:
                times[name].append((time.perf_counter() - start) / n_samples)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    return {
        "samples": n_samples, "old_s": old, "new_s": new, "old_over_new": old / new,
        "same_coefficients": bool(np.array_equal(fields["old"].a, fields["new"].a)),
        "float32_entries_differing": int(np.sum(fields["old"].u != fields["new"].u)),
        "float32_entries": int(fields["new"].u.size),
    }


def accuracy(resolution: int, n_samples: int, seed: int) -> dict[str, float]:
    """PCG against the direct solve in float64, on the coefficients both paths draw."""
    fields = darcy.sample_grf(n_samples, resolution, np.random.default_rng(seed))
    a = np.where(fields >= 0, darcy.HIGH_COEFF, darcy.LOW_COEFF)
    solution = darcy_solver.solve_darcy_pcg(a)
    direct = np.stack([darcy_solver.solve_darcy(coefficient) for coefficient in a])
    errors = np.linalg.norm((solution.u - direct).reshape(n_samples, -1), axis=1)
    errors /= np.linalg.norm(direct.reshape(n_samples, -1), axis=1)
    return {"max_rel_l2": float(errors.max()), "pcg_iterations_max": int(solution.iterations.max())}


def profile(resolution: int, seed: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds of each stage of one sample at `resolution`."""
    rng = np.random.default_rng(seed)
    field = darcy.sample_grf(1, resolution, rng)
    a = np.where(field >= 0, darcy.HIGH_COEFF, darcy.LOW_COEFF)
    matrix = darcy_solver.five_point_matrix(a[0])
    rhs = np.ones(matrix.shape[0])

    def factor_and_solve() -> None:
        scipy.sparse.linalg.splu(
            matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}
        ).solve(rhs)

    stages = {
        "grf_s": lambda: darcy.sample_grf(1, resolution, rng),
        "threshold_s": lambda: np.where(field >= 0, darcy.HIGH_COEFF, darcy.LOW_COEFF),
        "assemble_s": lambda: darcy_solver.five_point_matrix(a[0]),
        "superlu_factor_and_solve_s": factor_and_solve,
        "pcg_solve_s": lambda: darcy_solver.solve_darcy_pcg(a),
    }
    return {name: statistics.median(seconds(run) for _ in range(repeats)) for name, run in stages.items()}


def environment() -> dict:
    return {
        "numpy": np.__version__, "scipy": scipy.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def print_table(rows: dict[int, dict], stages: dict[str, float], env: dict) -> None:
    print("Darcy generation, seconds per sample (median over rounds; GRF + threshold + solve)")
    print(f"{'resolution':>10}{'samples':>9}{'old':>10}{'new':>10}{'old/new':>9}"
          f"{'rel L2':>10}{'f32 diff':>12}{'PCG its':>9}")
    for resolution, row in rows.items():
        print(f"{resolution:>10}{row['samples']:>9}{row['old_s']:>9.4f}s{row['new_s']:>9.4f}s"
              f"{row['old_s'] / row['new_s']:>8.2f}x{row['max_rel_l2']:>10.1e}"
              f"{row['float32_entries_differing']:>5}/{row['float32_entries']:<6}{row['pcg_iterations_max']:>9}")
    print(f"where one sample's time goes at {TARGET_RESOLUTION}: " + ", ".join(
        f"{name[:-2]} {value:.3f}s" for name, value in stages.items()))
    new = rows[TARGET_RESOLUTION]["new_s"]
    print(f"{TARGET_SECONDS} s target at {TARGET_RESOLUTION}: {'met' if new <= TARGET_SECONDS else 'NOT met'} "
          f"({new:.3f} s per sample)")
    print("rel L2 = max over samples of ||u_pcg - u_direct|| / ||u_direct|| (float64); f32 diff = stored float32 "
          "entries that differ; coefficients identical: " + str(all(row["same_coefficients"] for row in rows.values())))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    env = environment()
    rows = {}
    for resolution, n_samples in SAMPLES.items():
        rows[resolution] = {**time_interleaved(resolution, n_samples, args.seed, args.rounds),
                            **accuracy(resolution, n_samples, args.seed)}
    stages = profile(TARGET_RESOLUTION, args.seed)
    env["load_average_after"] = os.getloadavg()
    print_table(rows, stages, env)
    record = {"setting": {"rounds": args.rounds, "seed": args.seed, "rtol": darcy_solver.PCG_RTOL},
              "per_sample": {str(k): v for k, v in rows.items()}, "stages_at_421": stages,
              "target_met": rows[TARGET_RESOLUTION]["new_s"] <= TARGET_SECONDS, "environment": env}
    write_text_atomic(args.output, strict_json_text(record))


if __name__ == "__main__":
    main()
