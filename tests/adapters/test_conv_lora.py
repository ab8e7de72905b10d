import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from orca_lora.adapters.conv_lora import LoRAPatchConv2d
from orca_lora.adapters.inject import (
    adapter_modules,
    add_adapters,
    count_trainable,
    mark_only_adapters_trainable,
    match_targets,
)
from orca_lora.adapters.io import CONFIG_NAME, WEIGHTS_NAME, load_peft_adapter, save_peft_adapter
from orca_lora.adapters.lora import LoRALinear

C_IN, C_OUT, PATCH = 3, 48, 2
D_IN = C_IN * PATCH * PATCH  # 12: the patch vector's length
RANKS = {"embedder.proj": 3, "head": 2}


def _conv(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Conv2d(C_IN, C_OUT, PATCH, stride=PATCH).to(dtype)


def _images(dtype: torch.dtype = torch.float32, seed: int = 5) -> Tensor:
    return torch.randn(4, C_IN, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _randomise_B(layer: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=generator))
    return layer


def _patch_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """W p + b on every non-overlapping patch p (F.unfold), back to (N, d_out, h, w): the patchify conv as a Linear."""
    out = weight @ F.unfold(x, PATCH, stride=PATCH) + bias[:, None]
    return out.view(x.shape[0], -1, x.shape[2] // PATCH, x.shape[3] // PATCH)


def _fold(patches: Tensor, size: tuple[int, int]) -> Tensor:
    return F.fold(patches, size, PATCH, stride=PATCH)


def _set_product(layer: LoRAPatchConv2d, B: Tensor, A: Tensor) -> None:
    """lora_A, lora_B with s lora_B lora_A = B A (as matrices), zero-padded to the layer's rank."""
    rank = A.shape[0]
    with torch.no_grad():
        layer.lora_A.zero_()[:rank] = A.reshape(rank, *layer.lora_A.shape[1:])
        layer.lora_B.zero_()[:, :rank] = (B / layer.scaling).reshape(B.shape[0], rank, 1, 1)


def test_layer_equals_unfold_and_linear_with_W0_plus_sBA():
    layer = LoRAPatchConv2d(_conv(), rank=3, alpha=6.0, generator=torch.Generator().manual_seed(4))
    plain = LoRALinear(nn.Linear(D_IN, C_OUT), rank=3, generator=torch.Generator().manual_seed(4))
    assert layer.lora_A.shape == (3, C_IN, PATCH, PATCH) and layer.lora_B.shape == (C_OUT, 3, 1, 1)
    assert torch.equal(layer.lora_A.flatten(1), plain.lora_A), "A is drawn as kaiming_lora_A draws it"
    x = _images()
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # B = 0 at init
    _randomise_B(layer)
    A, B, s = layer.lora_A.flatten(1), layer.lora_B.flatten(1), layer.scaling
    weight = layer.base_layer.weight.flatten(1)
    torch.testing.assert_close(layer(x), _patch_linear(x, weight + s * B @ A, layer.base_layer.bias))
    torch.testing.assert_close(layer.delta_weight(), s * B @ A)
    assert layer.trainable_param_count == 3 * (C_OUT + D_IN)
    assert "in_channels=3, out_channels=48, kernel_size=(2, 2), in_features=12, out_features=48, rank=3" in repr(layer)


def test_merge_and_unmerge_round_trip():
    layer = _randomise_B(LoRAPatchConv2d(_conv(), rank=4, alpha=8.0))
    x, weight = _images(), layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight - weight, layer.delta_weight().view_as(weight))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged)


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        (nn.Conv2d(3, 8, 3, stride=1, padding=1), r"patchify Conv2d .*; this one has stride=\(1, 1\) != "
                                                  r"kernel_size=\(3, 3\), padding=\(1, 1\)"),
        (nn.Conv2d(3, 8, 2, stride=2, padding=1), r"this one has padding=\(1, 1\)$"),
        (nn.Conv2d(3, 8, 2, stride=2, dilation=2), r"this one has dilation=\(2, 2\)$"),
        (nn.Conv2d(4, 8, 2, stride=2, groups=2), "this one has groups=2$"),
        (nn.Linear(4, 8), "base_layer must be an nn.Conv2d, got Linear"),
    ],
)
def test_only_a_patchify_conv_is_wrapped(conv, message):
    with pytest.raises(ValueError, match=message):
        LoRAPatchConv2d(conv, rank=1)


