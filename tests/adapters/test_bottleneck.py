import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from orca_lora.adapters.bottleneck import (
    INIT_STD,
    BottleneckAdapter,
    add_bottleneck_adapters,
    bottleneck_modules,
    bottleneck_param_count,
    bottleneck_sizes,
    mark_only_bottlenecks_trainable,
)
from orca_lora.adapters.inject import count_trainable
from orca_lora.config import DEFAULT_TARGETS, ConfigError
from orca_lora.config_load import load_config
from orca_lora.finetune.stage import prepare_model
from orca_lora.pipeline import run_pipeline

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
WIDTHS = {0: 32, 1: 64}  # block width d of each stage of the tiny Swin (embed_dim 32)
BLOCKS = [(stage, block) for stage in (0, 1) for block in (0, 1)]
LEAVES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _per_block_ranks() -> dict[str, int]:
    """Stage 2's shape of rank map: one rank per block, repeated for each of its Linears."""
    return {f"layers.{s}.blocks.{b}.{leaf}": i + 1 for i, (s, b) in enumerate(BLOCKS) for leaf in LEAVES}


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _randomise_up(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in bottleneck_modules(model).values():
            module.adapter_up.weight.copy_(0.5 * torch.randn(module.adapter_up.weight.shape, generator=generator))
            module.adapter_up.bias.copy_(0.1 * torch.randn(module.adapter_up.bias.shape, generator=generator))


def _reference_branch(adapter: BottleneckAdapter):
    """W_up GELU(W_down h + b_down) + b_up as a function of the sublayer output h, with an erf GELU."""
    down, up = adapter.adapter_down, adapter.adapter_up
    return lambda h: _gelu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias


def test_param_count_is_two_projections_with_biases():
    for features, bottleneck in [(32, 1), (64, 8), (768, 64)]:
        brute = sum(p.numel() for p in nn.Sequential(nn.Linear(features, bottleneck),
                                                      nn.Linear(bottleneck, features)).parameters())
        formula = 2 * bottleneck * features + bottleneck + features
        assert bottleneck_param_count(features, bottleneck) == brute == formula


def test_init_is_near_identity_and_seeded():
    adapter = BottleneckAdapter(nn.Linear(16, 16), 16, 4, generator=torch.Generator().manual_seed(2))
    assert torch.count_nonzero(adapter.adapter_up.weight) == 0 and torch.count_nonzero(adapter.adapter_up.bias) == 0
    assert torch.count_nonzero(adapter.adapter_down.bias) == 0
    expected = torch.empty(4, 16)
    nn.init.trunc_normal_(expected, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD,
                          generator=torch.Generator().manual_seed(2))
    assert torch.equal(adapter.adapter_down.weight.detach(), expected)
    assert 0 < adapter.adapter_down.weight.abs().max() <= 2 * INIT_STD
    assert adapter.trainable_param_count == bottleneck_param_count(16, 4)
    assert not any(p.requires_grad for p in adapter.base_layer.parameters())


def test_forward_is_sublayer_plus_bottleneck():
    adapter = BottleneckAdapter(nn.Linear(12, 16), 16, 3, generator=torch.Generator().manual_seed(0))
    _randomise_up(adapter)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    hidden = adapter.base_layer(x)
    torch.testing.assert_close(adapter(x), hidden + _reference_branch(adapter)(hidden))


def test_dropout_is_on_the_adapter_path_only():
    adapter = BottleneckAdapter(nn.Linear(12, 16), 16, 3, dropout=0.5).train()
    _randomise_up(adapter)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    hidden = adapter.base_layer(x)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = adapter(x)
        torch.manual_seed(0)
        dropped = torch.nn.functional.dropout(hidden, 0.5, training=True)
    torch.testing.assert_close(out, hidden + _reference_branch(adapter)(dropped))


@pytest.mark.parametrize("bottleneck, dropout, match", [(0, 0.0, r"bottleneck must be in \[1, features\]"),
                                                        (17, 0.0, r"\[1, 16\], got 17"),
                                                        (4, 1.0, r"dropout must be in \[0, 1\)")])
def test_bad_sizes_are_refused(bottleneck, dropout, match):
    with pytest.raises(ValueError, match=match):
        BottleneckAdapter(nn.Linear(16, 16), 16, bottleneck, dropout)


def test_merge_is_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="cannot be merged.*GELU"):
        BottleneckAdapter(nn.Linear(4, 4), 4, 2).merge()


def test_extra_repr():
    assert "features=16, bottleneck=4, dropout=0.1" in repr(BottleneckAdapter(nn.Linear(16, 16), 16, 4, 0.1))


def test_stage2_rank_maps_give_one_size_per_sublayer(swin):
    sizes = bottleneck_sizes(swin, DEFAULT_TARGETS, _per_block_ranks())
    expected = {f"layers.{s}.blocks.{b}.{sub}": i + 1 for i, (s, b) in enumerate(BLOCKS) for sub in ("attn", "mlp")}
    assert sizes == expected
    attn_only = bottleneck_sizes(swin, [r"\.attn\.qkv$"], 2)
    assert list(attn_only) == [f"layers.{s}.blocks.{b}.attn" for s, b in BLOCKS]


