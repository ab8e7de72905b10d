"""The study's Markdown report (`report.md`) from a `hypothesis.StudyResult`: the verdict, the tables
the plan (`configs/study_gap.md`) asks for, the figures of `study_plots`, and the limits the data set.
A missing part is said plainly, with the runs that would supply it."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

from orca_lora.files import write_text_atomic
from orca_lora.reports.study_plots import log2_intervals, method_label, plot_study, task_order
from orca_lora.studies.block_evidence import BlockTrend
from orca_lora.studies.hypothesis import StudyResult, flat_tasks, sweeps_phrase
from orca_lora.studies.plan import TRAINING_RATIO, training_met

PLAN = "configs/study_gap.md"
PRIMARY_SWEEP = ("the primary sweep of `configs/study_gap.yaml` (uniform LoRA at ranks 1, 2, 4, 8, 16, 32, "
                 "seeds 0, 1, 2, on every task)")


def _number(value: Optional[float], digits: int = 4) -> str:
    """`digits` significant digits; n/a for None or NaN, the infinity sign for an unbounded end."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}g}"


def _fixed(value: Optional[float], decimals: int = 2) -> str:
    return _number(value) if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _plus_minus(mean: float, se: float) -> str:
    return f"{_number(mean)} ± {_number(se, 2)}" if math.isfinite(se) else f"{_number(mean)} (one seed)"


def _bracket(interval: Sequence[float], digits: int = 4) -> str:
    return f"[{_number(interval[0], digits)}, {_number(interval[1], digits)}]"


def rank_range(log2_interval: tuple[float, float]) -> str:
    """The censoring interval of log2 r* as ranks: (2, 4], (0, 1] below the grid, (16, ∞) above it."""
    low, high = log2_interval
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    left = "0" if math.isinf(low) else f"{2.0 ** low:g}"
    return f"({left}, ∞)" if math.isinf(high) else f"({left}, {2.0 ** high:g}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _figure(figures: dict[str, str], stem: str, caption: str) -> list[str]:
    return [f"![{caption}]({figures[stem]})", ""] if stem in figures else []


def _title(result: StudyResult, command: str, wall_time: Optional[str]) -> list[str]:
    verdict = result.verdict or "No verdict was computed."
    lines = ["# Does the LoRA rank needed grow with the modality gap?", "",
             f"{verdict} Primary regime: {result.regime}; {sweeps_phrase(result)}; {result.n_runs} runs read."]
    if command:
        lines += ["", f"Command: `{command}`"]
    if wall_time:
        lines += ["", f"Wall time of the study: {wall_time}"]
    if result.control_studies:
        met = sum(study.result.controls.passed is True for study in result.control_studies)
        lines += ["", f"Known-answer controls: {met} of {len(result.control_studies)} met ("
                  + ", ".join(f"`{Path(study.directory).name}`: {_control_met(study.result)}"
                              for study in result.control_studies) + "; \"Known-answer controls beside the verdict\")."]
    return lines


def _plan(result: StudyResult) -> list[str]:
    return ["## Analysis plan", "",
            f"The analysis follows `{PLAN}` (in the repository), fixed before the study ran. r* is chosen on "
            f"validation errors only: the smallest swept rank whose error is within {result.gain_fraction:.0%} of the "
            "log gain from the un-adapted model (rank 0, the task's `linear` runs) to the best, "
            f"e(r) <= e_best (e(0) / e_best)^{result.gain_fraction:.2f}; the test split is read for the reported "
            "numbers only."]


def _task_rows(result: StudyResult) -> list[list[str]]:
    intervals = log2_intervals(result)
    benefits = {task.task: task for task in result.fit.tasks} if result.fit else {}
    rows = []
    for chosen in sorted(result.chosen, key=lambda chosen: chosen.gap):
        benefit = benefits.get(chosen.task)
        rows.append([chosen.task, _number(chosen.gap), str(chosen.r_star),
                     rank_range(intervals.get(chosen.task, (math.nan, math.nan))), str(chosen.r_star_on_test),
                     _plus_minus(chosen.test_error, chosen.test_se),
                     f"{_number(benefit.rank_benefit)} {_bracket(benefit.rank_benefit_interval)}" if benefit
                     else "n/a (no fit)"])
    return rows


