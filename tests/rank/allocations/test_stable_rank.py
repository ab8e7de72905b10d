import numpy as np
import pytest
import torch
from allocation_toys import assert_meets_budget, make_inputs
from torch import nn

from orca_lora.rank.allocations import get_allocation
from orca_lora.rank.allocations.stable_rank import pretrained_weight, stable_rank
from orca_lora.rank.select import ModuleShape


@pytest.mark.parametrize("shape", [(5, 3), (3, 7), (12, 12)])
def test_stable_rank_is_frobenius_over_spectral_squared_as_numpy_computes_it(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    singular = np.linalg.svd(weight.numpy().astype(np.float64), compute_uv=False)
    assert stable_rank(weight) == pytest.approx(float((singular ** 2).sum() / singular[0] ** 2), rel=1e-12)


def test_stable_rank_is_1_for_rank_1_and_n_for_an_orthogonal_matrix():
    assert stable_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(5))) == pytest.approx(1.0)
    assert stable_rank(torch.linalg.qr(torch.randn(6, 6))[0]) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="zero matrix"):
        stable_rank(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="takes a matrix"):
        stable_rank(torch.ones(3))


class TwoBlockBody(nn.Module):
    """Block 0: a rank-1 weight (stable rank 1); block 1: an orthogonal one (stable rank 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.low, self.high = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.low.weight.copy_(torch.outer(torch.ones(16), torch.arange(16.0)))
            self.high.weight.copy_(torch.linalg.qr(torch.randn(16, 16))[0])


def test_stable_rank_allocation_reads_the_frozen_weights_and_meets_the_budget():
    body, shapes = TwoBlockBody(), {"body.low": ModuleShape(0, 16, 16), "body.high": ModuleShape(1, 16, 16)}
    assert pretrained_weight(body, "body.high") is body.high.weight
    inputs = make_inputs(shapes, body=body, measured=make_inputs(shapes).measured[:2], allocation="stable-rank",
                         budget=32 * 17 + 5)
    result = get_allocation("stable-rank").allocate(inputs)
    assert_meets_budget(result.ranks, shapes, inputs.budget)
    assert result.ranks == {"body.low": 1, "body.high": 16}  # 1 : 16, as the stable ranks
    assert result.block_ranks == [1, 16]
