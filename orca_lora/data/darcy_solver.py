"""Linear solvers for Darcy flow: -div(a grad u) = f on the unit square, u = 0 on the boundary.

Second-order 5-point finite differences on an n x n node grid that includes the boundary, with
arithmetic face means as in FNO's solve_gwf.m (Li et al., "Fourier Neural Operator for Parametric
PDEs", 2021). `solve_darcy` solves one grid directly (SuperLU); `solve_darcy_pcg` solves a batch by
conjugate gradients preconditioned with the unit-coefficient Laplacian (fast sine transform).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg

PCG_RTOL = 1e-12  # stored fields are float32: this keeps the solver error ~1e4 times below their rounding
PCG_ROUND_OFF_ITERATIONS = 10  # allowed beyond the exact-arithmetic CG bound (float32 preconditioner, round-off)


def _face_means(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face coefficients of the interior nodes' stencils, from node values (..., n, n).

    horizontal[..., i, j] joins nodes (i+1, j) and (i+1, j+1): shape (..., n-2, n-1); vertical[..., i, j]
    joins nodes (i, j+1) and (i+1, j+1): shape (..., n-1, n-2). Each is the arithmetic mean of its two
    node values, as in FNO's solve_gwf.m.
    """
    horizontal = 0.5 * (a[..., 1:-1, :-1] + a[..., 1:-1, 1:])
    vertical = 0.5 * (a[..., :-1, 1:-1] + a[..., 1:, 1:-1])
    return horizontal, vertical


def _check_coefficients(a: np.ndarray, ndim: int, caller: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    shape = "(n, n)" if ndim == 2 else "(N, n, n)"
    if a.ndim != ndim or a.shape[-1] != a.shape[-2] or a.shape[-1] < 3 or a.size == 0:
        raise ValueError(f"{caller} needs square coefficient grids {shape} with n >= 3; got shape {a.shape}")
    if not np.all(a > 0):
        raise ValueError(f"{caller} needs a strictly positive coefficient a (the operator is elliptic only then)")
    return a


def five_point_matrix(a: np.ndarray) -> scipy.sparse.csc_matrix:
    """The sparse matrix of `solve_darcy`'s system: -div(a grad u) on the (n-2)^2 interior nodes, row-major.

    From node values `a` (n, n), n >= 3, a > 0, on a grid that includes the boundary (h = 1/(n-1)):
    row p holds sum_q a_pq / h^2 on the diagonal and -a_pq / h^2 for each interior neighbour q,
    with the face coefficient a_pq = (a_p + a_q) / 2; boundary neighbours (u = 0) drop out.
    """
    a = _check_coefficients(a, 2, "five_point_matrix")
    n = a.shape[0]
    m = n - 2
    horizontal, vertical = _face_means(a)
    diagonal = horizontal[:, :-1] + horizontal[:, 1:] + vertical[:-1] + vertical[1:]
    east = -horizontal[:, 1:].copy()
    east[:, -1] = 0.0  # the last node of a row has no interior neighbour to its right
    south = -vertical[1:-1].ravel()
    bands = {0: diagonal.ravel(), 1: east.ravel()[:-1], -1: east.ravel()[:-1], m: south, -m: south}
    bands = {offset: band for offset, band in bands.items() if band.size}  # a 3 x 3 grid has one unknown
    matrix = scipy.sparse.diags(list(bands.values()), list(bands), format="csc") * (n - 1) ** 2
    matrix.eliminate_zeros()
    return matrix


def solve_darcy(a: np.ndarray, forcing: float = 1.0) -> np.ndarray:
    """Solve -div(a grad u) = forcing on (0,1)^2 with u = 0 on the boundary, by a sparse direct solve.

    `a` holds node values on an n x n grid that includes the boundary (h = 1/(n-1), the layout of
    the FNO .mat files). Second-order 5-point finite differences on the interior nodes:

        sum over the 4 neighbours q of p:  a_{pq} (u_p - u_q) / h^2 = forcing,

    with the face coefficient a_{pq} = (a_p + a_q) / 2, the arithmetic mean of the two node values
    (as in FNO's solve_gwf.m). SuperLU factorisation; the reference for `solve_darcy_pcg`.
    Returns u on the n x n grid, zero on the boundary.
    """
    a = _check_coefficients(a, 2, "solve_darcy")
    n = a.shape[0]
    # The operator is symmetric positive definite: a symmetric fill-reducing ordering and no
    # pivoting make SuperLU about 1.7x faster at 421 x 421 than spsolve's defaults.
    lu = scipy.sparse.linalg.splu(
        five_point_matrix(a), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}
    )
    interior = lu.solve(np.full((n - 2) ** 2, float(forcing)))
    u = np.zeros((n, n))
    u[1:-1, 1:-1] = interior.reshape(n - 2, n - 2)
    return u


