import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from orca_lora.cli import main
from orca_lora.config_load import load_config
from orca_lora.data.darcy import relative_l2
from orca_lora.data.planted_tasks import pooled_source_features
from orca_lora.data.tasks import SourceSide, build_task
from orca_lora.models.source import load_source_body
from orca_lora.pipeline import measurement_hash, run_pipeline
from orca_lora.reports.run_plots import plot_run
from orca_lora.run_files import RunFiles, read_gaps, read_metrics, read_ranks, read_sample_errors

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STAGES = ("stage1", "stage2", "stage3")
pytestmark = pytest.mark.slow


def markers(directory: Path) -> dict[str, str]:
    return {stage: (directory / stage / "stage.json").read_text() for stage in STAGES}


def test_pipeline_writes_a_complete_run_directory_and_skips_finished_stages(tiny_overrides):
    config = load_config(QUICKSTART, tiny_overrides)
    result = run_pipeline(config)
    directory = result.directory
    for relative in ("config.yaml", "stage1/embedder.safetensors", "stage1/alignment.csv", "stage2/gaps.csv",
                     "stage2/ranks.json", "stage3/trainable.safetensors", "stage3/adapter/adapter_config.json",
                     "stage3/adapter/adapter_model.safetensors", "stage3/sample_errors.npz", "metrics.json"):
        assert (directory / relative).is_file(), relative
    assert not (directory / "plots").exists(), "the pipeline writes run files; figures are the caller's choice"
    metrics = json.loads((directory / "metrics.json").read_text())
    assert {"test_error", "baseline_error", "trainable_params", "stage_seconds", "device"} <= set(metrics)
    assert set(metrics["stage_seconds"]) == set(STAGES)
    assert metrics["test_error"] == result.metrics.test_error and np.isfinite(metrics["test_error"])
    run = RunFiles(directory)
    assert read_metrics(run) == result.metrics
    # stage 2's ranks live in ranks.json alone, and stage 3 trained at them
    assert json.loads(run.marker("stage2").read_text())["result"] is None
    with safe_open(str(run.trainable), "pt") as saved:
        trained = {key.removeprefix("model.").removesuffix(".lora_A"): saved.get_slice(key).get_shape()[0]
                   for key in saved.keys() if key.endswith(".lora_A")}
    assert trained == read_ranks(run).ranks == result.metrics.ranks
    errors = read_sample_errors(run)
    assert len(errors.test) == 32 and len(errors.val) == round(0.1 * 96)
    assert errors.test.mean() == pytest.approx(result.metrics.test_error, abs=1e-6)
    assert errors.val.mean() == pytest.approx(result.metrics.best_val_error, abs=1e-6)
    written = {path.name for path in plot_run(directory)}
    assert {"alignment.png", "gaps_and_ranks.png", "training.pdf"} <= written
    with safe_open(str(directory / "stage3" / "trainable.safetensors"), "pt") as saved:
        frozen = [k for k in saved.keys() if k.startswith("model.body.") and "lora_" not in k]
    assert frozen == [], "the frozen body must not be in the trainable checkpoint"

    before = markers(directory)
    again = run_pipeline(config)
    assert markers(directory) == before
    assert again.metrics.test_error == metrics["test_error"]

    run_pipeline(load_config(QUICKSTART, tiny_overrides + ["stage3.lr=5e-3"]))
    after = markers(directory)
    assert after["stage1"] == before["stage1"] and after["stage2"] == before["stage2"]
    assert after["stage3"] != before["stage3"]


def test_same_config_gives_the_same_numbers(tiny_overrides):
    overrides = tiny_overrides + ["stage2.enabled=false", "stage1.epochs=1", "trainer.max_epochs=1"]
    first = run_pipeline(load_config(QUICKSTART, overrides + ["output.name=first"]))
    second = run_pipeline(load_config(QUICKSTART, overrides + ["output.name=second"]))
    assert first.metrics.test_error == second.metrics.test_error
    assert first.metrics.alignment == second.metrics.alignment
    first_errors = read_sample_errors(RunFiles(first.directory))
    second_errors = read_sample_errors(RunFiles(second.directory))
    assert np.array_equal(first_errors.test, second_errors.test)


def test_uniform_rank_and_disabled_alignment(tiny_overrides):
    overrides = tiny_overrides + ["stage2.enabled=false", "stage1.epochs=0", "stage3.rank=3"]
    result = run_pipeline(load_config(QUICKSTART, overrides))
    assert set(result.metrics.ranks.values()) == {3}
    assert result.metrics.alignment["before"] == result.metrics.alignment["after"]
    run = RunFiles(result.directory)
    assert read_gaps(run) is None and read_ranks(run).ranks == result.metrics.ranks


