import pytest
import torch
from torch import nn

from orca_lora.adapters.lora import LoRALinear
from orca_lora.config import Stage3Config
from orca_lora.finetune.allocations import plan_allocation
from orca_lora.finetune.allocations.gradient import averaged_gradients, gradient_importance
from orca_lora.finetune.stage import prepare_model
from orca_lora.rank.select import trainable_params


def test_importance_is_the_mean_of_w_times_g():
    weights = {"m": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    gradients = {"m": torch.tensor([[0.5, -1.0], [2.0, 0.0]])}
    assert gradient_importance(weights, gradients) == {"m": pytest.approx((0.5 + 2.0 + 6.0 + 0.0) / 4)}


def test_gradients_average_the_batches_and_leave_the_weight_frozen():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    model.requires_grad_(False)
    # squared error: dL/dW = 2 (W x - t) x^T per batch: (1 - 0) 2 [1, 0] and (2 - 1) 2 [0, 1], averaged [1, 1]
    batches = [(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0]])), (torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0]]))]
    gradients = averaged_gradients(model, ["0"], batches, lambda out, target: (out - target) ** 2, nn.Identity(),
                                   torch.device("cpu"))
    torch.testing.assert_close(gradients["0"], torch.tensor([[1.0, 1.0]]))
    assert not model[0].weight.requires_grad and model[0].weight.grad is None
    assert gradient_importance({"0": model[0].weight}, gradients)["0"] == pytest.approx(1.5)


def test_gradient_ranks_meet_the_budget_and_train_as_the_method(setup_for):
    setup = setup_for("gradient", Stage3Config(method="lora", rank=2, batch_size=8, allocation_batches=2))
    plan = plan_allocation(setup)
    widest = max(shape.d_out + shape.d_in for shape in setup.shapes.values())
    cost = trainable_params(plan.ranks, setup.shapes)
    assert setup.request.budget - widest < cost <= setup.request.budget
    assert len(set(plan.ranks.values())) > 1, "ranks follow the importances, not the uniform rank"
    assert not any(p.grad is not None for p in setup.model.parameters()), "no gradient carried into training"
    prepare_model(setup.model, setup.stage, plan.ranks, method=plan.method)
    for name, rank in plan.ranks.items():
        layer = setup.model.get_submodule(name)
        assert type(layer) is LoRALinear and layer.rank == rank


def test_stage_3_trains_at_the_allocation_ranks_and_writes_them_to_its_own_ranks_json(tmp_path, setup_for):
    from orca_lora.config import TrainerConfig
    from orca_lora.finetune import stage as finetune_stage
    from orca_lora.run_files import RunFiles, read_training_ranks

    setup = setup_for("gradient", Stage3Config(method="lora", rank=2, batch_size=12, allocation_batches=1))
    trainer = TrainerConfig(max_epochs=1, limit_train_batches=1, enable_progress_bar=False)
    uniform = dict.fromkeys(setup.shapes, 2)
    result = finetune_stage.run(setup.stage, trainer, setup.model, uniform, setup.task, 0, RunFiles(tmp_path),
                                allocation=setup.request)
    written = read_training_ranks(RunFiles(tmp_path))
    assert written.allocation == "gradient" and written.budget == setup.request.budget and written.gaps is None
    assert written.ranks == {name: setup.model.get_submodule(name).rank for name in setup.shapes} != uniform
    assert written.trainable_params == trainable_params(written.ranks, setup.shapes)
    assert not RunFiles(tmp_path).ranks.exists(), "stage 2's ranks.json is not stage 3's to write"
    assert result.trained_params == result.trainable_params
