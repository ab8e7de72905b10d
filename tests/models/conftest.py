import pytest
import torch

from orca_lora.models.body import build_body

TINY_NAME = "swin_tiny_patch4_window7_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 24,
               "depths": [2, 2, 2], "num_heads": [2, 4, 8]}


@pytest.fixture
def tiny_spec():
    """(timm name, kwargs) of a 3-stage Swin small enough for unit tests."""
    return TINY_NAME, dict(TINY_KWARGS)


@pytest.fixture
def tiny_body():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_body(TINY_NAME, model_kwargs=TINY_KWARGS).eval()
