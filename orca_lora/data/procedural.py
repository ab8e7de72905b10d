"""Offline source images: FractalDB-style iterated function systems (IFS), one system per class.

Kataoka et al., "Pre-training without Natural Images" (FractalDB, 2020): a class is an IFS of 2-4
affine maps; its images are chaos-game renderings with small per-image perturbations of the maps.
Systems are drawn as in Anderson & Farrell, "Improving Fractal Pre-training" (2022): each linear
part is R(theta) diag(s1, d * s2) R(phi) with singular values s1 >= s2 in (0, 1) and d = +-1,
rescaled so that the sigma-factor sum_i (s1_i + 2 s2_i) lies in [(5 + N) / 2, (6 + N) / 2]
(N maps), which keeps attractors spread out rather than collapsed to a point or filling the plane.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from orca_lora.config import SourceConfig

MAX_MAPS = 4
MAX_SINGULAR_VALUE = 0.99  # every map a strict contraction, also after the per-image perturbation
BURN_IN = 20  # chaos-game steps dropped before the orbit is on the attractor
POINTS_PER_PIXEL = 2
FRAME_QUANTILE = 0.005  # each side of the orbit's frame (see _rasterise)
PERTURBATION = 0.1  # relative noise on each linear coefficient, per image
OFFSET_NOISE = 0.05  # absolute noise on each translation, per image
MIN_COLOUR = 0.25  # colour channels drawn from [MIN_COLOUR, 1] so no image is black
POINTS_PER_CHUNK = 4_000_000  # orbit points held at once (32 MB): sets how many images render together
_SYSTEM_STREAM, _IMAGE_STREAM = 0, 1  # seed-sequence tags keeping system and image draws apart


@dataclass(frozen=True)
class IFSSystem:
    """An iterated function system x -> linear[k] @ x + offset[k], map k chosen with probs[k]."""

    linear: np.ndarray  # (K, 2, 2), K in 2..4, spectral norms < 1
    offset: np.ndarray  # (K, 2)
    probs: np.ndarray  # (K,), proportional to |det linear[k]|, summing to 1

    def __post_init__(self) -> None:
        k = len(self.probs)
        if self.linear.shape != (k, 2, 2) or self.offset.shape != (k, 2) or not 2 <= k <= MAX_MAPS:
            raise ValueError(f"IFSSystem needs linear (K, 2, 2), offset (K, 2), probs (K,) with K in 2..{MAX_MAPS}")


@dataclass
class ProceduralImages:
    """images float32 (N, 3, H, W) in [0, 1]; labels int64 (N,), class-major, in [0, n_classes)."""

    images: np.ndarray
    labels: np.ndarray


def _rotation(angle: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def ifs_system(class_id: int, seed: int) -> IFSSystem:
    """The IFS of class `class_id`, a function of (seed, class_id) only (see the module docstring).

    Class k is therefore the same system whatever the number of classes generated; ids past a
    source's class count are held-out classes of the same family.
    """
    if class_id < 0 or seed < 0:
        raise ValueError(f"ifs_system needs class_id >= 0 and seed >= 0; got class_id={class_id}, seed={seed}")
    rng = np.random.default_rng([seed, class_id, _SYSTEM_STREAM])
    n_maps = int(rng.integers(2, MAX_MAPS + 1))
    target = rng.uniform(5 + n_maps, 6 + n_maps) / 2
    while True:  # redraw until the rescaled maps are strict contractions (3.4 tries on average)
        s1 = rng.uniform(0, 1, n_maps)
        s2 = rng.uniform(0, 1, n_maps) * s1
        scale = target / np.sum(s1 + 2 * s2)
        if scale * s1.max() < MAX_SINGULAR_VALUE:
            s1, s2 = scale * s1, scale * s2
            break
    sign = rng.choice([-1.0, 1.0], n_maps)
    theta, phi = rng.uniform(0, 2 * np.pi, (2, n_maps))
    diagonal = np.zeros((n_maps, 2, 2))
    diagonal[:, 0, 0], diagonal[:, 1, 1] = s1, sign * s2
    linear = _rotation(theta) @ diagonal @ _rotation(phi)
    offset = rng.uniform(-1, 1, (n_maps, 2))
    det = s1 * s2
    return IFSSystem(linear=linear, offset=offset, probs=det / det.sum())


@dataclass
class _Variations:
    """Per-image chaos-game inputs, maps padded to MAX_MAPS (padding never chosen)."""

    linear: np.ndarray  # (B, MAX_MAPS, 2, 2)
    offset: np.ndarray  # (B, MAX_MAPS, 2)
    choices: np.ndarray  # (B, steps) map index per step
    flips: np.ndarray  # (B, 2) bool: flip rows, flip columns
    colours: np.ndarray  # (B, 3)


def _image_variations(
    systems: dict[int, IFSSystem], keys: list[tuple[int, int]], seed: int, steps: int
) -> _Variations:
    """Perturbed maps, flips, colour and map choices for the images `keys` = [(class_id, index)];
    each image's draws depend on (seed, class_id, index) only."""
    count = len(keys)
    linear = np.zeros((count, MAX_MAPS, 2, 2))
    offset = np.zeros((count, MAX_MAPS, 2))
    choices = np.empty((count, steps), dtype=np.int8)
    flips, colours = np.empty((count, 2), dtype=bool), np.empty((count, 3))
    for row, (class_id, index) in enumerate(keys):
        system = systems[class_id]
        n_maps = len(system.probs)
        rng = np.random.default_rng([seed, class_id, _IMAGE_STREAM, index])
        linear[row, :n_maps] = system.linear * (1 + rng.uniform(-PERTURBATION, PERTURBATION, (n_maps, 2, 2)))
        offset[row, :n_maps] = system.offset + rng.normal(0, OFFSET_NOISE, (n_maps, 2))
        choices[row] = np.searchsorted(np.cumsum(system.probs)[:-1], rng.random(steps), side="right")
        flips[row] = rng.random(2) < 0.5
        colours[row] = rng.uniform(MIN_COLOUR, 1, 3)
    norms = np.linalg.norm(linear, ord=2, axis=(-2, -1))
    linear *= np.minimum(1, MAX_SINGULAR_VALUE / np.maximum(norms, 1e-12))[..., None, None]
    return _Variations(linear, offset, choices, flips, colours)


