import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from orca_lora.adapters.inject import (
    adapter_modules,
    adapter_state_dict,
    add_adapters,
    count_trainable,
    load_adapter_state_dict,
    mark_only_adapters_trainable,
    match_targets,
    merge_adapters,
    unmerge_adapters,
)
from orca_lora.adapters.mora import MoRALinear, cyclic_extend, mora_compress, mora_decompress, mora_rank
from orca_lora.adapters.spec import get_method
from orca_lora.config import ConfigError
from orca_lora.config_load import load_config
from orca_lora.finetune.stage import prepare_model
from orca_lora.pipeline import run_pipeline

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
# (d_out, d_in, rank): r_hat = 6 with one cyclic pad and a cut decompress; r_hat = 12 with no pad;
# r_hat = 9 > d_in = 4, so the cyclic extension wraps x twice
SHAPES = [(7, 11, 2), (24, 12, 4), (77, 4, 1)]


def _layer(d_out: int, d_in: int, rank: int, **options) -> MoRALinear:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out)
    return MoRALinear(base, rank, **options)


def _randomise(layer: MoRALinear, seed: int = 1) -> MoRALinear:
    with torch.no_grad():
        layer.mora_M.copy_(torch.randn(layer.mora_M.shape, generator=torch.Generator().manual_seed(seed)))
    return layer


def _x(d_in: int) -> torch.Tensor:
    return torch.randn(4, 3, d_in, generator=torch.Generator().manual_seed(7))


