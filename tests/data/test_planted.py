import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orca_lora.data import planted

PATCH = 2


def patch_embedding(seed: int = 0) -> tuple[nn.Conv2d, nn.LayerNorm]:
    """timm's PatchEmbed in float64: a patchify conv (3 -> 48, k = stride = 2), then a LayerNorm with a
    non-trivial affine part."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 48, kernel_size=PATCH, stride=PATCH).double()
    norm = nn.LayerNorm(48).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    return conv, norm


def tokens(conv: nn.Conv2d, norm: nn.LayerNorm, images: torch.Tensor) -> torch.Tensor:
    return norm(conv(images).permute(0, 2, 3, 1))


def plant(conv: nn.Conv2d, k: int, angle: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    directions = planted.plant_directions(conv.weight.detach(), conv.bias.detach(), k,
                                          torch.Generator().manual_seed(seed))
    rotation = planted.token_rotation(directions, angle)
    return rotation, planted.planted_transform(conv.weight.detach(), rotation)


def test_patch_vectors_times_the_conv_matrix_is_the_conv():
    conv, _ = patch_embedding()
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    by_matrix = planted.patch_vectors(images, PATCH) @ conv.weight.flatten(1).T + conv.bias
    assert torch.allclose(by_matrix, conv(images).flatten(2).transpose(1, 2), atol=1e-12)


def test_map_patches_by_the_identity_and_by_an_inverse_round_trips():
    images = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    transform = torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(12, 12, dtype=torch.float64)
    assert torch.equal(planted.map_patches(images, torch.eye(12, dtype=torch.float64), PATCH), images)
    there = planted.map_patches(images, transform, PATCH)
    assert torch.allclose(planted.map_patches(there, torch.linalg.inv(transform), PATCH), images, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_token_rotation_is_orthogonal_and_moves_exactly_k_directions(k):
    basis = torch.linalg.qr(torch.randn(48, k, dtype=torch.float64)).Q
    rotation = planted.token_rotation(basis, 0.7)
    assert torch.allclose(rotation @ rotation.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert torch.linalg.matrix_rank(rotation - torch.eye(48, dtype=torch.float64)) == k
    outside = torch.linalg.svd(torch.eye(48, dtype=torch.float64) - basis @ basis.T).U[:, : 48 - k]
    assert torch.allclose(rotation @ outside, outside, atol=1e-12)


def test_plant_directions_lie_in_the_projection_and_avoid_the_bias():
    conv, _ = patch_embedding()
    directions = planted.plant_directions(conv.weight.detach(), conv.bias.detach(), 6, torch.Generator().manual_seed(1))
    projection = planted.centred_projection(conv.weight.detach())
    inside = projection @ torch.linalg.lstsq(projection, directions).solution
    bias = conv.bias.detach().double()
    assert torch.allclose(inside, directions, atol=1e-10)
    assert torch.allclose(directions.T @ directions, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert (directions.T @ (bias - bias.mean())).abs().max() < 1e-10


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_planted_tokens_are_an_exact_rank_k_linear_map_of_the_clean_ones(k):
    """After conv + LayerNorm: planted = beta + M (clean - beta), M = diag(gamma) Q diag(gamma)^-1."""
    conv, norm = patch_embedding()
    rotation, transform = plant(conv, k)
    images = torch.rand(16, 3, 8, 8, dtype=torch.float64)
    clean = tokens(conv, norm, images)
    shifted = tokens(conv, norm, planted.map_patches(images, transform, PATCH))
    gamma, beta = norm.weight.detach(), norm.bias.detach()
    linear_map = torch.diag(gamma) @ rotation @ torch.diag(1 / gamma)
    assert torch.allclose(shifted, beta + (clean - beta) @ linear_map.T, atol=1e-10)
    assert torch.linalg.matrix_rank(linear_map - torch.eye(48, dtype=torch.float64)) == k
    assert (shifted - clean).abs().max() > 0.1


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_the_restoring_update_has_rank_k_undoes_the_plant_and_is_the_only_one(k):
    conv, norm = patch_embedding()
    _, transform = plant(conv, k)
    update = planted.restoring_update(conv.weight.detach(), transform)
    singular = torch.linalg.svdvals(update)
    assert int((singular > 1e-9 * singular[0]).sum()) == k
    images = torch.rand(16, 3, 8, 8, dtype=torch.float64)
    shifted = planted.map_patches(images, transform, PATCH)
    fixed = F.conv2d(shifted, (conv.weight.flatten(1) + update).view_as(conv.weight), conv.bias, stride=PATCH)
    assert torch.allclose(norm(fixed.permute(0, 2, 3, 1)), tokens(conv, norm, images), atol=1e-10)
    # least squares over patches: the correction that maps every planted patch to its clean token is unique
    weight = conv.weight.flatten(1).detach()
    patches, clean_patches = planted.patch_vectors(shifted, PATCH)[0], planted.patch_vectors(images, PATCH)[0]
    solved = torch.linalg.lstsq(patches, clean_patches @ weight.T - patches @ weight.T).solution.T
    assert torch.allclose(solved, update, atol=1e-8)
    # so the best rank k - 1 update leaves a residual (Eckart-Young on the unique update)
    if k > 1:
        assert singular[k - 1] / singular[0] > 1e-3


def test_out_of_range_dials_are_refused_with_the_key():
    conv, _ = patch_embedding()
    with pytest.raises(ValueError, match=r"task.planted_k: 12 is outside \[1, 11\]"):
        planted.plant_directions(conv.weight.detach(), conv.bias.detach(), 12, torch.Generator())
    with pytest.raises(ValueError, match="task.planted_angle"):
        planted.token_rotation(torch.eye(48, 2, dtype=torch.float64), 4.0)
    assert torch.allclose(planted.token_rotation(torch.eye(48, 2, dtype=torch.float64), math.pi)[:2, :2],
                          -torch.eye(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_the_function_update_has_rank_k_in_k_directions_of_equal_effect(k):
    torch.manual_seed(0)
    weight = torch.randn(96, 48, dtype=torch.float64)
    inputs = torch.randn(4000, 48, dtype=torch.float64) @ torch.diag(torch.logspace(-1, 1, 48, dtype=torch.float64))
    moment = inputs.T @ inputs / len(inputs)  # strongly anisotropic, as a LayerNorm's outputs can be
    update = planted.function_update(weight, moment, k, 0.5, torch.Generator().manual_seed(1))
    singular = torch.linalg.svdvals(update)
    assert int((singular > 1e-9 * singular[0]).sum()) == k  # the LoRA rank that can equal it, and no less
    # the change's second moment over these inputs, dW M dW^T, has k equal eigenvalues s^2, s = 0.5 ||W M^1/2||
    effect = torch.linalg.eigvalsh(update @ moment @ update.T)[-k:]
    strength = 0.5 * torch.linalg.matrix_norm(weight @ torch.linalg.cholesky(moment), ord=2)
    assert torch.allclose(effect, strength.square().expand(k), rtol=1e-8)
    # it reads the inputs' k most-used directions: its row space is the top-k eigenspace of M
    top = torch.linalg.eigh(moment).eigenvectors[:, -k:]
    assert torch.allclose(update @ top @ top.T, update, atol=1e-10)
    with pytest.raises(ValueError, match=r"task.planted_k: 49 is outside \[1, 48\]"):
        planted.function_update(weight, moment, 49, 0.5, torch.Generator())
