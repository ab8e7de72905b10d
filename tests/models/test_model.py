import torch
from torch import nn

from orca_lora.adapters.inject import match_targets
from orca_lora.config import DEFAULT_TARGETS
from orca_lora.models.embedder import Embedder
from orca_lora.models.heads import ClassificationHead, DenseHead
from orca_lora.models.model import build_orca_model


def test_classification_model_shapes_and_names(tiny_body):
    model = build_orca_model(tiny_body, in_channels=3, head="classification", num_outputs=10, output_size=None,
                             embedder_init="random")
    assert [name for name, _ in model.named_children()] == ["embedder", "body", "head"]
    assert isinstance(model.embedder, Embedder) and isinstance(model.head, ClassificationHead)
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 10)
    for name in match_targets(tiny_body, DEFAULT_TARGETS):
        assert isinstance(model.get_submodule(f"body.{name}"), nn.Linear)


def test_dense_model_maps_darcy_like_fields_to_fields(tiny_body):
    model = build_orca_model(tiny_body, in_channels=3, head="dense", num_outputs=1, output_size=(21, 21),
                             embedder_init="random")
    assert isinstance(model.head, DenseHead)
    assert model(torch.rand(2, 3, 21, 21)).shape == (2, 1, 21, 21)


def test_forward_is_head_of_body_stages_of_embedder(tiny_body):
    model = build_orca_model(tiny_body, 3, "classification", 5, None, embedder_init="source").eval()
    images = torch.rand(2, 3, 32, 32)
    # with the source patch embedding copied in, the composed model sees what the body alone sees
    assert torch.equal(model.forward_features(images), tiny_body.forward_features(images))
    expected = model.head(tiny_body.norm(tiny_body.layers(model.embedder(images))))
    assert torch.equal(model(images), expected)


def test_gradients_reach_embedder_body_and_head_but_not_the_unused_patch_embed(tiny_body):
    model = build_orca_model(tiny_body, 1, "dense", 2, (16, 16), embedder_init="random")
    model(torch.rand(2, 1, 16, 16)).square().mean().backward()
    for module in (model.embedder.proj, model.head.fc, model.body.layers[0].blocks[0].attn.qkv):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert not any(parameter.requires_grad for parameter in model.body.patch_embed.parameters())
    assert all(parameter.grad is None for parameter in model.body.patch_embed.parameters())


def test_seed_fixes_new_weights(tiny_body):
    def new_weights(seed: int) -> list[torch.Tensor]:
        model = build_orca_model(tiny_body, 3, "classification", 5, None, embedder_init="random", seed=seed)
        return [model.embedder.proj.weight, model.head.fc.weight]

    assert all(torch.equal(a, b) for a, b in zip(new_weights(0), new_weights(0)))
    assert not any(torch.equal(a, b) for a, b in zip(new_weights(0), new_weights(1)))

