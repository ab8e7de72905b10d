"""Stage-1 alignment loss at ORCA's Darcy setting: ours vs a straightforward reference.

Setting (ORCA, Darcy flow): 5000 source features in 10 classes, 128 target features with 10
k-means pseudo-classes, 128 dims, exact inner OT, entropic reg 0.1, debiased; value + backward.

- ours: `orca_lora.align.distances.otdd`, first call (source side computed too) and steady
  state (source side cached by `prepare_source`, as in training); exact and Gaussian inner.
- reference: what ORCA's otdd library does each step: label-to-label W2^2 by a Python loop over
  class pairs (POT `ot.emd2` for exact, spectral matrix square roots for Gaussian; detached, as
  otdd stores them with `.item()`), then the outer debiased Sinkhorn on the label-augmented
  points by geomloss' `SamplesLoss` with ORCA's schedule (scaling 0.5, blur = sqrt(0.1)) and
  the cost looked up per label pair. POT's `ot.sinkhorn2` cannot stand in for that outer
  step: at eps = 0.1 on squared distances in the hundreds, POT's log-domain Sinkhorn took
  ~450 s for the 5000 x 128 term alone here (and its epsilon-scaling variant did not converge).
- accuracy: both against a fine-schedule run of the same geomloss loss (scaling 0.95).

Features are synthetic: class blobs for the source, a shifted Gaussian for the target;
squared distances ~150-500, so eps = 0.1 is close to unregularised OT.
Run: .venv/bin/python bench/bench_align.py   (writes bench/results/align.json)
"""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import geomloss
import numpy as np
import ot
import scipy
import sklearn
import torch
from geomloss import SamplesLoss

from orca_lora.align.distances import mmd2, otdd, prepare_source
from orca_lora.align.label_costs import label_distances
from orca_lora.align.pseudo_labels import kmeans_labels

N_SOURCE, N_TARGET, DIM, N_CLASSES, EPS = 5000, 128, 128, 10, 0.1
SCALING_SOURCES = (256, 512, 1024, 2048, 4096)
RESULTS = Path(__file__).parent / "results" / "align.json"


