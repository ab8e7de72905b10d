import pytest
import torch
from torch import nn

from orca_lora.adapters.dora import DoRALinear
from orca_lora.adapters.dylora import DyLoRALinear
from orca_lora.adapters.inject import (
    DEFAULT_TARGETS,
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
from orca_lora.adapters.lora import LoRALinear

# (d_out, d_in) of the adapted Linears in one block of each stage of the tiny Swin (embed_dim 32, mlp_ratio 4).
STAGE_SHAPES = {
    0: {"attn.qkv": (96, 32), "attn.proj": (32, 32), "mlp.fc1": (128, 32), "mlp.fc2": (32, 128)},
    1: {"attn.qkv": (192, 64), "attn.proj": (64, 64), "mlp.fc1": (256, 64), "mlp.fc2": (64, 256)},
}
BLOCKS = [(stage, block) for stage in (0, 1) for block in (0, 1)]


def _per_block_ranks() -> dict[str, int]:
    return {
        f"layers.{stage}.blocks.{block}.{leaf}": i + 1
        for i, (stage, block) in enumerate(BLOCKS)
        for leaf in STAGE_SHAPES[stage]
    }


def _randomise_B(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in adapter_modules(model).values():
            module.lora_B.copy_(0.1 * torch.randn(module.lora_B.shape, generator=generator))


def test_default_targets_select_the_block_linears_only(swin):
    names = list(match_targets(swin, DEFAULT_TARGETS))
    assert names == list(_per_block_ranks())
    assert not any(name.startswith(("patch_embed", "head")) or "downsample" in name for name in names)


def test_count_trainable_with_per_block_ranks_equals_hand_count(swin):
    adapters = add_adapters(swin, ranks=_per_block_ranks())
    mark_only_adapters_trainable(swin)
    hand_count = sum(
        (i + 1) * (d_out + d_in)
        for i, (stage, _) in enumerate(BLOCKS)
        for d_out, d_in in STAGE_SHAPES[stage].values()
    )
    assert hand_count == 512 * (1 + 2) + 1024 * (3 + 4)  # sum of d_out + d_in per stage, times the block ranks
    assert count_trainable(swin) == hand_count == sum(m.trainable_param_count for m in adapters.values())
    assert {name: m.rank for name, m in adapters.items()} == _per_block_ranks()


def test_dora_count_adds_the_magnitudes(swin):
    add_adapters(swin, ranks=2, method="dora")
    mark_only_adapters_trainable(swin)
    expected = sum(
        2 * (d_out + d_in) + d_out for stage, _ in BLOCKS for d_out, d_in in STAGE_SHAPES[stage].values()
    )
    assert count_trainable(swin) == expected


def test_adapters_leave_the_output_unchanged_until_trained_and_merge_exactly(swin, images):
    before = swin(images)
    adapters = add_adapters(swin, ranks=_per_block_ranks())
    assert all(isinstance(swin.get_submodule(name), LoRALinear) for name in adapters)
    torch.testing.assert_close(swin(images), before, rtol=0, atol=1e-6)
    _randomise_B(swin)
    adapted = swin(images)
    assert not torch.allclose(adapted, before, atol=1e-3)
    merge_adapters(swin)
    torch.testing.assert_close(swin(images), adapted, rtol=0, atol=1e-5)
    unmerge_adapters(swin)
    torch.testing.assert_close(swin(images), adapted, rtol=0, atol=1e-5)


def test_rank_map_needs_full_cover_unless_default_rank(swin):
    ranks = {"layers.0.blocks.0.attn.qkv": 4}
    with pytest.raises(KeyError, match="rank map misses matched modules .*layers.0.blocks.0.attn.proj"):
        add_adapters(swin, ranks=ranks)
    adapters = add_adapters(swin, ranks=ranks, default_rank=2)
    assert adapters["layers.0.blocks.0.attn.qkv"].rank == 4
    assert {m.rank for name, m in adapters.items() if name != "layers.0.blocks.0.attn.qkv"} == {2}


def test_method_options_reach_the_layers_and_seed_fixes_A(make_swin):
    first = add_adapters(make_swin(0), ranks=4, method="dylora", min_rank=2, frozen=True, seed=3)
    again = add_adapters(make_swin(0), ranks=4, method="dylora", min_rank=2, frozen=True, seed=3)
    other = add_adapters(make_swin(0), ranks=4, method="dylora", min_rank=2, frozen=True, seed=4)
    module = first["layers.1.blocks.1.mlp.fc2"]
    assert isinstance(module, DyLoRALinear) and module.min_rank == 2 and module.frozen
    assert all(torch.equal(first[n].lora_A, again[n].lora_A) for n in first)
    assert not torch.equal(module.lora_A, other["layers.1.blocks.1.mlp.fc2"].lora_A)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"targets": (r"\.attn\.qkv$", r"\.nothing$")}, ValueError, r"targets \['\\\\.nothing\$'\] match no module"),
        ({"targets": ("patch_embed",)}, ValueError, "selects 'patch_embed', a PatchEmbed; only nn.Linear"),
        ({"targets": (r"patch_embed\.proj",), "method": "dora"}, ValueError,
         "method dora adapts nn.Linear modules only; patch_embed.proj is a Conv2d: use method lora"),
        ({"ranks": {"layers.0.blocks.0.attn.qkv": 2, "layers.9.qkv": 2}, "default_rank": 2}, KeyError,
         r"do not select: \['layers.9.qkv'\]"),
        ({"ranks": 0}, ValueError, r"rank 0 for 'layers.0.blocks.0.attn.qkv' .* must be in \[1, 32\]"),
        ({"ranks": {"layers.1.blocks.0.attn.proj": 65}, "default_rank": 2}, ValueError,
         r"rank 65 for 'layers.1.blocks.0.attn.proj' \(Linear of shape \(64, 64\)\) is out of range; .*\[1, 64\]"),
        ({"method": "vera"}, KeyError, "unknown method 'vera'; choose one of"),
        ({"method": "houlsby"}, ValueError, "method 'houlsby' puts no adapter layer on a Linear"),
        ({"method": "delta-lora", "dropout": 0.1}, ValueError, "no adapter dropout"),
        ({"method": "lora", "min_rank": 2}, TypeError, "min_rank"),
    ],
)
def test_errors_leave_the_model_untouched(swin, kwargs, error, message):
    with pytest.raises(error, match=message):
        add_adapters(swin, **kwargs)
    assert adapter_modules(swin) == {}


