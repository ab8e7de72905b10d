"""Tests of the weight analysis' measurements (orca_lora/weights/analysis.py); the files and figures are tests/reports/test_weight_report.py's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orca_lora.weights.analysis import RunWeights, compare_adapters, run_labels
from orca_lora.weights.subspace import subspace_similarity


def test_run_labels_number_repeated_names():
    assert run_labels([Path("a/x"), Path("b/y")]) == ["x", "y"]
    assert run_labels([Path("a/x"), Path("b/x"), Path("c/y")]) == ["x-0", "x-1", "y"]


def adapter_run(label: str, modules: dict[str, int], seed: int) -> RunWeights:
    generator = torch.Generator().manual_seed(seed)
    lora_A = {name: torch.randn(rank, 12, generator=generator) for name, rank in modules.items()}
    return RunWeights(label, Path(label), "lora", dict(modules), {}, lora_A)


def test_compare_adapters_pairs_the_shared_modules():
    first = adapter_run("a", {"body.m1": 2, "body.m2": 3}, seed=0)
    second = adapter_run("b", {"body.m2": 4, "body.m3": 1}, seed=1)
    [similarity] = compare_adapters(first, second)
    assert (similarity.run_a, similarity.run_b, similarity.module, similarity.d_in) == ("a", "b", "body.m2", 12)
    torch.testing.assert_close(similarity.phi, subspace_similarity(first.lora_A["body.m2"], second.lora_A["body.m2"]))
    assert similarity.chance == pytest.approx(4 / 12)
    with pytest.raises(ValueError, match="no module in common"):
        compare_adapters(first, adapter_run("c", {"body.m9": 2}, seed=2))
