"""Running many runs: a sweep file's grids become points (one run directory each), run here or in
local worker processes, finished points skipped. Reads configs, calls the pipeline; the statistics
of the finished runs are `studies/`'s, their tables and figures `reports/`'s."""
