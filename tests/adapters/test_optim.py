import pytest
import torch

from orca_lora.adapters.inject import add_adapters, mark_only_adapters_trainable
from orca_lora.adapters.optim import adapter_param_groups


def _by_name(groups):
    return {group["name"]: group for group in groups}


def test_groups_carry_the_loraplus_ratio_and_cover_every_trainable_param_once(swin):
    add_adapters(swin, ranks=2, method="dora")
    mark_only_adapters_trainable(swin)
    swin.head.fc.requires_grad_(True)
    groups = _by_name(adapter_param_groups(swin, lr=1e-3, weight_decay=0.05, loraplus_ratio=16.0))

    assert groups["lora_A"]["lr"] == 1e-3 and groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == 1e-3
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["lora_B"]["weight_decay"] == 0.05
    assert all(group["loraplus_ratio"] == 16.0 for group in groups.values())
    grouped = [id(p) for group in groups.values() for p in group["params"]]
    trainable = {id(p) for p in swin.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable

    names = {id(p): name for name, p in swin.named_parameters()}
    assert all(names[id(p)].endswith(".lora_A") for p in groups["lora_A"]["params"])
    assert all(names[id(p)].endswith(".lora_B") for p in groups["lora_B"]["params"])
    assert [names[id(p)] for p in groups["decay"]["params"]] == ["head.fc.weight"]
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "head.fc.bias" in no_decay and sum(n.endswith("lora_magnitude_vector") for n in no_decay) == 16


def test_loraplus_moves_B_ratio_times_faster_under_sgd(swin, images):
    add_adapters(swin, ranks=2)
    mark_only_adapters_trainable(swin)
    qkv = swin.layers[0].blocks[0].attn.qkv
    with torch.no_grad():
        qkv.lora_B.normal_(generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(adapter_param_groups(swin, lr=0.1, weight_decay=0.0, loraplus_ratio=4.0))
    A, B = qkv.lora_A.detach().clone(), qkv.lora_B.detach().clone()
    swin(images).square().mean().backward()
    optimizer.step()
    torch.testing.assert_close(qkv.lora_A.detach(), A - 0.1 * qkv.lora_A.grad)
    torch.testing.assert_close(qkv.lora_B.detach(), B - 0.4 * qkv.lora_B.grad)


def test_empty_groups_are_left_out(swin):
    add_adapters(swin, ranks=2)
    mark_only_adapters_trainable(swin)
    assert [g["name"] for g in adapter_param_groups(swin, lr=1e-3, weight_decay=0.0)] == ["lora_A", "lora_B"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0, "weight_decay": 0.0}, "lr must be > 0"),
        ({"lr": 1e-3, "weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"lr": 1e-3, "weight_decay": 0.0, "loraplus_ratio": 0.0}, "loraplus_ratio must be > 0"),
    ],
)
def test_bad_arguments_raise(swin, kwargs, message):
    with pytest.raises(ValueError, match=message):
        adapter_param_groups(swin, **kwargs)


def test_no_trainable_parameters_raises(swin):
    swin.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters; call mark_only_adapters_trainable"):
        adapter_param_groups(swin, lr=1e-3, weight_decay=0.0)