def _tasks_section(result: StudyResult) -> list[str]:
    lines = ["## Tasks", ""]
    if not result.chosen:
        return lines + [f"No task has a complete rank sweep: run {PRIMARY_SWEEP}."]
    header = ["task", "gap D", "r* (validation)", "r* interval (ranks)", "r* on test (never used)",
              "test error at r* ± SE", "G (validation) [95% interval]"]
    return lines + _table(header, _task_rows(result)) + [
        "", "The r* the test split would have chosen is shown only to expose the selection; it is never used."]


def _fit_section(result: StudyResult, figures: dict[str, str]) -> list[str]:
    lines = ["## Primary fit: log2 r* = a + beta log2 D", ""]
    lines += _figure(figures, "study_rank_vs_gap", "r* against the gap, and posterior rank per block")
    fit = result.fit
    if fit is None:
        return lines + [f"No fit: {sweeps_phrase(result)}; the censored fit needs at least 3 tasks with distinct "
                        f"gaps (the plan asks for 8): run {PRIMARY_SWEEP}."]
    rows = [["beta (r* ~ D^beta)", _fixed(fit.slope)],
            [f"{fit.level:.0%} interval (bootstrap, {fit.n_resamples} replicates; joined by the slopes of exact lines "
             "where any meet every task)",
             f"[{_fixed(fit.slope_interval[0])}, {_fixed(fit.slope_interval[1])}]"],
            ["verdict", fit.verdict], ["intercept a (log2 r* at D = 1)", _fixed(fit.intercept)],
            ["p for beta = 0", _number(fit.p_slope_zero, 3)], ["p for beta = 1", _number(fit.p_slope_one, 3)],
            ["sigma (scatter of log2 r*)", _fixed(fit.sigma)],
            ["Spearman rho (D, r*)", _fixed(fit.spearman_rho)],
            ["one-sided permutation p", _number(fit.spearman_p, 3)],
            ["leave-one-task-out error, with the gap (log2 units)", _fixed(fit.loto_error_gap)],
            ["leave-one-task-out error, without the gap", _fixed(fit.loto_error_no_gap)]]
    return lines + _table(["statistic", "value"], rows)


def _controls_section(result: StudyResult, heading: str = "## Known-answer controls") -> list[str]:
    """Planted k against the recovered r*, the gaps against k, and what the fit must find on them."""
    controls = result.controls
    if controls is None:
        return []
    lines = [heading, "",
             "Each planted task needs exactly rank k where its plant sits (planted-shift: the embedding projection; "
             "planted-function: the planted Linear; README, \"Known-answer controls\"); "
             "the study's own rule must choose r* = k on validation (n/a: the task has no rank-0 runs). Shown "
             "beside it, not fitted: the gain r* (the plan's rule before its amendment of 21:42: within 10% of the "
             "gain from the smallest rank), the paired r* (the smallest rank not worse than the best by a one-sided "
             "paired t-test on validation samples, level 0.05) and the ratio r* (the smallest rank within 15% of "
             "the best validation error).", ""]
    rows = [[row.task, str(row.planted_k), "n/a" if row.r_star is None else str(row.r_star),
             "yes" if row.recovered else "no", str(row.gain_r_star), str(row.paired_r_star), str(row.ratio_r_star),
             _number(row.unadapted_error, 3) if row.unadapted_error is not None else "n/a",
             _bracket(row.r_star_percentiles, 3) if row.r_star_percentiles else "n/a (no fit)",
             "n/a" if row.fraction_at_k is None else f"{row.fraction_at_k:.0%}",
             _number(row.block0_gap), _number(row.mean_gap),
             ", ".join(f"{rank}: {_number(error, 3)}" for rank, error in zip(row.ranks, row.mean_errors))]
            for row in controls.rows]
    lines += _table(["task", "planted k", "r* (validation)", "r* = k", "gain r*", "paired r*", "ratio r*", "e(0)",
                     "r* bootstrap 2.5-97.5%",
                     "replicates at k", "D block 0", "mean D", "validation e(r)"], rows)
    fit = result.fit
    gaps = {True: "The mean gap increases with k.", False: "The mean gap does not increase with k.",
            None: f"Every task plants k = {controls.rows[0].planted_k} (a planted null): only the gap moves."}
    if controls.gaps_at_floor:
        gaps[False] = ("Every gap is at its floor (a function control: only rank moves), so no fit can attribute r* "
                       "to the gap.")
    lines += ["", f"Recovered r* = k on {controls.recovered} of {len(controls.rows)} planted tasks. "
              f"{gaps[controls.gaps_increase_with_k]} The planted law r* = "
              f"k is, against the measured mean gap, an elasticity of {_fixed(controls.planted_elasticity)} (against "
              f"D at block 0: {_fixed(controls.block0_elasticity)}); the fit's beta: "
              + (f"{_fixed(fit.slope)} [{_fixed(fit.slope_interval[0])}, {_fixed(fit.slope_interval[1])}], verdict "
                 f"{fit.verdict}." if fit is not None else "no fit."),
              "", f"The plan requires of this control: {controls.requirement}. Met: "
              + {True: "**yes**.", False: "**no**.", None: "cannot be judged (no fit)."}[controls.passed]]
    return lines


