"""The allocation comparison's table (CSV and Markdown, with its notes) from a `studies.compare.CompareResult`."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional

from orca_lora.files import write_text_atomic
from orca_lora.studies.compare import CompareResult

# what a reader of the table must know about an allocation besides its ranks
ALLOCATION_NOTES = {
    "eva": "EVA's ranks and its initialisation (lora_A from EVA's components, B = 0), not its ranks alone.",
    "adalora": "masks, not resizes: it trained the parameters in parentheses (init_r) and is tested at its "
               "final ranks, whose cost (adapter params) follows PEFT's budget of rank-1 triplets, not ours.",
}


CSV_COLUMNS = ("task", "budget", "allocation", "lr", "n_seeds", "val_error_mean", "test_error_mean", "test_error_se",
               "adapter_params", "trainable_params", "trained_params", "n_test", "difference_vs_uniform",
               "p_value", "p_holm", "seed_difference", "seed_difference_se")


def _cell(value: Any, digits: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def compare_csv(result: CompareResult) -> str:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in result.rows:
        writer.writerow([_cell(getattr(row, name)) for name in (
            "task", "budget", "allocation", "lr", "n_seeds", "val_error", "test_error", "test_se", "adapter_params",
            "trainable_params", "trained_params", "n_test", "difference", "p_value", "p_holm", "seed_difference",
            "seed_difference_se")])
    return stream.getvalue()


def _plus_minus(mean: Optional[float], se: Optional[float], signed: bool = False) -> str:
    if mean is None:
        return ""
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text if se is None or math.isnan(se) else f"{text} ± {se:.4f}"


def compare_markdown(result: CompareResult) -> str:
    lines = ["| task | budget | allocation | lr (val) | seeds | val error | test error ± SE | Δ vs uniform "
             f"(test samples) | p ({result.paired_test}) | p Holm | Δ over seeds ± SE | adapter params | "
             "trainable (trained) params |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for row in result.rows:
        params = f"{row.trainable_params:,}" + ("" if row.trained_params in (None, row.trainable_params)
                                                 else f" ({row.trained_params:,})")
        lines.append(f"| {row.task} | {row.budget} | {row.allocation} | {row.lr:g} | {row.n_seeds} | "
                     f"{row.val_error:.4f} | {_plus_minus(row.test_error, row.test_se)} | "
                     f"{_plus_minus(row.difference, None, signed=True)} | {_cell(row.p_value, 3)} | "
                     f"{_cell(row.p_holm, 3)} | {_plus_minus(row.seed_difference, row.seed_difference_se, True)} | "
                     f"{row.adapter_params:,} | {params} |")
    notes = ("Learning rates chosen on the mean validation error over seeds; test errors only reported. Δ < 0: "
             f"lower test error than uniform at its own chosen lr. p: two-sided paired {result.paired_test} test over "
             "test samples (errors averaged over seeds), Holm-adjusted over the table's comparisons.")
    shown = {row.allocation for row in result.rows}
    notes += "".join(f" {name}: {note}" for name, note in ALLOCATION_NOTES.items() if name in shown)
    return "\n".join(lines) + "\n\n" + notes + "\n"


def write_compare(result: CompareResult, directory: Path) -> list[Path]:
    """`compare.csv` and `compare.md` in `directory`."""
    written = [directory / "compare.csv", directory / "compare.md"]
    write_text_atomic(written[0], compare_csv(result))
    write_text_atomic(written[1], compare_markdown(result))
    return written
