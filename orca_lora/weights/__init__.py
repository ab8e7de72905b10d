"""Looking inside trained weights (torch): spectra and minimal ranks of the weight changes of runs,
and the similarity of two runs' LoRA subspaces."""
