"""Spectral views of learned weight updates: LoRA subspace similarity and the minimal-rank diagnostic.

Subspace similarity (Hu et al. 2021, LoRA sec. 7.2). For two LoRA `A` matrices (r x d_in)
learned on the same frozen model, take the right-singular unitary matrices of A = U S V^T and keep
the columns of V for the top-i singular values, V_i (d_in x i). Then

    phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j)  in [0, 1],

1 when one subspace holds the other, 0 when they are orthogonal. The columns of V span the row
space of A (the input directions the adapter reads), so phi(r1, r2) does not change when A -> R A
for an invertible R; the top-i subspaces for i < r are only kept by orthogonal R.

Minimal rank (Zeng & Lee, "The Expressive Power of Low-Rank Adaptation", Zeng & Lee 2024, Lemma 1).
For an error matrix E = W_target - W0 with singular values sigma_1 >= sigma_2 >= ..., a rank-r update
of one linear layer gets at best

    min_{rank(dW) <= r} ||W0 + dW - W_target||_2 = sigma_{r+1}(E)

(Eckart-Young; the lemma's sigma_{RL+1} with L = 1 layer), and the energy rank is the smallest r
with sum_{k<=r} sigma_k^2 / sum_k sigma_k^2 >= tau.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def right_singular_vectors(matrix: Tensor) -> Tensor:
    """V (d_in x r) of matrix = U S V^T (r x d_in, r <= d_in), columns by decreasing singular value, float64."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D LoRA A matrix (r x d_in), got shape {tuple(matrix.shape)}")
    rows, columns = matrix.shape
    if not 1 <= rows <= columns:
        raise ValueError(f"a LoRA A matrix has 1 <= r <= d_in rows; got shape ({rows}, {columns}), "
                         "pass A (r x d_in), not its transpose")
    return torch.linalg.svd(matrix.detach().double(), full_matrices=False).Vh.T


def subspace_similarity(first: Tensor, second: Tensor) -> Tensor:
    """The grid phi(A1, A2, i, j) for i in 1..r1, j in 1..r2 as an (r1 x r2) float64 tensor.

    Entry [i-1, j-1] is ||V1_i^T V2_j||_F^2 / min(i, j) with V the right singular vectors (Hu et al.
    2021, sec. 7.2). `first` is r1 x d_in and `second` r2 x d_in.
    """
    v1, v2 = right_singular_vectors(first), right_singular_vectors(second)
    if v1.shape[0] != v2.shape[0]:
        raise ValueError(f"the A matrices read inputs of different widths: {tuple(first.shape)} and "
                         f"{tuple(second.shape)}; compare the same module of runs on the same source body")
    # ||V1_i^T V2_j||_F^2 sums the squared overlaps of the first i and first j columns
    overlap = (v1.T @ v2).square().cumsum(0).cumsum(1)
    i = torch.arange(1, v1.shape[1] + 1, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(1, v2.shape[1] + 1, dtype=torch.float64).unsqueeze(0)
    return overlap / torch.minimum(i, j)


def random_subspace_similarity(i: int, j: int, dim: int) -> float:
    """E[phi] for independent uniformly random i- and j-dimensional subspaces of R^dim: max(i, j) / dim.

    E ||P_i P_j||_F^2 = tr(P_i E[P_j]) = tr(P_i) j / dim = i j / dim; dividing by min(i, j) gives it.
    The chance level a learned phi should be read against.
    """
    if not (1 <= i <= dim and 1 <= j <= dim):
        raise ValueError(f"subspace dimensions must be in [1, dim] = [1, {dim}], got i={i}, j={j}")
    return max(i, j) / dim


def singular_values(update: Tensor) -> Tensor:
    """sigma_1 >= sigma_2 >= ... of a 2-D weight update, float64."""
    if update.ndim != 2:
        raise ValueError(f"expected a 2-D weight update (d_out x d_in), got shape {tuple(update.shape)}")
    return torch.linalg.svdvals(update.detach().double())


def energy_rank(sigma: Tensor, energy_fraction: float) -> int:
    """Smallest r with sum_{k<=r} sigma_k^2 / sum_k sigma_k^2 >= energy_fraction; 0 for a zero update."""
    if not 0.0 < energy_fraction <= 1.0:
        raise ValueError(f"energy_fraction must be in (0, 1], got {energy_fraction}")
    energy = sigma.double().square().cumsum(0)
    if len(energy) == 0 or energy[-1] == 0:
        return 0
    reached = energy / energy[-1] >= energy_fraction
    # rounding can leave the full sum a hair under 1, and the full rank always holds all the energy
    return int(reached.nonzero()[0]) + 1 if reached.any() else len(sigma)


def best_rank_error(sigma: Tensor, rank: int) -> float:
    """sigma_{rank+1}: the spectral-norm error of the best rank-`rank` approximation (Eckart-Young)."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return float(sigma[rank]) if rank < len(sigma) else 0.0


@dataclass
class RankDiagnostic:
    """What a rank-`rank` update can reach of one module's weight change E."""

    singular_values: list[float]  # of E, decreasing
    energy_fraction: float  # tau
    energy_rank: int  # smallest r holding tau of ||E||_F^2
    rank: int  # the rank asked about (a LoRA rank)
    rank_error: float  # sigma_{rank+1}(E)
    relative_rank_error: float  # sigma_{rank+1} / sigma_1; 0 for E = 0
    energy_at_rank: float  # share of ||E||_F^2 in the top `rank` directions; 1 for E = 0


def rank_diagnostic(update: Tensor, rank: int, energy_fraction: float) -> RankDiagnostic:
    """Singular values, energy rank and best rank-`rank` error of the weight change `update`."""
    sigma = singular_values(update)
    energy = sigma.square()
    total, top = float(energy.sum()), float(sigma[0]) if len(sigma) else 0.0
    error = best_rank_error(sigma, rank)
    return RankDiagnostic(
        singular_values=sigma.tolist(), energy_fraction=energy_fraction,
        energy_rank=energy_rank(sigma, energy_fraction), rank=rank, rank_error=error,
        relative_rank_error=error / top if top > 0 else 0.0,
        energy_at_rank=float(energy[:rank].sum()) / total if total > 0 else 1.0,
    )
