import csv

import pytest
import torch
from safetensors.torch import load_file

from orca_lora.align import stage as align_stage
from orca_lora.align.distances import DISTANCES, distance_options, prepare_source
from orca_lora.config import Stage1Config, TrainerConfig
from orca_lora.data.procedural import generate_procedural
from orca_lora.models.embedder import Embedder
from orca_lora.models.features import labelled_target_sample, source_features
from orca_lora.run_files import RunFiles, read_alignment
from toys import by_hand_patch_embedding, indexed_classification_task

QUIET = TrainerConfig(enable_progress_bar=False)


@pytest.fixture(scope="module")
def source() -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural source images at 16 x 16, so every use goes through the resize to the body's 32 x 32."""
    images = generate_procedural(4, 12, image_size=16, seed=0)
    return torch.as_tensor(images.images), torch.as_tensor(images.labels)


def test_align_module_refuses_a_non_differentiable_distance(body):
    embedder = Embedder.from_body(body, 3)
    features, labels = torch.randn(8, 16), torch.arange(8) % 2
    with pytest.raises(ValueError, match="c2st.*not differentiable"):
        align_stage.AlignModule(embedder, features, labels, Stage1Config(distance="c2st"), seed=0)


def expected_distance(distance: str, body, embedder, source, target_x, target_y) -> float:
    """The stage-1 distance recomputed from its parts, without AlignModule."""
    features = by_hand_patch_embedding(body, source[0])
    with torch.no_grad():
        target = embedder(target_x).mean(dim=(1, 2))
    stage = Stage1Config()
    options = distance_options(distance, stage.otdd_inner, stage.entropic_reg, seed=0)
    return float(DISTANCES[distance].fn(features, source[1], target, target_y, **options))


@pytest.mark.parametrize("distance", ["mmd", "otdd"])
def test_run_trains_the_embedder_and_writes_weights_and_curve(body, source, tmp_path, distance):
    task = indexed_classification_task(n=32)
    embedder = Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    stage = Stage1Config(epochs=2, distance=distance, max_samples=24, batch_size=8, lr=5e-2)
    run = RunFiles(tmp_path)
    result = align_stage.run(stage, QUIET, body, task, embedder, *source, seed=0, run_files=run)
    target_x, target_y = labelled_target_sample(task, 24, stage.n_pseudo_labels, 0)

    assert len(result.curve) == 3 and result.distance_before == result.curve[0]
    assert result.curve[0] == pytest.approx(
        expected_distance(distance, body, Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1)),
                          source, target_x, target_y), rel=1e-4)
    assert result.distance_after == result.curve[-1] < 0.5 * result.curve[0]

    saved = load_file(str(run.embedder))
    assert saved.keys() == before.keys()
    assert all(torch.equal(saved[k], v) for k, v in embedder.state_dict().items())
    assert not torch.equal(saved["proj.weight"], before["proj.weight"])
    assert result.curve[-1] == pytest.approx(
        expected_distance(distance, body, embedder, source, target_x, target_y), rel=1e-4)

    with open(run.alignment, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r[distance]) for r in rows] == pytest.approx(result.curve, rel=1e-5)
    assert read_alignment(run) == (distance, pytest.approx(result.curve, rel=1e-5))
    assert not list(run.stage("stage1").glob("*.tmp")) and not list(run.stage("stage1").glob(".*.tmp"))


def test_run_with_no_epochs_only_measures(body, source, tmp_path):
    task = indexed_classification_task(n=32)
    embedder = Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    result = align_stage.run(Stage1Config(epochs=0, distance="mmd", max_samples=24), QUIET, body, task,
                             embedder, *source, seed=0, run_files=RunFiles(tmp_path))
    assert result.curve == [result.distance_before] and result.distance_before == result.distance_after
    assert (tmp_path / "stage1" / "alignment.csv").read_text().splitlines() == [
        "epoch,mmd", f"0,{result.curve[0]:.6g}"]
    saved = load_file(str(tmp_path / "stage1" / "embedder.safetensors"))
    assert all(torch.equal(saved[k], before[k]) for k in before)
    assert not (tmp_path / "stage1" / "logs").exists()


def test_otdd_source_side_is_prepared_once_and_reused(body, source):
    """The cached source side must equal what otdd would compute itself, so the loss is unchanged."""
    images, labels = source[0][::2], source[1][::2]
    features = source_features(body, images)
    embedder = Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1))
    module = align_stage.AlignModule(embedder, features, labels, Stage1Config(distance="otdd"), seed=0)
    target_x, target_y = torch.rand(12, 3, 16, 16), torch.arange(12) % 3
    with torch.no_grad():
        first = module.distance(target_x, target_y)
        cache = module.source_cache
        second = module.distance(target_x, target_y)
        plain = DISTANCES["otdd"].fn(features, labels, embedder(target_x).mean(dim=(1, 2)), target_y,
                                     inner="exact", entropic_reg=0.1)
    assert module.source_cache is cache
    assert torch.equal(cache.self_ot, prepare_source(features, labels).self_ot)
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(second, plain)


def test_a_killed_attempts_logs_are_replaced_not_kept_beside(body, source, tmp_path):
    run = RunFiles(tmp_path)
    stale = run.stage("stage1") / "logs" / "version_0"
    stale.mkdir(parents=True)
    (stale / "metrics.csv").write_text("epoch,train_distance\n0,99\n")
    task = indexed_classification_task(n=32)
    embedder = Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1))
    align_stage.run(Stage1Config(epochs=1, distance="mmd", max_samples=24, batch_size=8), QUIET, body, task,
                    embedder, *source, seed=0, run_files=run)
    assert sorted(p.name for p in (run.stage("stage1") / "logs").iterdir()) == ["version_0"]
    assert "99" not in (stale / "metrics.csv").read_text()