def _control_met(result: StudyResult) -> str:
    return {True: "yes", False: "**no**", None: "cannot be judged"}[result.controls.passed]


def _control_studies_section(result: StudyResult) -> list[str]:
    """The control sweeps read beside the study (`--controls`): one line each, then each control's own section."""
    if not result.control_studies:
        return []
    lines = ["## Known-answer controls beside the verdict", "",
             "Each control sweep analysed on its own (its regime, its fit; never pooled with the study's tasks), by "
             "the same r* rule, censored fit and verdict rule. A control the instrument fails limits what the "
             "study's verdict can mean.", ""]
    rows = [[f"`{study.directory}`", study.result.regime, study.result.controls.requirement, _control_met(study.result),
             f"{_fixed(study.result.fit.slope)} {_bracket(study.result.fit.slope_interval, 3)}, "
             f"{study.result.fit.verdict}" if study.result.fit else "no fit"]
            for study in result.control_studies]
    lines += _table(["control sweep", "regime", "the plan requires", "met", "beta [95% interval], verdict"], rows)
    for study in result.control_studies:
        lines += [""] + _controls_section(study.result, f"### Control `{study.directory}`")
    return lines


def _curves_section(result: StudyResult, figures: dict[str, str]) -> list[str]:
    lines = ["## Error against rank", ""]
    lines += _figure(figures, "study_rank_curves", "validation and test error against rank per task")
    if not result.rank_rows:
        return lines + [f"No rank curves: run {PRIMARY_SWEEP}."]
    chosen = {c.task: c for c in result.chosen}
    order = task_order(result)
    rows = []
    for row in sorted(result.rank_rows, key=lambda row: (order.index(row.task), row.rank)):
        marks = [label for label, rank in (("r* (validation)", getattr(chosen.get(row.task), "r_star", None)),
                                           ("r* on test (never used)",
                                            getattr(chosen.get(row.task), "r_star_on_test", None)))
                 if rank == row.rank]
        rows.append([row.task, str(row.rank), str(row.n_seeds), _plus_minus(row.val_error, row.val_se),
                     _plus_minus(row.test_error, row.test_se), ", ".join(marks)])
    header = ["task", "rank", "seeds", "validation e(r) ± SE", "test e(r) ± SE", "chosen"]
    return lines + _table(header, rows)


def _power_section(result: StudyResult) -> list[str]:
    lines = ["## Power at the measured noise", ""]
    if result.power:
        rows = [[_fixed(p.beta), str(p.n_studies), f"{p.coverage:.0%}", f"{p.declared_growth:.0%}",
                 ", ".join(f"{label} {rate:.0%}" for label, rate in p.verdict_rates.items()),
                 _fixed(p.median_interval_width), str(p.n_resamples)] for p in result.power]
        lines += _table(["planted beta", "studies", "coverage of beta", "declared growth", "verdict rates",
                         "median interval width", "bootstrap replicates"], rows)
    else:
        lines.append(f"No power simulation: {result.power_note}. The study's own design is {PRIMARY_SWEEP}.")
    lines += ["", "Measured per task (validation): the best error, e(0) / e_best, the share of the log gain left at "
              "the smallest rank, and the seed and sample sd as fractions of each rank's error (the simulation takes "
              "their medians):", ""]
    if not result.noise:
        return lines + ["No noise estimates: no rank curves."]
    rows = [[n.task, _number(n.best), _number(n.unadapted_ratio, 3), _number(n.first_share, 3), _number(n.seed_sd, 3),
             _number(n.sample_sd, 3)] for n in result.noise]
    return lines + _table(["task", "e_best", "e(0) / e_best", "log-gain share at r_min", "seed sd / e(r)",
                           "sample sd / e(r)"], rows)


