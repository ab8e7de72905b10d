"""Linear PDE operators on one input law: Poisson, Helmholtz and heat, all from the same GRF field f.

On the unit square with u = 0 on the boundary, on an n x n node grid that includes the boundary
(h = 1/(n-1), Darcy's layout), with the 5-point -Laplacian L_h on the interior nodes:

    poisson    -Laplace u = f                 u = L_h^-1 f
    helmholtz  -Laplace u - k^2 u = f         u = (L_h - k^2)^-1 f,  k^2 < lambda_11 (coercive)
    heat       u_t = Laplace u, u(0) = f      u(T) = exp(-T L_h) f   (exact in time)

The orthonormal DST-I diagonalises L_h (`darcy_solver.laplacian_eigenvalues`), so each solve is
two sine transforms and a division: O(n^2 log n), second-order accurate in h.

The input f is Darcy's Gaussian random field (`darcy.sample_grf`, covariance (-Laplace + 9)^-2,
Li et al. 2021) before the threshold that makes Darcy's coefficient: with the same seed, sample i
is the very field whose sign pattern is Darcy's sample i. Same inputs, different operators.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from orca_lora.data import darcy, darcy_solver

WAVENUMBER_RANGE = (1.0, 4.0)  # k^2 <= 16 < 2 pi^2 ~ 19.7, the first Dirichlet eigenvalue: coercive
OPERATORS = ("poisson", "helmholtz", "heat")


def _check_fields(f: np.ndarray, caller: str) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim < 2 or f.shape[-1] != f.shape[-2] or f.shape[-1] < 3:
        raise ValueError(f"{caller} needs square node grids (..., n, n) with n >= 3; got shape {f.shape}")
    return f


def spectral_solve(f: np.ndarray, multiplier: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """u = S diag(m(lambda)) S f on the interior nodes, zero on the boundary; S the orthonormal DST-I.

    `f` holds node values (..., n, n) including the boundary, whose values are not used; `multiplier`
    maps the eigenvalues lambda_jk of L_h to the operator's symbol (1 / lambda for Poisson).
    """
    f = _check_fields(f, "spectral_solve")
    n = f.shape[-1]
    u = np.zeros(f.shape)
    spectrum = darcy_solver.sine_transform(f[..., 1:-1, 1:-1])
    u[..., 1:-1, 1:-1] = darcy_solver.sine_transform(spectrum * multiplier(darcy_solver.laplacian_eigenvalues(n)))
    return u


def solve_poisson(f: np.ndarray) -> np.ndarray:
    """-Laplace u = f, u = 0 on the boundary: u = L_h^-1 f (5-point, second order)."""
    return spectral_solve(f, lambda eigenvalues: 1.0 / eigenvalues)


def solve_helmholtz(f: np.ndarray, wavenumber: float) -> np.ndarray:
    """-Laplace u - k^2 u = f, u = 0 on the boundary: u = (L_h - k^2)^-1 f.

    Coercive (and well conditioned) while k^2 stays below the smallest eigenvalue of L_h,
    lambda_11 = 8 (n-1)^2 sin^2(pi / (2(n-1))) -> 2 pi^2; k in [1, 4] keeps k^2 <= 16 below it
    for every grid of n >= 4 nodes (lambda_11 = 18 at n = 4).
    """
    f = _check_fields(f, "solve_helmholtz")
    smallest = darcy_solver.laplacian_eigenvalues(f.shape[-1])[0, 0]
    if wavenumber**2 >= smallest:
        raise ValueError(f"solve_helmholtz: k^2 = {wavenumber**2:.3g} must stay below the first Dirichlet eigenvalue "
                         f"{smallest:.3g} of this {f.shape[-1]}-node grid (lower task.wavenumber or refine the grid)")
    return spectral_solve(f, lambda eigenvalues: 1.0 / (eigenvalues - wavenumber**2))


def solve_heat(f: np.ndarray, time: float) -> np.ndarray:
    """u_t = Laplace u on (0, T], u(0) = f, u = 0 on the boundary: u(T) = exp(-T L_h) f.

    The semi-discrete system u' = -L_h u integrated exactly, mode by mode: the sine mode (j, k)
    decays as exp(-lambda_jk T), so the only error is the spatial one, second order in h.
    """
    if time <= 0:
        raise ValueError(f"solve_heat needs a time T > 0; got {time}")
    return spectral_solve(f, lambda eigenvalues: np.exp(-time * eigenvalues))


def solve_operator(name: str, f: np.ndarray, wavenumber: float, time: float) -> np.ndarray:
    """The solution of operator `name` (one of OPERATORS) for inputs f (..., n, n)."""
    if name == "poisson":
        return solve_poisson(f)
    if name == "helmholtz":
        return solve_helmholtz(f, wavenumber)
    if name == "heat":
        return solve_heat(f, time)
    raise ValueError(f"unknown PDE operator {name!r}; choose one of {', '.join(OPERATORS)}")


def generate_pde(name: str, n_samples: int, resolution: int, seed: int, *, wavenumber: float,
                 time: float) -> tuple[np.ndarray, np.ndarray]:
    """(f, u), float32 (n_samples, s, s): Darcy's continuous GRF inputs and operator `name`'s solutions.

    f is drawn as `generate_darcy` draws its fields (`sample_grf` from default_rng(seed), alpha = 2,
    tau = 3), so sample i does not depend on n_samples and is shared by all three operators.
    """
    if n_samples < 1 or resolution < 4:
        raise ValueError(f"generate_pde needs n_samples >= 1 and resolution >= 4; got {n_samples}, {resolution}")
    f = darcy.sample_grf(n_samples, resolution, np.random.default_rng(seed))
    u = solve_operator(name, f, wavenumber, time)
    return f.astype(np.float32), u.astype(np.float32)
