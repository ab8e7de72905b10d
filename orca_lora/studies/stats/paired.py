"""The statistics of an allocation comparison
(README, "Allocations against the field"): standard errors over seeds, paired tests over
test samples, seed-paired differences, and Holm's step-down correction across a table's comparisons."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from orca_lora.choices import PAIRED_TESTS
from orca_lora.studies.stats.bootstrap import seed_standard_error


@dataclass
class MeanSpread:
    mean: float
    se: float  # standard error of the mean (sample std / sqrt(n)); NaN for one value
    n: int


def mean_and_se(values: Sequence[float]) -> MeanSpread:
    values = np.asarray(values, float)
    if values.size == 0:
        raise ValueError("no values to average")
    return MeanSpread(float(values.mean()), float(seed_standard_error(values)), int(values.size))


@dataclass
class PairedTest:
    difference: float  # mean over test samples of (allocation - reference)
    p_value: float  # two-sided
    n_samples: int


def paired_sample_test(errors: np.ndarray, reference: np.ndarray, test: str = "t") -> PairedTest:
    """Two-sided paired test of per-sample errors against the reference's on the same test samples:
    scipy's `ttest_rel` (the mean difference, what the table reports) or `wilcoxon` (signed ranks,
    robust to the heavy tails of relative L2 errors). Identical samples give p = 1."""
    errors, reference = np.asarray(errors, float), np.asarray(reference, float)
    if errors.shape != reference.shape:
        raise ValueError(f"paired test needs the same test samples: {errors.shape} against {reference.shape}")
    if test not in PAIRED_TESTS:
        raise ValueError(f"paired test {test!r} is not one of {', '.join(PAIRED_TESTS)}")
    differences = errors - reference
    if not np.any(differences):
        return PairedTest(0.0, 1.0, int(differences.size))
    if test == "t":
        p_value = stats.ttest_rel(errors, reference).pvalue
    else:
        p_value = stats.wilcoxon(errors, reference).pvalue
    return PairedTest(float(differences.mean()), float(p_value), int(differences.size))


def seed_paired_difference(errors: dict[int, float], reference: dict[int, float]) -> MeanSpread | None:
    """Mean +- SE over seeds of (allocation - reference) test errors, seed by seed; None when the two
    were not run with the same seeds (no pairing to make)."""
    if set(errors) != set(reference):
        return None
    return mean_and_se([errors[seed] - reference[seed] for seed in sorted(errors)])


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest (from 0) is multiplied
    by m - i, then made non-decreasing along the sorted order and capped at 1. NaN stays NaN and does
    not count in m (a comparison without a test)."""
    tested = [index for index, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(tested, key=lambda index: p_values[index])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for step, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - step) * p_values[index]))
        adjusted[index] = running
    return adjusted
