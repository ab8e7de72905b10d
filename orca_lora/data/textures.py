"""Gaussian random field textures: classes that differ only in the law (alpha, tau) of the field.

Each class is a GRF with covariance tau^(2 alpha - 2) (-Laplace + tau^2 I)^(-alpha) (Darcy's sampler,
`darcy.sample_grf`, after FNO's GRF.m, Li et al. 2021): alpha sets the smoothness (the spectrum's
decay), tau the correlation length (~1 / tau). Every sample is standardised to zero mean and unit
variance, so the overall amplitude (which also depends on tau) is no cue; only texture
statistics (the shape of the spectrum) tell the classes apart.
"""

from __future__ import annotations

import numpy as np

from orca_lora.data import darcy

# (alpha, tau) per class: smoothness x correlation length, neighbouring classes close enough to confuse
GRF_CLASSES: tuple[tuple[float, float], ...] = (
    (1.5, 3.0), (1.5, 10.0), (2.0, 3.0), (2.0, 10.0), (2.5, 3.0),
    (2.5, 10.0), (3.0, 3.0), (3.0, 10.0), (4.0, 3.0), (4.0, 10.0),
)
_TEXTURE_STREAM = 3  # seed-sequence tag (procedural uses 0 and 1, signals 2)


def generate_textures(n_samples: int, resolution: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fields (n_samples, 1, s, s) float32 and labels (n_samples,) int64 for samples start .. start + n - 1.

    Sample i has class i mod 10 (balanced) and is drawn from default_rng([seed, 3, i]): a function
    of (seed, i) only, so disjoint index ranges give independent splits.
    """
    if n_samples < 1 or resolution < 4:
        raise ValueError(f"generate_textures needs n_samples >= 1 and resolution >= 4; got {n_samples}, {resolution}")
    labels = np.arange(start, start + n_samples) % len(GRF_CLASSES)
    fields = np.empty((n_samples, 1, resolution, resolution), dtype=np.float32)
    for row, (index, label) in enumerate(zip(range(start, start + n_samples), labels)):
        alpha, tau = GRF_CLASSES[label]
        field = darcy.sample_grf(1, resolution, np.random.default_rng([seed, _TEXTURE_STREAM, index]), alpha, tau)[0]
        fields[row, 0] = (field - field.mean()) / field.std()
    return fields, labels.astype(np.int64)