def _trend_row(trend: BlockTrend) -> list[str]:
    if trend.task is None:
        statistic = f"slope {_fixed(trend.statistic)} of log2(1 + value) per doubling of D"
        task = "pooled (mixed model)"
    else:
        statistic, task = f"Spearman rho {_fixed(trend.statistic)}", trend.task
    interval = _bracket(trend.interval, 3) if trend.interval else "-"
    return [trend.what, task, statistic, interval, _number(trend.p_value, 3), str(trend.n_points)]


def _blocks_section(result: StudyResult, figures: dict[str, str]) -> list[str]:
    lines = ["## Per block", ""]
    lines += _figure(figures, "study_blocks", "one block at a time, and energy ranks per block")
    missing = [message for part, message in (
        (result.posterior, "No ibp-lora posterior ranks: run ibp-lora with a flat prior (the `ibp-flat` grid of "
                           "`configs/study_gap.yaml`)."),
        (result.one_block, "No one-block runs: run one block at rank 1 with the others at 8 (the `block` grid of "
                           "`configs/study_gap.yaml`: `stage3.block_ranks`)."),
        (result.energy, "No energy ranks: they need `full` fine-tuning runs in the primary regime."))
        if not part]
    lines += [f"- {message}" for message in missing] + ([""] if missing else [])
    if not result.trends:
        return lines + ["No block trends: none of the block parts has enough points (3 blocks per task, 2 tasks "
                        "for the mixed model)."]
    header = ["what", "task", "statistic", "95% interval", "p", "points"]
    return lines + _table(header, [_trend_row(trend) for trend in result.trends])


def _methods_section(result: StudyResult, figures: dict[str, str]) -> list[str]:
    lines = ["## Methods against full fine-tuning (test)", ""]
    lines += _figure(figures, "study_method_shares", "each method's share of the linear to full gap")
    if not result.shares:
        return lines + ["No methods-vs-full comparison: it needs `linear` and `full` runs of a task beside its "
                        "adapter runs (the `linear` / `full` and other-method grids of `configs/study_gap.yaml`)."]
    rows = [[s.task, method_label(s), "-" if s.rank is None else str(s.rank), ", ".join(map(str, s.seeds)),
             _plus_minus(s.test_error, s.test_se), f"{_fixed(s.share)} {_bracket(s.share_interval, 3)}",
             _number(s.linear_error), _number(s.full_error)] for s in result.shares]
    header = ["task", "method", "rank", "seeds", "test error ± SE", "share [95% interval]", "linear error",
              "full error"]
    return lines + _table(header, rows) + ["", "share = (e_linear - e_method) / (e_linear - e_full): 0 is the "
                                                "head alone, 1 full fine-tuning."]


def _benefits_section(result: StudyResult, figures: dict[str, str]) -> list[str]:
    lines = ["## Rank benefit: embedder frozen against trained (test)", ""]
    lines += _figure(figures, "study_rank_benefits", "rank benefit by embedder regime")
    if not result.benefits:
        return lines + ["No frozen-vs-trained comparison: it needs the trained-embedder slice "
                        "(`stage3.train_embedder=true` at the study's lowest and highest rank: the `embedder` grid of "
                        "`configs/study_gap.yaml`)."]
    rows = [[b.task, b.regime, ", ".join(map(str, b.seeds)), f"{b.low_rank} -> {b.high_rank}",
             _number(b.low_error), _number(b.high_error),
             f"{_number(b.benefit, 3)} {_bracket(b.benefit_interval, 3)}"] for b in result.benefits]
    header = ["task", "regime", "seeds", "ranks", "test e(low)", "test e(high)", "G [95% interval]"]
    return lines + _table(header, rows)


def _training_section(result: StudyResult) -> list[str]:
    lines = ["## Minimum of training", ""]
    if not result.training:
        return lines + ["No minimum-of-training check: it needs LoRA runs trained longer than the study's epochs "
                        "(darcy, r = 8, 30 epochs, seed 0)."]
    rows = [[c.task, str(c.rank), ", ".join(map(str, c.seeds)), f"{c.study_epochs} / {c.long_epochs}",
             f"{_number(c.study_val)} / {_number(c.long_val)}", f"{_number(c.study_test)} / {_number(c.long_test)}",
             _fixed(c.ratio, 3), "met" if training_met(c.ratio) else "not met"] for c in result.training]
    header = ["task", "rank", "seeds", "epochs (study / long)", "validation (study / long)", "test (study / long)",
              "validation ratio", f"ratio <= {TRAINING_RATIO}"]
    return lines + _table(header, rows)


