"""Text and figures made from results: one run's figures, a sweep's tables and figures, the
allocation comparison's tables and figures, the study's report.md, the weight analysis' files.
Figures are drawn from saved run files or from `studies/` results, never from stage internals."""