def laplacian_eigenvalues(n: int) -> np.ndarray:
    """Eigenvalues (n-2, n-2) of the unit-coefficient 5-point -Laplacian on the interior of an n x n grid, float64.

    Dirichlet boundary, scaled by 1/h^2 = (n-1)^2; the orthonormal 2-D DST-I (`sine_transform`)
    diagonalises it with lambda_jk = 4 (n-1)^2 (sin^2(j pi / (2(n-1))) + sin^2(k pi / (2(n-1)))),
    j, k = 1..n-2, eigenvector sin(j pi x) sin(k pi y) at the nodes (LeVeque, "Finite Difference
    Methods for Ordinary and Partial Differential Equations", 2007, section 3.4).
    """
    if n < 3:
        raise ValueError(f"laplacian_eigenvalues needs a grid of n >= 3 nodes per side; got {n}")
    half_angles = np.sin(np.arange(1, n - 1) * np.pi / (2 * (n - 1))) ** 2
    return 4.0 * (n - 1) ** 2 * (half_angles[:, None] + half_angles[None, :])


def sine_transform(values: np.ndarray) -> np.ndarray:
    """Orthonormal 2-D DST-I over the last two axes: symmetric and orthogonal, so its own inverse."""
    return scipy.fft.dstn(values, type=1, axes=(-2, -1), norm="ortho")


@functools.lru_cache(maxsize=8)
def _inverse_laplacian_eigenvalues(n: int) -> np.ndarray:
    """1 / `laplacian_eigenvalues(n)` in float32, for the preconditioner."""
    return (1.0 / laplacian_eigenvalues(n)).astype(np.float32)


def _unit_laplacian_solve(residual: np.ndarray) -> np.ndarray:
    """L^{-1} r for a batch (N, m, m) by the fast sine transform: DST-I, divide by the eigenvalues, DST-I.

    In float32 (twice as fast): the preconditioner only steers CG's search directions, while the
    residuals and iterates stay float64.
    """
    spectrum = scipy.fft.dstn(residual.astype(np.float32), type=1, axes=(1, 2), norm="ortho", overwrite_x=True)
    spectrum *= _inverse_laplacian_eigenvalues(residual.shape[-1] + 2)
    return scipy.fft.dstn(spectrum, type=1, axes=(1, 2), norm="ortho", overwrite_x=True).astype(np.float64)


class _FluxOperator:
    """u -> -div(a grad u) on the interior nodes of a batch, as differences of face fluxes.

    The operator of `solve_darcy` (same face means, same 1/h^2 scaling) without a matrix: with the
    flux g = a_face (u_next - u) across each face, the row of node p is g_before - g_after summed
    over both axes. Work arrays are allocated once and reused by every call.
    """

    def __init__(self, a: np.ndarray) -> None:
        scale = (a.shape[-1] - 1) ** 2
        horizontal, vertical = _face_means(a)
        self.horizontal, self.vertical = horizontal * scale, vertical * scale
        self.padded = np.zeros(a.shape)  # u with its zero boundary
        self.flux_h, self.flux_v = np.empty_like(horizontal), np.empty_like(vertical)

    def __call__(self, u: np.ndarray, out: np.ndarray) -> np.ndarray:
        padded, flux_h, flux_v = self.padded, self.flux_h, self.flux_v
        padded[:, 1:-1, 1:-1] = u
        np.multiply(self.horizontal, np.subtract(padded[:, 1:-1, 1:], padded[:, 1:-1, :-1], out=flux_h), out=flux_h)
        np.multiply(self.vertical, np.subtract(padded[:, 1:, 1:-1], padded[:, :-1, 1:-1], out=flux_v), out=flux_v)
        np.subtract(flux_h[:, :, :-1], flux_h[:, :, 1:], out=out)
        out += flux_v[:, :-1]
        out -= flux_v[:, 1:]
        return out

    def condition_bound(self) -> float:
        """kappa = a_max / a_min over the faces: a_min L <= A <= a_max L bounds cond(L^{-1} A) by it."""
        return max(self.horizontal.max(), self.vertical.max()) / min(self.horizontal.min(), self.vertical.min())


