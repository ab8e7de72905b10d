"""Darcy flow (FNO benchmark): generator, file readers, normalizer and metric.

The PDE is -div(a grad u) = f on (0,1)^2 with u = 0 on the boundary (Li et al., "Fourier Neural
Operator for Parametric PDEs", 2021). Coefficients are thresholded Gaussian random fields:
a = 12 where the field is >= 0, else 3. The linear solvers are in `darcy_solver`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import scipy.fft
import scipy.io
import torch
from torch import nn
from tqdm.auto import tqdm

from orca_lora.data import darcy_solver
from orca_lora.files import cache_is_valid, save_npz_atomic, write_digest

HIGH_COEFF, LOW_COEFF = 12.0, 3.0
SOLVE_BATCH_NODES = 2**20  # grid nodes drawn and solved per batch: ~100 MB of work arrays at any resolution
TQDM_MIN_SAMPLES = 64  # show a progress bar only for runs long enough to want one


@dataclass
class DarcyFields:
    """Coefficients `a` and solutions `u`, float32 arrays of shape (N, s, s) on the same node grid."""

    a: np.ndarray
    u: np.ndarray

    def __post_init__(self) -> None:
        if self.a.ndim != 3 or self.a.shape != self.u.shape:
            raise ValueError(
                f"DarcyFields needs a and u of equal shape (N, s, s); got {self.a.shape} and {self.u.shape}"
            )


# ---------------------------------------------------------------------------------------------
# Generator


def sample_grf(
    n_samples: int, resolution: int, rng: np.random.Generator, alpha: float = 2.0, tau: float = 3.0
) -> np.ndarray:
    """Gaussian random fields with covariance (-Laplace + tau^2 I)^(-alpha), Neumann cosine basis.

    FNO's GRF.m: coef_k = tau^(alpha-1) (pi^2 (k1^2 + k2^2) + tau^2)^(-alpha/2) for k1, k2 in
    0..s-1, L = s * coef * xi with xi ~ N(0, 1), L[0, 0] = 0 (zero mean), u = idct2(L) (MATLAB's
    orthonormal inverse DCT-II). Returns float64 (n_samples, s, s).
    """
    if n_samples < 1 or resolution < 2:
        raise ValueError(f"sample_grf needs n_samples >= 1 and resolution >= 2; got {n_samples}, {resolution}")
    k1, k2 = np.meshgrid(np.arange(resolution), np.arange(resolution), indexing="ij")
    coef = tau ** (alpha - 1) * (np.pi**2 * (k1**2 + k2**2) + tau**2) ** (-alpha / 2)
    spectrum = resolution * coef * rng.standard_normal((n_samples, resolution, resolution))
    spectrum[:, 0, 0] = 0.0
    return scipy.fft.idctn(spectrum, type=2, axes=(1, 2), norm="ortho")


def generate_darcy(n_samples: int, resolution: int, seed: int, root: str | Path | None = None) -> DarcyFields:
    """Draw `n_samples` piecewise-constant coefficients (12 where GRF >= 0, else 3) and solve each.

    Deterministic in `seed`; sample i does not depend on `n_samples`. Solved in batches by
    `solve_darcy_pcg` at rtol 1e-12: within ~1e-12 of the direct solve, far below float32's 6e-8,
    so the stored fields match `solve_darcy`'s except for a rare last-bit rounding. With `root`,
    the result is cached at `<root>/darcy/generated_n{N}_r{res}_seed{seed}.npz` and read from
    there on later calls (checked against its content hash; a damaged cache is regenerated).
    """
    if n_samples < 1 or resolution < 3:
        raise ValueError(f"generate_darcy needs n_samples >= 1 and resolution >= 3; got {n_samples}, {resolution}")
    cache = None if root is None else Path(root) / "darcy" / f"generated_n{n_samples}_r{resolution}_seed{seed}.npz"
    if cache is not None and cache_is_valid(cache):
        with np.load(cache) as stored:
            return DarcyFields(a=stored["a"], u=stored["u"])
    rng = np.random.default_rng(seed)
    a = np.empty((n_samples, resolution, resolution), dtype=np.float32)
    u = np.empty_like(a)
    batch = max(1, SOLVE_BATCH_NODES // resolution**2)
    progress = tqdm(total=n_samples, desc="darcy", disable=n_samples < TQDM_MIN_SAMPLES)
    for start in range(0, n_samples, batch):
        coeff = np.where(sample_grf(min(batch, n_samples - start), resolution, rng) >= 0, HIGH_COEFF, LOW_COEFF)
        a[start : start + len(coeff)] = coeff
        u[start : start + len(coeff)] = darcy_solver.solve_darcy_pcg(coeff).u
        progress.update(len(coeff))
    progress.close()
    result = DarcyFields(a=a, u=u)
    if cache is not None:
        save_npz_atomic(cache, a=a, u=u)
        write_digest(cache)
    return result


# ---------------------------------------------------------------------------------------------
# Readers


def _fields_from(path: Path, a: np.ndarray, u: np.ndarray, a_key: str, u_key: str) -> DarcyFields:
    a, u = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(u, dtype=np.float32)
    for key, array in ((a_key, a), (u_key, u)):
        if array.ndim != 3 or array.shape[1] != array.shape[2]:
            raise ValueError(f"{path}: {key!r} should have shape (N, s, s) (channel dim squeezed); got {array.shape}")
    if a.shape != u.shape:
        raise ValueError(f"{path}: {a_key!r} {a.shape} and {u_key!r} {u.shape} should have the same shape")
    if len(a) < 2:
        raise ValueError(f"{path}: holds {len(a)} sample(s); the normalizer and a train / validation split need "
                         "at least 2 (use the full file, not a slice)")
    zero = np.flatnonzero(~np.any(u.reshape(len(u), -1), axis=1))
    if len(zero):  # the relative L2 error divides by |u|: such a sample has no error to measure
        raise ValueError(f"{path}: {u_key!r} is zero everywhere in {len(zero)} sample(s) (first: {zero[0]}); "
                         "the solution field is missing or the file is damaged: fetch it again (data/README.md)")
    return DarcyFields(a=a, u=u)


def _require_keys(path: Path, available, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in available]
    if missing:
        raise KeyError(f"{path}: missing key(s) {missing}; this layout needs {list(keys)}, found {sorted(available)}")


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Darcy file not found: {path}. See data/README.md for where to get it.")
    return path


def read_fno_mat(path: str | Path) -> DarcyFields:
    """FNO / NAS-Bench-360 `piececonst_r421_N1024_smooth*.mat`: keys `coeff`, `sol`, (N, s, s).

    MATLAB v7.3 files are HDF5 (read with h5py, which sees MATLAB's column-major arrays with their
    axes reversed, so they are transposed back); older versions go through scipy.io.loadmat.
    """
    path = _require_file(path)
    keys = ("coeff", "sol")
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as file:
            _require_keys(path, file.keys(), keys)
            a, u = (np.asarray(file[key]).T for key in keys)
    else:
        contents = scipy.io.loadmat(path, variable_names=list(keys))
        # loadmat returns only the asked variables (and its own __header__ etc.): name what the file has
        _require_keys(path, [name for name, _, _ in scipy.io.whosmat(path)], keys)
        a, u = contents["coeff"], contents["sol"]
    return _fields_from(path, a, u, *keys)


def read_pdebench_hdf5(path: str | Path) -> DarcyFields:
    """PDEBench `2D_DarcyFlow_beta*_Train.hdf5`: `nu` (N, s, s) coefficient, `tensor` (N, 1, s, s) solution."""
    path = _require_file(path)
    with h5py.File(path, "r") as file:
        _require_keys(path, file.keys(), ("nu", "tensor"))
        a, u = np.asarray(file["nu"]), np.asarray(file["tensor"])
    if u.ndim == 4 and u.shape[1] == 1:
        u = u[:, 0]
    return _fields_from(path, a, u, "nu", "tensor")


def read_neuraloperator_pt(path: str | Path) -> DarcyFields:
    """neuraloperator `darcy_train_16.pt` etc.: torch.save of {"x": coefficient, "y": solution}, (N, [1,] s, s)."""
    path = _require_file(path)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: expected a torch.save of a dict of tensors ('x', 'y'); {error}") from error
    if not isinstance(contents, dict):
        raise ValueError(f"{path}: expected a dict with keys 'x' and 'y'; got {type(contents).__name__}")
    _require_keys(path, contents.keys(), ("x", "y"))
    a, u = (_squeeze_channel(contents[key]) for key in ("x", "y"))
    return _fields_from(path, a, u, "x", "y")


def _squeeze_channel(field: torch.Tensor) -> np.ndarray:
    array = torch.as_tensor(field).numpy()
    return array[:, 0] if array.ndim == 4 and array.shape[1] == 1 else array


DARCY_READERS: dict[str, Callable[[str | Path], DarcyFields]] = {
    ".mat": read_fno_mat,
    ".hdf5": read_pdebench_hdf5,
    ".h5": read_pdebench_hdf5,
    ".pt": read_neuraloperator_pt,
}


def load_darcy_file(path: str | Path) -> DarcyFields:
    """Read a Darcy file, choosing the layout by suffix (see DARCY_READERS)."""
    path = Path(path)
    reader = DARCY_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unknown Darcy file suffix {path.suffix!r}; supported: {sorted(DARCY_READERS)}")
    try:
        return reader(path)
    except (KeyError, ValueError, FileNotFoundError) as error:
        if str(path) in str(error):  # the readers' own messages already name the file
            raise
        problem = error
    except Exception as error:  # scipy's and h5py's errors for damaged files share no base worth naming
        problem = error
    raise ValueError(f"{path}: cannot be read as a {path.suffix} Darcy file ({type(problem).__name__}: "
                     f"{' '.join(str(problem).split())}); it is truncated or not that format: fetch it again "
                     "(data/README.md)") from None


# ---------------------------------------------------------------------------------------------
# Model-side helpers


def downsample(fields: np.ndarray, factor: int) -> np.ndarray:
    """Keep every `factor`-th node along both spatial axes, `fields[:, ::r, ::r]` (r=5: 421 -> 85)."""
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"downsample factor must be an integer >= 1; got {factor!r}")
    if fields.ndim != 3:
        raise ValueError(f"downsample needs fields of shape (N, s, s); got {fields.shape}")
    # A copy, so the full-resolution array can be freed (1024 x 421 x 421 float32 is 0.7 GB).
    return np.ascontiguousarray(fields[:, ::factor, ::factor])


def darcy_inputs(a: torch.Tensor) -> torch.Tensor:
    """Stack (a, x, y) channels: (N, s, s) -> (N, 3, s, s); x runs along axis 1, y along axis 2, both in [0, 1]."""
    if a.ndim != 3:
        raise ValueError(f"darcy_inputs needs a of shape (N, s1, s2); got {tuple(a.shape)}")
    n, s1, s2 = a.shape
    x = torch.linspace(0, 1, s1, dtype=a.dtype, device=a.device).view(1, s1, 1).expand(n, s1, s2)
    y = torch.linspace(0, 1, s2, dtype=a.dtype, device=a.device).view(1, 1, s2).expand(n, s1, s2)
    return torch.stack([a, x, y], dim=1)


class UnitGaussianNormalizer(nn.Module):
    """Pointwise standardisation over the sample axis: encode(x) = (x - mean) / (std + eps).

    Fit on training samples x of shape (N, ...): mean and unbiased std over N, each of the shape of
    one sample, held as buffers so they follow `.to(device)` and are saved in state dicts (to load
    one, build it from any data of the right sample shape, then `load_state_dict`). eps = 1e-5 and
    the constructor-from-data form as in FNO's utilities3.py.
    """

    def __init__(self, x: torch.Tensor, eps: float = 1e-5) -> None:
        super().__init__()
        if x.ndim < 2 or x.shape[0] < 2:
            raise ValueError(f"UnitGaussianNormalizer needs x of shape (N, ...) with N >= 2; got {tuple(x.shape)}")
        self.register_buffer("mean", x.mean(dim=0))
        self.register_buffer("std", x.std(dim=0))
        self.eps = eps

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-self.mean.ndim :] != self.mean.shape:
            raise ValueError(f"expected samples of shape {tuple(self.mean.shape)}; got a batch {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (x - self.mean) / (self.std + self.eps)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return x * (self.std + self.eps) + self.mean

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mean.shape)}, eps={self.eps}"


def relative_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample relative L2 error ||pred - target||_2 / ||target||_2 over all non-batch dims, shape (N,).

    The metric and loss of FNO (LpLoss with p=2, no reduction).
    """
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(
            f"relative_l2 needs pred and target of equal shape (N, ...); got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    return (pred - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)
