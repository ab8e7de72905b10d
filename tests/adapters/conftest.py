"""The tiny timm Swin every adapter test runs on."""

from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn


def _make_tiny_swin(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2, window_size=4,
            embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10,
        )
    return model.eval()


@pytest.fixture
def make_swin() -> Callable[[int], nn.Module]:
    """Builds a fresh tiny Swin (eval mode); the same seed gives the same weights."""
    return _make_tiny_swin


@pytest.fixture
def swin(make_swin: Callable[[int], nn.Module]) -> nn.Module:
    return make_swin(0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def make_linear() -> Callable[..., nn.Linear]:
    """Builds the 40 -> 24 nn.Linear the layer tests wrap; the same seed gives the same weights."""
    def make(seed: int = 0, bias: bool = True) -> nn.Linear:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Linear(40, 24, bias=bias)

    return make


@pytest.fixture
def x() -> torch.Tensor:
    """A (5, 3, 40) input for the make_linear layers."""
    return torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(7))
