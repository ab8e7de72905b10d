"""hypothesis: the rank-vs-gap study's analysis (configs/study_gap.md) on synthetic run directories.
(The energy ranks need trained weights, so energy_points is stubbed out; the CLI is tested elsewhere.)"""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from study_toys import RANKS, planted_curve, write_study, write_study_run

from orca_lora import cli
from orca_lora.records import StageRecord
from orca_lora.run_files import RunFiles, write_marker
from orca_lora.studies import hypothesis as hyp
from orca_lora.studies.method_shares import TrainingCheck
from orca_lora.studies.rank_threshold import VERDICTS
from orca_lora.studies.study_runs import check_plan, read_study
from orca_lora.sweeps.grid import SweepPoint

PLANTED = (("procedural", 0.02, 1), ("darcy", 0.1, 4), ("spectrogram", 0.4, 8), ("grf-texture", 1.0, 32))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    written = write_study(root, seed=0, tasks=PLANTED)
    runs = read_study([root])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hyp.blocks, "energy_points", lambda runs, regime: [])
        result = hyp.evaluate_study(runs, n_resamples=199, seed=0, power_studies=10)
    return written, runs, result


def test_evaluate_study_end_to_end_on_a_planted_study(study):
    written, runs, result = study
    assert result.regime == "frozen embedder, 6 epochs" and result.n_runs == len(runs) == len(written.errors)
    assert result.n_tasks == 4 and result.gain_fraction == 0.1
    planted = {task: r_star for task, _, r_star in PLANTED}
    assert {c.task: c.r_star for c in result.chosen} == planted
    assert {t.task: t.r_star for t in result.fit.tasks} == planted
    for chosen in result.chosen:
        gap = next(gap for task, gap, _ in PLANTED if task == chosen.task)
        assert chosen.gap == pytest.approx(gap, rel=0.02)  # block gaps planted around the task's mean gap
    fit = result.fit
    assert fit.n_resamples == 199 and fit.slope > 0 and fit.spearman_rho == pytest.approx(1.0)
    assert fit.slope_interval[0] < fit.slope < fit.slope_interval[1]
    assert fit.verdict in VERDICTS and fit.verdict in ("proportional", "grows")
    # one row per task and rank, over both seeds; validation and test both as planted
    assert len(result.rank_rows) == 4 * len(RANKS)
    for row in result.rank_rows:
        expected = planted_curve(RANKS, planted[row.task])[RANKS.index(row.rank)]
        assert row.n_seeds == 2
        assert row.val_error == pytest.approx(expected, abs=0.002)
        assert row.test_error == pytest.approx(expected + 0.01, abs=0.002)
    for chosen in result.chosen:
        at_r_star = next(row for row in result.rank_rows if row.task == chosen.task and row.rank == chosen.r_star)
        assert chosen.test_error == at_r_star.test_error and chosen.test_se == at_r_star.test_se
    noise = {n.task: n for n in result.noise}
    # the power simulation's terms: e(0) / e_best = 0.3 / 0.1 and half the log gain left at rank 1 (planted_curve)
    assert noise["darcy"].best == pytest.approx(0.1, abs=0.002)
    assert noise["darcy"].unadapted_ratio == pytest.approx(3.0, rel=0.03)
    assert noise["darcy"].first_share == pytest.approx(0.5, abs=0.03) and noise["procedural"].first_share == 0
    assert 0.002 / 0.18 < noise["darcy"].sample_sd < 0.002 / 0.1  # noise 0.002 relative to e(r) in [0.1, 0.18]
    assert [p.beta for p in result.power] == [1.0, 0.0] and all(p.n_studies == 10 for p in result.power)
    # secondary analyses
    assert len(result.posterior) == 4 * 6 and len(result.one_block) == 6 and result.energy == []
    assert [t.what for t in result.trends] == ["ibp-lora posterior rank", "one block at rank 1: validation error change"]
    assert result.trends[0].statistic > 0 and result.trends[1].statistic == pytest.approx(1.0)
    assert len(result.shares) == 4 * (len(RANKS) + 1)
    lora_darcy_1 = next(s for s in result.shares if (s.task, s.method, s.rank) == ("darcy", "lora", 1))
    at_one = planted_curve(RANKS, 4)[0] + 0.01  # darcy's test error at rank 1
    assert lora_darcy_1.share == pytest.approx((0.31 - at_one) / (0.31 - 0.09), abs=0.01)
    assert sorted(b.regime for b in result.benefits) == ["frozen embedder", "trained embedder"]
    check, = result.training
    assert (check.task, check.rank, check.long_epochs) == ("darcy", 8, 30) and check.ratio < 1.15