def _official_delta_weight(M: torch.Tensor, d_in: int, d_out: int) -> torch.Tensor:
    """get_delta_weight of the official code (kongds/MoRA, mora_type 1), loop for loop."""
    r = M.shape[0]
    pad = r - d_in % r if d_in % r else 0
    w = torch.zeros(r, d_in, dtype=torch.float64)
    for i in range(d_in + pad):
        w[:, i % d_in] += M[:, i % r].double()
    repeats = -(-d_out // r)
    return torch.cat([w] * repeats, dim=0)[:d_out]


def test_r_hat_is_the_largest_square_within_lora_s_count():
    for rank in range(1, 9):
        for d_in, d_out in [(48, 144), (48, 48), (96, 384), (7, 3)]:
            budget = rank * (d_in + d_out)
            brute = max(k for k in range(budget + 1) if k * k <= budget)
            assert mora_rank(rank, d_in, d_out) == brute
    assert mora_rank(8, 4096, 4096) == 256  # the paper's example: 256 x 256 = LoRA's 65,536 parameters
    with pytest.raises(ValueError, match="must be >= 1"):
        mora_rank(0, 4, 4)


@pytest.mark.parametrize("d_in, r_hat", [(10, 4), (8, 4), (3, 7), (5, 5)])
def test_compress_and_decompress_match_explicit_loops(d_in, r_hat):
    x = torch.randn(2, d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    groups = math.ceil(d_in / r_hat)
    expected = torch.zeros(2, r_hat, dtype=torch.float64)
    for p in range(groups * r_hat):
        expected[:, p % r_hat] += x[:, p % d_in]
    torch.testing.assert_close(mora_compress(x, r_hat), expected)
    h = torch.randn(2, r_hat, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for d_out in (r_hat - 1, r_hat, 3 * r_hat + 2):
        expected_out = torch.stack([h[:, i % r_hat] for i in range(d_out)], dim=1)
        assert torch.equal(mora_decompress(h, d_out), expected_out)


def test_cyclic_padding_is_the_official_concatenation():
    x = torch.arange(10.0).view(1, 10)
    pad = 2  # r_hat = 4
    assert torch.equal(cyclic_extend(x, 12), torch.cat([x, x[..., :pad]], dim=-1))


def test_mora_is_registered_with_an_exact_count():
    assert get_method("mora").layer is MoRALinear
    layer = _layer(144, 48, 8)
    own = {name: p.numel() for name, p in layer.named_parameters() if not name.startswith("base_layer")}
    assert layer.r_hat == 39 and own == {"mora_M": 39 * 39} and layer.trainable_param_count == 1521
    assert layer.trainable_param_count <= 8 * (48 + 144)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


@pytest.mark.parametrize("d_out, d_in, rank", SHAPES)
def test_zero_M_leaves_the_output_unchanged(d_out, d_in, rank):
    layer = _layer(d_out, d_in, rank)
    torch.testing.assert_close(layer(_x(d_in)), layer.base_layer(_x(d_in)), rtol=0, atol=0)


@pytest.mark.parametrize("d_out, d_in, rank", SHAPES)
def test_delta_weight_equals_the_official_merge_loop(d_out, d_in, rank):
    layer = _randomise(_layer(d_out, d_in, rank))
    expected = _official_delta_weight(layer.mora_M.detach(), d_in, d_out)
    torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d_out, d_in, rank", SHAPES)
def test_forward_is_the_dense_delta(d_out, d_in, rank):
    layer = _randomise(_layer(d_out, d_in, rank))
    x = _x(d_in)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + F.linear(x, layer.delta_weight()), rtol=1e-5, atol=1e-5)


def test_update_rank_exceeds_the_nominal_rank():
    layer = _randomise(_layer(7, 11, 2))
    assert layer.r_hat == 6
    assert torch.linalg.matrix_rank(layer.delta_weight().double()) == 6  # LoRA's update would have rank 2


@pytest.mark.parametrize("d_out, d_in, rank", SHAPES)
def test_merge_and_unmerge_are_exact(d_out, d_in, rank):
    layer = _randomise(_layer(d_out, d_in, rank)).eval()
    W0 = layer.base_layer.weight.detach().clone()
    x = _x(d_in)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)


def test_gradient_reaches_only_M():
    layer = _layer(7, 11, 2)
    x = _x(11).requires_grad_(True)
    layer(x).square().sum().backward()
    assert layer.mora_M.grad is not None and torch.count_nonzero(layer.mora_M.grad) > 0
    assert layer.base_layer.weight.grad is None


def test_dropout_is_on_the_adapter_path_only():
    layer = _randomise(_layer(7, 11, 2, dropout=0.5)).train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = layer(_x(11))
        torch.manual_seed(0)
        dropped = F.dropout(_x(11), 0.5, training=True)
    expected = layer.base_layer(_x(11)) + F.linear(dropped, layer.delta_weight())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rslora_is_refused_here_and_in_the_config():
    with pytest.raises(ValueError, match="MoRA has no LoRA scale"):
        _layer(7, 11, 2, use_rslora=True)
    with pytest.raises(ConfigError, match="stage3.rslora: MoRA"):
        load_config(None, ["stage3.method=mora", "stage3.rslora=true"])


def test_extra_repr_shows_r_hat_and_no_scale():
    text = repr(_layer(7, 11, 2, dropout=0.1))
    assert "in_features=11, out_features=7, rank=2, r_hat=6, dropout=0.1, merged=False" in text
    assert "alpha" not in text


def test_inject_counts_saves_and_merges(make_swin, images):
    model = make_swin(0)
    adapters = add_adapters(model, ranks=2, method="mora")
    mark_only_adapters_trainable(model)
    hand = sum(math.isqrt(2 * (m.base_layer.in_features + m.base_layer.out_features)) ** 2 for m in adapters.values())
    assert count_trainable(model) == hand
    assert set(adapter_state_dict(model)) == {f"{name}.mora_M" for name in adapters}
    for module in adapters.values():
        _randomise(module)
    copy_model = make_swin(0)
    add_adapters(copy_model, ranks=2, method="mora")
    load_adapter_state_dict(copy_model, adapter_state_dict(model))
    before = model(images)
    torch.testing.assert_close(copy_model(images), before)
    merge_adapters(model)
    torch.testing.assert_close(model(images), before, rtol=1e-4, atol=1e-4)
    unmerge_adapters(model)


def test_stage3_prepares_a_mora_model(tiny_overrides, body):
    stage = load_config(QUICKSTART, tiny_overrides + ["stage3.method=mora"]).stage3
    model = nn.Module()
    model.body, model.embedder, model.head = copy.deepcopy(body), nn.Linear(2, 2), nn.Linear(2, 2)
    prepare_model(model, stage, dict.fromkeys(match_targets(model, stage.targets), 2))
    assert {type(m) for m in adapter_modules(model).values()} == {MoRALinear}
    assert {n.rsplit(".", 1)[-1] for n, p in model.body.named_parameters() if p.requires_grad} == {"mora_M"}


@pytest.mark.slow
def test_tiny_pipeline_runs_with_mora(tiny_overrides):
    overrides = tiny_overrides + ["stage3.method=mora", "stage2.enabled=false", "stage1.epochs=1",
                                  "trainer.max_epochs=1", "stage3.rank=2"]
    result = run_pipeline(load_config(QUICKSTART, overrides))
    assert result.metrics.method == "mora" and np.isfinite(result.metrics.test_error)
    stage3 = result.directory / "stage3"
    assert not (stage3 / "adapter").exists()  # no PEFT layout for MoRA
    with safe_open(str(stage3 / "trainable.safetensors"), "pt") as saved:
        body_keys = [key for key in saved.keys() if key.startswith("model.body.")]
    assert body_keys and all(key.endswith(".mora_M") for key in body_keys)
