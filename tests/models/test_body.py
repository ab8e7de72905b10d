import json
import re

import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from orca_lora.adapters.inject import match_targets
from orca_lora.config import DEFAULT_TARGETS
from orca_lora.models.body import (body_blocks, body_img_size, body_stride, body_token_grid,
                                   build_body, load_body, save_body)


def test_body_blocks_are_every_swin_block_in_forward_order(tiny_body):
    named = body_blocks(tiny_body)
    assert [name for name, _ in named] == [f"layers.{stage}.blocks.{index}" for stage in range(3) for index in range(2)]
    called = []
    handles = [block.register_forward_pre_hook(lambda module, args, name=name: called.append(name))
               for name, block in named]
    tiny_body.forward_features(torch.rand(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    assert called == [name for name, _ in named]
    assert len(named) == sum(isinstance(module, SwinTransformerBlock) for module in tiny_body.modules())


def test_the_default_targets_are_the_four_linears_of_each_block(tiny_body):
    linears = match_targets(tiny_body, DEFAULT_TARGETS)
    assert len(linears) == 6 * 4
    assert all(isinstance(module, nn.Linear) for module in linears.values())
    assert not any("patch_embed" in name for name in linears)
    assert all(tiny_body.get_submodule(name) is module for name, module in linears.items())
    dim = 24 * 2 ** 2
    assert linears["layers.2.blocks.1.attn.qkv"].weight.shape == (3 * dim, dim)
    assert linears["layers.2.blocks.1.mlp.fc1"].weight.shape == (4 * dim, dim)
    suffixes = {name.split(".blocks.")[1].split(".", 1)[1] for name in linears}
    assert suffixes == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}


def test_token_grid_and_stride_match_the_forward_pass(tiny_body):
    images = torch.rand(2, 3, 32, 32)
    assert tuple(tiny_body.patch_embed(images).shape[1:]) == body_token_grid(tiny_body) == (16, 16, 24)
    final = tiny_body.forward_features(images)
    stride = body_stride(tiny_body)
    assert stride == 8
    assert (final.shape[1] * stride, final.shape[2] * stride) == body_img_size(tiny_body) == (32, 32)


@pytest.mark.parametrize("name", ["resnet18", "swinv2_tiny_window8_256", "no_such_model"])
def test_non_swin_names_are_rejected(name):
    with pytest.raises(ValueError, match="is not a timm Swin.*swin_tiny_patch4_window7_224"):
        build_body(name)


def test_save_load_round_trip(tiny_body, tiny_spec, tmp_path):
    name, kwargs = tiny_spec
    weights = save_body(tiny_body, tmp_path / "body", name, kwargs)
    assert weights == tmp_path / "body.safetensors"
    assert json.loads((tmp_path / "body.json").read_text()) == {"model_name": name, "model_kwargs": kwargs}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["body.json", "body.safetensors"]
    loaded, info = load_body(tmp_path / "body")
    assert info["model_name"] == name
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.eval().forward_features(images), tiny_body.forward_features(images))
    again, _ = load_body(weights)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tiny_body.state_dict().values()))


def test_load_body_names_the_missing_file(tmp_path):
    (tmp_path / "body.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="body.json"):
        load_body(tmp_path / "body")


def test_torch_checkpoint_with_wrapper_and_classifier_loads(tiny_spec, tmp_path):
    name, kwargs = tiny_spec
    classifier = timm.create_model(name, num_classes=5, **kwargs)
    path = tmp_path / "weights.pth"
    torch.save({"model": classifier.state_dict()}, path)
    body = build_body(name, checkpoint=path, model_kwargs=kwargs)
    expected = {key: value for key, value in classifier.state_dict().items() if not key.startswith("head.")}
    assert body.state_dict().keys() == expected.keys()
    assert all(torch.equal(body.state_dict()[key], value) for key, value in expected.items())


def test_original_microsoft_layout_goes_through_timms_filter(tiny_body, tiny_spec, tmp_path):
    name, kwargs = tiny_spec
    original = {}
    for key, value in tiny_body.state_dict().items():
        # Microsoft's release merges patches at the end of stage i, timm at the start of stage i + 1
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        original[f"layers.{int(match[1]) - 1}.downsample.{match[2]}" if match else key] = value
    original["head.weight"] = torch.zeros(7, 96)
    original["head.bias"] = torch.zeros(7)
    path = tmp_path / "swin_original.pth"
    torch.save({"model": original}, path)
    body = build_body(name, checkpoint=path, model_kwargs=kwargs)
    assert all(torch.equal(body.state_dict()[key], value) for key, value in tiny_body.state_dict().items())


@pytest.mark.parametrize("other_kwargs, problem", [
    ({"embed_dim": 32, "num_heads": [2, 4, 8]}, "shape file vs model: patch_embed.proj.weight (24, 3, 2, 2) vs (32,"),
    ({"depths": [2, 2], "num_heads": [2, 4]}, "unexpected: layers.2."),
])
def test_wrong_architecture_checkpoint_is_a_one_line_error(tiny_body, tiny_spec, tmp_path, other_kwargs, problem):
    name, kwargs = tiny_spec
    path = tmp_path / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in tiny_body.state_dict().items()}, str(path))
    with pytest.raises(ValueError) as error:
        build_body(name, checkpoint=path, model_kwargs={**kwargs, **other_kwargs})
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message and name in message
    assert problem in message
    assert len(message) < 1000


def test_missing_checkpoint_and_conflicting_sources_fail_early(tiny_spec, tmp_path):
    name, kwargs = tiny_spec
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        build_body(name, checkpoint=tmp_path / "nothing.pth", model_kwargs=kwargs)
    with pytest.raises(ValueError, match="not both"):
        build_body(name, pretrained=True, checkpoint=tmp_path / "nothing.pth", model_kwargs=kwargs)


def test_hub_failure_is_one_line_pointing_to_local_weights(tiny_spec, monkeypatch):
    name, kwargs = tiny_spec

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConnectionError) as error:
        build_body(name, pretrained=True, model_kwargs=kwargs)
    message = str(error.value)
    assert "\n" not in message and "checkpoint" in message and "offline" in message and name in message


@pytest.mark.slow
def test_seed_scale_body_trains_one_step_on_cpu():
    torch.manual_seed(0)
    body = build_body("swin_base_patch4_window7_224")
    assert len(body_blocks(body)) == 24 and body_token_grid(body) == (56, 56, 128) and body_stride(body) == 32
    features = body.forward_features(torch.rand(1, 3, 224, 224))
    assert features.shape == (1, 7, 7, 1024)
    features.square().mean().backward()
    assert body.layers[0].blocks[0].attn.qkv.weight.grad is not None
    assert body.patch_embed.proj.weight.grad.abs().sum() > 0
