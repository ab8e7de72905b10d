import copy
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
    mark_only_adapters_trainable,
    match_targets,
    merge_adapters,
    unmerge_adapters,
)
from orca_lora.adapters.lora import LoRALinear
from orca_lora.adapters.sbora import SBoRAFALinear, SBoRAFBLinear, standard_basis_indices, standard_basis_rows
from orca_lora.adapters.spec import get_method
from orca_lora.config_load import load_config
from orca_lora.finetune.stage import prepare_model
from orca_lora.pipeline import run_pipeline

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
D_OUT, D_IN, RANK = 24, 40, 5
LAYERS = {"sbora-fa": SBoRAFALinear, "sbora-fb": SBoRAFBLinear}
TRAINED = {"sbora-fa": "lora_B", "sbora-fb": "lora_A"}


def _linear(seed: int = 0) -> nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(D_IN, D_OUT)


def _layer(method: str, **options) -> SBoRAFALinear | SBoRAFBLinear:
    return LAYERS[method](_linear(), RANK, alpha=10.0, generator=torch.Generator().manual_seed(3), **options)


def _randomise(layer: nn.Module, method: str) -> nn.Module:
    trained = getattr(layer, TRAINED[method])
    with torch.no_grad():
        trained.copy_(torch.randn(trained.shape, generator=torch.Generator().manual_seed(1)))
    return layer


def _x() -> torch.Tensor:
    return torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(7))


def _one_hot_lora(layer: nn.Module, method: str) -> LoRALinear:
    """The reference: a plain LoRA whose fixed factor is the one-hot matrix, written entry by entry."""
    reference = LoRALinear(_linear(), RANK, alpha=10.0)
    with torch.no_grad():
        if method == "sbora-fa":
            reference.lora_A.zero_()
            for k, i in enumerate(layer.basis_indices.tolist()):
                reference.lora_A[k, i] = 1.0
            reference.lora_B.copy_(layer.lora_B)
        else:
            reference.lora_B.zero_()
            for k, j in enumerate(layer.basis_indices.tolist()):
                reference.lora_B[j, k] = 1.0
            reference.lora_A.copy_(layer.lora_A)
    return reference


def test_basis_indices_are_distinct_seeded_uniform_draws():
    indices = standard_basis_indices(40, 6, torch.Generator().manual_seed(0))
    assert len(set(indices.tolist())) == 6 and all(0 <= i < 40 for i in indices.tolist())
    reference = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:6]
    assert torch.equal(indices, reference)
    assert torch.equal(standard_basis_indices(7, 7, torch.Generator().manual_seed(2)).sort().values, torch.arange(7))
    # every index turns up over many seeds: the draw covers the whole range
    draws = [standard_basis_indices(40, 2, torch.Generator().manual_seed(seed)) for seed in range(200)]
    seen = {i for draw in draws for i in draw.tolist()}
    assert seen == set(range(40))


@pytest.mark.parametrize("rank", [0, 41])
def test_basis_indices_refuse_an_impossible_rank(rank):
    with pytest.raises(ValueError, match=r"rank must be in \[1, size\] = \[1, 40\]"):
        standard_basis_indices(40, rank)


def test_standard_basis_rows_are_identity_rows():
    rows = standard_basis_rows(torch.tensor([3, 0]), 5)
    torch.testing.assert_close(rows, torch.eye(5)[[3, 0]])


def test_methods_are_registered():
    assert get_method("sbora-fa").layer is SBoRAFALinear and get_method("sbora-fb").layer is SBoRAFBLinear


@pytest.mark.parametrize("method, count", [("sbora-fa", D_OUT * RANK), ("sbora-fb", RANK * D_IN)])
def test_only_the_free_factor_is_a_parameter_and_the_count_is_exact(method, count):
    layer = _layer(method)
    own = {name: p.numel() for name, p in layer.named_parameters() if not name.startswith("base_layer")}
    assert own == {TRAINED[method]: count}
    assert layer.trainable_param_count == count
    assert "basis_indices" in dict(layer.named_buffers())
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


@pytest.mark.parametrize("method", LAYERS)
def test_trained_factor_starts_at_zero_so_the_output_is_the_base(method):
    layer = _layer(method)
    assert torch.count_nonzero(getattr(layer, TRAINED[method])) == 0
    torch.testing.assert_close(layer(_x()), layer.base_layer(_x()), rtol=0, atol=0)