def _missing_parts(result: StudyResult) -> list[str]:
    parts = (("no fit", result.fit), ("no power simulation", result.power),
             ("no ibp-lora posterior ranks", result.posterior), ("no one-block runs", result.one_block),
             ("no energy ranks", result.energy), ("no methods-vs-full shares", result.shares),
             ("no frozen-vs-trained comparison", result.benefits), ("no minimum-of-training check", result.training))
    return [label for label, part in parts if not part]


def _limits_section(result: StudyResult) -> list[str]:
    seeds = sorted({row.n_seeds for row in result.rank_rows})
    seed_text = "none" if not seeds else str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]} to {seeds[-1]}"
    lines = ["## Limits", "",
             f"- {sweeps_phrase(result)} (the plan asks for 8).",
             f"- Seeds per (task, rank): {seed_text}.",
             f"- Validation samples per task: {result.validation_samples or 'none read'}."]
    if result.fit is not None:
        flat = flat_tasks(result.fit)
        lines.append(f"- Tasks whose rank benefit G is not above 0 on validation (r* there reads noise, not need): "
                     f"{', '.join(flat)}." if flat else "- Every task's G interval lies above 0.")
    censored = [task for task, (low, high) in log2_intervals(result).items() if math.isinf(low) or math.isinf(high)]
    if censored:
        lines.append(f"- r* at an end of the grid (censored): {', '.join(censored)}.")
    moved = [c.task for c in result.chosen if c.r_star != c.r_star_on_test]
    if moved:
        lines.append(f"- The test split would have chosen another r* on: {', '.join(moved)}.")
    missing = _missing_parts(result)
    lines.append(f"- Missing from this study: {'; '.join(missing)}." if missing else "- Every part of the plan has "
                                                                                     "data.")
    if result.planned_points and not result.missing:
        lines.append(f"- Every one of the sweep's {result.planned_points} planned points finished.")
    return lines


def _unfinished_section(result: StudyResult) -> list[str]:
    """The planned points with no finished run (`sweep.json` against the runs read); empty when none."""
    if not result.missing:
        return []
    lines = ["## Planned points that did not finish", "",
             f"{len(result.missing)} of the sweep's {result.planned_points} planned points have no finished run, "
             "so the analysis reads the others as they are: a curve without a rank is fitted on the ranks it has "
             "(its r* interval is wider than planned), and seeds without every rank are left out of their curve. "
             "Re-run the sweep (`orca-lora sweep SWEEP.yaml` skips the finished points) to fill them.", ""]
    rows = [[point.name, point.state, point.task or "?", point.method or "?",
             "?" if point.rank is None else str(point.rank), "?" if point.seed is None else str(point.seed),
             "yes" if point.primary else "no"] for point in result.missing]
    lines += _table(["point", "state", "task", "method", "rank", "seed", "primary sweep"], rows)
    lines += [""] if result.incomplete else []
    for curve in result.incomplete:
        hole = f", none at rank {', '.join(map(str, curve.lacking_ranks))}" if curve.lacking_ranks else ""
        lines.append(f"- {curve.task}: incomplete curve{hole}; r* chosen from ranks "
                     f"{', '.join(map(str, curve.ranks))}.")
    return lines


def _deviations_section(result: StudyResult) -> list[str]:
    lines = ["## Deviations", "", "The plan's own amendments, each made before any result was read, are listed in "
             "`configs/study_gap.md`. What this analysis had to do that the plan does not say:", ""]
    return lines + ([f"- {note}" for note in result.deviations] or ["- nothing."])


def write_report(result: StudyResult, directory: Path, command: str = "", wall_time: str | None = None) -> Path:
    """`directory/report.md` (written atomically) with the study's figures under `directory/plots/`."""
    directory = Path(directory)
    figures = {path.stem: path.relative_to(directory).as_posix() for path in plot_study(result, directory)
               if path.suffix == ".png"}
    sections = [_title(result, command, wall_time), _unfinished_section(result), _plan(result), _tasks_section(result),
                _fit_section(result, figures), _controls_section(result), _control_studies_section(result),
                _curves_section(result, figures), _power_section(result),
                _blocks_section(result, figures), _methods_section(result, figures),
                _benefits_section(result, figures), _training_section(result), _deviations_section(result),
                _limits_section(result)]
    path = directory / "report.md"
    write_text_atomic(path, "\n\n".join("\n".join(section) for section in sections if section) + "\n")
    return path
