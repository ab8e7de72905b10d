import copy
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orca_lora.adapters.base import lora_scaling
from orca_lora.adapters.delta import DeltaLoRALinear
from orca_lora.adapters.dora import DoRALinear
from orca_lora.adapters.dylora import DyLoRALinear
from orca_lora.adapters.lora import LoRA, LoRALinear, LoRALinearFunction, lora_linear, lora_param_count
from orca_lora.adapters.spec import METHODS, get_method, register_method

D_OUT, D_IN = 24, 40


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(D_IN, D_OUT, bias=bias)


def _randomise(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    """Non-zero B (and a moved DoRA magnitude) so the adapter path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
        if isinstance(layer, DoRALinear):
            layer.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(D_OUT, generator=generator))
    return layer


def _assert_grads_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Float32 sums over many terms in a different order: tolerance relative to the largest entry."""
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def _x(batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, D_IN, generator=torch.Generator().manual_seed(7))


METHOD_LAYERS = {
    "lora": lambda: LoRALinear(_linear(), rank=4, alpha=8.0),
    "rslora": lambda: LoRALinear(_linear(), rank=4, alpha=8.0, use_rslora=True),
    "delta-lora": lambda: DeltaLoRALinear(_linear(), rank=4, alpha=8.0),
    "dylora": lambda: DyLoRALinear(_linear(), rank=6, alpha=8.0, min_rank=2),
    "dora": lambda: DoRALinear(_linear(), rank=4, alpha=8.0),
    "dora-no-bias": lambda: DoRALinear(_linear(bias=False), rank=4, alpha=8.0),
}


def test_scaling_and_param_count_formulas():
    assert lora_scaling(16.0, 4) == 4.0
    assert lora_scaling(16.0, 4, use_rslora=True) == 8.0
    assert lora_param_count(24, 40, 3) == 3 * 24 + 40 * 3


@pytest.mark.parametrize("method", METHOD_LAYERS)
def test_trainable_param_count_is_exact(method):
    layer = METHOD_LAYERS[method]()
    own = sum(p.numel() for name, p in layer.named_parameters() if not name.startswith("base_layer"))
    assert layer.trainable_param_count == own
    assert all(not p.requires_grad for p in layer.base_layer.parameters())


def test_lora_A_is_kaiming_uniform_like_peft():
    layer = LoRALinear(_linear(), rank=4, generator=torch.Generator().manual_seed(3))
    bound = 1 / math.sqrt(D_IN)  # kaiming_uniform with a = sqrt(5): gain sqrt(1/3), bound sqrt(3) * gain / sqrt(fan_in)
    expected = torch.empty(4, D_IN).uniform_(-bound, bound, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer.lora_A.detach(), expected)
    assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("method", METHOD_LAYERS)
def test_zero_B_at_init_leaves_output_unchanged(method):
    layer = METHOD_LAYERS[method]()
    torch.testing.assert_close(layer(_x()), layer.base_layer(_x()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_matches_formula(use_rslora):
    layer = _randomise(LoRALinear(_linear(), rank=3, alpha=6.0, use_rslora=use_rslora))
    scale = 6.0 / math.sqrt(3) if use_rslora else 6.0 / 3
    assert layer.scaling == pytest.approx(scale)
    W0, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    x = _x()
    expected = x @ W0.T + b + scale * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_peft_layer_outputs_and_grads(use_rslora):
    ours = _randomise(LoRALinear(_linear(), rank=3, alpha=6.0, use_rslora=use_rslora))
    config = peft.LoraConfig(r=3, lora_alpha=6.0, use_rslora=use_rslora, target_modules=["0"])
    theirs = peft.get_peft_model(nn.Sequential(_linear()), config)
    peft_layer = theirs.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = _x()
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    _assert_grads_close(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
    _assert_grads_close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)


def test_adapter_layers_adopt_the_base_layer_mode():
    assert not LoRALinear(_linear().eval(), rank=2).training
    assert DyLoRALinear(_linear().train(), rank=2).training


def test_dropout_is_on_the_adapter_path_only():
    layer = LoRALinear(_linear(), rank=4, dropout=0.5).train()
    torch.testing.assert_close(layer(_x()), layer.base_layer(_x()))
    _randomise(layer)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = layer(_x())
        torch.manual_seed(0)
        dropped = F.dropout(_x(), 0.5, training=True)
    expected = layer.base_layer(_x()) + layer.scaling * dropped @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(_x()), layer.base_layer(_x()) + F.linear(_x(), layer.delta_weight()))


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_delta_weight_has_rank_r(rank):
    layer = _randomise(LoRALinear(_linear(), rank=rank))
    delta = layer.delta_weight()
    assert delta.shape == (D_OUT, D_IN)
    assert torch.linalg.matrix_rank(delta) == rank
    outer_sum = sum(torch.outer(layer.lora_B[:, k], layer.lora_A[k]) for k in range(rank))
    torch.testing.assert_close(delta, layer.scaling * outer_sum)


@pytest.mark.parametrize("method", METHOD_LAYERS)
def test_merged_equals_unmerged_and_unmerge_restores_W0(method):
    layer = _randomise(METHOD_LAYERS[method]()).eval()
    W0 = layer.base_layer.weight.detach().clone()
    x = _x()
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_registry_holds_the_lora_family():
    assert {"lora", "delta-lora", "lora-plus", "dylora", "dora"} <= set(METHODS)
    assert get_method("lora-plus").layer is LoRALinear
    assert get_method("delta-lora").layer is DeltaLoRALinear
    with pytest.raises(KeyError, match="unknown method 'vera'.*'dora'"):
        get_method("vera")
    with pytest.raises(ValueError, match="already registered"):
        register_method(LoRA)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"rank must be in \[1, min\(d_out, d_in\)\] = \[1, 24\].*got 0"),
        ({"rank": 25}, r"shape \(24, 40\), got 25"),
        ({"rank": 2, "alpha": 0.0}, "alpha must be > 0"),
        ({"rank": 2, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(_linear(), **kwargs)


def test_bad_layers_and_method_options_raise():
    with pytest.raises(ValueError, match="must be an nn.Linear, got Conv2d"):
        LoRALinear(nn.Conv2d(3, 4, 2), rank=1)
    with pytest.raises(ValueError, match="Delta-LoRA layers take no adapter dropout"):
        DeltaLoRALinear(_linear(), rank=2, dropout=0.1)
    with pytest.raises(ValueError, match=r"min_rank must be in \[1, rank\] = \[1, 4\]"):
        DyLoRALinear(_linear(), rank=4, min_rank=5)
    layer = DyLoRALinear(_linear(), rank=4)
    with pytest.raises(ValueError, match=r"eval_rank must be in \[1, rank\] = \[1, 4\], got 5"):
        layer.eval_rank = 5


def test_extra_repr_names_the_settings():
    text = repr(LoRALinear(_linear(), rank=4, alpha=8.0, dropout=0.1))
    assert "in_features=40, out_features=24, rank=4, alpha=8, scaling=2" in text and "dropout=0.1" in text


def _uses_fast_path(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "LoRALinearFunctionBackward"


def _fast_path_case(dtype: torch.dtype, bias: bool = True, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x (2, 3, d_in) and A, B needing grad; frozen W and b."""
    generator = torch.Generator().manual_seed(seed)
    x, A, B = (torch.randn(shape, generator=generator, dtype=dtype) for shape in ((2, 3, D_IN), (4, D_IN), (D_OUT, 4)))
    W = torch.randn(D_OUT, D_IN, generator=generator, dtype=dtype)
    b = torch.randn(D_OUT, generator=generator, dtype=dtype) if bias else None
    return x.requires_grad_(), W, b, A.requires_grad_(), B.requires_grad_()


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_function_passes_gradcheck(bias):
    x, W, b, A, B = _fast_path_case(torch.float64, bias)
    assert torch.autograd.gradcheck(lambda x, A, B: LoRALinearFunction.apply(x, W, b, A, B, 1.5), (x, A, B))


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_plain_autograd_in_float32(bias):
    x, W, b, A, B = _fast_path_case(torch.float32, bias)
    grad_out = torch.randn(2, 3, D_OUT, generator=torch.Generator().manual_seed(1))
    out = lora_linear(x, W, b, A, B, 1.5)
    grads = torch.autograd.grad(out, (x, A, B), grad_out)
    expected = x @ W.T + 1.5 * (x @ A.T) @ B.T + (0 if b is None else b)
    expected_grads = torch.autograd.grad(expected, (x, A, B), grad_out)
    assert _uses_fast_path(out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for ours, reference in zip(grads, expected_grads):
        _assert_grads_close(ours, reference)


def test_lora_linear_skips_the_gradients_not_wanted():
    x, W, b, A, B = _fast_path_case(torch.float64)
    out = lora_linear(x.detach(), W, b, A.detach(), B, 1.5)
    out.sum().backward()
    assert B.grad is not None and A.grad is None
    torch.testing.assert_close(B.grad, 1.5 * (x @ A.T).detach().reshape(-1, 4).sum(0).expand(D_OUT, 4))
    with torch.no_grad():
        plain = lora_linear(x, W, b, A, B, 1.5)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, out.detach())


def test_lora_linear_function_refuses_a_trainable_base_weight():
    x, W, b, A, B = _fast_path_case(torch.float64)
    with pytest.raises(ValueError, match="frozen base weight and bias"):
        LoRALinearFunction.apply(x, W.requires_grad_(), b, A, B, 1.5)


def test_lora_linear_function_second_derivatives_pass_gradgradcheck():
    x, W, b, A, B = _fast_path_case(torch.float64)
    assert torch.autograd.gradgradcheck(lambda x, A, B: LoRALinearFunction.apply(x, W, b, A, B, 1.5), (x, A, B))


@pytest.mark.parametrize("method", ["lora", "rslora", "delta-lora", "dylora"])
def test_fast_path_equals_the_autograd_path_in_every_method_using_it(method, monkeypatch):
    layer = _randomise(METHOD_LAYERS[method]()).train()
    layers = [layer, copy.deepcopy(layer)]
    if method == "dylora":
        for each in layers:
            each.frozen, each._train_rank = True, 4
    monkeypatch.setattr(layers[1], "_fast_path_applies", lambda *args: False)
    x = _x().requires_grad_()
    outs = [layer(x) for layer in layers]
    assert _uses_fast_path(outs[0]) and not _uses_fast_path(outs[1])
    grads = [torch.autograd.grad(out.square().sum(), (x, each.lora_A, each.lora_B)) for out, each in zip(outs, layers)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for ours, reference in zip(*grads):
        _assert_grads_close(ours, reference)


class _SubclassedLinear(nn.Linear):
    pass


def _training_layer(base_layer: nn.Linear | None = None, dropout: float = 0.0) -> LoRALinear:
    return LoRALinear(_linear() if base_layer is None else base_layer, rank=4, dropout=dropout).train()


def _layer_with_trainable(name: str) -> LoRALinear:
    layer = _training_layer()
    getattr(layer.base_layer, name).requires_grad_(True)
    return layer


def _layer_with_hooked_base() -> LoRALinear:
    layer = _training_layer()
    layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    return layer


FALLBACK_LAYERS = {
    "dropout": lambda: _training_layer(dropout=0.1),
    "trainable weight": lambda: _layer_with_trainable("weight"),
    "trainable bias": lambda: _layer_with_trainable("bias"),
    "hooked base layer": _layer_with_hooked_base,
    "nn.Linear subclass": lambda: _training_layer(_SubclassedLinear(D_IN, D_OUT)),
}


@pytest.mark.parametrize("case", FALLBACK_LAYERS)
def test_fast_path_falls_back_where_it_would_not_be_exact(case):
    assert not _uses_fast_path(FALLBACK_LAYERS[case]()(_x()))
    assert _uses_fast_path(_training_layer()(_x()))


def test_fast_path_falls_back_under_autocast_and_trains_the_base_weight_when_asked():
    layer = _randomise(LoRALinear(_linear(), rank=4)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(_x())
    assert out.dtype == torch.bfloat16 and not _uses_fast_path(out)
    layer.base_layer.weight.requires_grad_(True)
    layer(_x()).sum().backward()
    torch.testing.assert_close(layer.base_layer.weight.grad, _x().reshape(-1, D_IN).sum(0).expand(D_OUT, D_IN))
