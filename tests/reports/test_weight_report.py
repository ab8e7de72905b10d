import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from weights.test_analysis import adapter_run

from orca_lora.config import to_yaml
from orca_lora.config_load import load_config
from orca_lora.models.source import load_source_body
from orca_lora.pipeline import run_pipeline
from orca_lora.reports import weight_report
from orca_lora.reports.weight_report import analyze_runs, format_analysis
from orca_lora.run_files import RunFiles, read_ranks
from orca_lora.weights import analysis
from orca_lora.weights.subspace import subspace_similarity

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
RUN_SETTINGS = {
    "lora": [],
    "lora_r4": ["seed=1", "stage2.enabled=false", "stage3.rank=4"],
    "full": ["stage3.method=full"],
}


def test_bad_arguments_fail_before_reading_runs(tmp_path):
    with pytest.raises(ValueError, match="no run directories"):
        analyze_runs([], tmp_path)
    with pytest.raises(ValueError, match="energy_fraction"):
        analyze_runs([tmp_path], tmp_path, energy_fraction=0.0)
    with pytest.raises(ValueError, match="max_panels"):
        analyze_runs([tmp_path], tmp_path, max_panels=0)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        analyze_runs([tmp_path / "nothing"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("analysis_runs")


@pytest.fixture
def tiny_runs(tiny_overrides, run_root) -> dict[str, Path]:
    """Two LoRA runs (ranks 8 and 4, seeds 0 and 1) and a full fine-tuning run, trained once per module."""
    for name, extra in RUN_SETTINGS.items():
        if not (run_root / name / "metrics.json").is_file():
            overrides = tiny_overrides + extra + [f"output.root={run_root}", f"output.name={name}"]
            run_pipeline(load_config(QUICKSTART, overrides))
    return {name: run_root / name for name in RUN_SETTINGS}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def stage2_ranks(run: Path) -> dict[str, int]:
    return read_ranks(RunFiles(run)).ranks


def source_body(run: Path) -> nn.Module:
    config = load_config(run / "config.yaml")
    return load_source_body(config.source, config.data_root)


@pytest.mark.slow
def test_two_lora_runs_give_heat_maps_and_update_spectra(tiny_runs, tmp_path):
    runs = [tiny_runs["lora"], tiny_runs["lora_r4"]]
    result = analyze_runs(runs, tmp_path / "out", energy_fraction=0.9, max_panels=4)
    out = tmp_path / "out"
    for name in ("update_spectra.csv", "subspace_similarity.csv", "subspace_lora__lora_r4.csv", "analysis.json",
                 "update_spectra_lora.png", "update_spectra_lora_r4.pdf", "subspace_lora__lora_r4.png",
                 "subspace_lora__lora_r4.pdf"):
        assert (out / name).is_file() and out / name in result.files, name
    modules = list(stage2_ranks(runs[0]))
    assert [s.module for s in result.similarities] == modules
    # independent reading: PEFT's adapter files, A from adapter_model.safetensors, dW from PEFT's layers
    grids = read_rows(out / "subspace_lora__lora_r4.csv")
    adapters = [load_file(str(run / "stage3" / "adapter" / "adapter_model.safetensors")) for run in runs]
    for similarity in result.similarities:
        key = f"base_model.model.{similarity.module}.lora_A.weight"
        expected = subspace_similarity(adapters[0][key], adapters[1][key])
        torch.testing.assert_close(similarity.phi, expected)
        written = [float(r["phi"]) for r in grids if r["module"] == similarity.module]
        np.testing.assert_allclose(written, expected.flatten().numpy(), rtol=1e-5)
    summary = read_rows(out / "subspace_similarity.csv")
    ranks = stage2_ranks(runs[0])
    assert [(r["rank_a"], r["rank_b"]) for r in summary] == [(str(ranks[m]), "4") for m in modules]

    holder = nn.Module()
    holder.body = source_body(runs[0])
    peft_model = peft.PeftModel.from_pretrained(holder, runs[0] / "stage3" / "adapter")
    saved = json.loads((out / "analysis.json").read_text())["singular_values"]["lora"]
    for spectrum in [s for s in result.spectra if s.run == "lora"]:
        delta = peft_model.base_model.model.get_submodule(spectrum.module).get_delta_weight("default")
        sigma = np.linalg.svd(delta.detach().double().numpy(), compute_uv=False)
        np.testing.assert_allclose(saved[spectrum.module], sigma, rtol=1e-4, atol=1e-6 * sigma[0])  # PEFT: float32
        assert 1 <= spectrum.diagnostic.energy_rank <= spectrum.diagnostic.rank == ranks[spectrum.module]
        assert spectrum.diagnostic.rank_error <= 1e-6 * sigma[0]  # s B A has at most the module's rank
    text = format_analysis(result)
    assert "lora vs lora_r4" in text and modules[0] in text and str(out) in text


@pytest.mark.slow
def test_a_full_run_gives_the_minimal_rank_table(tiny_runs, tmp_path):
    run = tiny_runs["full"]
    result = analyze_runs([run], tmp_path / "out", energy_fraction=0.8)
    assert result.similarities == [] and not (tmp_path / "out" / "subspace_similarity.csv").exists()
    ranks = stage2_ranks(run)
    body, trained = source_body(run), load_file(str(run / "stage3" / "trainable.safetensors"))
    rows = {row["module"]: row for row in read_rows(tmp_path / "out" / "update_spectra.csv")}
    assert list(rows) == list(ranks) == [s.module for s in result.spectra]
    for module, rank in ranks.items():
        change = (trained[f"model.{module}.weight"].double()
                  - body.get_submodule(module.removeprefix("body.")).weight.double()).numpy()
        sigma = np.linalg.svd(change, compute_uv=False)
        energy = np.cumsum(sigma ** 2) / np.sum(sigma ** 2)
        row = rows[module]
        assert int(row["rank"]) == rank
        assert int(row["energy_rank"]) == 1 + int(np.argmax(energy >= 0.8))
        assert float(row["rank_error"]) == pytest.approx(sigma[rank], rel=1e-4)
        assert float(row["relative_rank_error"]) == pytest.approx(sigma[rank] / sigma[0], rel=1e-4)
        assert (int(row["d_out"]), int(row["d_in"])) == change.shape
    assert (tmp_path / "out" / "update_spectra_full.pdf").is_file()


@pytest.mark.slow
def test_mixed_runs_get_each_analysis_where_it_applies(tiny_runs, tmp_path):
    runs = [tiny_runs["full"], tiny_runs["lora"], tiny_runs["lora_r4"]]
    result = analyze_runs(runs, tmp_path / "out")
    assert result.runs == {"full": "full", "lora": "lora", "lora_r4": "lora"}
    assert {(s.run_a, s.run_b) for s in result.similarities} == {("lora", "lora_r4")}
    assert {s.run for s in result.spectra} == {"full", "lora", "lora_r4"}
    for label in ("full", "lora", "lora_r4"):
        assert (tmp_path / "out" / f"update_spectra_{label}.png").is_file()
    full_rows = [s for s in result.spectra if s.run == "full"]
    assert all(math.isfinite(s.diagnostic.relative_rank_error) for s in full_rows)


@pytest.mark.slow
def test_runs_missing_what_is_needed_are_named(tiny_runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_runs["lora"], unfinished)
    (unfinished / "stage3" / "trainable.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"trainable\.safetensors.*orca-lora run"):
        analyze_runs([tiny_runs["lora"], unfinished], tmp_path / "out")

    config = load_config(tiny_runs["lora"] / "config.yaml")
    probe = tmp_path / "probe"
    shutil.copytree(tiny_runs["lora"], probe)
    config.stage3.method = "linear"
    (probe / "config.yaml").write_text(to_yaml(config))
    with pytest.raises(ValueError, match="stage3.method='linear' has no weight change"):
        analyze_runs([probe], tmp_path / "out")

    config.stage3.method = "full"  # the config no longer fits the saved LoRA tensors
    (probe / "config.yaml").write_text(to_yaml(config))
    with pytest.raises(KeyError, match=r"trainable\.safetensors has no 'model\.body\..*\.weight'"):
        analyze_runs([probe], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def refuse_non_json(constant):
    raise ValueError(f"{constant} is not JSON")


def test_fake_runs_give_tables_figures_and_text(tmp_path, monkeypatch):
    first = adapter_run("a", {"body.m1": 2}, seed=0)
    second = adapter_run("b", {"body.m1": 3}, seed=1)
    first.changes = {"body.m1": torch.randn(5, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)}
    second.changes = {"body.m1": torch.zeros(5, 12, dtype=torch.float64)}
    monkeypatch.setattr(analysis, "check_run", lambda directory: None)
    monkeypatch.setattr(analysis, "read_run", lambda directory, label, config, frozen: {"a": first, "b": second}[label])
    drawn = {}
    save = weight_report.save_figure

    def spy(figure, stem):
        drawn[stem.name] = ([np.asarray(image.get_array()) for axis in figure.axes for image in axis.images],
                            [line.get_ydata() for axis in figure.axes for line in axis.get_lines()])
        return save(figure, stem)

    monkeypatch.setattr(weight_report, "save_figure", spy)
    result = analyze_runs([Path("a"), Path("b")], tmp_path, energy_fraction=0.5)
    assert set(drawn) == {"update_spectra_a", "update_spectra_b", "subspace_a__b"}
    [heat_map], _ = drawn["subspace_a__b"]
    np.testing.assert_allclose(heat_map, subspace_similarity(first.lora_A["body.m1"], second.lora_A["body.m1"]))
    sigma = np.linalg.svd(first.changes["body.m1"].numpy(), compute_uv=False)
    _, [curve, tau] = drawn["update_spectra_a"]
    np.testing.assert_allclose(curve, np.cumsum(sigma ** 2) / np.sum(sigma ** 2))
    assert list(tau) == [0.5, 0.5]
    rows = read_rows(tmp_path / "update_spectra.csv")
    assert [row["energy_rank"] for row in rows] == [str(result.spectra[0].diagnostic.energy_rank), "0"]
    assert float(rows[0]["rank_error"]) == pytest.approx(sigma[2], rel=1e-5)
    saved = json.loads((tmp_path / "analysis.json").read_text(), parse_constant=refuse_non_json)  # strict JSON
    assert saved["runs"]["a"]["method"] == "lora" and saved["singular_values"]["b"]["body.m1"] == [0.0] * 5
    text = format_analysis(result)
    assert "a vs b" in text and "body.m1" in text and "5x12" in text
