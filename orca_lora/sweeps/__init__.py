"""Running many runs: a sweep file's grids become points (one run directory each; `grid.py`, `sweep.py`),
run here or in local worker processes (`pool.py`) or submitted as SLURM job arrays (`slurm.py`), finished
points skipped, their state at a glance (`status.py`). Reads configs, calls the pipeline; the statistics
of the finished runs are `studies/`'s, their tables and figures `reports/`'s."""