def test_adding_twice_raises(swin):
    add_adapters(swin, ranks=2)
    with pytest.raises(ValueError, match="selects 'layers.0.blocks.0.attn.qkv', which already has an adapter"):
        add_adapters(swin, ranks=2)


def test_adapter_state_dict_round_trip(make_swin, images):
    source = make_swin(0)
    add_adapters(source, ranks=_per_block_ranks(), method="dora")
    _randomise_B(source)
    state = adapter_state_dict(source)
    assert len(state) == 16 * 3
    assert {key.rsplit(".", 1)[1] for key in state} == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert set(state) <= set(source.state_dict())
    target = make_swin(0)
    add_adapters(target, ranks=_per_block_ranks(), method="dora", seed=9)
    load_adapter_state_dict(target, state)
    torch.testing.assert_close(target(images), source(images))
    assert isinstance(target.layers[1].blocks[0].mlp.fc1, DoRALinear)


def test_adapter_state_dict_holds_delta_lora_base_weights(swin):
    add_adapters(swin, ranks=2, method="delta-lora", targets=(r"\.attn\.qkv$",))
    assert sorted(adapter_state_dict(swin))[:3] == [
        "layers.0.blocks.0.attn.qkv.base_layer.weight",
        "layers.0.blocks.0.attn.qkv.lora_A",
        "layers.0.blocks.0.attn.qkv.lora_B",
    ]


def test_load_adapter_state_dict_errors(swin):
    add_adapters(swin, ranks=2)
    state = adapter_state_dict(swin)
    extra = {**state, "head.fc.lora_A": torch.zeros(2, 64)}
    with pytest.raises(KeyError, match=r"missing keys \[\], unexpected keys \['head.fc.lora_A'\]"):
        load_adapter_state_dict(swin, extra)
    partial = {k: v for k, v in state.items() if "layers.1.blocks.1.mlp.fc2" not in k}
    with pytest.raises(KeyError, match="missing keys .*layers.1.blocks.1.mlp.fc2.lora_A"):
        load_adapter_state_dict(swin, partial)
    wrong = {**state, "layers.0.blocks.0.attn.qkv.lora_A": torch.zeros(3, 32)}
    with pytest.raises(ValueError, match=r"qkv.lora_A': the state holds shape \(3, 32\), the model \(2, 32\)"):
        load_adapter_state_dict(swin, wrong)
    merge_adapters(swin)
    with pytest.raises(RuntimeError, match="are merged; call unmerge_adapters"):
        load_adapter_state_dict(swin, state)