def test_rank_must_fit_the_patch_matrix():
    with pytest.raises(ValueError, match=r"\[1, 12\] for a Conv2d of patch-matrix shape \(48, 12\), got 13"):
        LoRAPatchConv2d(_conv(), rank=13)
    with pytest.raises(ValueError, match=r"rank 13 for 'proj' \(Conv2d of patch-matrix shape \(48, 12\)\)"):
        add_adapters(nn.ModuleDict({"proj": _conv()}), targets=("proj",), ranks=13)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_rank_k_lora_undoes_a_planted_rank_k_patch_transform_and_rank_k_minus_1_cannot(k):
    """Patches p of x_planted are T p, T = I + U V^T: conv(x_planted) + s B A = conv(x_clean) needs
    dW = W (T^-1 - I), of rank k; the best rank-(k-1) dW leaves ||(W + dW) T - W||_F = Eckart-Young's
    tail of W (I - T) (substitute dW' = dW T), which the planted images must show too."""
    generator = torch.Generator().manual_seed(k)
    conv = _conv(dtype=torch.float64)
    weight, eye = conv.weight.detach().flatten(1), torch.eye(D_IN, dtype=torch.float64)
    U, V = (torch.randn(D_IN, k, generator=generator, dtype=torch.float64) / D_IN**0.5 for _ in range(2))
    T = eye + U @ V.T
    x_clean = _images(torch.float64)
    x_planted = _fold(T @ F.unfold(x_clean, PATCH, stride=PATCH), x_clean.shape[-2:])
    clean, planted = conv(x_clean), conv(x_planted)
    layer = LoRAPatchConv2d(conv, rank=k, alpha=3.0)

    factors_U, S, Vh = torch.linalg.svd(weight @ (torch.linalg.inv(T) - eye))
    assert S[k - 1] > 1e-3 * S[0] and (k == D_IN or S[k] < 1e-12 * S[0]), "dW has rank exactly k"
    _set_product(layer, factors_U[:, :k] * S[:k], Vh[:k])
    torch.testing.assert_close(layer(x_planted), clean, rtol=1e-12, atol=1e-12)

    tail_U, tail_S, tail_Vh = torch.linalg.svd(weight @ (eye - T))
    relative = tail_S[k - 1:].norm() / tail_S.norm()
    assert relative > 1e-3, "no rank-(k-1) correction comes close"
    B, A = tail_U[:, :k - 1] * tail_S[:k - 1], tail_Vh[:k - 1] @ torch.linalg.inv(T)  # dW T = the truncation
    torch.testing.assert_close(torch.linalg.matrix_norm((weight + B @ A) @ T - weight), tail_S[k - 1:].norm())
    _set_product(layer, B, A)
    left = (layer(x_planted) - clean).norm() / (planted - clean).norm()
    assert left > 1e-3, "the best rank-(k-1) correction leaves the planted images visibly off"


def _patchify_model(seed: int = 0) -> nn.Module:
    """A patchify `embedder.proj`, as orca_lora.models.embedder builds it, and a Linear `head`."""

    class PatchifyModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedder = nn.ModuleDict({"proj": nn.Conv2d(C_IN, C_OUT, PATCH, stride=PATCH)})
            self.head = nn.Linear(C_OUT, 5)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.embedder["proj"](x).flatten(2).mean(-1))

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PatchifyModel().eval()


def _adapt(model: nn.Module) -> dict[str, nn.Module]:
    adapters = add_adapters(model, targets=(r"^embedder\.proj$", r"^head$"), ranks=RANKS, alpha=4.0)
    for seed, module in enumerate(adapters.values()):
        _randomise_B(module, seed)
    return adapters


def test_lora_puts_the_conv_layer_on_a_patchify_conv():
    model = _patchify_model()
    assert list(match_targets(model, ("proj", "head"))) == ["embedder.proj", "head"]
    adapters = _adapt(model)
    assert {name: type(m) for name, m in adapters.items()} == {"embedder.proj": LoRAPatchConv2d, "head": LoRALinear}
    mark_only_adapters_trainable(model)
    assert count_trainable(model) == 3 * (C_OUT + D_IN) + 2 * (5 + C_OUT)


@pytest.mark.parametrize("method", ["dora", "dylora", "delta-lora", "qlora"])
def test_other_methods_refuse_a_conv_before_touching_the_model(method):
    model = _patchify_model()
    with pytest.raises(ValueError, match=f"method {method} adapts nn.Linear modules only; embedder.proj is a "
                                         "Conv2d: use method lora or target Linear modules"):
        add_adapters(model, targets=("proj", "head"), ranks=2, method=method)
    assert adapter_modules(model) == {}


def test_a_non_patchify_conv_target_names_its_settings():
    model = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3, padding=1)})
    with pytest.raises(ValueError, match=r"'conv', a Conv2d with stride=\(1, 1\) != kernel_size=\(3, 3\), "
                                         r"padding=\(1, 1\); only nn.Linear modules or a patchify Conv2d"):
        match_targets(model, ("conv",))


def test_peft_loads_what_we_save_and_so_do_we(tmp_path):
    model, base_copy, x = _patchify_model(), _patchify_model(), _images()
    _adapt(model)
    directory = save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["embedder.proj", "head"]
    stored = load_file(directory / WEIGHTS_NAME)
    assert stored["base_model.model.embedder.proj.lora_A.weight"].shape == (3, C_IN, PATCH, PATCH)
    assert stored["base_model.model.embedder.proj.lora_B.weight"].shape == (C_OUT, 3, 1, 1)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base_copy), directory).eval()
    torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-6)
    ours = _patchify_model()
    loaded = load_peft_adapter(ours, directory)
    assert {n: (type(m), m.rank) for n, m in loaded.items()} == {
        n: (type(m), m.rank) for n, m in adapter_modules(model).items()}
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), model.state_dict().values()))
    torch.testing.assert_close(ours(x), model(x), rtol=0, atol=0)
