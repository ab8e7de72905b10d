import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from orca_lora.adapters.delta import DeltaLoRALinear
from orca_lora.adapters.dora import DoRALinear
from orca_lora.adapters.dylora import DyLoRALinear
from orca_lora.adapters.lora import LoRALinear
from orca_lora.config import DEFAULT_TARGETS, Stage3Config, TaskConfig, TrainerConfig
from orca_lora.data.tasks import build_task
from orca_lora.finetune import stage as finetune_stage
from orca_lora.models.body import build_body
from orca_lora.models.model import build_orca_model
from orca_lora.rank.stage import uniform_ranks
from orca_lora.run_files import RunFiles

TINY_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
               "num_heads": (2, 4)}


def make_model(num_classes: int = 3) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        body = build_body("swin_tiny_patch4_window7_224", model_kwargs=TINY_KWARGS).eval().requires_grad_(False)
    return build_orca_model(body, 3, "classification", num_classes, None, seed=0)


def ranks_for(model: nn.Module) -> dict[str, int]:
    """Block-dependent ranks, so a wrong module-to-rank wiring shows."""
    ranks = uniform_ranks(model.body, DEFAULT_TARGETS, 1)
    return {name: 1 + index % 3 for index, name in enumerate(ranks)}


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_prepare_model_lora_trains_adapters_embedder_and_head():
    model = make_model()
    ranks = ranks_for(model)
    finetune_stage.prepare_model(model, Stage3Config(method="lora", alpha=4.0, rslora=True, dropout=0.1), ranks)
    expected = {f"{name}.{p}" for name in ranks for p in ("lora_A", "lora_B")}
    expected |= {f"embedder.{n}" for n, _ in model.embedder.named_parameters()}
    expected |= {f"head.{n}" for n, _ in model.head.named_parameters()}
    assert trainable_names(model) == expected and model.training
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        assert type(layer) is LoRALinear and layer.rank == rank
        assert layer.alpha == 4.0 and layer.use_rslora and layer.lora_dropout.p == 0.1


def test_prepare_model_full_trains_everything_but_the_unused_patch_embedding():
    model = make_model()
    finetune_stage.prepare_model(model, Stage3Config(method="full"), ranks_for(model))
    everything = {name for name, _ in model.named_parameters()}
    assert trainable_names(model) == {n for n in everything if not n.startswith("body.patch_embed.")}
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_prepare_model_linear_trains_only_the_head():
    model = make_model()
    finetune_stage.prepare_model(model, Stage3Config(method="linear"), ranks_for(model))
    assert trainable_names(model) == {"head.fc.weight", "head.fc.bias"}
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("method, layer_class, extra", [
    ("dylora", DyLoRALinear, set()),
    ("dora", DoRALinear, {"lora_magnitude_vector"}),
    ("delta-lora", DeltaLoRALinear, set()),
    ("lora-plus", LoRALinear, set()),
])
def test_prepare_model_builds_each_method(method, layer_class, extra):
    model = make_model()
    ranks = ranks_for(model)
    stage = Stage3Config(method=method, dylora_min_rank=1, dylora_frozen=True)
    finetune_stage.prepare_model(model, stage, ranks)
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        assert type(layer) is layer_class and layer.rank == rank
        if method == "dylora":
            assert layer.min_rank == 1 and layer.frozen
    adapter_params = {f"{name}.{p}" for name in ranks for p in {"lora_A", "lora_B"} | extra}
    assert adapter_params <= trainable_names(model)
    assert not any(n.startswith("body.") and n not in adapter_params for n in trainable_names(model))


def test_steps_per_epoch_follows_lightning_limits():
    assert finetune_stage._steps_per_epoch(10, 1.0) == 10
    assert finetune_stage._steps_per_epoch(10, 0.25) == 2
    assert finetune_stage._steps_per_epoch(10, 0.01) == 1
    assert finetune_stage._steps_per_epoch(10, 3) == 3
    assert finetune_stage._steps_per_epoch(10, 50) == 10
    assert finetune_stage._steps_per_epoch(10, 1) == 1, "an int limit is a batch count, even 1"


@pytest.fixture(scope="module")
def procedural_task():
    return build_task(TaskConfig(name="procedural", n_train=40, n_test=16, n_classes=3, val_fraction=0.2),
                      "unused")


