"""The statistics of finished runs, read from their run files only (numpy, scipy, statsmodels; no
matplotlib, no Markdown): seed tables, allocation comparisons, the rank-vs-gap study (r* on
validation, the censored fit, power, per-block evidence, method shares). `stats/` holds the general
tools (bootstrap, paired tests, censored regression) the studies share."""