def test_the_verdict_sentence_names_the_verdict_label(study):
    _, _, result = study
    assert result.verdict.startswith(f"Verdict: **{result.fit.verdict}**")
    assert "procedural r*=1" in result.verdict and "grf-texture r*=32" in result.verdict
    assert "On 1 of 4 tasks the rank benefit G is not above 0" in result.verdict  # procedural's flat curve
    assert "minimum of training is not met" not in result.verdict
    for label in VERDICTS:
        changed = dataclasses.replace(result, fit=dataclasses.replace(result.fit, verdict=label))
        sentence = hyp.verdict(changed)
        assert sentence.startswith(f"Verdict: **{label}**")
        assert all(f"**{other}**" not in sentence for other in VERDICTS if other != label)
    slow = dataclasses.replace(result, training=[TrainingCheck("darcy", 8, [0], 6, 30, 0.2, 0.1, 0.1, 0.1)])
    assert "minimum of training is not met (darcy r=8: 6 epochs 0.2000 against 30 epochs 0.1000 on validation)" \
        in hyp.verdict(slow)
    on_test_only = dataclasses.replace(result, training=[TrainingCheck("darcy", 8, [0], 6, 30, 0.1, 0.1, 0.2, 0.1)])
    assert "minimum of training is not met" not in hyp.verdict(on_test_only)  # the test split never decides
    assert hyp.verdict(dataclasses.replace(result, fit=None, n_tasks=2)).startswith("No verdict: 2 task(s)")


