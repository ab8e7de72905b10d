from dataclasses import replace

import pytest
import torch

from orca_lora.config import PretrainConfig
from orca_lora.models.body import load_body
from orca_lora.models.pretrain import (cached_source_body, cached_source_body_path, pretrain_model_kwargs,
                                       pretrain_source, source_body_path)

QUIET = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture
def small_config() -> PretrainConfig:
    return PretrainConfig(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                          n_classes=3, samples_per_class=16, val_fraction=0.25, epochs=1, batch_size=16)


def test_model_kwargs_carry_the_size_settings(small_config):
    assert pretrain_model_kwargs(small_config) == {"img_size": 16, "patch_size": 2, "window_size": 4,
                                                   "embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]}


def test_cache_path_depends_on_config_and_seed(small_config, tmp_path):
    path = source_body_path(small_config, tmp_path, seed=0)
    assert path.parent == tmp_path / "source" and path.name.startswith("offline_")
    assert source_body_path(small_config, tmp_path, seed=0) == path
    assert source_body_path(small_config, tmp_path, seed=1) != path
    assert source_body_path(replace(small_config, epochs=2), tmp_path, seed=0) != path


def test_bad_validation_fraction_fails_before_training(small_config, tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        pretrain_source(replace(small_config, val_fraction=0.0), tmp_path / "body", seed=0)


@pytest.mark.slow
def test_pretrain_writes_a_loadable_body_and_is_fixed_by_the_seed(small_config, tmp_path):
    result = pretrain_source(small_config, tmp_path / "a" / "body", seed=0, trainer_options=QUIET)
    assert result.path == tmp_path / "a" / "body.safetensors" and result.path.is_file()
    assert (tmp_path / "a" / "body.json").is_file()
    assert any((tmp_path / "a" / "body_logs").rglob("metrics.csv"))
    assert 0.0 <= result.val_accuracy <= 1.0 and result.seconds > 0
    assert result.chance_accuracy == pytest.approx(1 / 3, abs=0.1)
    body, info = load_body(result.path)
    assert info == {"model_name": small_config.model, "model_kwargs": pretrain_model_kwargs(small_config)}
    assert body.forward_features(torch.rand(2, 3, 16, 16)).shape == (2, 4, 4, 32)

    again = pretrain_source(small_config, tmp_path / "b" / "body", seed=0, trainer_options=QUIET)
    second, _ = load_body(again.path)
    assert all(torch.equal(a, b) for a, b in zip(body.state_dict().values(), second.state_dict().values()))
    assert again.val_accuracy == result.val_accuracy


@pytest.mark.slow
def test_cached_source_body_is_built_once(small_config, tmp_path):
    path, result = cached_source_body_path(small_config, tmp_path, seed=0, trainer_options=QUIET)
    assert result is not None and path == result.path
    assert path.parent == tmp_path / "source"
    modified = path.stat().st_mtime_ns
    again, second = cached_source_body_path(small_config, tmp_path, seed=0, trainer_options=QUIET)
    assert (again, second) == (path, None) and path.stat().st_mtime_ns == modified
    body = cached_source_body(small_config, tmp_path, seed=0)
    stored, _ = load_body(path)
    assert all(torch.equal(a, b) for a, b in zip(body.state_dict().values(), stored.state_dict().values()))