def darcy_like_features(n_source: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 0.5 * torch.randn(N_CLASSES, DIM, generator=g)
    y_s = torch.arange(n_source) % N_CLASSES
    x_s = centres[y_s] + 0.5 * torch.randn(n_source, DIM, generator=g)
    x_t = 0.3 + 0.6 * torch.randn(N_TARGET, DIM, generator=g)
    return x_s, y_s, x_t, kmeans_labels(x_t, N_CLASSES, seed=seed)


def timed(fn, repeats: int):
    """Median wall time of `fn()` over `repeats` calls, and its last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def value_and_backward(loss_fn, x_t):
    x = x_t.clone().requires_grad_(True)
    value = loss_fn(x)
    value.backward()
    return value.item()


# ---------------------------------------------------------------------------------------------
# Reference: ORCA's otdd recipe


def loop_label_distances(x_a, y_a, x_b, y_b, inner: str) -> np.ndarray:
    classes_a = [x_a[y_a == c].double().numpy() for c in torch.unique(y_a)]
    classes_b = [x_b[y_b == c].double().numpy() for c in torch.unique(y_b)]
    if inner == "exact":
        return np.array([[ot.emd2(ot.unif(len(a)), ot.unif(len(b)), ot.dist(a, b))
                          for b in classes_b] for a in classes_a])
    # Spectral square roots, precomputed per class of a, as otdd's efficient_pwdist_gauss does.
    roots = [psd_sqrt(np.cov(a, rowvar=False)) for a in classes_a]
    costs = np.zeros((len(classes_a), len(classes_b)))
    for i, (a, root) in enumerate(zip(classes_a, roots)):
        for j, b in enumerate(classes_b):
            s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
            cross = psd_sqrt(root @ s2 @ root)
            costs[i, j] = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * cross)
    return np.maximum(costs, 0.0)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.maximum(eigenvalues, 0.0))) @ eigenvectors.T


def reference_otdd(x_s, y_s, x_t, y_t, inner: str, scaling: float = 0.5) -> torch.Tensor:
    """ORCA's otdd: loops for W2^2 between all labels, then geomloss on augmented points."""
    k_s, k_t = len(torch.unique(y_s)), len(torch.unique(y_t))
    w = np.zeros((k_s + k_t, k_s + k_t))
    w[:k_s, :k_s] = loop_label_distances(x_s, y_s, x_s, y_s, inner)
    w[:k_s, k_s:] = loop_label_distances(x_s, y_s, x_t.detach(), y_t, inner)
    w[k_s:, :k_s] = w[:k_s, k_s:].T
    w[k_s:, k_s:] = loop_label_distances(x_t.detach(), y_t, x_t.detach(), y_t, inner)
    w = torch.as_tensor(w, dtype=x_t.dtype)

    def augmented_cost(z1, z2):
        f1, f2 = z1[..., :-1], z2[..., :-1]
        sq = (f1 * f1).sum(-1)[..., :, None] + (f2 * f2).sum(-1)[..., None, :] - 2 * f1 @ f2.mT
        return sq + w[z1[..., -1].long()[..., :, None], z2[..., -1].long()[..., None, :]]

    source = torch.cat([x_s, torch.unique(y_s, return_inverse=True)[1][:, None].to(x_s.dtype)], 1)
    target_labels = torch.unique(y_t, return_inverse=True)[1][:, None] + k_s
    target = torch.cat([x_t, target_labels.to(x_t.dtype)], 1)
    loss = SamplesLoss("sinkhorn", p=2, blur=EPS**0.5, debias=True, scaling=scaling,
                       cost=augmented_cost, backend="tensorized")
    return loss(source, target)


# ---------------------------------------------------------------------------------------------
# Measurements


def loss_timing(loss_fn, x_t, repeats: int):
    """(median seconds, value) of `loss_fn(x)` plus its backward, x a fresh copy of x_t."""
    return timed(lambda: value_and_backward(loss_fn, x_t), repeats)


def darcy_timings(repeats: int) -> dict:
    x_s, y_s, x_t, y_t = darcy_like_features(N_SOURCE)
    rows = {}
    for inner in ("exact", "gaussian"):
        options = dict(inner=inner, entropic_reg=EPS)
        cache = prepare_source(x_s, y_s, **options)
        first = loss_timing(lambda x: otdd(x_s, y_s, x, y_t, **options), x_t, 1)
        steady = loss_timing(lambda x: otdd(x_s, y_s, x, y_t, source=cache, **options), x_t,
                             2 * repeats)
        reference = loss_timing(lambda x: reference_otdd(x_s, y_s, x, y_t, inner), x_t, repeats)
        fine = value_and_backward(lambda x: reference_otdd(x_s, y_s, x, y_t, inner, 0.95), x_t)
        loop_w = loop_label_distances(x_s, y_s, x_t, y_t, inner)
        ours_w = label_distances(x_s.double(), y_s, x_t.double(), y_t, inner).numpy()
        rows[inner] = {
            "ours_first_s": first[0], "ours_steady_s": steady[0], "reference_s": reference[0],
            "value_ours": steady[1], "value_reference": reference[1], "value_fine": fine,
            "rel_err_ours_vs_fine": abs(steady[1] - fine) / abs(fine),
            "rel_err_reference_vs_fine": abs(reference[1] - fine) / abs(fine),
            "label_costs_max_rel_diff": float(np.max(np.abs(ours_w - loop_w) / np.abs(loop_w))),
        }
    rows["mmd"] = {"ours_steady_s": loss_timing(lambda x: mmd2(x_s, x), x_t, repeats)[0]}
    return rows


SCALING_LOSSES = {  # name -> loss of (source features, labels, cache, target x, target labels)
    "otdd exact": lambda x_s, y_s, cache, x, y_t: otdd(x_s, y_s, x, y_t, entropic_reg=EPS, source=cache),
    "otdd gaussian": lambda x_s, y_s, cache, x, y_t: otdd(x_s, y_s, x, y_t, inner="gaussian",
                                                          entropic_reg=EPS, source=cache),
    "mmd": lambda x_s, y_s, cache, x, y_t: mmd2(x_s, x),
}


def scaling_timings(repeats: int) -> dict:
    """Steady-state loss + backward against the sample count n (n source features, n target
    features; the source side cached as in training), and the log-log slope of time on n."""
    steady: dict[str, list[float]] = {name: [] for name in SCALING_LOSSES}
    for n in SCALING_SOURCES:
        x_s, y_s, _, _ = darcy_like_features(n)
        x_t = 0.3 + 0.6 * torch.randn(n, DIM, generator=torch.Generator().manual_seed(1))
        y_t = kmeans_labels(x_t, N_CLASSES, seed=0)
        caches = {"otdd exact": prepare_source(x_s, y_s, entropic_reg=EPS),
                  "otdd gaussian": prepare_source(x_s, y_s, inner="gaussian", entropic_reg=EPS), "mmd": None}
        for name, loss in SCALING_LOSSES.items():
            steady[name].append(loss_timing(lambda x: loss(x_s, y_s, caches[name], x, y_t), x_t, repeats)[0])
    logs = np.log(SCALING_SOURCES)
    return {"n": list(SCALING_SOURCES), "steady_s": steady,
            "exponent": {name: float(np.polyfit(logs, np.log(times), 1)[0]) for name, times in steady.items()}}


def environment() -> dict:
    return {
        "torch": torch.__version__, "pot": ot.__version__, "geomloss": geomloss.__version__,
        "numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
    }


def print_table(darcy: dict, scaling: dict, env: dict) -> None:
    print(f"ORCA Darcy setting: {N_SOURCE} source / {N_TARGET} target, dim {DIM}, eps {EPS}, "
          f"debiased; value + backward, median times")
    print(f"{'loss':<16}{'ours first':>12}{'ours steady':>13}{'reference':>11}"
          f"{'ref/steady':>12}{'ref/first':>11}{'err ours':>10}{'err ref':>9}")
    for inner in ("exact", "gaussian"):
        r = darcy[inner]
        print(f"{'otdd ' + inner:<16}{r['ours_first_s']:>11.3f}s{r['ours_steady_s']:>12.3f}s"
              f"{r['reference_s']:>10.2f}s{r['reference_s'] / r['ours_steady_s']:>11.1f}x"
              f"{r['reference_s'] / r['ours_first_s']:>10.1f}x"
              f"{r['rel_err_ours_vs_fine']:>10.1e}{r['rel_err_reference_vs_fine']:>9.1e}")
    print(f"{'mmd2':<16}{'':>12}{darcy['mmd']['ours_steady_s']:>12.3f}s")
    label_diffs = ", ".join(f"{inner} {darcy[inner]['label_costs_max_rel_diff']:.1e}"
                            for inner in ("exact", "gaussian"))
    print("err = relative difference to geomloss SamplesLoss with scaling 0.95; "
          f"label costs vs the loop: max relative difference {label_diffs}")
    print(f"steady state, n source = n target: {'loss':<14}" + "".join(f"{n:>9}" for n in scaling["n"])
          + f"{'exponent':>10}")
    for name, times in scaling["steady_s"].items():
        print(f"{'':<35}{name:<14}" + "".join(f"{t:>8.3f}s" for t in times) + f"{scaling['exponent'][name]:>10.2f}")
    print(f"0.4 s target (exact, steady state): "
          f"{'met' if darcy['exact']['ours_steady_s'] <= 0.4 else 'NOT met'}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env.items()))


def main(repeats: int = 3) -> None:
    env = environment()
    darcy = darcy_timings(repeats)
    scaling = scaling_timings(repeats)
    env["load_average_after"] = os.getloadavg()
    print_table(darcy, scaling, env)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"darcy": darcy, "scaling": scaling, "environment": env},
                                  indent=2))


if __name__ == "__main__":
    main()