def _chaos_game(linear: np.ndarray, offset: np.ndarray, choices: np.ndarray) -> np.ndarray:
    """Orbits of all images at once, x_{t+1} = linear[k_t] x_t + offset[k_t]; returns (B, 2, steps - BURN_IN)."""
    batch, steps = choices.shape
    rows = np.arange(batch)
    x = np.zeros((batch, 2))
    # Step-major buffers keep every per-step read and write contiguous; one transpose at the end.
    choices_by_step = np.ascontiguousarray(choices.T)
    points = np.empty((steps - BURN_IN, batch, 2), dtype=np.float32)
    for t, k in enumerate(choices_by_step):
        x = np.einsum("bij,bj->bi", linear[rows, k], x) + offset[rows, k]
        if t >= BURN_IN:
            points[t - BURN_IN] = x
    return np.ascontiguousarray(points.transpose(1, 2, 0))


def _rasterise(points: np.ndarray, size: int) -> np.ndarray:
    """Fit each orbit (B, 2, T) into a size x size image, keeping its aspect ratio; the intensity is
    the log visit count over its maximum, in [0, 1]. Returns (B, size, size).

    The frame is the central 99% of each coordinate: a rare long excursion of the orbit would
    otherwise shrink the attractor to a few pixels; points outside the frame are dropped.
    """
    batch = points.shape[0]
    low, high = np.quantile(points, [FRAME_QUANTILE, 1 - FRAME_QUANTILE], axis=-1)
    scale = ((size - 2) / np.maximum((high - low).max(axis=1), 1e-6)).astype(np.float32)
    shift = ((size - 1) / 2 - (low + high) / 2 * scale[:, None]).astype(np.float32)
    pixels = np.rint(points * scale[:, None, None] + shift[..., None]).astype(np.int32)
    # Seen as unsigned, negative pixels become huge: one comparison tests both ends of the frame.
    inside = np.all(pixels.view(np.uint32) < size, axis=1)
    dropped = batch * size * size  # an extra bin for points outside the frame, cut off below
    flat = np.arange(batch, dtype=np.int32)[:, None] * size * size + pixels[:, 0] * size + pixels[:, 1]
    counts = np.bincount(np.where(inside, flat, dropped).ravel(), minlength=dropped + 1)[:-1]
    density = np.log1p(counts.reshape(batch, size, size))
    return density / density.reshape(batch, -1).max(axis=1)[:, None, None]


