import csv
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.metrics import adjusted_rand_score
from torch import nn
from torch.utils.data import TensorDataset

from orca_lora.align import stage as align_stage
from orca_lora.align.distances import DISTANCES, prepare_source
from orca_lora.config import Stage1Config, TrainerConfig
from orca_lora.data.procedural import generate_procedural
from orca_lora.data.tasks import TaskData, cross_entropy, misclassification
from orca_lora.models.embedder import Embedder

QUIET = TrainerConfig(enable_progress_bar=False)


@pytest.fixture(scope="module")
def source() -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural source images at 16 x 16, so every use goes through the resize to the body's 32 x 32."""
    images = generate_procedural(4, 12, image_size=16, seed=0)
    return torch.as_tensor(images.images), torch.as_tensor(images.labels)


def make_task(inputs: torch.Tensor, targets: torch.Tensor, regression: bool) -> TaskData:
    train = TensorDataset(inputs, targets)
    return TaskData(
        name="toy", train=train, val=train, test=train, in_channels=inputs.shape[1],
        input_size=tuple(inputs.shape[-2:]), head="dense" if regression else "classification",
        num_outputs=1 if regression else int(targets.max()) + 1,
        output_size=tuple(targets.shape[-2:]) if regression else None, error=misclassification,
        loss=cross_entropy, output_transform=nn.Identity(), baseline_error=0.5,
    )


def indexed_classification_task(n: int = 40, classes: int = 3) -> TaskData:
    """Sample i is an image filled with i, labelled i % classes, so a returned pair names its index."""
    inputs = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 16, 16).clone()
    return make_task(inputs, torch.arange(n) % classes, regression=False)


def clustered_regression_task(per_cluster: int = 10) -> tuple[TaskData, torch.Tensor]:
    """Target fields around three far-apart levels; returns the task and each sample's true cluster."""
    generator = torch.Generator().manual_seed(3)
    clusters = torch.arange(3).repeat_interleave(per_cluster)
    fields = 10.0 * clusters[:, None, None].float() + 0.1 * torch.randn(len(clusters), 8, 8, generator=generator)
    inputs = torch.randn(len(clusters), 1, 8, 8, generator=generator)
    inputs[:, 0, 0, 0] = torch.arange(len(clusters), dtype=torch.float32)  # names the sample
    return make_task(inputs, fields, regression=True), clusters


