import pytest
import torch

from orca_lora.adapters.dylora import DyLoRALinear
from orca_lora.adapters.lora import LoRALinear


def _randomise(layer: DyLoRALinear, seed: int = 0) -> DyLoRALinear:
    """Non-zero B so the adapter path matters."""
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed)))
    return layer


def test_dylora_at_rank_b_equals_lora_of_rank_b(make_linear, x):
    dylora = _randomise(DyLoRALinear(make_linear(), rank=6, alpha=8.0, min_rank=2))
    for b in (2, 4, 6):
        plain = LoRALinear(make_linear(), rank=b, alpha=8.0)  # same alpha: both scale by alpha / b
        with torch.no_grad():
            plain.lora_A.copy_(dylora.lora_A[:b])
            plain.lora_B.copy_(dylora.lora_B[:, :b])
        dylora.eval_rank = b
        dylora.eval()
        assert dylora.scaling == pytest.approx(8.0 / b)
        torch.testing.assert_close(dylora(x), plain(x))
        dylora.train()
        dylora._train_rank = b
        torch.testing.assert_close(dylora(x), plain(x))


def test_dylora_sample_rank_is_uniform_and_seeded(make_linear):
    layer = DyLoRALinear(make_linear(), rank=6, min_rank=2).train()
    draws = [layer.sample_rank(torch.Generator().manual_seed(seed)) for seed in range(200)]
    reference = [int(torch.randint(2, 7, (1,), generator=torch.Generator().manual_seed(seed))) for seed in range(200)]
    assert draws == reference
    assert set(draws) == {2, 3, 4, 5, 6}
    assert layer.active_rank == draws[-1]
    layer.eval()
    assert layer.active_rank == layer.eval_rank == 6


@pytest.mark.parametrize("frozen", [False, True])
def test_dylora_gradients_reach_only_the_trained_components(frozen, make_linear, x):
    layer = _randomise(DyLoRALinear(make_linear(), rank=6, frozen=frozen)).train()
    layer._train_rank = 4
    layer(x).square().sum().backward()
    rows_with_grad = torch.nonzero(layer.lora_A.grad.abs().sum(1)).flatten().tolist()
    cols_with_grad = torch.nonzero(layer.lora_B.grad.abs().sum(0)).flatten().tolist()
    expected = [3] if frozen else [0, 1, 2, 3]
    assert rows_with_grad == expected
    assert cols_with_grad == expected


def test_dylora_merge_keeps_its_rank_across_mode_changes(make_linear):
    layer = _randomise(DyLoRALinear(make_linear(), rank=6))
    W0 = layer.base_layer.weight.detach().clone()
    layer.eval_rank = 2
    layer.eval().merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.eval_rank = 3
    layer.train().unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-6)


def test_extra_repr_names_the_settings(make_linear):
    text = repr(DyLoRALinear(make_linear(), rank=4, alpha=8.0, min_rank=2))
    assert "rank=4, alpha=8, scaling=2" in text and "min_rank=2" in text and "frozen=False" in text