def strict_json(path: Path):
    """The file parsed as strict JSON: NaN, Infinity and -Infinity refused, as jq and JavaScript do."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_write_study_writes_strict_json_that_loads(study, tmp_path):
    _, _, result = study
    # an undefined statistic (a seed sd with one seed, ...) is NaN in the result and null in the file
    undefined = dataclasses.replace(result.noise[0], seed_sd=math.nan)
    path = hyp.write_study(dataclasses.replace(result, noise=[undefined, *result.noise[1:]]), tmp_path)
    assert path == tmp_path / "hypothesis.json"
    loaded = strict_json(path)
    assert loaded["noise"][0]["seed_sd"] is None and loaded["noise"][1]["seed_sd"] is not None
    low, high = next(t for t in loaded["fit"]["tasks"] if t["task"] == "procedural")["log2_interval"]
    assert low is None and high == 0.0  # r* = 1, the grid's lowest rank: unbounded below
    assert loaded["verdict"] == result.verdict and loaded["n_tasks"] == 4
    assert [t["r_star"] for t in loaded["fit"]["tasks"]] == [t.r_star for t in result.fit.tasks]
    assert loaded["fit"]["slope_interval"] == pytest.approx(list(result.fit.slope_interval))
    assert len(loaded["rank_rows"]) == len(result.rank_rows) and len(loaded["shares"]) == len(result.shares)
    assert loaded["fit"]["tasks"][0]["mean_errors"] == pytest.approx(result.fit.tasks[0].mean_errors.tolist())


def write_curve(root, task, gap, val_curve, test_curve, seeds=(0, 1), n=20, unadapted=0.6):
    """LoRA at ranks 1, 2, 4, 8 and the rank-0 (`linear`) run at `unadapted` on every seed: r* by log gain is the
    first rank within a factor (0.6 / 0.1)^0.1 = 1.196 of a best error of 0.1."""
    ranks = (1, 2, 4, 8)
    for seed in seeds:
        for rank, val, test in [(0, unadapted, unadapted), *zip(ranks, val_curve, test_curve)]:
            wiggle = 0.001 * np.sin(np.arange(n) + seed + rank)
            write_study_run(root, f"{task}_r{rank}_s{seed}", task=task, method="lora" if rank else "linear",
                            rank=max(rank, 1), seed=seed, val_errors=val + wiggle, test_errors=test + wiggle,
                            block_gaps=np.full(6, gap))


def test_r_star_is_chosen_on_validation_even_where_test_would_choose_another(tmp_path):
    """darcy: validation reaches its best at r = 2, test only at r = 8; procedural the other way round."""
    write_curve(tmp_path, "darcy", 0.1, val_curve=(0.30, 0.10, 0.10, 0.10), test_curve=(0.30, 0.25, 0.20, 0.10))
    write_curve(tmp_path, "procedural", 0.5, val_curve=(0.30, 0.25, 0.20, 0.10), test_curve=(0.30, 0.10, 0.10, 0.10))
    write_curve(tmp_path, "spectrogram", 2.0, val_curve=(0.30, 0.20, 0.10, 0.10), test_curve=(0.30, 0.20, 0.10, 0.10))
    result = hyp.evaluate_study(read_study([tmp_path]), n_resamples=99, power_studies=0)
    chosen = {c.task: c for c in result.chosen}
    assert (chosen["darcy"].r_star, chosen["darcy"].r_star_on_test) == (2, 8)
    assert (chosen["procedural"].r_star, chosen["procedural"].r_star_on_test) == (8, 2)
    assert (chosen["spectrogram"].r_star, chosen["spectrogram"].r_star_on_test) == (4, 4)
    assert chosen["darcy"].test_error == pytest.approx(0.25, abs=1e-3)  # the test error at the validation r*
    assert chosen["procedural"].test_error == pytest.approx(0.10, abs=1e-3)
    fitted = {t.task: t for t in result.fit.tasks}
    assert fitted["darcy"].r_star == 2 and fitted["procedural"].r_star == 8 and fitted["spectrogram"].r_star == 4
    assert fitted["darcy"].log2_interval == (0.0, 1.0) and fitted["procedural"].log2_interval == (2.0, math.inf)
    assert "darcy r*=2" in result.verdict and "procedural r*=8" in result.verdict
    assert result.power == [] and result.shares == [] and result.posterior == []
    rows = {(r.task, r.rank): r for r in result.rank_rows}
    assert rows["darcy", 2].val_error == pytest.approx(0.10, abs=1e-3)
    assert rows["darcy", 2].test_error == pytest.approx(0.25, abs=1e-3)


def test_fewer_than_three_tasks_give_no_fit(tmp_path):
    write_curve(tmp_path, "darcy", 0.1, (0.3, 0.1, 0.1, 0.1), (0.3, 0.1, 0.1, 0.1), seeds=(0,))
    write_curve(tmp_path, "procedural", 0.5, (0.3, 0.2, 0.1, 0.1), (0.3, 0.2, 0.1, 0.1), seeds=(0,))
    result = hyp.evaluate_study(read_study([tmp_path]), n_resamples=19, power_studies=5)
    assert result.fit is None and result.n_tasks == 2 and result.power == []
    assert [c.r_star for c in result.chosen] == [2, 4]
    assert result.verdict.startswith("No verdict: 2 task(s)")


def test_test_errors_are_reported_over_the_seeds_of_the_validation_curve(tmp_path):
    """Seed 2 ran rank 1 only: the curve (validation) leaves it out, and so must the test errors."""
    write_curve(tmp_path, "darcy", 0.1, (0.3, 0.1, 0.1, 0.1), (0.3, 0.1, 0.1, 0.1))
    write_curve(tmp_path, "procedural", 0.5, (0.3, 0.2, 0.1, 0.1), (0.3, 0.2, 0.1, 0.1))
    write_curve(tmp_path, "spectrogram", 2.0, (0.3, 0.3, 0.2, 0.1), (0.3, 0.3, 0.2, 0.1))
    write_study_run(tmp_path, "darcy_r1_s2", task="darcy", rank=1, seed=2, val_errors=np.full(20, 0.9),
                    test_errors=np.full(20, 0.9), block_gaps=np.full(6, 0.1))
    result = hyp.evaluate_study(read_study([tmp_path]), n_resamples=19, power_studies=0)
    row = next(r for r in result.rank_rows if (r.task, r.rank) == ("darcy", 1))
    assert row.n_seeds == 2 and row.val_error == pytest.approx(0.3, abs=1e-3)
    assert row.test_error == pytest.approx(0.3, abs=1e-3)
    assert next(c for c in result.chosen if c.task == "darcy").r_star_on_test == 2


def write_failed_point_sweep(root: Path) -> Path:
    """A sweep of ranks 0 (`linear`), 1, 4, 8 on three tasks (one seed) whose darcy rank-4 point stopped in stage 1
    (it diverged, or its process died), with the sweep's plan (sweep.json) as `run_sweep` writes it."""
    points = []
    for task, gap, curve in (("darcy", 0.1, (0.6, 0.3, 0.1, 0.1)), ("procedural", 0.5, (0.6, 0.3, 0.2, 0.1)),
                             ("spectrogram", 2.0, (0.6, 0.3, 0.3, 0.1))):
        for rank, error in zip((0, 1, 4, 8), curve):
            name = f"{task}_rank{rank}"
            method = ("stage3.method=lora", f"stage3.rank={rank}") if rank else ("stage3.method=linear",)
            points.append(SweepPoint(name, {"task": task, "rank": f"rank{rank}"}, (f"task.name={task}", *method)))
            if name == "darcy_rank4":
                write_marker(RunFiles(root / name), "stage1", StageRecord("hash"))
                continue
            errors = error + 0.001 * np.sin(np.arange(20) + rank)
            write_study_run(root, name, task=task, method="lora" if rank else "linear", rank=max(rank, 1),
                            val_errors=errors, test_errors=errors, block_gaps=np.full(6, gap))
    (root / "sweep.json").write_text(json.dumps({"name": "study", "base": "base.yaml", "set": [],
                                                 "points": [dataclasses.asdict(point) for point in points]}))
    return root


