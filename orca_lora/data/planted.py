"""Known-answer controls (README, "Known-answer controls"; reviews/positive_controls.md section 5): tasks
whose needed LoRA rank is planted, k. Zeng & Lee 2024 ("The Expressive Power of Low-Rank Adaptation",
Lemma 1): an error of rank k at one adapted layer needs rank k there, so the answer is known when the
adapter sits where the plant is.

planted-shift. Fresh images of the source body's own pretraining classes, every p x p x c patch vector x
replaced by T x, with

    T = A^+ Q A,   A = Pi W_P (d x c p^2),   Pi = I - 1 1^T / d (centering over the d token channels),

W_P the body's patch-embedding conv as a matrix on patch vectors, b its bias, and Q orthogonal: k // 2
plane rotations (and one reflection when k is odd) inside a k-dim subspace of col(A) orthogonal to Pi b,
identity elsewhere. Then the centered pre-LayerNorm token of T x is Q times that of x (A T = Q A, and
Q Pi b = Pi b), its norm (the LayerNorm's scale) is unchanged, and after the patch embedding (conv, then
LayerNorm with gain gamma and bias beta)

    token(T x) = beta + M (token(x) - beta),   M = diag(gamma) Q diag(gamma)^-1,   rank(M - I) = k:

an exact rank-k linear map of the clean tokens, which commutes with the token mean-pooling of the gap.
dW = W_P (T^-1 - I), of rank k, on the projection restores the clean tokens; no rank below k can (the
LayerNorm forgives only a per-token scale and a shift along 1, and a scale c != 1 needs W_P (c T^-1 - I),
of full rank). The planes pair directions of the pooled block-0 features (`PLANE_CHOICES`); with
`task.planted_gap` their angles are calibrated so the block-0 gap grows by the same step per planted
dimension (`rank/plant_calibration.py`).

planted-function. The same fresh clean images; the teacher is the frozen body with a rank-k change s U V^T
(U, V orthonormal columns, k equal singular values s; Zeng & Lee's uniform singular values) added to the
weights of the named modules. The inputs are the source's, so every D_i is at its floor by construction.

Targets: "teacher", a fixed random dense head (`models/heads.py`) on the clean body's (planted-function:
the teacher's) last-stage tokens, centred, as a field (relative L2 per sample): the student, the same head
type on the same body, can reproduce it exactly. "classes" (planted-shift only): the source's own classes.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from orca_lora.config import SourceConfig, TaskConfig
from orca_lora.data import darcy, procedural
from orca_lora.data.tasks import TaskData, classification_arrays, split_train_val
from orca_lora.models.body import body_stride
from orca_lora.models.embedder import mean_pool
from orca_lora.models.heads import build_head
from orca_lora.rank.plant_calibration import calibrate_dials, gap_to

log = logging.getLogger("orca_lora")

Arrays = dict[str, np.ndarray]
_PLANT_STREAM = 5  # seed-sequence tag of the plants' draws (task_builders' dials use 4)
# which directions (most varying first) each plane pairs: (e_1, e_2), (e_3, e_4), ... for visible
PLANE_ORDERS = {
    "visible": lambda size, count: list(range(2 * count)),
    "contrast": lambda size, count: [i for j in range(count) for i in (j, size - 1 - j)],
    "blind": lambda size, count: list(range(size - 1, size - 1 - 2 * count, -1)),
}
PLANE_CHOICES = ("random", *PLANE_ORDERS)  # = choices.PLANTED_PLANES
BATCH = 256
TEACHER_COMPONENTS = 16  # principal directions of the last-stage tokens the teacher's head reads


# ---------------------------------------------------------------------------------------------
# The patch-space algebra


def patch_matrix(conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """(W_P, b): a conv with kernel = stride as a (d, c p p) matrix on patch vectors (flattened in
    channel, row, column order, as `patch_vectors` makes them) and its bias (zeros when it has none)."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    return weight.reshape(weight.shape[0], -1), bias


