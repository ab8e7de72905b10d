import pytest
import torch
from torch import nn

from orca_lora.align.distances import median_bandwidths, mmd2
from orca_lora.rank.gap import GapSettings, block_gap, block_gaps, pooled_block_inputs, source_units


@pytest.fixture(scope="module")
def tokens(body) -> torch.Tensor:
    """Patch-embedding tokens (16, 16, 16, 16) of random images, as stage 2 feeds the body."""
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
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
    assert [p.shape for p in pooled] == [(32, 16), (32, 16), (32, 32), (32, 32)]
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


def test_source_units_standardise_the_source_and_ignore_the_target():
    generator = torch.Generator().manual_seed(0)
    source = 3.0 + 2.0 * torch.randn(200, 8, generator=generator, dtype=torch.float64)
    units = source_units(source)
    z = units.standardize(source)
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(8, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(dim=0), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(units.bandwidths, median_bandwidths(z, z))
    assert units.width == 8 and units.median_distance == pytest.approx(float(units.bandwidths[2]))
    shifted = units.standardize(source + 5.0)
    torch.testing.assert_close(shifted.mean(dim=0), 5.0 / units.std, atol=1e-9, rtol=0,
                               msg="a target shift stays visible in the source's units")


def test_block_gaps_measure_each_block_in_its_source_units(body, tokens):
    target = tokens + 0.3
    settings = GapSettings("mmd", permutations=50, bootstraps=50, seed=3)
    gaps = block_gaps(body, tokens, target, settings)
    source_blocks, target_blocks = pooled_block_inputs(body, tokens), pooled_block_inputs(body, target)
    assert [g.width for g in gaps] == [16, 16, 32, 32]
    assert [g.name for g in gaps] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0",
                                      "layers.1.blocks.1"]
    labels = torch.zeros(32, dtype=torch.long)
    for got, source, target_features in zip(gaps, source_blocks, target_blocks):
        units = source_units(source)
        assert got.estimate == block_gap(source, labels, target_features, labels, units, settings)
        z_s, z_t = units.standardize(source), units.standardize(target_features)
        expected = float(mmd2(z_s, z_t, bandwidths=units.bandwidths)) * units.median_distance ** 2
        assert got.estimate.gap == pytest.approx(expected, rel=1e-9)


def test_block_gaps_sit_at_the_floor_for_one_distribution_and_above_it_for_a_shift(body, tokens):
    settings = GapSettings("mmd", permutations=100, bootstraps=50, seed=0)
    same = block_gaps(body, tokens[:16], tokens[16:], settings)
    assert all(g.estimate.p_value > 0.05 for g in same), [g.estimate for g in same]
    # a shift along a random channel direction (a constant one would be removed by patch merging's LayerNorm)
    direction = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(5))
    shifted = block_gaps(body, tokens[:16], tokens[16:] + 2.0 * direction, settings)
    for g in shifted:
        assert g.estimate.p_value < 0.05 and g.estimate.gap > g.estimate.floor
        assert g.estimate.ci_low <= g.estimate.gap <= g.estimate.ci_high


def test_block_gaps_take_labels_and_the_other_distances(body, tokens):
    labels = torch.arange(32) % 2
    shift = 0.5
    for distance, options in (("otdd", {"inner": "gaussian", "entropic_reg": 0.1}), ("c2st", {"seed": 0})):
        settings = GapSettings(distance, permutations=20, bootstraps=20, otdd_draws=4, options=options)
        gaps = block_gaps(body, tokens, tokens + shift, settings, labels, labels)
        assert len(gaps) == 4 and all(g.estimate.gap == g.estimate.gap for g in gaps), distance


def test_block_gaps_reject_bad_input_before_any_forward(body, tokens):
    with pytest.raises(ValueError, match="token grid"):
        block_gaps(body, tokens, tokens[:, :8, :8], GapSettings())
    with pytest.raises(KeyError, match="stage2.distance: 'kl'"):
        block_gaps(body, tokens, tokens, GapSettings("kl"))


def test_a_spectral_gap_counts_a_planted_shift_against_its_permutation_null():
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(96, 12, generator=generator, dtype=torch.float64)
    target = torch.randn(96, 12, generator=generator, dtype=torch.float64)
    target[:, :2] *= 3.0  # a rank-2 covariance change
    labels = torch.zeros(96, dtype=torch.long)
    settings = GapSettings("spectral", permutations=20, bootstraps=20, seed=0)
    estimate = block_gap(source, labels, target, labels, source_units(source), settings)
    assert estimate.gap == 2.0 and estimate.floor <= 1.0 and estimate.p_value < 0.1
