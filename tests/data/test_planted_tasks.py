import copy

import pytest
import torch
import torch.nn.functional as F

from orca_lora.config import PretrainConfig, SourceConfig, TaskConfig
from orca_lora.data import planted
from orca_lora.data.planted_tasks import (input_moment, planted_module_update, planted_patch_map, planted_teacher,
                                          pooled_source_features, source_class_images)
from orca_lora.data.tasks import SourceSide, build_task
from orca_lora.models.heads import build_head

SOURCE = SourceConfig(proxy_samples=16, pretrain=PretrainConfig(n_classes=4, samples_per_class=8))


def planted_config(**settings) -> TaskConfig:
    return TaskConfig(**{"name": "planted-shift", "resolution": 32, "n_train": 24, "n_test": 8, "val_fraction": 0.25,
                         "planted_k": 2, **settings})


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(inputs), torch.stack(targets)


def restored_features(body, images: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The body's pooled features with its patch projection W_P + dW, in float64 (the known answer)."""
    body = copy.deepcopy(body).double()
    embed = body.patch_embed
    weight = (embed.proj.weight.flatten(1) + update).view_as(embed.proj.weight)
    tokens = embed.norm(F.conv2d(images.double(), weight, embed.proj.bias, stride=embed.proj.stride).permute(0, 2, 3, 1))
    return body.norm(body.layers(tokens)).mean(dim=(1, 2))


def test_planted_shift_is_a_pooled_regression_the_rank_k_update_solves_exactly(body):
    config = planted_config()
    task = build_task(config, "unused", SourceSide(SOURCE, body))
    inputs, targets = stacked(task.test)
    assert (task.head, task.regression, task.num_outputs, task.in_channels) == ("pooled", True, 32, 3)
    assert (len(task.train), len(task.val), len(task.test)) == (18, 6, 8)
    assert targets.shape == (8, 32) and inputs.shape == (8, 3, 32, 32)
    pooled = build_head(task.head, 32, task.num_outputs, 2, None)
    with torch.no_grad():
        as_is = pooled(body.forward_features(inputs))
        update = planted.restoring_update(body.patch_embed.proj.weight, planted_patch_map(body, config))
        fixed = restored_features(body, inputs, update).float()
    assert task.error(as_is, targets).mean() > 1e-3  # the plant moves the features
    assert task.error(fixed, targets).max() < 1e-4  # and the rank-k update on the projection undoes it
    assert int((torch.linalg.svdvals(update) > 1e-9).sum()) == 2
    assert task.baseline_error > 0.01


def test_planted_shift_is_fixed_by_data_seed_and_its_dials(body):
    side = SourceSide(SOURCE, body)
    first, again = (stacked(build_task(planted_config(), "unused", side).test) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_seed = planted_patch_map(body, planted_config(data_seed=1))
    other_angle = planted_patch_map(body, planted_config(planted_angle=0.5))
    other_planes = planted_patch_map(body, planted_config(planted_planes=1))
    for other in (other_seed, other_angle, other_planes):
        assert not torch.allclose(planted_patch_map(body, planted_config()), other)
    # the planes dial draws the directions only: planes seed 1 is data seed 1's plant on data seed 0's images
    assert torch.equal(other_planes, other_seed)
    assert torch.equal(planted_patch_map(body, planted_config(planted_planes=0)),
                       planted_patch_map(body, planted_config()))


def test_targets_are_the_body_pooled_features_of_clean_images(body):
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = body.norm(body.layers(body.patch_embed(images))).mean(dim=(1, 2))
    assert torch.allclose(pooled_source_features(body, images), expected, atol=1e-6)


def test_planted_shift_needs_the_source_side_and_the_body_resolution(body):
    with pytest.raises(ValueError, match="source body"):
        build_task(planted_config(), "unused")
    with pytest.raises(ValueError, match="task.resolution"):
        build_task(planted_config(resolution=16), "unused", SourceSide(SOURCE, body))


def test_planted_function_keeps_the_images_and_plants_rank_k_on_the_named_module(body):
    config = planted_config(name="planted-function", planted_module="layers.0.blocks.1.mlp.fc2")
    side = SourceSide(SOURCE, body)
    task = build_task(config, "unused", side)
    inputs, targets = stacked(task.test)
    images = source_class_images(side, 32, config.data_seed)
    assert torch.equal(inputs, images[:8])  # no input gap: the source's own images
    module = body.layers[0].blocks[1].mlp.fc2
    update = planted_module_update(body, config, images[8:])
    assert update.shape == module.weight.shape and int((torch.linalg.svdvals(update) > 1e-9).sum()) == 2
    assert task.error(pooled_source_features(body, inputs), targets).mean() > 1e-4  # the teacher differs
    before = module.weight.clone()
    teacher = planted_teacher(body, config, images[8:])
    assert torch.equal(module.weight, before)  # the body itself is left untouched
    with torch.no_grad():  # the rank-k answer on that module alone reproduces the teacher
        student = copy.deepcopy(body)
        student.layers[0].blocks[1].mlp.fc2.weight += update.float()
    assert torch.equal(student.layers[0].blocks[1].mlp.fc2.weight, teacher.layers[0].blocks[1].mlp.fc2.weight)
    assert task.error(pooled_source_features(student, inputs), targets).max() < 1e-5
    # the moment is over the module's own inputs: fc2 reads fc1's GELU outputs, 4x the stage's width 16
    moment = input_moment(body, module, images[8:])
    assert moment.shape == (4 * 16, 4 * 16) and torch.allclose(moment, moment.T)
    with pytest.raises(ValueError, match="task.planted_module: 'layers.0.norm' is not a Linear"):
        planted_module_update(body, planted_config(name="planted-function", planted_module="layers.0.norm"), images)
