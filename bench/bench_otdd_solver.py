"""OTDD's outer Sinkhorn (orca_lora/align/sinkhorn.py): accuracy against POT at eps from 1 to 1e-3
times the median cost, and iterations and time against the previous solver and against ORCA's own
otdd at ORCA's Darcy stage-1 setting.

1. accuracy: seeded labelled Gaussian mixtures (20 to 2,000 source points, 3/4 as many target
   points, dims 2 to 128), otdd's augmented cost ||x - x'||^2 + W2^2(P_y, P_y') with W2^2 from POT's
   emd2 per class pair, eps = ratio x the cost's median for ratios 1, 1e-1, 1e-2, 1e-3. Ours at its
   defaults (tolerance 1e-3, cap) against POT's log-domain Sinkhorn on the same objective
   <P, C> + eps KL(P | a x b), run to a column error of 1e-8 from our potentials (converged, it sits
   at the problem's unique solution whatever its start; from a cold start POT took 10^5 iterations
   at the smallest eps on 20 points), and against POT's exact emd2 at the smallest eps.
2. darcy: bench_align's Darcy-like features (5,000 source / 128 target features, dim 128, 10
   classes, eps 0.1, debiased), the loss + backward with the source side cached as in training, by
   today's solver and by the previous one (commit 44625df's sinkhorn.py, read from git: 25 annealing
   steps, then plain updates to a 1,000-iteration cap). Per Sinkhorn problem: seconds and soft
   c-transforms (one log-sum-exp over a cost's rows or columns, the unit of work of both solvers).
3. orca (with --orca PATH, a checkout of sjunhongshen/ORCA): ORCA's vendored otdd (Alvarez-Melis &
   Fusi 2020, as used by Shen et al. 2023) called as ORCA's `embedder.otdd` calls it
   (DatasetDistance, debiased, p = 2, entreg = 0.1, maxsamples = the source size), on the same
   tensors, value + backward, against ours. Its imports need munkres, seaborn and adjustText
   (e.g. `pip install --no-deps --target DIR munkres seaborn adjustText`, DIR on PYTHONPATH); its
   `symeig` calls, removed from torch, go to torch.linalg.eigh, and its `geomloss.utils` to
   `geomloss._legacy.utils` (moved there in geomloss 0.3). The values are in each library's
   own units (geomloss halves the squared cost), so only the times compare.

Run: .venv/bin/python bench/bench_otdd_solver.py [--orca PATH]   (writes bench/results/otdd_solver.json)
"""
import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ot
import torch
from bench_align import N_CLASSES, darcy_like_features, environment
from bench_pipeline import repository_path

from orca_lora.align import distances, sinkhorn
from orca_lora.align.distances import otdd, prepare_source
from orca_lora.align.sinkhorn import SinkhornCapWarning, entropic_ot, sinkhorn_potentials
from orca_lora.files import strict_json_text, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "otdd_solver.json"
PREVIOUS_COMMIT = "44625df"  # the last commit with the annealing + plain-update solver
ACCURACY_CASES = [(20, 2), (60, 8), (200, 32), (600, 64), (2000, 128)]  # (source points, dim)
EPS_RATIOS = (1.0, 1e-1, 1e-2, 1e-3)
DARCY_EPS = 0.1
POT_MAX_ITERS = 20_000


