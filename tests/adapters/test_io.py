import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from orca_lora.adapters.inject import add_adapters, adapter_modules, merge_adapters
from orca_lora.adapters.io import CONFIG_NAME, DELTA_BASE_NAME, WEIGHTS_NAME, load_peft_adapter, save_peft_adapter

RANKS = {"layers.0.blocks.0.attn.qkv": 2, "layers.1.blocks.1.mlp.fc1": 5, "layers.1.blocks.0.attn.proj": 3}


def _adapt(model, method="lora", use_rslora=False, **options):
    adapters = add_adapters(model, ranks=RANKS, default_rank=4, method=method, alpha=8.0, use_rslora=use_rslora,
                            **options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in adapters.values():
            module.lora_B.copy_(0.2 * torch.randn(module.lora_B.shape, generator=generator))
            if method == "dora":
                magnitude = module.lora_magnitude_vector
                magnitude.mul_(1 + 0.3 * torch.rand(magnitude.shape, generator=generator))
    adapters["layers.0.blocks.1.mlp.fc2"].alpha = 3.0
    return adapters


@pytest.mark.parametrize(("method", "use_rslora"), [("lora", False), ("lora", True), ("dora", False)])
def test_peft_loads_what_we_save(swin, images, tmp_path, method, use_rslora):
    base_copy = copy.deepcopy(swin)
    _adapt(swin, method, use_rslora)
    save_peft_adapter(swin, tmp_path / "adapter", base_model_name="tiny-swin")
    theirs = peft.PeftModel.from_pretrained(base_copy, tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(images), swin(images), rtol=0, atol=1e-5)


def test_config_uses_the_common_rank_and_patterns(swin, tmp_path):
    _adapt(swin, "dora")
    save_peft_adapter(swin, tmp_path / "adapter", base_model_name="tiny-swin")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] and config["base_model_name_or_path"] == "tiny-swin"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["rank_pattern"] == {name.replace(".", "\\."): rank for name, rank in RANKS.items()}
    assert config["alpha_pattern"] == {r"layers\.0\.blocks\.1\.mlp\.fc2": 3.0}
    assert config["target_modules"] == list(adapter_modules(swin))
    keys = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert keys["base_model.model.layers.1.blocks.1.mlp.fc1.lora_A.weight"].shape == (5, 64)
    assert keys["base_model.model.layers.1.blocks.1.mlp.fc1.lora_magnitude_vector"].shape == (256,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("method", ["lora", "dora", "delta-lora"])
def test_own_round_trip(make_swin, images, tmp_path, method):
    source = make_swin(0)
    _adapt(source, method)
    if method == "delta-lora":
        with torch.no_grad():
            adapter_modules(source)["layers.0.blocks.0.attn.qkv"].base_layer.weight.add_(0.1)
    save_peft_adapter(source, tmp_path / "adapter")
    assert (tmp_path / "adapter" / DELTA_BASE_NAME).is_file() == (method == "delta-lora")
    target = make_swin(0)
    loaded = load_peft_adapter(target, tmp_path / "adapter")
    assert {n: type(m) for n, m in loaded.items()} == {n: type(m) for n, m in adapter_modules(source).items()}
    assert loaded["layers.0.blocks.1.mlp.fc2"].alpha == 3.0 and loaded["layers.1.blocks.1.mlp.fc1"].rank == 5
    torch.testing.assert_close(target(images), source(images))


def test_dylora_saves_at_its_eval_rank(swin, images, tmp_path):
    base_copy = copy.deepcopy(swin)
    adapters = _adapt(swin, "dylora")
    for module in adapters.values():
        module.eval_rank = 2
    save_peft_adapter(swin, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["r"] == 2 and config["rank_pattern"] == {} and config["lora_alpha"] == 8.0
    theirs = peft.PeftModel.from_pretrained(base_copy, tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(images), swin(images), rtol=0, atol=1e-5)


def test_saving_again_replaces_the_adapter_directory(make_swin, images, tmp_path):
    first, second = make_swin(0), make_swin(0)
    _adapt(first)
    _adapt(second)
    with torch.no_grad():
        adapter_modules(second)["layers.0.blocks.0.attn.qkv"].lora_B.mul_(3)
    save_peft_adapter(first, tmp_path / "adapter")
    save_peft_adapter(second, tmp_path / "adapter")
    target = make_swin(0)
    load_peft_adapter(target, tmp_path / "adapter")
    torch.testing.assert_close(target(images), second(images))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_errors(make_swin, tmp_path):
    with pytest.raises(ValueError, match="no adapter layers; call add_adapters"):
        save_peft_adapter(make_swin(0), tmp_path / "adapter")
    mixed = make_swin(0)
    add_adapters(mixed, targets=(r"\.attn\.qkv$",), ranks=2, method="dora")
    add_adapters(mixed, targets=(r"\.mlp\.fc1$",), ranks=2)
    with pytest.raises(ValueError, match=r"one method for all modules; this model mixes \['dora', 'lora'\]"):
        save_peft_adapter(mixed, tmp_path / "adapter")
    merged = make_swin(0)
    add_adapters(merged, ranks=2)
    merge_adapters(merged)
    with pytest.raises(RuntimeError, match="merged into W0; call unmerge_adapters"):
        save_peft_adapter(merged, tmp_path / "adapter")
    occupied = tmp_path / "run"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    model = make_swin(0)
    add_adapters(model, ranks=2)
    with pytest.raises(FileExistsError, match="holds no adapter; choose a new or empty directory"):
        save_peft_adapter(model, occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_load_errors_leave_the_model_untouched(make_swin, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_peft_adapter(make_swin(0), tmp_path)
    source = make_swin(0)
    _adapt(source)
    directory = save_peft_adapter(source, tmp_path / "adapter")
    weights = load_file(directory / WEIGHTS_NAME)
    weights["base_model.model.layers.0.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(3, 32)
    save_file(weights, directory / WEIGHTS_NAME)
    target = make_swin(0)
    with pytest.raises(ValueError, match=r"qkv.lora_A': stored shape \(3, 32\), the config and model need \(2, 32\)"):
        load_peft_adapter(target, directory)
    del weights["base_model.model.layers.0.blocks.0.attn.qkv.lora_A.weight"]
    save_file(weights, directory / WEIGHTS_NAME)
    with pytest.raises(KeyError, match=r"missing keys \['layers.0.blocks.0.attn.qkv.lora_A'\]"):
        load_peft_adapter(target, directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    (directory / CONFIG_NAME).write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(ValueError, match="bias='all' is not supported; use 'none'"):
        load_peft_adapter(target, directory)
    (directory / CONFIG_NAME).write_text(json.dumps({**config, "target_modules": ["patch_embed.norm"]}))
    with pytest.raises(ValueError, match=r"neither nn.Linear nor a patchify Conv2d .*: \['patch_embed.norm'\]"):
        load_peft_adapter(target, directory)
    assert adapter_modules(target) == {}


def test_we_load_what_peft_saves(make_swin, images, tmp_path):
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=r".*\.attn\.(qkv|proj)", rank_pattern={"proj": 2})
    theirs = peft.get_peft_model(make_swin(0), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    theirs.save_pretrained(tmp_path / "peft")
    ours = make_swin(0)
    loaded = load_peft_adapter(ours, tmp_path / "peft")
    assert {m.rank for n, m in loaded.items() if n.endswith("proj")} == {2} and len(loaded) == 8
    torch.testing.assert_close(ours(images), theirs.eval()(images), rtol=0, atol=1e-5)
