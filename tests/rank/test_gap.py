import pytest
import torch
from torch import nn

from orca_lora.align.distances import mmd2
from orca_lora.rank.gap import block_gaps, pooled_block_inputs, standardize_jointly



@pytest.fixture(scope="module")
def tokens(body) -> torch.Tensor:
    """Patch-embedding tokens (16, 16, 16, 16) of random images, as stage 2 feeds the body."""
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return body.patch_embed(images)


def manual_block_inputs(body: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Stage by stage: patch merging, then each block; the mean token entering every block."""
    pooled, x = [], tokens
    with torch.no_grad():
        for layer in body.layers:
            x = layer.downsample(x)
            for block in layer.blocks:
                pooled.append(x.mean(dim=(1, 2)))
                x = block(x)
    return pooled


def test_pooled_block_inputs_match_a_block_by_block_forward(body, tokens):
    pooled = pooled_block_inputs(body, tokens)
    expected = manual_block_inputs(body, tokens)
    assert [p.shape for p in pooled] == [(16, 16), (16, 16), (16, 32), (16, 32)]
    for got, want in zip(pooled, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(pooled_block_inputs(body, tokens, batch_size=5), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pooled_block_inputs_leave_no_hooks_behind_even_on_error(body, tokens):
    blocks = [block for layer in body.layers for block in layer.blocks]
    pooled_block_inputs(body, tokens[:2])
    with pytest.raises(Exception):
        pooled_block_inputs(body, tokens[:2, :, :, :7])
    assert all(not block._forward_pre_hooks for block in blocks)


def test_standardize_jointly_gives_zero_mean_unit_std_on_the_union():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(30, 5, generator=generator, dtype=torch.float64) * 10 + 3
    target = torch.randn(20, 5, generator=generator, dtype=torch.float64) * 2 - 7
    scaled_source, scaled_target = standardize_jointly(source, target)
    union = torch.cat([scaled_source, scaled_target])
    torch.testing.assert_close(union.mean(dim=0), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(union.std(dim=0), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)
    raw = torch.cat([source, target])
    torch.testing.assert_close(scaled_source, (source - raw.mean(0)) / raw.std(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(scaled_target, (target - raw.mean(0)) / raw.std(0), rtol=1e-6, atol=1e-9)


def test_block_gaps_equal_mmd_of_jointly_standardised_block_inputs(body, tokens):
    target = tokens[8:] + 0.5 * torch.randn(16, generator=torch.Generator().manual_seed(2))
    gaps = block_gaps(body, tokens[:8], target, "mmd")
    for gap, source_block, target_block in zip(gaps, manual_block_inputs(body, tokens[:8]),
                                               manual_block_inputs(body, target), strict=True):
        union = torch.cat([source_block, target_block]).double()
        mean, std = union.mean(0), union.std(0)
        expected = mmd2((source_block.double() - mean) / std, (target_block.double() - mean) / std)
        assert gap == pytest.approx(float(expected), rel=1e-4, abs=1e-8)


def test_block_gaps_are_near_zero_for_the_same_tokens_and_positive_for_shifted_ones(body, tokens):
    same = block_gaps(body, tokens, tokens.clone(), "mmd")
    shift = torch.randn(16, generator=torch.Generator().manual_seed(3))
    shifted = block_gaps(body, tokens, tokens + shift, "mmd")
    assert len(same) == len(shifted) == 4
    # unbiased MMD^2 of a sample with itself: 2 (mean off-diagonal kernel - 5) / n, in [-2 * 5 / n, 0]
    # for the 5-bandwidth kernel; a real shift is far above that
    assert all(-2 * 5 / len(tokens) <= g <= 0 for g in same)
    assert min(shifted) > 2.0


def test_block_gaps_take_labels_and_the_other_distances(body, tokens):
    labels = torch.arange(16) % 2
    shift = torch.randn(16, generator=torch.Generator().manual_seed(3))
    otdd = block_gaps(body, tokens, tokens + shift, "otdd", labels, labels, inner="gaussian", entropic_reg=0.1)
    c2st = block_gaps(body, tokens, tokens + shift, "c2st", seed=0)
    assert len(otdd) == len(c2st) == 4
    assert all(g > 0 for g in otdd)
    assert all(0.0 <= g <= 1.0 for g in c2st) and max(c2st) > 0.5


def test_block_gaps_reject_bad_input_before_any_forward(body, tokens):
    with pytest.raises(ValueError, match=r"\(16, 16, 16\).*\(8, 8, 16\)"):
        block_gaps(body, tokens, tokens[:, :8, :8], "mmd")
    with pytest.raises(KeyError, match="stage2.distance.*'kl'"):
        block_gaps(body, tokens, tokens, "kl")
