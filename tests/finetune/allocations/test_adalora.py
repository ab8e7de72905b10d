import csv
import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from orca_lora.adapters.lora import LoRALinear
from orca_lora.config import Stage3Config, TrainerConfig
from orca_lora.finetune import stage as finetune_stage
from orca_lora.finetune.allocations import plan_allocation
from orca_lora.finetune.allocations.adalora import adalora_ranks, as_lora, orthogonality_penalty, schedule_steps
from orca_lora.finetune.module import FinetuneModule
from orca_lora.finetune.stage import prepare_model
from orca_lora.rank.select import ModuleShape
from orca_lora.run_files import RunFiles, read_training_ranks


class LossModel(nn.Module):
    """Returns a transformers-style output with a zero `.loss`, the one case PEFT adds its penalty to."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return SimpleNamespace(loss=self.fc(x).sum() * 0.0)


def test_the_penalty_is_the_one_peft_adds_inside_its_own_forward_and_its_gradient_flows():
    torch.manual_seed(0)
    peft_model = get_peft_model(LossModel(), AdaLoraConfig(target_modules=["fc"], init_r=4, target_r=2,
                                                           total_step=10, orth_reg_weight=0.5))
    ours = orthogonality_penalty(peft_model.base_model.model)
    x = torch.rand(2, 6)
    assert peft_model(x).loss == 0, "a plain PeftModel skips the penalty (PEFT issue #432)"
    torch.testing.assert_close(peft_model.base_model(x).loss, 0.5 * ours)  # AdaLoraModel.forward adds it
    assert ours > 0
    ours.backward()
    layer = peft_model.base_model.model.fc
    assert layer.lora_A["default"].grad.abs().sum() > 0 and layer.lora_B["default"].grad.abs().sum() > 0


def test_target_r_meets_the_uniform_budget_and_init_r_is_larger():
    shapes = {"a": ModuleShape(0, 16, 48), "b": ModuleShape(0, 16, 16)}
    assert adalora_ranks(shapes, 4 * (64 + 32), 1.5) == (4, 6)
    assert adalora_ranks(shapes, 12 * 96, 1.5) == (12, 16), "init_r capped at the narrowest module's rank"
    with pytest.raises(ValueError, match="stage3.adalora_init_ratio"):
        adalora_ranks(shapes, 16 * 96, 1.5)
    assert schedule_steps(Stage3Config(adalora_tinit=0.1, adalora_tfinal=0.2), 100) == (10, 20)
    assert schedule_steps(Stage3Config(), 3) == (0, 1), "tfinal >= 1: the final pattern is set within training"
    with pytest.raises(ValueError, match="trainer.max_epochs"):
        schedule_steps(Stage3Config(), 1)


def test_the_penalty_is_in_our_training_loss(setup_for):
    setup = setup_for("adalora", Stage3Config(method="lora", rank=2))
    plan = plan_allocation(setup)
    prepare_model(setup.model, setup.stage, plan.ranks, method=plan.method)
    module = FinetuneModule(setup.model, setup.task, setup.stage, 3, 3, 0, plan.method).eval()  # one forward
    inputs, targets = setup.task.train.tensors[0][:4], setup.task.train.tensors[1][:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        objective = module.training_step((inputs, targets), 0)
    task_loss = setup.task.loss(module(inputs), targets).mean()
    penalty = setup.stage.adalora_orth_reg_weight * orthogonality_penalty(setup.model)
    torch.testing.assert_close(objective, task_loss + penalty)
    assert penalty > 0


def test_as_lora_equals_the_masked_adalora_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    get_peft_model(model, AdaLoraConfig(target_modules=["0"], init_r=4, target_r=2, total_step=10, lora_alpha=8))
    layer = model[0]
    with torch.no_grad():
        layer.lora_E["default"].copy_(torch.tensor([[0.5], [0.0], [-1.0], [0.0]]))
    stage = Stage3Config(alpha=8.0)
    pruned = as_lora(layer, stage)
    x = torch.rand(3, 6)
    assert type(pruned) is LoRALinear and pruned.rank == 2
    torch.testing.assert_close(pruned(x), layer(x))
    with torch.no_grad():
        layer.lora_E["default"].zero_()
    assert type(as_lora(layer, stage)) is nn.Linear, "no triplet kept: no adapter"


def test_our_loop_allocates_and_tests_the_final_ranks(tmp_path, setup_for, monkeypatch):
    calls = []
    allocate = AdaLoraModel.update_and_allocate
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", lambda self, step: calls.append(step) or allocate(self, step))
    setup = setup_for("adalora", Stage3Config(method="lora", rank=2, batch_size=8, lr=1e-2))
    trainer = TrainerConfig(max_epochs=1, enable_progress_bar=False, log_every_n_steps=1, limit_val_batches=1)
    result = finetune_stage.run(setup.stage, trainer, setup.model, dict.fromkeys(setup.shapes, 2), setup.task, 0,
                                RunFiles(tmp_path), allocation=setup.request)
    assert calls == [0, 1, 2], "one allocation per optimizer step, the last fixing the final pattern"
    ranks = read_training_ranks(RunFiles(tmp_path)).ranks
    n = len(setup.shapes)
    assert sum(ranks.values()) == 2 * n, "PEFT's final budget: target_r triplets per module"
    assert max(ranks.values()) <= 3 and result.trained_params > result.trainable_params
    for name, rank in ranks.items():
        layer = setup.model.get_submodule(name)
        assert (type(layer) is nn.Linear) if rank == 0 else (type(layer) is LoRALinear and layer.rank == rank)
    with open(RunFiles(tmp_path).training_log) as stream:
        penalties = [float(row["train_penalty"]) for row in csv.DictReader(stream) if row.get("train_penalty")]
    assert penalties and all(value > 0 for value in penalties)
