"""A sweep's table in the seeds' form (method, rank, trainable params in M, prediction error), as CSV and Markdown."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

from orca_lora.files import write_text_atomic
from orca_lora.studies.seed_table import TableRow

COLUMNS = ("task", "method", "allocation", "rank", "trainable_params_M", "prediction_error_mean",
           "prediction_error_std", "n_seeds")


def table_csv(rows: Sequence[TableRow]) -> str:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([row.task, row.method, row.allocation, "" if row.rank is None else row.rank,
                         f"{row.trainable_params_m:.4f}", f"{row.error_mean:.6g}",
                         "" if math.isnan(row.error_std) else f"{row.error_std:.3g}", row.n_seeds])
    return stream.getvalue()


def _error_cell(row: TableRow) -> str:
    if math.isnan(row.error_std):
        return f"{row.error_mean:.4f} (1 seed)"
    return f"{row.error_mean:.4f} ± {row.error_std:.4f} ({row.n_seeds} seeds)"


def table_markdown(rows: Sequence[TableRow]) -> str:
    lines = ["| task | method | ranks | rank | trainable params (M) | prediction error (↓) |",
             "| --- | --- | --- | ---: | ---: | --- |"]
    for row in rows:
        rank = "" if row.rank is None else str(row.rank)
        lines.append(f"| {row.task} | {row.method} | {row.allocation} | {rank} | "
                     f"{row.trainable_params_m:.4f} | {_error_cell(row)} |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[TableRow], directory: Path) -> list[Path]:
    """`table.csv` and `table.md` in `directory`."""
    written = [directory / "table.csv", directory / "table.md"]
    write_text_atomic(written[0], table_csv(rows))
    write_text_atomic(written[1], table_markdown(rows))
    return written
