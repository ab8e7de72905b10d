import numpy as np
import pytest

from orca_lora.data import darcy, darcy_solver, pde

RESOLUTIONS = (17, 33, 65)  # h = 1/16, 1/32, 1/64


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n), indexing="ij")


def manufactured(n: int) -> tuple[np.ndarray, np.ndarray]:
    """u = x(1-x) y(1-y) e^x (not an eigenvector of the discrete operator) and -Laplace u:
    e^x (x(x+3) y(1-y) + 2x(1-x))."""
    x, y = _grid(n)
    u = x * (1 - x) * y * (1 - y) * np.exp(x)
    minus_laplace_u = np.exp(x) * (x * (x + 3) * y * (1 - y) + 2 * x * (1 - x))
    return u, minus_laplace_u


def _convergence(errors: list[float]) -> list[float]:
    return [coarse / fine for coarse, fine in zip(errors, errors[1:])]


def test_poisson_converges_at_second_order_to_a_manufactured_solution():
    errors = []
    for n in RESOLUTIONS:
        u, f = manufactured(n)
        errors.append(np.abs(pde.solve_poisson(f) - u).max())
    ratios = _convergence(errors)
    assert errors[-1] < 1e-5
    assert all(3.8 < ratio < 4.2 for ratio in ratios), (errors, ratios)


@pytest.mark.parametrize("wavenumber", [1.0, 4.0])
def test_helmholtz_converges_at_second_order_to_a_manufactured_solution(wavenumber):
    errors = []
    for n in RESOLUTIONS:
        u, minus_laplace_u = manufactured(n)
        errors.append(np.abs(pde.solve_helmholtz(minus_laplace_u - wavenumber**2 * u, wavenumber) - u).max())
    ratios = _convergence(errors)
    assert all(3.8 < ratio < 4.2 for ratio in ratios), (errors, ratios)


def test_heat_decays_a_sine_mode_exactly_and_converges_to_the_continuous_decay():
    time, (j, k) = 0.02, (1, 2)
    errors = []
    for n in RESOLUTIONS:
        x, y = _grid(n)
        mode = np.sin(j * np.pi * x) * np.sin(k * np.pi * y)  # an eigenvector of the discrete operator too
        u = pde.solve_heat(mode, time)
        discrete = darcy_solver.laplacian_eigenvalues(n)[j - 1, k - 1]
        np.testing.assert_allclose(u, np.exp(-discrete * time) * mode, atol=1e-13)  # exact in time
        errors.append(np.abs(u - np.exp(-np.pi**2 * (j**2 + k**2) * time) * mode).max())  # continuous decay
    ratios = _convergence(errors)
    assert all(3.8 < ratio < 4.2 for ratio in ratios), (errors, ratios)


def test_solvers_match_their_sparse_operator():
    n = 9
    f = np.random.default_rng(0).standard_normal((n, n))
    matrix = darcy_solver.five_point_matrix(np.ones((n, n))).toarray()
    interior = f[1:-1, 1:-1].ravel()
    np.testing.assert_allclose(pde.solve_poisson(f)[1:-1, 1:-1].ravel(), np.linalg.solve(matrix, interior),
                               atol=1e-12)
    shifted = matrix - 9.0 * np.eye(len(matrix))
    np.testing.assert_allclose(pde.solve_helmholtz(f, 3.0)[1:-1, 1:-1].ravel(), np.linalg.solve(shifted, interior),
                               atol=1e-12)
    assert np.all(pde.solve_poisson(f)[[0, -1]] == 0) and np.all(pde.solve_poisson(f)[:, [0, -1]] == 0)


def test_helmholtz_refuses_a_wavenumber_past_the_first_eigenvalue():
    with pytest.raises(ValueError, match="task.wavenumber"):
        pde.solve_helmholtz(np.ones((3, 3)), 4.0)  # lambda_11 = 16 on a 3-node grid
    with pytest.raises(ValueError, match="T > 0"):
        pde.solve_heat(np.ones((5, 5)), 0.0)


def test_the_three_operators_share_darcys_unthresholded_fields():
    fields = {name: pde.generate_pde(name, 5, 16, seed=3, wavenumber=3.0, time=0.01) for name in pde.OPERATORS}
    inputs = [f for f, _ in fields.values()]
    assert all(np.array_equal(inputs[0], f) for f in inputs[1:])
    darcy_fields = darcy.generate_darcy(5, 16, seed=3)
    assert np.array_equal(np.where(inputs[0] >= 0, darcy.HIGH_COEFF, darcy.LOW_COEFF), darcy_fields.a)
    outputs = [u for _, u in fields.values()]
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[0], outputs[2])
