"""Shared fixtures: a tiny but complete pipeline setting that runs in seconds."""
from pathlib import Path

import pytest
import torch
from torch import nn

from orca_lora.models.body import build_body

REPO = Path(__file__).resolve().parents[1]
TINY_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
               "num_heads": (2, 4)}

TINY = [
    "task.resolution=16", "task.n_train=96", "task.n_test=32",
    "source.proxy_samples=128", "source.pretrain.n_classes=4", "source.pretrain.samples_per_class=48",
    "source.pretrain.epochs=1", "source.pretrain.embed_dim=24", "source.pretrain.depths=[2,2]",
    "source.pretrain.num_heads=[2,4]",
    "stage1.epochs=2", "stage1.max_samples=64", "stage2.max_samples=64",
    "stage3.batch_size=16", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def shared_data_root(tmp_path_factory) -> Path:
    """One data root per test session, so the tiny offline body is pretrained once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_overrides(shared_data_root, tmp_path) -> list[str]:
    return TINY + [f"data_root={shared_data_root}", f"output.root={tmp_path / 'runs'}", "output.name=tiny"]


@pytest.fixture(scope="module")
def body() -> nn.Module:
    """A tiny frozen timm Swin (blocks of 16 and 32 channels) for stage-level tests."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_body("swin_tiny_patch4_window7_224", model_kwargs=TINY_KWARGS).eval().requires_grad_(False)