@dataclass
class DarcySolution:
    """Solutions u (N, n, n), float64 and zero on the boundary, and the CG iterations each sample took (N,)."""

    u: np.ndarray
    iterations: np.ndarray


def cg_iteration_bound(kappa: float, rtol: float) -> int:
    """Iterations after which PCG's stopping test sqrt(r' L^-1 r / b' L^-1 b) <= rtol must hold, in exact arithmetic.

    CG: ||e_k||_A <= 2 rho^k ||e_0||_A with rho = (sqrt(kappa) - 1) / (sqrt(kappa) + 1) (Saad,
    "Iterative Methods for Sparse Linear Systems", 2nd ed. 2003, section 6.11.3); a_min L <= A <= a_max L
    turns the preconditioned residual ratio into at most sqrt(kappa) times the error ratio:
    k = ceil(log(2 sqrt(kappa) / rtol) / log(1 / rho)).
    """
    rate = (np.sqrt(kappa) - 1.0) / (np.sqrt(kappa) + 1.0)
    if rate <= 0.0:
        return 1
    return max(1, int(np.ceil(np.log(2.0 * np.sqrt(kappa) / rtol) / -np.log(rate))))


def _rowwise_dot(x: np.ndarray, y: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Per-sample inner products of two (N, ...) batches, using `work` (their shape) for the products.

    Each row is summed on its own (numpy's pairwise sum along a contiguous axis), so a sample's value
    does not depend on the rest of the batch; einsum's blocking made it depend on it, and a threaded
    BLAS dot was also 50x slower on this 2-core machine while other processes kept the cores busy.
    """
    return np.multiply(x, y, out=work).reshape(len(x), -1).sum(axis=1)


def solve_darcy_pcg(a: np.ndarray, forcing: float = 1.0, rtol: float = PCG_RTOL) -> DarcySolution:
    """Solve `solve_darcy`'s system for a batch of coefficients (N, n, n) by preconditioned conjugate gradients.

    Preconditioner: the unit-coefficient Laplacian L, inverted exactly by the fast sine transform.
    Every face coefficient lies in [a_min, a_max], so cond(L^{-1} A) <= kappa = a_max / a_min (4 for
    the 3/12 fields) whatever the resolution, and the iteration count does not grow with n
    (see `cg_iteration_bound`). A sample stops when sqrt(r' L^-1 r) <= rtol sqrt(b' L^-1 b), which
    bounds its relative error in the energy norm by sqrt(kappa) rtol. Converged samples are frozen
    (step 0), so each result is the one it would get alone in the batch.
    """
    a = _check_coefficients(a, 3, "solve_darcy_pcg")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"solve_darcy_pcg needs 0 < rtol < 1; got {rtol}")
    operator = _FluxOperator(a)
    kappa = operator.condition_bound()
    limit = cg_iteration_bound(kappa, rtol) + PCG_ROUND_OFF_ITERATIONS
    n_samples, m = a.shape[0], a.shape[-1] - 2
    x, residual = np.zeros((n_samples, m, m)), np.full((n_samples, m, m), float(forcing))
    direction = _unit_laplacian_solve(residual)
    product, scratch = np.empty_like(x), np.empty_like(x)
    rz = _rowwise_dot(residual, direction, scratch)
    stop = rtol**2 * rz
    iterations = np.zeros(n_samples, dtype=np.int64)
    for _ in range(limit):
        active = rz > stop
        if not active.any():
            break
        iterations += active
        operator(direction, out=product)
        curvature = _rowwise_dot(direction, product, scratch)
        alpha = np.divide(rz, curvature, out=np.zeros(n_samples), where=active)[:, None, None]
        x += np.multiply(alpha, direction, out=scratch)
        residual -= np.multiply(alpha, product, out=scratch)
        z = _unit_laplacian_solve(residual)
        rz_next = _rowwise_dot(residual, z, scratch)
        beta = np.divide(rz_next, rz, out=np.zeros(n_samples), where=active)[:, None, None]
        direction *= beta
        direction += z
        rz = rz_next
    if np.any(rz > stop):
        raise RuntimeError(
            f"solve_darcy_pcg: {int(np.sum(rz > stop))} sample(s) did not reach rtol={rtol} in {limit} iterations"
            f" (the CG bound for a_max/a_min = {kappa:.3g}, plus {PCG_ROUND_OFF_ITERATIONS}); raise rtol or use"
            " solve_darcy"
        )
    u = np.zeros(a.shape)
    u[:, 1:-1, 1:-1] = x
    return DarcySolution(u=u, iterations=iterations)
