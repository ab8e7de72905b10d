import peft
import torch
from torch import nn

from orca_lora.adapters.dora import DoRALinear, dora_weight_norm


def _randomise(layer: DoRALinear, seed: int = 0) -> DoRALinear:
    """Non-zero B and a moved magnitude so the adapter path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
        layer.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(layer.base_layer.out_features, generator=generator))
    return layer


def _assert_grads_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Float32 sums over many terms in a different order: tolerance relative to the largest entry."""
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def test_dora_forward_matches_formula_and_peft(make_linear, x):
    ours = _randomise(DoRALinear(make_linear(), rank=3, alpha=6.0))
    W0, b, A, B, m = ours.base_layer.weight, ours.base_layer.bias, ours.lora_A, ours.lora_B, ours.lora_magnitude_vector
    direction = W0 + 2.0 * B @ A
    expected = x @ (m[:, None] / direction.norm(dim=1, keepdim=True) * direction).T + b
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dora_weight_norm(W0, 2.0 * B @ A), direction.norm(dim=1))

    config = peft.LoraConfig(r=3, lora_alpha=6.0, use_dora=True, target_modules=["0"])
    theirs = peft.get_peft_model(nn.Sequential(make_linear()), config)
    peft_layer = theirs.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(A)
        peft_layer.lora_B["default"].weight.copy_(B)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(m)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()  # PEFT detaches the norm (DoRA 4.3), so equal grads check ours does too
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    _assert_grads_close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)
    _assert_grads_close(m.grad, peft_layer.lora_magnitude_vector["default"].weight.grad)


def test_dora_with_dropout_matches_peft(make_linear, x):
    ours = _randomise(DoRALinear(make_linear(), rank=3, alpha=6.0, dropout=0.3)).train()
    config = peft.LoraConfig(r=3, lora_alpha=6.0, use_dora=True, lora_dropout=0.3, target_modules=["0"])
    theirs = peft.get_peft_model(nn.Sequential(make_linear()), config).train()
    peft_layer = theirs.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = ours(x)
        torch.manual_seed(0)
        expected = theirs(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dora_magnitude_starts_at_row_norms(make_linear):
    layer = DoRALinear(make_linear(), rank=2)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), layer.base_layer.weight.norm(dim=1))


def test_extra_repr_names_the_class(make_linear):
    assert "DoRALinear" in repr(DoRALinear(make_linear(), rank=2))
