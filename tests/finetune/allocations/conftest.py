"""A tiny Swin OrcaModel, a random 3-class task and the setup a stage-3 allocation reads."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from orca_lora.config import Stage3Config
from orca_lora.data.tasks import TaskData, cross_entropy, misclassification
from orca_lora.finetune.allocations import AllocationRequest, AllocationSetup
from orca_lora.models.body import build_body
from orca_lora.models.model import build_orca_model
from orca_lora.rank.select import trainable_params
from orca_lora.rank.stage import adapted_module_shapes

TINY_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
               "num_heads": (2, 4)}


def tiny_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        body = build_body("swin_tiny_patch4_window7_224", model_kwargs=TINY_KWARGS).eval().requires_grad_(False)
    return build_orca_model(body, 3, "classification", 3, None, seed=0)


def random_task(n: int = 24) -> TaskData:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(n, 3, 16, 16, generator=generator), torch.arange(n) % 3)
    return TaskData(name="toy", train=data, val=data, test=data, in_channels=3, input_size=(16, 16),
                    head="classification", num_outputs=3, output_size=None, error=misclassification,
                    loss=cross_entropy, output_transform=nn.Identity(), baseline_error=2 / 3)


def make_setup(name: str, stage: Stage3Config, total_steps: int = 3, model: nn.Module | None = None,
               task: TaskData | None = None) -> AllocationSetup:
    """The setup at the uniform stage3.rank budget, as stage 2 hands it over."""
    model = model or tiny_model()
    shapes = adapted_module_shapes(model.body, stage.targets)
    budget = trainable_params(dict.fromkeys(shapes, stage.rank), shapes)
    return AllocationSetup(model, task or random_task(), stage, shapes, AllocationRequest(name, budget, 1, 64), 0,
                           total_steps, torch.device("cpu"))


@pytest.fixture
def setup_for():
    return make_setup