def test_a_planted_shift_run_adapts_only_the_embedding_projection(tiny_overrides):
    """The known-answer control's setting end to end: stage 1 off, the frozen body's own patch embedding,
    LoRA on embedder.proj only; the base conv stays the body's, the LoRA factors train and export."""
    overrides = tiny_overrides + [
        "task.name=planted-shift", "task.resolution=32", "task.planted_k=2", "stage1.epochs=0",
        "stage1.embedder_init=source", "stage2.allocation=uniform", "stage3.rank=2",
        r"stage3.targets=[^embedder\.proj$]", "stage3.train_embedder=false", "stage3.body_stochastic_depth=false"]
    result = run_pipeline(load_config(QUICKSTART, overrides))
    assert result.metrics.ranks == {"embedder.proj": 2} and result.metrics.trainable_params == 2 * (24 + 12)
    assert np.isfinite(result.metrics.test_error) and result.metrics.baseline_error > 0
    gaps = read_gaps(RunFiles(result.directory))
    assert gaps[0].gap > gaps[0].floor  # stage 2 sees the plant at block 0
    assert [row.rank for row in gaps] == [2] + [0] * (len(gaps) - 1)  # the only adapted module is block 0's
    with safe_open(str(result.directory / "stage3" / "trainable.safetensors"), "pt") as saved:
        assert sorted(saved.keys()) == ["model.embedder.proj.lora_A", "model.embedder.proj.lora_B"]
        assert saved.get_tensor("model.embedder.proj.lora_B").abs().sum() > 0
    peft_config = json.loads((result.directory / "stage3" / "adapter" / "adapter_config.json").read_text())
    assert "embedder.proj" in json.dumps(peft_config["target_modules"])


def test_linear_on_a_planted_shift_is_the_unadapted_body_evaluated_without_training(tiny_overrides):
    """Rank 0 of a planted control: `linear` on the parameter-free pooled head trains nothing, so stage 3
    evaluates the prepared model; its errors are the frozen body's on the shifted images against the clean
    targets, computed here from the task's own tensors."""
    overrides = tiny_overrides + [
        "task.name=planted-shift", "task.resolution=32", "task.planted_k=2", "stage1.epochs=0",
        "stage1.embedder_init=source", "stage2.allocation=uniform", "stage3.method=linear",
        "stage3.train_embedder=false", "stage3.body_stochastic_depth=false"]
    config = load_config(QUICKSTART, overrides)
    result = run_pipeline(config)
    assert result.metrics.trained_params == 0 and not (result.directory / "stage3" / "checkpoints").exists()
    body = load_source_body(config.source, config.data_root)
    task = build_task(config.task, config.data_root, SourceSide(config.source, body))
    errors = read_sample_errors(RunFiles(result.directory))
    for split, saved in (("val", errors.val), ("test", errors.test)):
        inputs, targets = (torch.stack(column) for column in zip(*getattr(task, split)))
        expected = relative_l2(pooled_source_features(body.eval(), inputs), targets).double().numpy()
        np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-7)
        assert expected.mean() > 0
    assert result.metrics.best_val_error == pytest.approx(errors.val.mean())
    assert result.metrics.test_error == pytest.approx(errors.test.mean(), rel=1e-6)


def test_the_points_of_a_rank_sweep_share_one_gap_measurement(tiny_overrides, tmp_path, caplog):
    """Stage 2's measurement has no stage-3 field in its hash: a second rank reads the first's gaps from the
    store, and they are the gaps a run without a store measures itself."""
    store = f"output.shared_stages={tmp_path / 'store'}"
    runs = {}
    for name, rank, shared in (("rank1", 1, True), ("rank2", 2, True), ("alone", 2, False)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="orca_lora"):
            config = load_config(QUICKSTART, tiny_overrides + [f"output.name={name}", f"stage3.rank={rank}"]
                                 + ([store] if shared else []))
            runs[name] = (run_pipeline(config, last_stage=2).directory, "measurement read from" in caplog.text)
    assert [read for _, read in runs.values()] == [False, True, False]
    measured = {name: [(row.gap, row.floor, row.p_value, row.ci_low, row.ci_high) for row in read_gaps(RunFiles(path))]
                for name, (path, _) in runs.items()}
    assert measured["rank1"] == measured["rank2"] == measured["alone"]
    assert [len(list((tmp_path / "store" / kind).iterdir())) for kind in ("measurements", "stage2")] == [1, 2]


