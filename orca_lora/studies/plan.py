"""The analysis plan's fixed rules (`configs/study_gap.md`), each defined once: the verdict, the report
and the figures read them from here, so two places cannot apply two versions of one rule."""
from __future__ import annotations

from typing import Sequence

GAIN_FRACTION = 0.1  # r*: the smallest rank within 10% of the log gain from rank 0 to the best (amendment of 21:42)
TRAINING_RATIO = 1.15  # minimum of training: the study's test error within 15% of a 5x longer run's


def training_met(ratio: float) -> bool:
    """The minimum-of-training check: study-length test error / long-run test error <= TRAINING_RATIO."""
    return ratio <= TRAINING_RATIO


def rank_benefit_shown(interval: Sequence[float]) -> bool:
    """A task's rank benefit G = (e(r_min) - e(r_max)) / e(r_max) is shown when its bootstrap interval
    lies above 0. Otherwise (an interval holding 0, or below it: the larger rank no better) r* reads
    noise, not need."""
    return interval[0] > 0
