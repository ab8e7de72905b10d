"""The known-answer control sweeps read beside a study (`orca-lora report DIR --controls CONTROL_DIR ...`): each
control directory is analysed on its own, with its own regime and fit, never pooled with the study's tasks."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from orca_lora.studies.hypothesis import ControlStudy, evaluate_study
from orca_lora.studies.study_runs import check_plan, read_study


def evaluate_control_studies(directories: Sequence[Path], n_resamples: int = 999,
                             seed: int = 0) -> list[ControlStudy]:
    """Each control sweep's directory analysed as `orca-lora report DIR` would, without the power simulation (a
    control's answer is known)."""
    studies = []
    for directory in directories:
        runs = read_study([directory])
        result = evaluate_study(runs, n_resamples, seed, 0, check_plan([directory], runs))
        if result.controls is None:
            raise ValueError(f"{directory}: no planted task with a rank sweep; --controls takes the directories of "
                             "the known-answer control sweeps (configs/controls*.yaml)")
        studies.append(ControlStudy(str(directory), result))
    return studies
