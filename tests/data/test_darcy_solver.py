import numpy as np
import pytest

from orca_lora.data import darcy_solver
from orca_lora.data.darcy import sample_grf
from orca_lora.data.darcy_solver import cg_iteration_bound, five_point_matrix, solve_darcy, solve_darcy_pcg

POISSON_CENTRE = 0.07367  # u(1/2, 1/2) for -Laplace u = 1 on the unit square, u = 0 on the boundary


def test_poisson_centre_value():
    n = 64
    u = solve_darcy(np.ones((n, n)))
    # 1/2 lies halfway between nodes 31 and 32 (h = 1/63): bilinear interpolation is their mean.
    centre = u[31:33, 31:33].mean()
    assert abs(centre - POISSON_CENTRE) / POISSON_CENTRE < 0.01


def _residual_by_loop(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """-div(a grad u) at the interior nodes, written out neighbour by neighbour."""
    n = a.shape[0]
    h2 = (1.0 / (n - 1)) ** 2
    residual = np.zeros((n - 2, n - 2))
    for i in range(1, n - 1):
        for j in range(1, n - 1):
            for di, dj in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                face = 0.5 * (a[i, j] + a[i + di, j + dj])
                residual[i - 1, j - 1] += face * (u[i, j] - u[i + di, j + dj]) / h2
    return residual


def test_solution_satisfies_the_stencil_with_arithmetic_face_means():
    rng = np.random.default_rng(0)
    a = rng.uniform(1.0, 10.0, (9, 9))
    u = solve_darcy(a, forcing=2.5)
    np.testing.assert_allclose(_residual_by_loop(a, u), 2.5, rtol=1e-9)
    assert np.all(u[[0, -1], :] == 0) and np.all(u[:, [0, -1]] == 0)


def test_solution_scales_with_forcing_and_inversely_with_coefficient():
    a = np.where(np.random.default_rng(1).standard_normal((12, 12)) > 0, 12.0, 3.0)
    np.testing.assert_allclose(solve_darcy(4.0 * a, forcing=2.0), 0.5 * solve_darcy(a), rtol=1e-10)


@pytest.mark.parametrize("a", [np.ones((5, 6)), np.ones((2, 2)), np.ones(9), np.zeros((5, 5))])
def test_solve_rejects_bad_coefficients(a):
    with pytest.raises(ValueError, match="solve_darcy"):
        solve_darcy(a)


def test_five_point_matrix_applies_the_stencil():
    a = np.random.default_rng(7).uniform(1.0, 10.0, (7, 7))
    u = np.zeros((7, 7))
    u[1:-1, 1:-1] = np.random.default_rng(8).standard_normal((5, 5))
    applied = five_point_matrix(a) @ u[1:-1, 1:-1].ravel()
    np.testing.assert_allclose(applied.reshape(5, 5), _residual_by_loop(a, u), rtol=1e-12)


@pytest.mark.parametrize("a", [np.ones((5, 6)), np.ones((2, 2)), np.zeros((5, 5))])
def test_five_point_matrix_rejects_bad_coefficients(a):
    with pytest.raises(ValueError, match="five_point_matrix"):
        five_point_matrix(a)


def _threshold_fields(n_samples: int, n: int, seed: int) -> np.ndarray:
    return np.where(sample_grf(n_samples, n, np.random.default_rng(seed)) >= 0, 12.0, 3.0)


def _unit_laplacian_by_kron(n: int) -> np.ndarray:
    """Dense 5-point Laplacian on the (n-2)^2 interior nodes from the 1-D second difference, scaled by 1/h^2."""
    m = n - 2
    second_difference = (2 * np.eye(m) - np.eye(m, k=1) - np.eye(m, k=-1)) * (n - 1) ** 2
    return np.kron(second_difference, np.eye(m)) + np.kron(np.eye(m), second_difference)


def test_laplacian_eigenvalues_match_a_dense_eigensolver():
    n = 9
    expected = np.linalg.eigvalsh(_unit_laplacian_by_kron(n))
    eigenvalues = 1.0 / darcy_solver._inverse_laplacian_eigenvalues(n).ravel()
    np.testing.assert_allclose(np.sort(eigenvalues), expected, rtol=1e-6)


def test_unit_laplacian_solve_inverts_the_laplacian():
    n = 11
    residual = np.random.default_rng(3).standard_normal((2, n - 2, n - 2))
    solved = darcy_solver._unit_laplacian_solve(residual)
    for r, x in zip(residual, solved):
        expected = np.linalg.solve(_unit_laplacian_by_kron(n), r.ravel())
        np.testing.assert_allclose(x.ravel(), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_flux_operator_matches_the_assembled_matrix():
    a = np.random.default_rng(4).uniform(1.0, 10.0, (2, 10, 10))
    u = np.random.default_rng(5).standard_normal((2, 8, 8))
    applied = darcy_solver._FluxOperator(a)(u, out=np.empty_like(u))
    for coefficient, field, result in zip(a, u, applied):
        expected = five_point_matrix(coefficient) @ field.ravel()
        np.testing.assert_allclose(result.ravel(), expected, rtol=1e-12, atol=1e-9 * np.abs(expected).max())


def test_cg_iteration_bound_is_the_first_k_meeting_the_rate():
    for kappa, rtol in ((4.0, 1e-12), (4.0, 1e-6), (30.0, 1e-8), (1.5, 1e-3)):
        rho = (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)
        k = 1
        while 2 * np.sqrt(kappa) * rho**k > rtol:
            k += 1
        assert cg_iteration_bound(kappa, rtol) == k
    assert cg_iteration_bound(1.0, 1e-12) == 1


@pytest.mark.parametrize("n", [5, 24, 61])
def test_pcg_agrees_with_the_direct_solve(n):
    a = np.concatenate([_threshold_fields(3, n, seed=n), np.random.default_rng(n).uniform(0.5, 20.0, (1, n, n))])
    solution = solve_darcy_pcg(a, forcing=1.5)
    for coefficient, u in zip(a, solution.u):
        direct = solve_darcy(coefficient, forcing=1.5)
        assert np.linalg.norm(u - direct) / np.linalg.norm(direct) < 1e-10
        assert np.all(u[[0, -1], :] == 0) and np.all(u[:, [0, -1]] == 0)


def test_pcg_satisfies_the_stencil():
    a = np.random.default_rng(6).uniform(1.0, 10.0, (1, 9, 9))
    u = solve_darcy_pcg(a, forcing=2.5).u[0]
    np.testing.assert_allclose(_residual_by_loop(a[0], u), 2.5, rtol=1e-9)


def test_pcg_iterations_stay_within_the_bound_at_every_resolution():
    rtol = 1e-10
    counts = {n: solve_darcy_pcg(_threshold_fields(2, n, seed=1), rtol=rtol).iterations for n in (17, 65, 129)}
    for iterations in counts.values():
        assert np.all(iterations <= cg_iteration_bound(4.0, rtol))
    assert max(c.max() for c in counts.values()) - min(c.min() for c in counts.values()) <= 3


def test_pcg_sample_does_not_depend_on_its_batch():
    a = _threshold_fields(4, 100, seed=2)  # rows longer than numpy's 8192-element buffers, where einsum varies
    batch = solve_darcy_pcg(a)
    assert len(set(batch.iterations)) > 1  # samples stop at different iterations, so freezing is exercised
    for coefficient, u in zip(a, batch.u):
        np.testing.assert_array_equal(solve_darcy_pcg(coefficient[None]).u[0], u)


def test_pcg_zero_forcing_gives_zero():
    solution = solve_darcy_pcg(_threshold_fields(2, 8, seed=0), forcing=0.0)
    assert np.all(solution.u == 0) and np.all(solution.iterations == 0)


@pytest.mark.parametrize(
    "a, rtol, match",
    [
        (np.ones((5, 5)), 1e-12, r"\(N, n, n\)"),
        (np.ones((2, 5, 6)), 1e-12, r"\(N, n, n\)"),
        (np.zeros((0, 5, 5)), 1e-12, r"\(N, n, n\)"),
        (-np.ones((1, 5, 5)), 1e-12, "positive"),
        (np.ones((1, 5, 5)), 0.0, "rtol"),
        (np.ones((1, 5, 5)), 1.0, "rtol"),
    ],
)
def test_pcg_rejects_bad_input(a, rtol, match):
    with pytest.raises(ValueError, match=match):
        solve_darcy_pcg(a, rtol=rtol)


def test_pcg_reports_non_convergence(monkeypatch):
    monkeypatch.setattr(darcy_solver, "cg_iteration_bound", lambda kappa, rtol: 1)
    monkeypatch.setattr(darcy_solver, "PCG_ROUND_OFF_ITERATIONS", 2)
    with pytest.raises(RuntimeError, match=r"did not reach rtol=1e-12 in 3 iterations"):
        solve_darcy_pcg(_threshold_fields(1, 16, seed=0))
