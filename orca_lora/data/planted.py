"""Planted input gaps of a known dimension k (README, "Known-answer controls"): pure functions on tensors.

Zeng & Lee 2024 ("The Expressive Power of Low-Rank Adaptation", Lemma 1): the smallest LoRA rank that
makes an adapted linear layer equal a target is the rank of the error between them. A patchify
Conv2d (kernel = stride = p) is a linear map W_P of each flattened patch vector x (d = C p^2), and
timm's PatchEmbed follows it with a LayerNorm. So the shift planted here acts on patch vectors,

    x -> T x,    T = A^+ Q A,    A = Pi W_P  (Pi = I - 1 1^T / D: the LayerNorm's centering),

with Q an orthogonal map of the token space that rotates k directions of col(A) orthogonal to the
centred bias Pi b (floor(k / 2) planes by `angle`, one reflection when k is odd) and fixes the rest.
Then A T = Q A and Q Pi b = Pi b, so each centred token is Q times the clean one: its norm, and with
it the LayerNorm's scale, is unchanged, and the block-0 input is an exact rank-k linear map of the
clean one. The LoRA update dW = W_P (T^-1 - I) on the projection (rank k) restores the clean tokens;
no rank below k can (rank(T^-1 - I) = rank(Q^T - I) = k).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_vectors(images: Tensor, patch: int) -> Tensor:
    """(N, C, H, W) -> (N, L, C p^2): non-overlapping p x p patches, each flattened in a Conv2d
    weight's (C, p, p) order, so `patch_vectors(x) @ W.flatten(1).T` is the conv's output."""
    return F.unfold(images, kernel_size=patch, stride=patch).transpose(1, 2)


def map_patches(images: Tensor, transform: Tensor, patch: int) -> Tensor:
    """Every patch vector x of `images` replaced by `transform @ x` (an exact inverse of `patch_vectors`)."""
    mapped = patch_vectors(images, patch) @ transform.to(images.dtype).T
    return F.fold(mapped.transpose(1, 2), images.shape[-2:], kernel_size=patch, stride=patch)


def centred_projection(weight: Tensor) -> Tensor:
    """A = Pi W_P for a patchify conv weight (D, C, p, p): its (D, C p^2) matrix, centred over the D
    output channels as the following LayerNorm centres every token."""
    matrix = weight.flatten(1).double()
    return matrix - matrix.mean(dim=0, keepdim=True)


def plant_directions(weight: Tensor, bias: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """(D, k) orthonormal token directions inside col(Pi W_P) and orthogonal to Pi b, drawn uniformly
    (a Gaussian combination, orthonormalised) from `generator`."""
    projection = centred_projection(weight)
    basis = torch.linalg.qr(projection).Q  # (D, d): orthonormal basis of col(A)
    centred_bias = (bias.double() - bias.double().mean()).reshape(-1, 1)
    along_bias = basis.T @ centred_bias
    if along_bias.norm() > 0:  # the subspace of col(A) orthogonal to Pi b
        free = torch.linalg.svd(torch.eye(basis.shape[1], dtype=torch.float64)
                                - along_bias @ along_bias.T / along_bias.square().sum()).U
        basis = basis @ free[:, : basis.shape[1] - 1]
    if not 1 <= k <= basis.shape[1]:
        raise ValueError(f"task.planted_k: {k} is outside [1, {basis.shape[1]}], the token directions a plant of "
                         f"this patch embedding can rotate (C p^2 = {weight[0].numel()}, less the bias direction)")
    mix = torch.randn(basis.shape[1], k, generator=generator, dtype=torch.float64)
    return basis @ torch.linalg.qr(mix).Q


def token_rotation(directions: Tensor, angle: float) -> Tensor:
    """Q (D x D) orthogonal: rotation by `angle` in the planes (d_1, d_2), (d_3, d_4), ... of the k
    columns of `directions`, a reflection of the last one when k is odd; identity on their complement."""
    size, k = directions.shape
    if not 0 < angle <= math.pi:
        raise ValueError(f"task.planted_angle: {angle} is outside (0, pi]")
    rotation = torch.eye(size, dtype=torch.float64)
    cos, sin = math.cos(angle), math.sin(angle)
    for first in range(0, k - 1, 2):
        u, v = directions[:, first: first + 1], directions[:, first + 1: first + 2]
        rotation += (cos - 1) * (u @ u.T + v @ v.T) + sin * (v @ u.T - u @ v.T)
    if k % 2:
        last = directions[:, k - 1: k]
        rotation -= 2 * last @ last.T
    return rotation


def planted_transform(weight: Tensor, rotation: Tensor) -> Tensor:
    """T = A^+ Q A (C p^2 x C p^2, float64): the patch map whose tokens are Q times the clean ones."""
    projection = centred_projection(weight)
    return torch.linalg.pinv(projection) @ rotation @ projection


def random_directions(size: int, k: int, generator: torch.Generator) -> Tensor:
    """(size, k) orthonormal directions drawn uniformly (a Gaussian matrix, orthonormalised)."""
    if not 1 <= k <= size:
        raise ValueError(f"task.planted_k: {k} is outside [1, {size}], the directions of a {size}-dimensional space")
    return torch.linalg.qr(torch.randn(size, k, generator=generator, dtype=torch.float64)).Q


def function_update(weight: Tensor, moment: Tensor, k: int, scale: float, generator: torch.Generator) -> Tensor:
    """dW = s U diag(lambda)^{-1/2} V^T, (out, in) float64, for a Linear W whose inputs x have second moment
    M = E[x x^T]: V (in x k) the top-k eigenvectors of M (eigenvalues lambda), U (out x k) orthonormal,
    drawn from `generator`. rank(dW) = k, so LoRA of rank k on that Linear can equal it and no lower rank
    can (Zeng & Lee 2024, Lemma 1). Its effect dW x has second moment s^2 U U^T: k directions of exactly
    equal weight, so each of the k ranks is worth the same share of the error (a random plane of the inputs
    can carry almost none of it); and it reads the inputs' most-used directions, so gradient descent finds it
    (weights along rarely-used directions learn slowly). s = scale x the largest singular value of W M^{1/2},
    the Linear's own largest effect."""
    size_out, size_in = weight.shape
    if not 1 <= k <= min(size_out, size_in):
        raise ValueError(f"task.planted_k: {k} is outside [1, {min(size_out, size_in)}], the rank a change of "
                         f"this {size_in} -> {size_out} Linear can have")
    values, vectors = torch.linalg.eigh(moment.double())  # ascending
    values = values.clamp_min(0)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    strength = scale * float(torch.linalg.matrix_norm(weight.double() @ root, ord=2))
    top_values, top_vectors = values[-k:].flip(0), vectors[:, -k:].flip(1)
    if top_values[-1] <= 0:
        raise ValueError(f"task.planted_k: the module's inputs span fewer than {k} directions")
    out_directions = random_directions(size_out, k, generator)
    return strength * out_directions @ torch.diag(top_values.rsqrt()) @ top_vectors.T


def restoring_update(weight: Tensor, transform: Tensor) -> Tensor:
    """dW = W_P (T^-1 - I), (D, C p^2): the projection update that undoes the plant, of rank k."""
    matrix = weight.flatten(1).double()
    return matrix @ (torch.linalg.inv(transform) - torch.eye(transform.shape[0], dtype=torch.float64))