@pytest.mark.parametrize("targets, ranks, error, match", [
    (DEFAULT_TARGETS, {**_per_block_ranks(), "layers.0.blocks.0.attn.proj": 7}, ValueError, "different ranks"),
    (DEFAULT_TARGETS, {"layers.0.blocks.0.attn.qkv": 2}, KeyError, "missing modules"),
    ([r"\.attn\.qkv$"], {**{f"layers.{s}.blocks.{b}.attn.qkv": 1 for s, b in BLOCKS},
                         "layers.0.blocks.0.mlp.fc1": 2}, KeyError, "unknown modules"),
    ([r"^head\.fc$"], 2, ValueError, "not inside a Swin block's attn or mlp"),
])
def test_bad_rank_maps_fail_before_the_model_is_touched(swin, targets, ranks, error, match):
    before = [name for name, _ in swin.named_modules()]
    with pytest.raises(error, match=match):
        add_bottleneck_adapters(swin, targets, ranks)
    assert [name for name, _ in swin.named_modules()] == before


def test_inserted_adapters_start_as_the_base_and_count_exactly(make_swin, images):
    model = make_swin(0)
    before = model(images)
    adapters = add_bottleneck_adapters(model, DEFAULT_TARGETS, _per_block_ranks(), seed=1)
    assert set(adapters) == set(bottleneck_sizes(make_swin(0), DEFAULT_TARGETS, _per_block_ranks()))
    assert isinstance(model.get_submodule("layers.1.blocks.1.mlp"), BottleneckAdapter)
    assert "layers.0.blocks.0.attn.base_layer.qkv" in dict(model.named_modules())  # wrapping renames
    assert torch.equal(model(images), before)
    mark_only_bottlenecks_trainable(model)
    hand = sum(2 * bottleneck_param_count(WIDTHS[s], i + 1) for i, (s, _) in enumerate(BLOCKS))
    assert count_trainable(model) == hand == sum(a.trainable_param_count for a in adapters.values())


def test_adapters_sit_on_the_sublayer_outputs_before_the_residual(make_swin, images):
    """Reference: forward hooks that add the same bottleneck to each attn / mlp output of a fresh Swin."""
    model = make_swin(0)
    adapters = add_bottleneck_adapters(model, DEFAULT_TARGETS, 3)
    _randomise_up(model)
    reference = make_swin(0)
    for name, adapter in adapters.items():
        branch = _reference_branch(adapter)
        reference.get_submodule(name).register_forward_hook(lambda module, args, out, f=branch: out + f(out))
    out = model(images)
    assert not torch.allclose(out, make_swin(0)(images), atol=1e-3)
    torch.testing.assert_close(out, reference(images), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_adapters(make_swin, images):
    model = make_swin(0)
    adapters = add_bottleneck_adapters(model, DEFAULT_TARGETS, 2)
    mark_only_bottlenecks_trainable(model)
    model(images).square().sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{name}.adapter_{side}.{kind}" for name in adapters for side in ("down", "up")
                         for kind in ("weight", "bias")}
    first = adapters["layers.0.blocks.0.attn"]
    assert torch.count_nonzero(first.adapter_up.weight.grad) > 0
    assert torch.count_nonzero(first.adapter_down.weight.grad) == 0  # W_up = 0 blocks it at the first step


def test_stage3_prepares_a_houlsby_model_and_refuses_to_merge_it(tiny_overrides, body):
    stage = load_config(QUICKSTART, tiny_overrides + ["stage3.method=houlsby", "stage3.dropout=0.1"]).stage3
    model = nn.Module()
    model.body, model.embedder, model.head = copy.deepcopy(body), nn.Linear(2, 2), nn.Linear(2, 2)
    ranks = {f"body.{name}": rank for name, rank in _per_block_ranks().items()}
    prepare_model(model, stage, ranks, seed=3)
    adapters = bottleneck_modules(model)
    assert {a.adapter_dropout.p for a in adapters.values()} == {0.1} and len(adapters) == 8
    widths = {0: 16, 1: 32}  # the stage-level tiny body has embed_dim 16
    hand = sum(2 * bottleneck_param_count(widths[s], i + 1) for i, (s, _) in enumerate(BLOCKS)) + 2 * (4 + 2)
    assert count_trainable(model) == hand
    with pytest.raises(ConfigError, match="stage3.save_merged: houlsby has no adapters to merge"):
        load_config(QUICKSTART, tiny_overrides + ["stage3.method=houlsby", "stage3.save_merged=true"])


@pytest.mark.slow
def test_tiny_pipeline_runs_with_houlsby(tiny_overrides):
    overrides = tiny_overrides + ["stage3.method=houlsby", "stage1.epochs=1", "trainer.max_epochs=1",
                                  "stage3.rank=2"]
    result = run_pipeline(load_config(QUICKSTART, overrides))
    assert result.metrics.method == "houlsby" and np.isfinite(result.metrics.test_error)
    stage3 = result.directory / "stage3"
    assert not (stage3 / "adapter").exists()  # no PEFT layout for bottleneck adapters
    with safe_open(str(stage3 / "trainable.safetensors"), "pt") as saved:
        body_keys = [key for key in saved.keys() if key.startswith("model.body.")]
    assert body_keys and all(".adapter_down." in key or ".adapter_up." in key for key in body_keys)
    sublayers = {key.rsplit(".", 2)[0] for key in body_keys}
    assert len(sublayers) == 2 * 4  # attn and mlp of the 2 + 2 blocks, sized from stage 2's ranks