def patch_vectors(images: Tensor, patch: int) -> Tensor:
    """(N, c, H, W) -> (N, H / p, W / p, c p p): every p x p patch as one vector."""
    n, c, h, w = images.shape
    blocks = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(n, h // patch, w // patch, c * patch * patch)


def map_patches(images: Tensor, transform: Tensor, patch: int) -> Tensor:
    """`images` with every patch vector x replaced by T x."""
    n, c, h, w = images.shape
    mapped = patch_vectors(images, patch) @ transform.to(images.dtype).T
    blocks = mapped.reshape(n, h // patch, w // patch, c, patch, patch)
    return blocks.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def centered(matrix: Tensor) -> Tensor:
    """Pi M, Pi = I - 1 1^T / d: the mean over the d token channels (rows) removed from each column."""
    return matrix - matrix.mean(dim=0, keepdim=True)


def plant_subspace(patch_weight: Tensor, bias: Tensor) -> Tensor:
    """An orthonormal basis (d, s) of the directions of col(A), A = Pi W_P, orthogonal to Pi b: what a
    plant may turn without moving the tokens' channel mean or their norm about it (s = rank A - 1)."""
    basis, singular, _ = torch.linalg.svd(centered(patch_weight.double()), full_matrices=False)
    basis = basis[:, : int((singular > singular[0] * 1e-10).sum())]
    along = basis.T @ centered(bias.double()[:, None])[:, 0]
    if along.norm() <= 1e-12 * max(1.0, float(bias.norm())):
        return basis
    _, _, right = torch.linalg.svd(along[None, :], full_matrices=True)  # rows 1.. span along's complement
    return basis @ right[1:].T


def plane_rotation(first: Tensor, second: Tensor, angle: float) -> Tensor:
    """I + (cos t - 1)(u u^T + v v^T) + sin t (v u^T - u v^T): orthonormal u turned toward v by t, the
    rest of the space fixed; rank(Q - I) = 2 for 0 < t < 2 pi."""
    u, v = first[:, None], second[:, None]
    identity = torch.eye(len(first), dtype=first.dtype)
    return identity + (math.cos(angle) - 1.0) * (u @ u.T + v @ v.T) + math.sin(angle) * (v @ u.T - u @ v.T)


def reflection(direction: Tensor) -> Tensor:
    """I - 2 u u^T for a unit u: the only orthogonal map with rank(Q - I) = 1."""
    u = direction[:, None]
    return torch.eye(len(direction), dtype=direction.dtype) - 2.0 * (u @ u.T)


def patch_transform(patch_weight: Tensor, orthogonal: Tensor) -> Tensor:
    """T = A^+ Q A, A = Pi W_P (float64): invertible with T^-1 = A^+ Q^T A when A has full column
    rank and Q maps col(A) onto itself."""
    a = centered(patch_weight.double())
    return torch.linalg.pinv(a) @ orthogonal.double() @ a


def token_map(gamma: Tensor, orthogonal: Tensor) -> Tensor:
    """M = diag(gamma) Q diag(gamma)^-1: the planted map of the LayerNorm's output about its bias beta."""
    gamma = gamma.double()
    return gamma[:, None] * orthogonal.double() / gamma[None, :]


def needed_correction(patch_weight: Tensor, transform: Tensor) -> Tensor:
    """dW = W_P (T^-1 - I): the projection's change that maps planted patches back to the clean tokens."""
    identity = torch.eye(transform.shape[0], dtype=torch.float64)
    return patch_weight.double() @ (torch.linalg.inv(transform.double()) - identity)


@dataclass(frozen=True)
class Plant:
    """Q: plane j turns planes[j, 0] toward planes[j, 1] by angles[j]; `reflected` (odd k) is reflected."""

    planes: Tensor  # (m, 2, d), orthonormal directions
    angles: tuple[float, ...]  # (m,)
    reflected: Tensor | None = None  # (d,) unit direction

    @property
    def rank(self) -> int:
        return 2 * len(self.angles) + (self.reflected is not None)

    def orthogonal(self) -> Tensor:
        """The product of the rotations and the reflection (they act on orthogonal subspaces, so commute)."""
        q = torch.eye(self.planes.shape[-1], dtype=torch.float64)
        for (first, second), angle in zip(self.planes, self.angles):
            q = plane_rotation(first, second, angle) @ q
        return q if self.reflected is None else reflection(self.reflected) @ q


def plane_pairs(basis: Tensor, features: Tensor, count: int, choice: str, generator: torch.Generator) -> Tensor:
    """`count` orthonormal pairs (count, 2, d) inside span(basis). random: a random orthonormal basis of the
    span, paired in order. The others follow how `features` (n, d: pooled block-0 features in Q's space,
    diag(gamma)^-1 (f - beta)) vary along the span's directions e_1, e_2, ... (most first; `PLANE_ORDERS`).

    What each is for, measured on the offline body (reviews/positive_controls.md): its pooled features vary
    along 3 of the 11 directions (99% of the variance) and its output responds to about 6. A plane turning
    a direction the output ignores into one it reads needs rank 1, not 2, to undo as far as the output
    can tell, so only `visible` planes (both directions read) need exactly k; `random` planes mix all
    directions (the gap sees every plane, the needed rank is below k), `contrast` ones turn each varying
    direction into an unvarying one (the gap sees them most; needed rank k / 2), `blind` ones turn unvarying
    directions (a rank-k plant at the gap's floor)."""
    size = basis.shape[1]
    if choice not in PLANE_CHOICES:
        raise ValueError(f"task.planted_planes: {choice!r} is not one of {', '.join(PLANE_CHOICES)}")
    if 2 * count > size:
        raise ValueError(f"{count} planes need {2 * count} directions; the patch space offers {size}")
    if choice == "random":
        directions, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        order = list(range(2 * count))
    else:
        _, directions = torch.linalg.eigh(torch.cov((features.double() @ basis).T))
        directions, order = directions.flip(1), PLANE_ORDERS[choice](size, count)
    return (basis @ directions[:, order]).T.reshape(count, 2, basis.shape[0])


# ---------------------------------------------------------------------------------------------
# Images, features and targets


def fresh_source_images(source: SourceConfig, count: int, data_seed: int) -> tuple[Tensor, Tensor]:
    """`count` new images (and labels) of the offline body's pretraining classes, class-balanced and
    shuffled by `data_seed`: samples past the pretraining images and the source proxy set's
    (`models/source.py`), a block of its own per data seed."""
    pretrain = source.pretrain
    per_class = math.ceil(count / pretrain.n_classes)
    start = (pretrain.samples_per_class + math.ceil(source.proxy_samples / pretrain.n_classes)
             + data_seed * per_class)
    drawn = procedural.generate_procedural(pretrain.n_classes, per_class, image_size=pretrain.img_size,
                                           seed=pretrain.seed, sample_offset=start)
    order = torch.randperm(len(drawn.labels), generator=torch.Generator().manual_seed(data_seed))[:count]
    return torch.as_tensor(drawn.images)[order], torch.as_tensor(drawn.labels)[order]


@torch.no_grad()
def last_stage_tokens(body: nn.Module, images: Tensor) -> Tensor:
    """The body's normed last-stage tokens (N, h, w, C) of `images` through its own patch embedding."""
    return torch.cat([body.norm(body.layers(body.patch_embed(batch))) for batch in images.split(BATCH)])


@torch.no_grad()
def block0_features(body: nn.Module, images: Tensor) -> Tensor:
    """Block 0's input, mean-pooled over tokens (N, d): what stage 2 measures first (float64)."""
    return torch.cat([mean_pool(body.patch_embed(batch)) for batch in images.split(BATCH)]).double()


@torch.no_grad()
def teacher_fields(body: nn.Module, tokens: Tensor, output_size: tuple[int, int],
                   generator: torch.Generator) -> tuple[nn.Module, Tensor]:
    """A dense head of the type the student gets, reading `tokens` (N, h, w, C) along their
    TEACHER_COMPONENTS leading principal directions P: weight G P^T with G Gaussian / sqrt(m), bias
    setting the field's mean over samples and tokens to 0 at every output unit. Returns it and the
    fields (N, H, W). Why the leading directions: gradient descent learns a linear read-out fastest
    along them, so the student's head converges in a few hundred steps (a head reading all
    directions was still 10x above its floor after 300 steps in the pilot), and the planted change
    still shows through them."""
    head = build_head("dense", tokens.shape[-1], 1, body_stride(body), output_size, generator=generator)
    flat = tokens.reshape(-1, tokens.shape[-1]).double()
    _, directions = torch.linalg.eigh(torch.cov(flat.T))
    leading = directions[:, -min(TEACHER_COMPONENTS, flat.shape[1]):]
    mixing = torch.randn(head.fc.out_features, leading.shape[1], generator=generator, dtype=torch.float64)
    head.fc.weight.copy_(mixing @ leading.T / math.sqrt(leading.shape[1]))
    head.fc.bias -= head.fc(tokens).mean(dim=(0, 1, 2))
    return head, torch.cat([head(batch)[:, 0] for batch in tokens.split(BATCH)])


def plant_generator(config: TaskConfig) -> torch.Generator:
    """The plants' and teacher heads' own generator, derived from `task.data_seed`."""
    seed = int(np.random.SeedSequence([config.data_seed, _PLANT_STREAM]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def split_arrays(x: Tensor, y: Tensor, n_test: int) -> Arrays:
    """Test first (n_test samples), then train, as numpy arrays."""
    return {"x_train": x[n_test:].numpy(), "y_train": y[n_test:].numpy(),
            "x_test": x[:n_test].numpy(), "y_test": y[:n_test].numpy()}


class FieldOutput(nn.Module):
    """The dense head's output (B, 1, H, W) as the field (B, H, W) the teacher's targets are."""

    def forward(self, output: Tensor) -> Tensor:
        return output.squeeze(1)


def source_side(source: SourceConfig, data_root) -> tuple[nn.Module, Tensor]:
    """The frozen source body and the source proxy images (`models/source.py`)."""
    # imported here: models.source imports the data package, whose import registers these tasks
    from orca_lora.models.source import load_source_body, source_proxy

    return load_source_body(source, data_root), source_proxy(source, data_root)[0]


def planted_source(config: TaskConfig) -> SourceConfig:
    """The source the targets come from: the run's own (`load_config` copies it into task.planted_source)."""
    if config.planted_source is None:
        raise ValueError(f"{config.name} builds its targets with the source body, which task.planted_source names; "
                         "load the config with load_config, which fills it in from the `source` section")
    if config.planted_source.model != "offline":
        raise ValueError(f"{config.name} draws images of the source body's pretraining classes; it needs "
                         f"source.model: offline, not {config.planted_source.model!r}")
    return config.planted_source


def planted_task(config: TaskConfig, arrays: Arrays) -> TaskData:
    """The TaskData of a planted task's arrays: a field regression on the teacher's output (relative L2,
    trivial predictor the mean training field), or the source's classes."""
    x_train, y_train = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    x_test, y_test = torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])
    if config.planted_target == "classes":
        return classification_arrays(config.name, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                                     arrays["y_test"], planted_source(config).pretrain.n_classes, config)
    train, val = split_train_val(TensorDataset(x_train, y_train), config.val_fraction, config.data_seed)
    mean_field = y_train.mean(dim=0, keepdim=True).expand_as(y_test)
    side = tuple(y_train.shape[-2:])
    return TaskData(
        name=config.name, train=train, val=val, test=TensorDataset(x_test, y_test), in_channels=x_train.shape[1],
        input_size=tuple(x_train.shape[-2:]), head="dense", num_outputs=1, output_size=side,
        error=darcy.relative_l2, loss=darcy.relative_l2, output_transform=FieldOutput(),
        baseline_error=float(darcy.relative_l2(mean_field, y_test).mean()),
    )


# ---------------------------------------------------------------------------------------------
# planted-shift


def design_plant(config: TaskConfig, body: nn.Module, source: Tensor, target: Tensor,
                 generator: torch.Generator) -> tuple[Plant, list[float]]:
    """The plant of `config` on `body`'s patch embedding: planes from the clean target's block-0 features
    `target` (`plane_pairs`) turned by task.planted_angle each, or, with task.planted_gap, by angles
    calibrated so the block-0 gap to the source's features `source` grows by planted_gap per planted
    dimension (an odd k's reflection direction is calibrated within its plane). Returns the plant and
    the gap above the clean task's after each planted unit."""
    norm = body.patch_embed.norm
    beta, gamma = norm.bias.detach().double(), norm.weight.detach().double()
    patch_weight, bias = patch_matrix(body.patch_embed.proj)
    planes, odd = divmod(config.planted_rank, 2)
    q_space = (target - beta) / gamma
    pairs = plane_pairs(plant_subspace(patch_weight, bias), q_space, planes + odd, config.planted_planes, generator)

    def plant(values: Sequence[float]) -> Plant:
        angles = tuple(float(value) for value in values[:planes])
        reflected = None
        if len(values) > planes:  # the reflection's direction, turned from the plane's first toward its second
            reflected = math.cos(values[planes]) * pairs[planes, 0] + math.sin(values[planes]) * pairs[planes, 1]
        return Plant(pairs[: len(angles)], angles, reflected)

    measure = gap_to(source)

    def gap(values: Sequence[float]) -> float:
        return measure(beta + (q_space @ plant(values).orthogonal().T) * gamma)

    if config.planted_gap is None:
        values = [config.planted_angle] * planes + [0.0] * odd
    else:
        step = config.planted_gap
        values = calibrate_dials(gap, [2 * step] * planes + [step] * odd,
                                 [(0.0, math.pi)] * planes + [(0.0, math.pi)] * odd)
    clean = gap(())
    return plant(values), [gap(values[: unit + 1]) - clean for unit in range(len(values))]


def planted_shift_arrays(config: TaskConfig, data_root) -> Arrays:
    """Planted images with their targets (train and test), the patch transform T, the plant's angles
    and the calibration's block-0 gap after each planted unit."""
    source = planted_source(config)
    body, proxy = source_side(source, data_root)
    images, labels = fresh_source_images(source, config.n_train + config.n_test, config.data_seed)
    generator = plant_generator(config)
    plant, gaps = design_plant(config, body, block0_features(body, proxy),
                               block0_features(body, images[config.n_test:]), generator)
    transform = patch_transform(patch_matrix(body.patch_embed.proj)[0], plant.orthogonal())
    planted = map_patches(images.double(), transform, int(body.patch_embed.patch_size[0])).float()
    if config.planted_target == "teacher":
        _, targets = teacher_fields(body, last_stage_tokens(body, images), tuple(images.shape[-2:]), generator)
    else:
        targets = labels
    log.info("%s: k = %d, angles %s, block-0 gap above the clean task's after each planted unit %s", config.name,
             plant.rank, [round(a, 4) for a in plant.angles], [round(g, 4) for g in gaps])
    return {**split_arrays(planted, targets, config.n_test), "transform": transform.numpy(),
            "angles": np.asarray(plant.angles, dtype=np.float64), "gaps": np.asarray(gaps, dtype=np.float64)}


# ---------------------------------------------------------------------------------------------
# planted-function


def planted_change(weight: Tensor, rank: int, scale: float, generator: torch.Generator) -> Tensor:
    """s U V^T (float64): U (d_out x k), V (d_in x k) with orthonormal columns (QR of Gaussian draws), every
    singular value s = scale x the weight's RMS singular value ||W||_F / sqrt(min(d_out, d_in))."""
    d_out, d_in = weight.shape
    if not 0 <= rank <= min(d_out, d_in):
        raise ValueError(f"task.planted_rank: {rank} must be in [0, {min(d_out, d_in)}] for a {d_out} x {d_in} weight")
    left, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=generator, dtype=torch.float64))
    size = scale * float(weight.detach().double().norm()) / math.sqrt(min(d_out, d_in))
    return size * left @ right.T


