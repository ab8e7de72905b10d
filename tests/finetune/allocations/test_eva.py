import pytest
import torch
from torch import nn

from orca_lora.adapters.lora import LoRALinear
from orca_lora.config import Stage3Config
from orca_lora.finetune.allocations import plan_allocation
from orca_lora.finetune.allocations.eva import EvaLoRA, budget_ranks, explained_variance_ratios
from orca_lora.finetune.stage import prepare_model
from orca_lora.rank.select import ModuleShape, trainable_params


def test_explained_variance_ratio_is_the_variance_share_along_each_component():
    covariance = torch.diag(torch.tensor([3.0, 1.0]))
    components = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert explained_variance_ratios(covariance, components) == pytest.approx([0.75, 0.25, 0.5])


def test_budget_ranks_take_components_by_ratio_within_one_component_of_the_budget():
    shapes = {"a": ModuleShape(0, 4, 4), "b": ModuleShape(0, 8, 8), "c": ModuleShape(1, 4, 4)}  # units 8, 16, 8
    ratios = {"a": [0.5, 0.1], "b": [0.4, 0.3, 0.05], "c": [0.01]}
    # by ratio: a1 (8), b1 (16), b2 (16) = 40; a2 (8) does not fit 45 - 40; c1 (8) neither
    assert budget_ranks(ratios, shapes, 45, dict.fromkeys(shapes, 4)) == {"a": 1, "b": 2, "c": 0}
    # a module's second component waits for its first, even at a higher ratio
    assert budget_ranks({"a": [0.1, 0.9]}, {"a": shapes["a"]}, 8, {"a": 4}) == {"a": 1}
    assert budget_ranks(ratios, shapes, 100, {"a": 1, "b": 1, "c": 1}) == {"a": 1, "b": 1, "c": 1}


def test_eva_runs_peft_meets_the_budget_and_copies_its_lora_A(setup_for):
    setup = setup_for("eva", Stage3Config(method="lora", rank=2, batch_size=12, allocation_batches=2))
    plan = plan_allocation(setup)
    widest = max(shape.d_out + shape.d_in for shape in setup.shapes.values())
    assert setup.request.budget - widest < trainable_params(plan.ranks, setup.shapes) <= setup.request.budget
    assert isinstance(plan.method, EvaLoRA)
    prepare_model(setup.model, setup.stage, plan.ranks, method=plan.method)
    for name, rank in plan.ranks.items():
        layer = setup.model.get_submodule(name)
        if rank == 0:
            assert type(layer) is nn.Linear
            continue
        assert type(layer) is LoRALinear and layer.rank == rank and not layer.lora_B.any()
        components = plan.method.components[name][:rank]
        torch.testing.assert_close(layer.lora_A.detach(), components)
        # EVA's components are orthonormal right-singular vectors of the module's inputs
        torch.testing.assert_close(components @ components.t(), torch.eye(rank), atol=1e-4, rtol=0)


def test_a_module_of_rank_zero_carries_no_adapter(setup_for):
    setup = setup_for("eva", Stage3Config(method="lora", rank=2))
    names = list(setup.shapes)
    ranks = {name: 1 for name in names} | {names[0]: 0}
    components = {name: torch.eye(setup.shapes[name].d_in)[:1] for name in names}
    prepare_model(setup.model, setup.stage, ranks, method=EvaLoRA(components))
    assert type(setup.model.get_submodule(names[0])) is nn.Linear
    assert not any(p.requires_grad for p in setup.model.get_submodule(names[0]).parameters())
    assert all(type(setup.model.get_submodule(name)) is LoRALinear for name in names[1:])
    setup.model(torch.rand(2, 3, 16, 16)).sum().backward()