def _flip(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Flip image b (B, H, W) vertically where flips[b, 0] and horizontally where flips[b, 1]."""
    images = np.where(flips[:, 0, None, None], images[:, ::-1, :], images)
    return np.where(flips[:, 1, None, None], images[:, :, ::-1], images)


def generate_procedural(
    n_classes: int,
    samples_per_class: int,
    image_size: int = 32,
    seed: int = 0,
    class_offset: int = 0,
    sample_offset: int = 0,
) -> ProceduralImages:
    """`samples_per_class` images of each IFS class class_offset .. class_offset + n_classes - 1.

    Image j of class c is a function of (seed, c, j) only, for j in sample_offset ..
    sample_offset + samples_per_class - 1: a later `sample_offset` gives fresh images of the same
    classes (a changed `seed` gives different classes). Labels are 0..n_classes-1, class-major.

    Per image (FractalDB-style): each linear coefficient scaled by 1 + U(-0.1, 0.1), translations
    moved by N(0, 0.05^2), random flips of both axes, and a random colour drawn independently of
    the class so colour is no label cue.
    The chaos game runs vectorised over all images of a chunk (about 1900 at 32 x 32); its cost
    grows as N * image_size^2, so render small and resize rather than render at 224 x 224.
    """
    if n_classes < 1 or samples_per_class < 1:
        raise ValueError(f"need n_classes >= 1 and samples_per_class >= 1; got {n_classes}, {samples_per_class}")
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4 pixels; got {image_size}")
    if min(seed, class_offset, sample_offset) < 0:
        raise ValueError(
            f"seed, class_offset and sample_offset must be >= 0; got {seed}, {class_offset}, {sample_offset}"
        )
    steps = BURN_IN + POINTS_PER_PIXEL * image_size**2
    systems = {class_id: ifs_system(class_id, seed) for class_id in range(class_offset, class_offset + n_classes)}
    keys = [(c, j) for c in systems for j in range(sample_offset, sample_offset + samples_per_class)]
    images = np.empty((len(keys), 3, image_size, image_size), dtype=np.float32)
    chunk_size = max(1, POINTS_PER_CHUNK // steps)
    for start in range(0, len(keys), chunk_size):
        variations = _image_variations(systems, keys[start : start + chunk_size], seed, steps)
        points = _chaos_game(variations.linear, variations.offset, variations.choices)
        intensity = _flip(_rasterise(points, image_size), variations.flips)
        images[start : start + chunk_size] = intensity[:, None] * variations.colours[:, :, None, None]
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), samples_per_class)
    return ProceduralImages(images=images, labels=labels)


# ---------------------------------------------------------------------------------------------
# Dials: fixed transformations of a procedural dataset that move it away from the source modality


def add_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """x + sigma * eps, eps ~ N(0, 1) drawn once per pixel of each sample (a fixed dataset); not clipped."""
    if sigma < 0:
        raise ValueError(f"add_noise needs sigma >= 0 (task.noise); got {sigma}")
    return (images + sigma * rng.standard_normal(images.shape)).astype(np.float32)


def tile_permutation(side: int, tile: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A fixed bijection of the (side / tile)^2 tiles of an image: a random `fraction` of them is
    shuffled among themselves (random positions, random permutation), the others stay put.

    Returns `order` with tile t of the output taken from tile order[t] of the input.
    """
    if tile < 1 or side % tile:
        raise ValueError(f"tile side {tile} must be >= 1 and divide the image side {side} (task.tile)")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in [0, 1] (task.permute_fraction)")
    count = (side // tile) ** 2
    moved = rng.choice(count, size=int(round(fraction * count)), replace=False)
    order = np.arange(count)
    order[moved] = rng.permutation(moved)
    return order


def permute_tiles(images: np.ndarray, tile: int, order: np.ndarray) -> np.ndarray:
    """Rearrange the tile x tile tiles of every image (N, C, H, W) by `order` (see `tile_permutation`);
    tile = 1 permutes pixels. Same bijection for every sample and channel: the Bayes error is unchanged."""
    n, channels, side, _ = images.shape
    grid = side // tile
    # (N, C, gy, ty, gx, tx) -> tiles on one axis (N, C, gy*gx, ty, tx), gather, and back
    tiles = images.reshape(n, channels, grid, tile, grid, tile).transpose(0, 1, 2, 4, 3, 5)
    tiles = tiles.reshape(n, channels, grid * grid, tile, tile)[:, :, order]
    return tiles.reshape(n, channels, grid, grid, tile, tile).transpose(0, 1, 2, 4, 3, 5).reshape(images.shape)


def invert(images: np.ndarray) -> np.ndarray:
    """1 - x: an affine change a linear embedder can undo exactly (the control dial)."""
    return (1.0 - images).astype(np.float32)


def fourier_channels(images: np.ndarray) -> np.ndarray:
    """Each channel's centred 2-D DFT as two channels, log(1 + |F|) and arg(F) / pi: (N, C, H, W) -> (N, 2C, H, W).

    F = fftshift(fft2(x)) is invertible (x = ifft2(ifftshift(|F| e^{i arg F}))), so no information
    is lost; it moves local structure to global (every output pixel depends on every input pixel).
    """
    spectrum = np.fft.fftshift(np.fft.fft2(images, axes=(-2, -1)), axes=(-2, -1))
    return np.concatenate([np.log1p(np.abs(spectrum)), np.angle(spectrum) / np.pi], axis=1).astype(np.float32)


def proxy_images_per_class(source: SourceConfig) -> int:
    """How many images of each pretraining class the procedural source proxy draws (after pretraining's own)."""
    return math.ceil(source.proxy_samples / source.pretrain.n_classes)