def labelled_mixture(n: int, dim: int, classes: int, seed: int, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = 2.0 * torch.randn(classes, dim, generator=g, dtype=torch.float64)
    return shift + centres[labels] + torch.randn(n, dim, generator=g, dtype=torch.float64), labels


def augmented_cost(x_s, y_s, x_t, y_t) -> np.ndarray:
    """||x - x'||^2 + W2^2(P_y, P_y'), W2^2 by POT's emd2 per class pair (apart from distances.py)."""
    pairs = itertools.product(torch.unique(y_s).tolist(), torch.unique(y_t).tolist())
    w2 = {(c, e): ot.emd2(ot.unif(int((y_s == c).sum())), ot.unif(int((y_t == e).sum())),
                          ot.dist(x_s[y_s == c].numpy(), x_t[y_t == e].numpy())) for c, e in pairs}
    label_cost = np.array([[w2[c, e] for e in y_t.tolist()] for c in y_s.tolist()])
    return ot.dist(x_s.numpy(), x_t.numpy()) + label_cost


def pot_value(cost: np.ndarray, eps: float, f: np.ndarray, g: np.ndarray) -> tuple[float, float, int]:
    """<P, C> + eps KL(P | a x b) of POT's log-domain Sinkhorn started from (f, g); its last column
    error and iterations."""
    a, b = ot.unif(cost.shape[0]), ot.unif(cost.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT's log["u"] = exp(log u) overflows at small eps
        plan, log = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=POT_MAX_ITERS, stopThr=1e-8,
                                warmstart=(np.log(a) + f / eps, np.log(b) + g / eps), log=True)
    support = plan > 0
    kl = np.sum(plan[support] * np.log(plan[support] / np.outer(a, b)[support]))
    return float(np.sum(plan * cost) + eps * kl), float(log["err"][-1]), int(log["niter"])


def accuracy_rows() -> list[dict]:
    rows = []
    for seed, (n, dim) in enumerate(ACCURACY_CASES):
        x_s, y_s = labelled_mixture(n, dim, 3, seed)
        x_t, y_t = labelled_mixture(3 * n // 4, dim, 2, seed + 100, shift=0.5)
        cost = augmented_cost(x_s, y_s, x_t, y_t)
        median, exact = float(np.median(cost)), None
        for ratio in EPS_RATIOS:
            eps, tensor = ratio * median, torch.from_numpy(cost)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SinkhornCapWarning)
                start = time.perf_counter()
                value = float(entropic_ot(tensor, eps))
                seconds = time.perf_counter() - start
                solved = sinkhorn_potentials(tensor, eps)
            reference, pot_error, pot_iterations = pot_value(cost, eps, solved.f.numpy(), solved.g.numpy())
            row = {"n_source": n, "n_target": len(x_t), "dim": dim, "eps_ratio": ratio, "eps": eps,
                   "value": value, "pot_value": reference, "pot_column_error": pot_error,
                   "pot_iterations_from_ours": pot_iterations, "rel_error_vs_pot": abs(value - reference) / abs(reference),
                   "iterations": solved.iterations, "marginal_error": solved.error, "seconds": seconds,
                   "cap_warnings": len(caught)}
            if ratio == min(EPS_RATIOS):
                exact = ot.emd2(ot.unif(len(x_s)), ot.unif(len(x_t)), cost, numItermax=10**7)
                row.update(emd2=float(exact), rel_error_vs_emd2=abs(value - exact) / abs(exact))
            rows.append(row)
            print(f"accuracy n={n} dim={dim} eps={ratio:g} x median: {solved.iterations} iterations, "
                  f"vs POT {row['rel_error_vs_pot']:.1e}", file=sys.stderr)
    return rows


def schedule_rows() -> dict:
    """Iterations against the schedule's ratio q (eps = 1e-3 x median), against the stages' stopping
    rule STAGE_LOG_RATIO (eps = 1e-6 x median, where the plan is the exact one) and, for self-transport
    costs (a cloud with itself, solved with the averaged update and no scaling), against eps."""
    ratios, stage_ratios, self_ratios = (0.3, 0.5, 0.7, 0.85), (3e-3, 1e-2, 3e-2), (1.0, 1e-2, 1e-4, 1e-6)
    rows = {"q": list(ratios), "iterations_by_q": [], "stage_log_ratio": list(stage_ratios),
            "iterations_by_stage_ratio": [], "self_eps_ratio": list(self_ratios), "self_iterations": []}
    schedule = sinkhorn.eps_schedule
    for seed, (n, dim) in enumerate(ACCURACY_CASES[:4]):
        x_s, y_s = labelled_mixture(n, dim, 3, seed)
        x_t, y_t = labelled_mixture(3 * n // 4, dim, 2, seed + 100, shift=0.5)
        cost = torch.from_numpy(augmented_cost(x_s, y_s, x_t, y_t))
        eps, counts = 1e-3 * float(cost.median()), []
        for q in ratios:
            sinkhorn.eps_schedule = lambda cost_range, eps, q=q: schedule(cost_range, eps, q)
            try:
                counts.append(sinkhorn_potentials(cost, eps).iterations)
            finally:
                sinkhorn.eps_schedule = schedule
        rows["iterations_by_q"].append({"n_source": n, "dim": dim, "iterations": counts})
        counts, stage_rule = [], sinkhorn.STAGE_LOG_RATIO
        for stage_ratio in stage_ratios:
            sinkhorn.STAGE_LOG_RATIO = stage_ratio
            try:
                counts.append(sinkhorn_potentials(cost, 1e-6 * float(cost.median())).iterations)
            finally:
                sinkhorn.STAGE_LOG_RATIO = stage_rule
        rows["iterations_by_stage_ratio"].append({"n_source": n, "dim": dim, "iterations": counts})
        self_cost = torch.from_numpy(augmented_cost(x_s, y_s, x_s, y_s))
        median = float(self_cost.median())
        rows["self_iterations"].append({"n_source": n, "dim": dim, "iterations": [
            sinkhorn_potentials(self_cost, ratio * median, symmetric=True).iterations for ratio in self_ratios]})
    return rows


def previous_solver() -> types.ModuleType:
    """sinkhorn.py as it was at PREVIOUS_COMMIT, from the repository's history."""
    source = subprocess.run(["git", "show", f"{PREVIOUS_COMMIT}:orca_lora/align/sinkhorn.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("previous_sinkhorn")
    exec(compile(source, f"{PREVIOUS_COMMIT}:sinkhorn.py", "exec"), module.__dict__)
    return module


@contextmanager
def solving_with(module: types.ModuleType):
    """otdd with `module`'s entropic_ot; yields the list of its calls: shape, seconds, c-transforms."""
    calls, count = [], [0]
    softmin, solve, original = module._softmin, module.entropic_ot, distances.entropic_ot

    def counted_softmin(*args, **kwargs):
        count[0] += 1
        return softmin(*args, **kwargs)

    def recorded(cost, *args, **kwargs):
        before, start = count[0], time.perf_counter()
        value = solve(cost, *args, **kwargs)
        calls.append({"shape": list(cost.shape), "seconds": time.perf_counter() - start,
                      "c_transforms": count[0] - before})
        return value

    module._softmin, distances.entropic_ot = counted_softmin, recorded
    try:
        yield calls
    finally:
        module._softmin, distances.entropic_ot = softmin, original


def value_and_backward(loss, x_t: torch.Tensor) -> tuple[float, float]:
    """(seconds, value) of loss(x) + backward on a fresh leaf copy x of x_t."""
    x = x_t.clone().requires_grad_(True)
    start = time.perf_counter()
    value = loss(x)
    value.backward()
    return time.perf_counter() - start, float(value)


def alternating_medians(contenders: dict, x_t: torch.Tensor, repeats: int) -> dict:
    """{name: {seconds, value}}: each contender's loss + backward, round by round in turn (so that a busy
    spell of the machine falls on all of them), median seconds over `repeats` rounds. A contender is
    (loss, module or None): with a module, otdd solves with that module's entropic_ot, and its last
    round's Sinkhorn calls are kept as `calls`."""
    runs = {name: [] for name in contenders}
    calls = {}
    for _ in range(repeats):
        for name, (loss, module) in contenders.items():
            with solving_with(module or sinkhorn) as recorded:
                runs[name].append(value_and_backward(loss, x_t))
            calls[name] = list(recorded)
    return {name: {"seconds": statistics.median(seconds for seconds, _ in done), "value": done[-1][1],
                   "calls": calls[name]} for name, done in runs.items()}


def cached_source(module: types.ModuleType, x_s, y_s, **options):
    """prepare_source with `module`'s solver (its self-transport of the source), and that call's record."""
    with solving_with(module) as calls:
        cache = prepare_source(x_s, y_s, entropic_reg=DARCY_EPS, **options)
    return cache, calls[-1]


def darcy_rows(repeats: int) -> dict:
    x_s, y_s, x_t, y_t = darcy_like_features(5000)
    solvers = {"today": sinkhorn, "previous": previous_solver()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        caches = {name: cached_source(module, x_s, y_s) for name, module in solvers.items()}
        contenders = {name: ((lambda x, cache=caches[name][0]: otdd(x_s, y_s, x, y_t, entropic_reg=DARCY_EPS,
                                                                    source=cache)), module)
                      for name, module in solvers.items()}
        timed = alternating_medians(contenders, x_t, repeats)
    rows = {}
    for name in solvers:
        cross, target_self = timed[name]["calls"]  # the cross cost, then the target's self cost
        rows[name] = {"loss_and_backward_s": timed[name]["seconds"], "value": timed[name]["value"],
                      "source_self_ot": caches[name][1], "cross": cross, "target_self": target_self}
        print(f"darcy {name}: {timed[name]['seconds']:.3f} s per step", file=sys.stderr)
    rows["cap_warnings"] = sum("cap" in str(warning.message) for warning in caught)
    return rows


def orca_loss(orca: Path):
    """ORCA's `embedder.otdd(feats, ys, src_train_dataset, exact)` on tensors, as a function of x."""
    sys.path.insert(0, str(orca / "src" / "otdd"))
    torch.symeig = lambda matrix, eigenvectors=True: torch.linalg.eigh(matrix)
    torch.Tensor.symeig = lambda matrix, eigenvectors=True: torch.linalg.eigh(matrix)
    import geomloss._legacy.utils
    geomloss.utils = geomloss._legacy.utils  # where geomloss 0.3 moved the module ORCA's otdd calls
    from otdd.pytorch.distance import DatasetDistance
    from torch.utils.data import TensorDataset

    def loss(x_s, y_s, x, y_t, exact: bool):
        distance = DatasetDistance(TensorDataset(x_s, y_s), TensorDataset(x, y_t),
                                   inner_ot_method="exact" if exact else "gaussian_approx", debiased_loss=True,
                                   inner_ot_debiased=True, p=2, inner_ot_p=2, entreg=DARCY_EPS,
                                   ignore_target_labels=False, device=x.device, load_prev_dyy1=None)
        return distance.distance(maxsamples=len(x_s))
    return loss


def orca_rows(orca: Path, repeats: int) -> dict:
    """ORCA's otdd against ours with today's and the previous solver (source cached, as in training) and
    today's uncached (as ORCA computes every call)."""
    x_s, y_s, x_t, y_t = darcy_like_features(5000)
    theirs, previous, rows = orca_loss(orca), previous_solver(), {}
    for inner in ("exact", "gaussian"):
        options = dict(inner=inner, entropic_reg=DARCY_EPS)
        today_cache, previous_cache = (cached_source(module, x_s, y_s, inner=inner)[0]
                                       for module in (sinkhorn, previous))
        contenders = {
            "orca": (lambda x: theirs(x_s, y_s, x, y_t, inner == "exact"), None),
            "today_cached": (lambda x: otdd(x_s, y_s, x, y_t, source=today_cache, **options), sinkhorn),
            "previous_cached": (lambda x: otdd(x_s, y_s, x, y_t, source=previous_cache, **options), previous),
            "today_uncached": (lambda x: otdd(x_s, y_s, x, y_t, **options), sinkhorn),
        }
        timed = alternating_medians(contenders, x_t, repeats)
        rows[inner] = {f"{name}_s": result["seconds"] for name, result in timed.items()}
        rows[inner].update({f"orca_over_{name}": timed["orca"]["seconds"] / result["seconds"]
                            for name, result in timed.items() if name != "orca"})
        rows[inner].update({f"value_{name}": result["value"] for name, result in timed.items()})
        print(f"orca {inner}: {rows[inner]['orca_over_today_cached']:.1f}x", file=sys.stderr)
    return rows


def print_tables(accuracy: list[dict], schedule: dict, darcy: dict, orca: dict | None) -> None:
    print("accuracy against POT (log-domain Sinkhorn to 1e-8 on the same objective; emd2 at the smallest eps)")
    print(f"{'n':>6}{'dim':>5}{'eps/median':>12}{'iters':>7}{'seconds':>9}{'vs POT':>9}{'vs emd2':>9}{'cap':>5}")
    for row in accuracy:
        emd = f"{row['rel_error_vs_emd2']:.1e}" if "rel_error_vs_emd2" in row else ""
        print(f"{row['n_source']:>6}{row['dim']:>5}{row['eps_ratio']:>12g}{row['iterations']:>7}"
              f"{row['seconds']:>9.3f}{row['rel_error_vs_pot']:>9.1e}{emd:>9}{row['cap_warnings']:>5}")
    print(f"iterations against the schedule's q (eps = 1e-3 x median): q = {schedule['q']}; "
          "self-transport against eps / median " + str(schedule["self_eps_ratio"]))
    print(f"and against the stages' STAGE_LOG_RATIO {schedule['stage_log_ratio']} at eps = 1e-6 x median")
    for by_q, by_stage, self_row in zip(schedule["iterations_by_q"], schedule["iterations_by_stage_ratio"],
                                        schedule["self_iterations"]):
        print(f"  n={by_q['n_source']:>5} dim={by_q['dim']:>4}: by q {by_q['iterations']}; by stage rule "
              f"{by_stage['iterations']}; self {self_row['iterations']}")
    print(f"ORCA's Darcy setting: 5000 source / 128 target, dim 128, {N_CLASSES} classes, eps {DARCY_EPS}, exact "
          "inner, debiased, source cached; per training step")
    print(f"{'solver':<10}{'step s':>8}{'cross s':>9}{'cross c-tr':>11}{'target s':>9}{'target c-tr':>12}"
          f"{'value':>10}")
    for name in ("today", "previous"):
        row = darcy[name]
        print(f"{name:<10}{row['loss_and_backward_s']:>8.3f}{row['cross']['seconds']:>9.3f}"
              f"{row['cross']['c_transforms']:>11}{row['target_self']['seconds']:>9.3f}"
              f"{row['target_self']['c_transforms']:>12}{row['value']:>10.3f}")
    print(f"cap warnings: {darcy['cap_warnings']}")
    if orca:
        print("against ORCA's own otdd (same tensors, value + backward, rounds alternating, medians)")
        for inner, row in orca.items():
            print(f"  {inner:<9} ORCA {row['orca_s']:.2f} s; ours, source cached: today {row['today_cached_s']:.3f} s "
                  f"({row['orca_over_today_cached']:.1f}x), previous solver {row['previous_cached_s']:.3f} s "
                  f"({row['orca_over_previous_cached']:.1f}x); today uncached {row['today_uncached_s']:.3f} s "
                  f"({row['orca_over_today_uncached']:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orca", type=Path, help="a checkout of sjunhongshen/ORCA (its src/otdd is imported)")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (medians)")
    args = parser.parse_args()
    if args.orca and not (args.orca / "src" / "otdd" / "otdd" / "pytorch" / "distance.py").is_file():
        parser.error(f"--orca {args.orca}: no src/otdd/otdd/pytorch/distance.py there; pass the root of an ORCA checkout")
    torch.manual_seed(0)
    env = environment()
    darcy = darcy_rows(args.repeats)
    orca = orca_rows(args.orca, args.repeats) if args.orca else None
    accuracy = accuracy_rows()
    schedule = schedule_rows()
    env["load_average_after"] = list(os.getloadavg())
    print_tables(accuracy, schedule, darcy, orca)
    results = {"accuracy": accuracy, "schedule": schedule, "darcy": darcy, "orca": orca, "previous_commit": PREVIOUS_COMMIT,
               "script": repository_path(Path(__file__).resolve()), "environment": env}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS, strict_json_text(results))


if __name__ == "__main__":
    main()