def test_a_failed_point_of_the_sweeps_plan_is_named_and_its_curve_is_not_complete(tmp_path):
    runs = read_study([write_failed_point_sweep(tmp_path)])
    result = hyp.evaluate_study(runs, n_resamples=19, power_studies=0, plan=check_plan([tmp_path], runs))
    point, = result.missing
    assert (point.name, point.task, point.method, point.rank, point.seed, point.primary) == \
        ("darcy_rank4", "darcy", "lora", 4, 0, True)
    assert point.state == "stopped in stage1: failed, interrupted or still running" and result.planned_points == 12
    assert result.incomplete == [hyp.IncompleteCurve("darcy", [1, 8], [4], ["darcy_rank4"])]
    # analysed as what it is: darcy's r* from ranks 1 and 8 is 8, censored above (rank 4 would have been r*)
    assert result.fit is not None and result.n_tasks == 3
    assert {t.task: (t.r_star, t.log2_interval) for t in result.fit.tasks}["darcy"] == (8, (0.0, math.inf))
    assert hyp.sweeps_phrase(result) == "3 task(s) with a rank sweep, 1 of them incomplete (darcy)"
    assert "These runs lack 1 of the sweep's 12 planned points: darcy_rank4 (darcy, lora, rank 4, seed 0; stopped " \
           "in stage1: failed, interrupted or still running). Re-run the sweep" in result.verdict
    assert "The darcy curve is incomplete (no run at rank 4): its r* is chosen from ranks 1, 8" in result.verdict
    (tmp_path / "sweep.json").unlink()  # not a sweep: analysed as before, nothing to name
    plain = hyp.evaluate_study(runs, n_resamples=19, power_studies=0, plan=check_plan([tmp_path], runs))
    assert plain.missing == [] and plain.incomplete == [] and "lack" not in plain.verdict


def test_hypothesis_names_the_failed_point_on_the_console_and_writes_strict_json(tmp_path, capsys):
    write_failed_point_sweep(tmp_path)
    assert cli.main(["hypothesis", str(tmp_path), "--resamples", "19", "--power-studies", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("not finished: darcy_rank4 (darcy, lora, rank 4, seed 0; stopped in stage1: failed")
    assert "The darcy curve is incomplete (no run at rank 4)" in out
    loaded = strict_json(tmp_path / "hypothesis.json")
    assert [point["name"] for point in loaded["missing"]] == ["darcy_rank4"]
    assert loaded["incomplete"][0]["lacking_ranks"] == [4]


def test_the_power_simulation_names_why_it_cannot_run():
    ranks = np.array([1, 2, 4])
    noisy = hyp.NoiseEstimate("t", 1.0, 2.0, 0.5, 0.1, 0.2)

    def curve(ranks, seeds=2):
        return hyp.TaskCurve("t", 10.0, ranks, np.zeros((seeds, len(ranks), 5)))

    assert "at least 3 tasks" in hyp.power_unavailable([curve(ranks)] * 2, [noisy])
    assert "differ in rank grid" in hyp.power_unavailable([curve(ranks), curve(ranks), curve(np.array([1, 2]))],
                                                          [noisy])
    silent = hyp.NoiseEstimate("t", 1.0, 2.0, 0.5, math.nan, math.nan)
    assert "two or more seeds" in hyp.power_unavailable([curve(ranks, 1)] * 3, [silent])
    no_gain = hyp.NoiseEstimate("t", 1.0, 1.0, math.nan, 0.1, 0.2)  # e(0) at the best: no log gain to share
    assert "rank-0 error lies above its best" in hyp.power_unavailable([curve(ranks)] * 3, [no_gain])
    assert hyp.power_unavailable([curve(ranks)] * 3, [noisy]) is None
