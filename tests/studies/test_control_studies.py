"""control_studies: control sweeps analysed apart from the study, beside its verdict. (The energy ranks of the
synthetic study's `full` runs need trained weights, so energy_points is stubbed out, as in test_hypothesis.)"""
import numpy as np
import pytest

from orca_lora import cli
from orca_lora.studies import hypothesis as hyp
from orca_lora.studies.control_studies import evaluate_control_studies
from orca_lora.studies.study_runs import read_study
from study_toys import BLOCKS, write_study, write_study_run

CONTROL_RANKS = (1, 2, 4, 8)


def write_planted_law(root):
    """planted-shift at k = 1, 2, 4 with block gaps 10 k: e(r) drops to its floor at r = k; rank 0 at 0.2."""
    rng = np.random.default_rng(0)
    for k in (1, 2, 4):
        for method, rank in [("linear", 1)] + [("lora", rank) for rank in CONTROL_RANKS]:
            error = 0.2 if method == "linear" else 0.002 + 0.03 * max(k - rank, 0) / k
            val = error + 1e-4 * rng.standard_normal(30)
            write_study_run(root, f"k{k}_{method}_r{rank}", task="planted-shift", method=method, rank=rank,
                            val_errors=val, test_errors=val, block_gaps=np.full(len(BLOCKS), 10.0 * k),
                            extra_overrides=[f"task.planted_k={k}"])
    return root


@pytest.fixture(autouse=True)
def no_energy_ranks(monkeypatch):
    monkeypatch.setattr(hyp.blocks, "energy_points", lambda runs, regime: [])


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    study = tmp_path_factory.mktemp("study")
    write_study(study, seeds=(0,), ranks=(1, 2, 4), tasks=(("procedural", 0.02, 1), ("darcy", 0.1, 2),
                                                           ("spectrogram", 0.4, 4)), secondary_tasks=())
    return study, write_planted_law(tmp_path_factory.mktemp("controls"))


def test_a_control_directory_is_analysed_on_its_own(directories):
    study, controls = directories
    (control,) = evaluate_control_studies([controls], n_resamples=99)
    alone = hyp.evaluate_study(read_study([controls]), n_resamples=99, power_studies=0)
    assert control.directory == str(controls)
    assert [row.r_star for row in control.result.controls.rows] == [row.r_star for row in alone.controls.rows] \
        == [1, 2, 4]
    assert control.result.fit.slope == pytest.approx(alone.fit.slope)
    with pytest.raises(ValueError, match="--controls takes the directories of the known-answer control sweeps"):
        evaluate_control_studies([study], n_resamples=99)


def test_planted_and_natural_tasks_are_never_fitted_together(directories):
    with pytest.raises(ValueError, match=r"planted tasks \(planted-shift.*natural ones \(darcy, procedural, "
                                         r"spectrogram\): give the controls' directories with --controls"):
        hyp.evaluate_study(read_study(list(directories)), n_resamples=99, power_studies=0)


def test_the_report_shows_each_control_beside_the_verdict(directories):
    study, controls = directories
    assert cli.main(["report", str(study), "--controls", str(controls), "--resamples", "99",
                     "--power-studies", "0"]) == 0
    report = (study / "report.md").read_text()
    (control,) = evaluate_control_studies([controls], n_resamples=99)
    met = {True: "yes", False: "**no**", None: "cannot be judged"}[control.result.controls.passed]
    assert f"Known-answer controls: {int(control.result.controls.passed is True)} of 1 met (`{controls.name}`: " \
        f"{met};" in report
    section = report.split("## Known-answer controls beside the verdict")[1]
    assert f"| `{controls}` | frozen embedder, 6 epochs | r* = k on every task" in section
    assert f"### Control `{controls}`" in section and "| planted-shift(planted_k=4) | 4 | 4 | yes |" in section
