"""General statistics the studies share: one bootstrap over seeds and samples, one standard error
over seeds, paired tests over test samples, interval-censored regression."""