@pytest.mark.parametrize("method", LAYERS)
def test_forward_and_gradient_equal_lora_with_a_one_hot_factor(method):
    layer = _randomise(_layer(method), method)
    reference = _one_hot_lora(layer, method)
    x = _x()
    out, expected = layer(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    trained = TRAINED[method]
    torch.testing.assert_close(getattr(layer, trained).grad, getattr(reference, trained).grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", LAYERS)
def test_delta_weight_is_the_lora_product_and_zero_outside_the_basis(method):
    layer = _randomise(_layer(method), method)
    delta = layer.delta_weight()
    torch.testing.assert_close(delta, _one_hot_lora(layer, method).delta_weight(), rtol=0, atol=0)
    basis_A, basis_B, scaling = layer.factors()
    torch.testing.assert_close(delta, scaling * basis_B @ basis_A, rtol=0, atol=0)
    axis = 0 if method == "sbora-fa" else 1  # FA touches columns (sum over rows), FB touches rows
    touched = torch.nonzero(delta.abs().sum(axis)).flatten()
    assert torch.equal(touched, layer.basis_indices.sort().values)


@pytest.mark.parametrize("method", LAYERS)
def test_merge_and_unmerge_are_exact_outside_the_basis(method):
    layer = _randomise(_layer(method), method).eval()
    W0 = layer.base_layer.weight.detach().clone()
    x = _x()
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight - W0, layer.delta_weight(), rtol=0, atol=1e-6)
    layer.unmerge()
    untouched = torch.ones(D_OUT, D_IN, dtype=torch.bool)
    if method == "sbora-fa":
        untouched[:, layer.basis_indices] = False
    else:
        untouched[layer.basis_indices] = False
    assert torch.equal(layer.base_layer.weight[untouched], W0[untouched])
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", LAYERS)
def test_dropout_is_on_the_adapter_path_only(method):
    layer = _randomise(_layer(method, dropout=0.5), method).train()
    reference = _one_hot_lora(layer, method)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = layer(_x())
        torch.manual_seed(0)
        dropped = F.dropout(_x(), 0.5, training=True)
    expected = layer.base_layer(_x()) + F.linear(dropped, reference.delta_weight())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, fixed", [("sbora-fa", "A (standard basis, 5 input features)"),
                                            ("sbora-fb", "B (standard basis, 5 output features)")])
def test_extra_repr_names_the_fixed_factor(method, fixed):
    text = repr(_layer(method))
    assert "rank=5, alpha=10, scaling=2" in text and f"fixed={fixed}" in text


@pytest.mark.parametrize("method", LAYERS)
def test_inject_counts_saves_and_seeds(method, make_swin, images):
    model = make_swin(0)
    adapters = add_adapters(model, ranks=3, method=method, seed=4)
    mark_only_adapters_trainable(model)
    side = "out_features" if method == "sbora-fa" else "in_features"
    assert count_trainable(model) == sum(3 * getattr(m.base_layer, side) for m in adapters.values())
    assert set(adapter_state_dict(model)) == {f"{name}.{TRAINED[method]}" for name in adapters}
    again = add_adapters(make_swin(0), ranks=3, method=method, seed=4)
    other = add_adapters(make_swin(0), ranks=3, method=method, seed=5)
    assert all(torch.equal(adapters[n].basis_indices, again[n].basis_indices) for n in adapters)
    assert any(not torch.equal(adapters[n].basis_indices, other[n].basis_indices) for n in adapters)
    for module in adapter_modules(model).values():
        _randomise(module, method)
    before = model(images)
    merge_adapters(model)
    torch.testing.assert_close(model(images), before, rtol=1e-4, atol=1e-4)
    unmerge_adapters(model)


@pytest.mark.parametrize("method", LAYERS)
def test_stage3_prepares_an_sbora_model(method, tiny_overrides, body):
    stage = load_config(QUICKSTART, tiny_overrides + [f"stage3.method={method}"]).stage3
    model = nn.Module()
    model.body, model.embedder, model.head = copy.deepcopy(body), nn.Linear(2, 2), nn.Linear(2, 2)
    prepare_model(model, stage, dict.fromkeys(match_targets(model, stage.targets), 2))
    assert {type(m) for m in adapter_modules(model).values()} == {LAYERS[method]}
    assert {n.rsplit(".", 1)[-1] for n, p in model.body.named_parameters() if p.requires_grad} == {TRAINED[method]}


@pytest.mark.slow
@pytest.mark.parametrize("method", LAYERS)
def test_tiny_pipeline_runs_with_sbora(method, tiny_overrides):
    overrides = tiny_overrides + [f"stage3.method={method}", "stage2.enabled=false", "stage1.epochs=1",
                                  "trainer.max_epochs=1", "stage3.rank=2", f"output.name={method}"]
    result = run_pipeline(load_config(QUICKSTART, overrides))
    assert result.metrics.method == method and np.isfinite(result.metrics.test_error)
    stage3 = result.directory / "stage3"
    assert not (stage3 / "adapter").exists()  # no PEFT layout for SBoRA
    with safe_open(str(stage3 / "trainable.safetensors"), "pt") as saved:
        body_keys = [key for key in saved.keys() if key.startswith("model.body.")]
    assert body_keys and all(key.endswith(f".{TRAINED[method]}") for key in body_keys)
