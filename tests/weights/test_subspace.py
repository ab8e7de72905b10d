import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orca_lora.weights.subspace import (best_rank_error, energy_rank, random_subspace_similarity,
                                        rank_diagnostic, right_singular_vectors, singular_values,
                                        subspace_similarity)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(gaussian(n, n, seed=seed)).Q


def test_right_singular_vectors_are_orthonormal_and_span_the_rows():
    matrix = gaussian(4, 10)
    vectors = right_singular_vectors(matrix)
    assert vectors.shape == (10, 4)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(matrix @ vectors @ vectors.T, matrix)
    # ordered by singular value: |A v_k| = sigma_k
    torch.testing.assert_close(torch.linalg.vector_norm(matrix @ vectors, dim=0), torch.linalg.svdvals(matrix))


def test_identical_matrices_have_similarity_one_on_the_diagonal():
    matrix = gaussian(6, 20)
    phi = subspace_similarity(matrix, matrix)
    assert phi.shape == (6, 6)
    torch.testing.assert_close(phi.diagonal(), torch.ones(6, dtype=torch.float64))


def test_orthogonal_subspaces_have_similarity_zero():
    basis = orthogonal(12, seed=1)
    first = gaussian(3, 3, seed=2) @ basis[:3]  # rows in the span of basis vectors 0..2
    second = gaussian(5, 5, seed=3) @ basis[3:8]
    torch.testing.assert_close(subspace_similarity(first, second), torch.zeros(3, 5, dtype=torch.float64))


def test_random_subspaces_average_the_chance_level():
    dim, draws = 16, 400
    grids = torch.stack([subspace_similarity(gaussian(3, dim, seed=2 * k), gaussian(5, dim, seed=2 * k + 1))
                         for k in range(draws)])
    mean, standard_error = grids.mean(0), grids.std(0) / draws ** 0.5
    expected = torch.tensor([[i * j / (dim * min(i, j)) for j in range(1, 6)] for i in range(1, 4)],
                            dtype=torch.float64)
    assert torch.all((mean - expected).abs() < 4 * standard_error)
    chance = [[random_subspace_similarity(i, j, dim) for j in range(1, 6)] for i in range(1, 4)]
    torch.testing.assert_close(torch.tensor(chance, dtype=torch.float64), expected)


def test_only_the_row_space_matters_under_invertible_mixing():
    first, second = gaussian(4, 15, seed=4), gaussian(6, 15, seed=5)
    phi = subspace_similarity(first, second)
    mixing = gaussian(4, 4, seed=6) + 3 * torch.eye(4, dtype=torch.float64)
    assert torch.linalg.matrix_rank(mixing) == 4
    # the whole row space is kept by any invertible R; its top-i parts only by an orthogonal R
    torch.testing.assert_close(subspace_similarity(mixing @ first, second)[-1], phi[-1])
    torch.testing.assert_close(subspace_similarity(orthogonal(4, seed=7) @ first, second), phi)


def test_matches_principal_angles_from_scipy():
    first, second = gaussian(5, 9, seed=8).numpy(), gaussian(3, 9, seed=9).numpy()
    phi = subspace_similarity(torch.from_numpy(first), torch.from_numpy(second)).numpy()
    v1, v2 = np.linalg.svd(first)[2].T, np.linalg.svd(second)[2].T
    for i in range(1, 6):
        for j in range(1, 4):
            angles = scipy.linalg.subspace_angles(v1[:, :i], v2[:, :j])  # min(i, j) principal angles
            assert phi[i - 1, j - 1] == pytest.approx(np.sum(np.cos(angles) ** 2) / min(i, j), abs=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(6, 12), st.integers(0, 10_000))
