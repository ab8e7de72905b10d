import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orca_lora.adapters.delta import attach_delta_lora, delta_lora_update
from orca_lora.adapters.delta import DeltaLoRALinear
from orca_lora.adapters.inject import add_adapters, adapter_modules, mark_only_adapters_trainable
from orca_lora.adapters.lora import LoRALinear


def _delta_layer(rank: int = 2, seed: int = 0) -> DeltaLoRALinear:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = nn.Linear(12, 8)
    return DeltaLoRALinear(base, rank=rank, alpha=4.0, generator=torch.Generator().manual_seed(seed))


def test_delta_lora_update_matches_a_loop_over_entries():
    generator = torch.Generator().manual_seed(0)
    weight, old_A, new_A = torch.randn(8, 12, generator=generator), *torch.randn(2, 3, 12, generator=generator)
    old_B, new_B = torch.randn(2, 8, 3, generator=generator)
    expected = weight.clone()
    for i in range(8):
        for j in range(12):
            change = sum(new_B[i, k] * new_A[k, j] - old_B[i, k] * old_A[k, j] for k in range(3))
            expected[i, j] += 0.5 * 2.0 * change
    result = delta_lora_update(weight, old_A, old_B, new_A, new_B, scaling=2.0, update_ratio=0.5)
    torch.testing.assert_close(result, expected)
    assert result is not weight


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_weight_moves_by_exactly_the_product_change_after_start_step(optimizer_class):
    layer = _delta_layer()
    optimizer = optimizer_class([layer.lora_A, layer.lora_B], lr=0.05)
    start_step, update_ratio = 2, 0.5
    handle = attach_delta_lora(optimizer, [layer], start_step=start_step, update_ratio=update_ratio)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    target = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    for step in range(6):
        W, A, B = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B))
        optimizer.zero_grad()
        F.mse_loss(layer(x), target).backward()
        optimizer.step()
        new_A, new_B = layer.lora_A.detach(), layer.lora_B.detach()
        assert not torch.equal(new_B @ new_A, B @ A)
        expected = W + update_ratio * layer.scaling * (new_B @ new_A - B @ A) if step > start_step else W
        torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-7)
    assert handle.step == 6
    handle.remove()
    W = layer.base_layer.weight.detach().clone()
    F.mse_loss(layer(x), target).backward()
    optimizer.step()
    assert torch.equal(layer.base_layer.weight, W)


def test_delta_lora_on_the_tiny_swin(swin, images):
    add_adapters(swin, method="delta-lora", ranks=2)
    mark_only_adapters_trainable(swin)
    modules = adapter_modules(swin)
    optimizer = torch.optim.AdamW([p for p in swin.parameters() if p.requires_grad], lr=1e-2)
    attach_delta_lora(optimizer, modules, start_step=0, update_ratio=1.0)
    before = {name: m.base_layer.weight.detach().clone() for name, m in modules.items()}
    swin.train()
    for _ in range(2):
        optimizer.zero_grad()
        swin(images).logsumexp(dim=1).mean().backward()
        optimizer.step()
    # Step 0 (t = K) leaves W alone; step 1 moves every base weight.
    assert all(not torch.equal(m.base_layer.weight, before[name]) for name, m in modules.items())
    assert not any(m.base_layer.weight.requires_grad for m in modules.values())


def test_attach_rejects_bad_inputs():
    layer = _delta_layer()
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    with pytest.raises(ValueError, match="modules is empty"):
        attach_delta_lora(optimizer, [], start_step=0, update_ratio=1.0)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        attach_delta_lora(optimizer, [layer], start_step=-1, update_ratio=1.0)
    with pytest.raises(ValueError, match="update_ratio must be > 0"):
        attach_delta_lora(optimizer, [layer], start_step=0, update_ratio=0.0)
    plain = LoRALinear(nn.Linear(12, 8), rank=2)
    with pytest.raises(ValueError, match="'plain' is a LoRALinear; Delta-LoRA needs DeltaLoRALinear"):
        attach_delta_lora(optimizer, {"plain": plain}, start_step=0, update_ratio=1.0)
    other = _delta_layer(seed=1)
    with pytest.raises(ValueError, match="does not update lora_A and lora_B of module 0"):
        attach_delta_lora(optimizer, [other], start_step=0, update_ratio=1.0)
    layer.lora_dropout.p = 0.1
    with pytest.raises(ValueError, match="adapter dropout 0.1; Delta-LoRA needs 0"):
        attach_delta_lora(optimizer, [layer], start_step=0, update_ratio=1.0)