def planted_teacher(body: nn.Module, modules: Sequence[str], rank: int, scale: float,
                    generator: torch.Generator) -> nn.Module:
    """A copy of `body` with `planted_change` added to the weight of every named nn.Linear (in order)."""
    teacher = copy.deepcopy(body)
    for name in modules:
        try:
            module = teacher.get_submodule(name)
        except AttributeError:
            raise ValueError(f"task.planted_modules: {name!r} is not a module of the source body; names look like "
                             "'layers.0.blocks.1.mlp.fc1'") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"task.planted_modules: {name!r} is a {type(module).__name__}, not an nn.Linear")
        with torch.no_grad():
            module.weight += planted_change(module.weight, rank, scale, generator).to(module.weight.dtype)
    return teacher


def planted_function_arrays(config: TaskConfig, data_root) -> Arrays:
    """Clean images and the planted teacher's fields (train and test)."""
    source = planted_source(config)
    body, _ = source_side(source, data_root)
    images, _ = fresh_source_images(source, config.n_train + config.n_test, config.data_seed)
    generator = plant_generator(config)
    teacher = planted_teacher(body, config.planted_modules, config.planted_rank, config.planted_scale, generator)
    _, targets = teacher_fields(teacher, last_stage_tokens(teacher, images), tuple(images.shape[-2:]), generator)
    return split_arrays(images, targets, config.n_test)