def test_similarity_lies_in_the_unit_interval(r1, r2, dim, seed):
    phi = subspace_similarity(gaussian(r1, dim, seed=seed), gaussian(r2, dim, seed=seed + 1))
    assert phi.shape == (r1, r2)
    assert torch.all(phi >= -1e-12) and torch.all(phi <= 1 + 1e-12)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="different widths"):
        subspace_similarity(gaussian(2, 8), gaussian(2, 9))
    with pytest.raises(ValueError, match="transpose"):
        subspace_similarity(gaussian(9, 4), gaussian(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        right_singular_vectors(gaussian(8))
    with pytest.raises(ValueError, match=r"\[1, dim\]"):
        random_subspace_similarity(5, 1, 4)


def planted(rank: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-`rank` matrix with singular values 5, 4, ... plus Gaussian noise, and the noise."""
    left, right = orthogonal(40, seed)[:, :rank], orthogonal(30, seed + 1)[:, :rank]
    sigma = torch.arange(5.0, 5.0 - rank, -1.0, dtype=torch.float64)
    perturbation = noise * gaussian(40, 30, seed=seed + 2)
    return left @ torch.diag(sigma) @ right.T + perturbation, perturbation


def test_singular_values_match_numpy():
    matrix = gaussian(7, 5)
    np.testing.assert_allclose(singular_values(matrix).numpy(), np.linalg.svd(matrix.numpy(), compute_uv=False))


def test_planted_low_rank_change_has_minimal_rank_k():
    change, noise = planted(rank=3, noise=1e-6)
    sigma = singular_values(change)
    assert energy_rank(sigma, 0.999) == 3
    assert energy_rank(sigma, 0.5) == 1  # 25 / (25 + 16 + 9) = 0.5
    # Weyl: sigma_4(L + N) <= sigma_4(L) + ||N||_2 = ||N||_2
    assert 0 < best_rank_error(sigma, 3) <= torch.linalg.matrix_norm(noise, ord=2)
    assert best_rank_error(sigma, 2) == pytest.approx(3.0, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 1.0), st.integers(0, 10_000))
def test_energy_rank_matches_a_loop(fraction, seed):
    sigma = singular_values(gaussian(8, 6, seed=seed))
    energy = sigma.numpy() ** 2
    expected = next(r for r in range(1, 7) if energy[:r].sum() / energy.sum() >= fraction or r == 6)
    assert energy_rank(sigma, fraction) == expected


def test_energy_rank_edge_cases():
    assert energy_rank(singular_values(torch.zeros(4, 3)), 0.9) == 0
    assert energy_rank(singular_values(gaussian(6, 4)), 1.0) == 4
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="energy_fraction"):
            energy_rank(torch.ones(3), bad)


def test_best_rank_error_is_the_truncated_svd_residual():
    change = gaussian(9, 6, seed=3)
    u, s, vt = np.linalg.svd(change.numpy(), full_matrices=False)
    sigma = singular_values(change)
    for rank in range(7):
        residual = change.numpy() - u[:, :rank] @ np.diag(s[:rank]) @ vt[:rank]
        assert best_rank_error(sigma, rank) == pytest.approx(np.linalg.norm(residual, 2), abs=1e-10)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):  # Eckart-Young: no rank-2 matrix gets closer
        guess = torch.randn(9, 2, generator=generator, dtype=torch.float64) @ torch.randn(
            2, 6, generator=generator, dtype=torch.float64)
        assert torch.linalg.matrix_norm(change - guess, ord=2) >= best_rank_error(sigma, 2)
    with pytest.raises(ValueError, match="rank"):
        best_rank_error(sigma, -1)


def test_rank_diagnostic_collects_the_numbers():
    change, _ = planted(rank=3, noise=1e-6)
    diagnostic = rank_diagnostic(change, rank=2, energy_fraction=0.999)
    assert diagnostic.energy_rank == 3 and diagnostic.rank == 2
    assert diagnostic.rank_error == pytest.approx(3.0, abs=1e-5)
    assert diagnostic.relative_rank_error == pytest.approx(3.0 / 5.0, abs=1e-6)
    assert diagnostic.energy_at_rank == pytest.approx(41 / 50, abs=1e-6)
    assert len(diagnostic.singular_values) == 30
    zero = rank_diagnostic(torch.zeros(5, 4), rank=2, energy_fraction=0.9)
    assert (zero.energy_rank, zero.rank_error, zero.relative_rank_error, zero.energy_at_rank) == (0, 0.0, 0.0, 1.0)