def by_hand_patch_embedding(body: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Bilinear resize, conv with kernel = stride = patch, LayerNorm over channels, mean over tokens."""
    embed = body.patch_embed
    resized = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    tokens = F.conv2d(resized, embed.proj.weight, embed.proj.bias, stride=embed.proj.stride).permute(0, 2, 3, 1)
    tokens = F.layer_norm(tokens, tokens.shape[-1:], embed.norm.weight, embed.norm.bias, embed.norm.eps)
    return tokens.mean(dim=(1, 2))


def test_source_features_are_the_mean_pooled_patch_embedding_of_resized_images(body, source):
    images = source[0][:10]
    expected = by_hand_patch_embedding(body, images)
    torch.testing.assert_close(align_stage.source_features(body, images), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(align_stage.source_features(body, images, batch_size=3), expected,
                               rtol=1e-4, atol=1e-5)
    full_size = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(align_stage.source_features(body, full_size), expected, rtol=1e-4, atol=1e-5)


def test_alignment_set_keeps_true_labels_for_classification():
    task = indexed_classification_task()
    inputs, labels = align_stage.alignment_set(task, max_samples=16, n_pseudo_labels=5, seed=0)
    index = inputs[:, 0, 0, 0].long()
    assert inputs.shape == (16, 3, 16, 16) and labels.dtype == torch.long
    assert len(set(index.tolist())) == 16
    assert torch.equal(labels, index % 3)
    again, _ = align_stage.alignment_set(task, max_samples=16, n_pseudo_labels=5, seed=0)
    other, _ = align_stage.alignment_set(task, max_samples=16, n_pseudo_labels=5, seed=1)
    assert torch.equal(again, inputs) and not torch.equal(other, inputs)
    everything, _ = align_stage.alignment_set(task, max_samples=1000, n_pseudo_labels=5, seed=0)
    assert sorted(everything[:, 0, 0, 0].long().tolist()) == list(range(40))


def test_alignment_set_labels_regression_targets_by_k_means_clusters():
    task, clusters = clustered_regression_task()
    inputs, labels = align_stage.alignment_set(task, max_samples=24, n_pseudo_labels=3, seed=0)
    truth = clusters[inputs[:, 0, 0, 0].long()]
    assert labels.dtype == torch.long and len(labels) == 24
    assert set(labels.tolist()) == {0, 1, 2}
    assert adjusted_rand_score(truth.numpy(), labels.numpy()) == 1.0
    _, five = align_stage.alignment_set(task, max_samples=24, n_pseudo_labels=5, seed=0)
    assert len(set(five.tolist())) == 5
    _, capped = align_stage.alignment_set(task, max_samples=4, n_pseudo_labels=10, seed=0)
    assert sorted(capped.tolist()) == [0, 1, 2, 3], "more clusters than samples: one cluster per sample"


def test_distance_options_fit_each_registered_distance():
    align = Stage1Config(otdd_inner="gaussian", entropic_reg=0.3)
    assert align_stage.distance_options("otdd", align, seed=7) == {"inner": "gaussian", "entropic_reg": 0.3}
    assert align_stage.distance_options("c2st", align, seed=7) == {"seed": 7}
    assert align_stage.distance_options("mmd", align, seed=7) == {}
    generator = torch.Generator().manual_seed(0)
    x, z = torch.randn(20, 4, generator=generator), torch.randn(20, 4, generator=generator) + 1.0
    labels = torch.arange(20) % 2
    for name, entry in DISTANCES.items():
        value = float(entry.fn(x, labels, z, labels, **align_stage.distance_options(name, align, seed=7)))
        assert math.isfinite(value), name


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
    options = align_stage.distance_options(distance, Stage1Config(), seed=0)
    return float(DISTANCES[distance].fn(features, source[1], target, target_y, **options))


@pytest.mark.parametrize("distance", ["mmd", "otdd"])
def test_run_trains_the_embedder_and_writes_weights_and_curve(body, source, tmp_path, distance):
    task = indexed_classification_task(n=32)
    embedder = Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    stage = Stage1Config(epochs=2, distance=distance, max_samples=24, batch_size=8, lr=5e-2)
    result = align_stage.run(stage, QUIET, body, task, embedder, *source, seed=0, directory=tmp_path)
    target_x, target_y = align_stage.alignment_set(task, 24, stage.n_pseudo_labels, 0)

    assert len(result.curve) == 3 and result.distance_before == result.curve[0]
    assert result.curve[0] == pytest.approx(
        expected_distance(distance, body, Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1)),
                          source, target_x, target_y), rel=1e-4)
    assert result.distance_after == result.curve[-1] < 0.5 * result.curve[0]

    saved = load_file(str(tmp_path / "embedder.safetensors"))
    assert result.embedder_path == tmp_path / "embedder.safetensors"
    assert saved.keys() == before.keys()
    assert all(torch.equal(saved[k], v) for k, v in embedder.state_dict().items())
    assert not torch.equal(saved["proj.weight"], before["proj.weight"])
    assert result.curve[-1] == pytest.approx(
        expected_distance(distance, body, embedder, source, target_x, target_y), rel=1e-4)

    with open(tmp_path / "alignment.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r[distance]) for r in rows] == pytest.approx(result.curve, rel=1e-5)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_run_with_no_epochs_only_measures(body, source, tmp_path):
    task = indexed_classification_task(n=32)
    embedder = Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    result = align_stage.run(Stage1Config(epochs=0, distance="mmd", max_samples=24), QUIET, body, task,
                             embedder, *source, seed=0, directory=tmp_path / "stage1")
    assert result.curve == [result.distance_before] and result.distance_before == result.distance_after
    assert (tmp_path / "stage1" / "alignment.csv").read_text().splitlines() == [
        "epoch,mmd", f"0,{result.curve[0]:.6g}"]
    saved = load_file(str(tmp_path / "stage1" / "embedder.safetensors"))
    assert all(torch.equal(saved[k], before[k]) for k in before)
    assert not (tmp_path / "stage1" / "logs").exists()


def test_otdd_source_side_is_prepared_once_and_reused(body, source):
    """The cached source side must equal what otdd would compute itself, so the loss is unchanged."""
    images, labels = source[0][::2], source[1][::2]
    features = align_stage.source_features(body, images)
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