def test_run_trains_tests_and_writes_its_files(tmp_path, procedural_task):
    task = procedural_task
    model = make_model()
    body_weights = {k: v.clone() for k, v in model.body.state_dict().items()}
    ranks = ranks_for(model)
    stage = Stage3Config(method="lora", rank=2, batch_size=8, lr=1e-2, save_merged=True)
    trainer = TrainerConfig(max_epochs=1, limit_train_batches=2, enable_progress_bar=False, log_every_n_steps=1)
    result = finetune_stage.run(stage, trainer, model, ranks, task, seed=0, run_files=RunFiles(tmp_path))
    written = RunFiles(tmp_path).stage("stage3")

    assert math.isfinite(result.test_error) and 0.0 <= result.test_error <= 1.0
    assert math.isfinite(result.best_val_error) and result.device == "cpu"
    last = torch.load(written / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == finetune_stage._steps_per_epoch(4, 2) == 2
    assert (written / "checkpoints" / "best.ckpt").is_file() and result.best_checkpoint.endswith("best.ckpt")
    assert (written / "logs" / "version_0" / "metrics.csv").is_file()

    trained = load_file(str(written / "trainable.safetensors"))
    assert not [k for k in trained if k.startswith("model.body.") and "lora_" not in k]
    assert {k for k in trained if "lora_" in k} == {f"model.{n}.{p}" for n in ranks for p in ("lora_A", "lora_B")}
    assert sum(t.numel() for t in trained.values()) == result.trainable_params
    assert result.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any(t.abs().sum() > 0 for k, t in trained.items() if k.endswith("lora_B")), "adapters trained"

    config = json.loads((written / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (written / "adapter" / "adapter_model.safetensors").is_file()

    name = "body.layers.1.blocks.0.attn.qkv"
    merged = load_file(str(written / "merged.safetensors"))
    lora_A, lora_B = trained[f"model.{name}.lora_A"], trained[f"model.{name}.lora_B"]
    scaling = stage.alpha / lora_A.shape[0]
    torch.testing.assert_close(merged[f"{name}.base_layer.weight"],
                               body_weights[name.removeprefix("body.") + ".weight"] + scaling * lora_B @ lora_A)

    model.eval()
    images, labels = map(torch.stack, zip(*(task.test[i] for i in range(len(task.test)))))
    with torch.no_grad():
        logits = model(images)
    assert result.test_error == pytest.approx(float((logits.argmax(1) != labels).float().mean()), abs=1e-6)


class _Stop(Exception):
    pass


def test_the_run_seed_draws_the_adapter_initialisation(tmp_path, procedural_task, monkeypatch):
    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(finetune_stage, "FinetuneModule", stop)
    initial = []
    for seed in (1, 2):
        model = make_model()
        ranks = ranks_for(model)
        with pytest.raises(_Stop):
            finetune_stage.run(Stage3Config(method="lora"), TrainerConfig(), model, ranks, procedural_task, seed,
                               RunFiles(tmp_path / str(seed)))
        initial.append(model.get_submodule("body.layers.0.blocks.0.attn.qkv").lora_A.detach().clone())
    assert not torch.equal(*initial)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_frozen_embedder_stays_as_stage_1_left_it(method):
    trained, frozen = make_model(), make_model()
    finetune_stage.prepare_model(trained, Stage3Config(method=method), ranks_for(trained))
    finetune_stage.prepare_model(frozen, Stage3Config(method=method, train_embedder=False), ranks_for(frozen))
    embedder = {f"embedder.{n}" for n, _ in frozen.embedder.named_parameters()}
    assert embedder <= trainable_names(trained)
    assert trainable_names(frozen) == trainable_names(trained) - embedder


def test_a_frozen_embedder_still_trains_the_lora_on_its_projection():
    model = make_model()
    ranks = {**ranks_for(model), "embedder.proj": 2}
    targets = [*DEFAULT_TARGETS, r"^embedder\.proj$"]
    finetune_stage.prepare_model(model, Stage3Config(method="lora", targets=targets, train_embedder=False), ranks)
    embedder = {name for name in trainable_names(model) if name.startswith("embedder.")}
    assert embedder == {"embedder.proj.lora_A", "embedder.proj.lora_B"}
    assert model.embedder.proj.lora_A.shape == (2, 3, 2, 2)


def test_the_body_keeps_stochastic_depth_unless_told_otherwise():
    default, off = make_model(), make_model()
    finetune_stage.prepare_model(default, Stage3Config(method="lora"), ranks_for(default))
    finetune_stage.prepare_model(off, Stage3Config(method="lora", body_stochastic_depth=False), ranks_for(off))
    assert default.body.training and default.head.training
    assert not any(module.training for module in off.body.modules())
    assert off.embedder.training and off.head.training
