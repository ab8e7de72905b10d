"""Module shapes for the allocation tests (helpers: tests/allocation_toys.py)."""
import pytest
from allocation_toys import swin_like_shapes

from orca_lora.rank.select import ModuleShape


@pytest.fixture
def mixed_shapes() -> dict[str, ModuleShape]:
    """Two narrow blocks then two wide ones, as the tiny test body has."""
    return swin_like_shapes([16, 16, 32, 32])


@pytest.fixture
def equal_shapes() -> dict[str, ModuleShape]:
    return swin_like_shapes([24, 24, 24, 24])