def test_the_measurement_hash_holds_what_is_measured_and_nothing_that_allocates(tiny_overrides):
    base = measurement_hash(load_config(QUICKSTART, tiny_overrides))
    same = ["stage3.rank=2", "stage3.lr=0.5", "stage2.allocation=uniform", "stage2.r_max=4", "stage3.method=dora"]
    other = ["stage2.permutations=50", "stage2.max_samples=32", "seed=1", "stage1.epochs=1", "task.n_train=64"]
    assert [measurement_hash(load_config(QUICKSTART, tiny_overrides + [item])) for item in same] == [base] * 5
    assert all(measurement_hash(load_config(QUICKSTART, tiny_overrides + [item])) != base for item in other)


def test_a_planted_function_leaves_every_gap_at_its_floor(tiny_overrides):
    """The function control: the source's own images through the body's own patch embedding, so stage 2
    finds no gap anywhere while the teacher's planted module change sets the needed rank."""
    overrides = tiny_overrides + [
        "task.name=planted-function", "task.resolution=32", "task.planted_k=2", "stage1.epochs=0",
        "stage1.embedder_init=source", "stage2.allocation=uniform", "stage3.rank=2",
        r"stage3.targets=[^body\.layers\.0\.blocks\.0\.mlp\.fc1$]", "stage3.train_embedder=false"]
    result = run_pipeline(load_config(QUICKSTART, overrides), last_stage=2)
    gaps = read_gaps(RunFiles(result.directory))
    assert [row.corrected for row in gaps] == [0.0] * len(gaps)
    assert read_ranks(RunFiles(result.directory)).ranks == {"body.layers.0.blocks.0.mlp.fc1": 2}


def run_cli(arguments: list[str], capsys) -> tuple[int, str]:
    code = main(arguments)
    return code, capsys.readouterr().err.strip()


def test_missing_dataset_path_is_one_line(tiny_overrides, capsys, tmp_path):
    code, error = run_cli(["run", str(QUICKSTART), "--set", "task.file=/no/such/darcy.mat",
                           *sum((["--set", o] for o in tiny_overrides), [])], capsys)
    assert code == 2 and len(error.splitlines()) == 1 and "task.file" in error
    assert not (tmp_path / "runs").exists()


def test_nan_in_inputs_is_one_line(tiny_overrides, capsys, tmp_path):
    a = np.full((12, 16, 16), 3.0, dtype=np.float32)
    a[4, 3, 3] = np.nan
    path = tmp_path / "nan.pt"
    torch.save({"x": torch.from_numpy(a), "y": torch.ones(12, 16, 16)}, path)
    code, error = run_cli(["run", str(QUICKSTART), *sum((["--set", o] for o in tiny_overrides), []),
                           "--set", f"task.file={path}", "--set", "task.n_train=8", "--set", "task.n_test=4"],
                          capsys)
    assert code == 2 and len(error.splitlines()) == 1 and "NaN" in error
    assert not (tmp_path / "runs").exists()


def test_rank_map_naming_a_missing_module_fails_before_training(tiny_overrides, capsys, tmp_path):
    code, error = run_cli(["run", str(QUICKSTART), *sum((["--set", o] for o in tiny_overrides), []),
                           "--set", "stage2.enabled=false",
                           "--set", "stage3.rank_map={body.layers.0.blocks.7.attn.qkv: 2}"], capsys)
    assert code == 2 and len(error.splitlines()) == 1 and "blocks.7.attn.qkv" in error
    assert not (tmp_path / "runs").exists()


def test_checkpoint_for_another_architecture_is_one_line(tiny_overrides, capsys, tmp_path):
    from orca_lora.models.body import build_body, save_body

    kwargs = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": [2], "num_heads": [2]}
    other = save_body(build_body("swin_tiny_patch4_window7_224", model_kwargs=kwargs), tmp_path / "other",
                      "swin_tiny_patch4_window7_224", kwargs)
    weights = other if other.suffix == ".safetensors" else other.with_suffix(".safetensors")
    code, error = run_cli(["run", str(QUICKSTART), *sum((["--set", o] for o in tiny_overrides), []),
                           "--set", "source.model=swin_tiny_patch4_window7_224",
                           "--set", "source.model_kwargs={img_size: 32, patch_size: 2, window_size: 4, "
                                    "embed_dim: 24, depths: [2, 2], num_heads: [2, 4]}",
                           "--set", f"source.checkpoint={weights}"], capsys)
    assert code == 2 and len(error.splitlines()) == 1 and "checkpoint" in error.lower()
    assert not (tmp_path / "runs").exists()
