import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from orca_lora.adapters.inject import adapter_modules
from orca_lora.config import DEFAULT_TARGETS, Stage3Config
from orca_lora.data.darcy import UnitGaussianNormalizer, relative_l2
from orca_lora.data.tasks import DecodeField, TaskData, cross_entropy, misclassification
from orca_lora.finetune.module import FinetuneModule, schedule_factor
from orca_lora.finetune.stage import prepare_model
from orca_lora.models.body import build_body
from orca_lora.models.model import build_orca_model
from orca_lora.rank.stage import uniform_ranks

TINY_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
               "num_heads": (2, 4)}


def make_body() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_body("swin_tiny_patch4_window7_224", model_kwargs=TINY_KWARGS).eval().requires_grad_(False)


def classification_task() -> TaskData:
    data = TensorDataset(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3)
    return TaskData(name="toy", train=data, val=data, test=data, in_channels=3, input_size=(16, 16),
                    head="classification", num_outputs=3, output_size=None, error=misclassification,
                    loss=cross_entropy, output_transform=nn.Identity(), baseline_error=2 / 3)


def dense_task() -> TaskData:
    generator = torch.Generator().manual_seed(0)
    fields = 3.0 + 2.0 * torch.randn(6, 8, 8, generator=generator)
    data = TensorDataset(torch.randn(6, 2, 8, 8, generator=generator), fields)
    return TaskData(name="field", train=data, val=data, test=data, in_channels=2, input_size=(8, 8), head="dense",
                    num_outputs=1, output_size=(8, 8), error=relative_l2, loss=relative_l2,
                    output_transform=DecodeField(UnitGaussianNormalizer(fields)), baseline_error=1.0)


def make_module(method: str, task: TaskData | None = None, **stage3) -> FinetuneModule:
    task = task or classification_task()
    body = make_body()
    model = build_orca_model(body, task.in_channels, task.head, task.num_outputs, task.output_size)
    stage = Stage3Config(method=method, rank=2, **stage3)
    prepare_model(model, stage, uniform_ranks(body, DEFAULT_TARGETS, 2))
    return FinetuneModule(model, task, stage, total_steps=20, steps_per_epoch=5, seed=0)


def reference_lrs(make_scheduler, steps: int) -> list[float]:
    """Learning-rate multipliers torch's own scheduler gives at steps 0..steps-1."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_schedule_warms_up_linearly_whatever_the_schedule():
    for schedule in ("cosine", "step", "constant"):
        factors = [schedule_factor(s, 100, 4, schedule, 10, 1, 0.1) for s in range(4)]
        assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_schedule_matches_torch_and_hits_its_endpoints():
    ours = [schedule_factor(s, 30, 0, "cosine", 10, 1, 0.1) for s in range(31)]
    expected = reference_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30), 31)
    assert ours == pytest.approx(expected, abs=1e-9)
    warm = lambda s: schedule_factor(s, 30, 10, "cosine", 10, 1, 0.1)  # noqa: E731
    assert warm(10) == 1.0 and warm(20) == pytest.approx(0.5) and warm(30) == pytest.approx(0.0, abs=1e-12)
    assert warm(45) == pytest.approx(0.0, abs=1e-12), "past the end the rate stays at 0"
    assert warm(15) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 20)))


def test_step_schedule_matches_torch_step_lr():
    ours = [schedule_factor(s, 100, 0, "step", 4, 3, 0.5) for s in range(40)]
    expected = reference_lrs(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=12, gamma=0.5), 40)
    assert ours == pytest.approx(expected, rel=1e-12)


def test_constant_schedule_stays_at_one_after_warm_up():
    assert [schedule_factor(s, 10, 2, "constant", 5, 1, 0.1) for s in range(2, 40)] == [1.0] * 38


def test_saved_keys_hold_what_training_changes_and_not_the_frozen_body():
    module = make_module("lora", dense_task())
    state = module.state_dict()
    expected = {k for k in state if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
                or k.startswith(("model.embedder.", "model.head.", "output_transform."))}
    keys = module.saved_keys()
    assert keys == expected
    assert {"output_transform.normalizer.mean", "output_transform.normalizer.std"} <= keys
    assert "model.body.layers.0.blocks.0.attn.qkv.lora_A" in keys
    assert not any(k.startswith("model.body.") and "lora_" not in k for k in keys)
    assert "model.body.layers.0.blocks.0.attn.qkv.base_layer.weight" in state

    checkpoint = {"state_dict": dict(state)}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == expected


def test_saved_keys_add_the_moved_base_weights_for_delta_lora():
    module = make_module("delta-lora")
    names = adapter_modules(module.model)
    bases = {f"model.{name}.base_layer.weight" for name in names}
    assert len(bases) == 16 and bases <= module.saved_keys()
    assert not bases & make_module("lora").saved_keys()


def optimizer_groups(module: FinetuneModule) -> dict[str, dict]:
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    return {group["name"]: group for group in config["optimizer"].param_groups}


@pytest.mark.parametrize("method, ratio", [("lora-plus", 8.0), ("lora", 1.0)])
def test_loraplus_ratio_reaches_the_optimizer(method, ratio):
    module = make_module(method, lr=2e-3, weight_decay=0.01, loraplus_ratio=8.0, warmup_steps=4)
    groups = optimizer_groups(module)
    assert groups["lora_B"]["initial_lr"] == pytest.approx(2e-3 * ratio)
    assert groups["lora_A"]["initial_lr"] == groups["decay"]["initial_lr"] == pytest.approx(2e-3)
    assert groups["lora_B"]["lr"] == pytest.approx(2e-3 * ratio / 4), "warm-up factor 1/4 at step 0"
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["lora_A"]["weight_decay"] == 0.01
    in_groups = [id(p) for group in groups.values() for p in group["params"]]
    trainable = [id(p) for p in module.parameters() if p.requires_grad]
    assert sorted(in_groups) == sorted(trainable)
    lora_B = {id(m.lora_B) for m in adapter_modules(module.model).values()}
    assert {id(p) for p in groups["lora_B"]["params"]} == lora_B


def test_delta_lora_optimizer_moves_the_base_weights_by_the_rule():
    module = make_module("delta-lora", delta_start_step=0, delta_update_ratio=0.5, lr=1e-2)
    optimizer = module.configure_optimizers()["optimizer"]
    layer = module.model.body.layers[0].blocks[0].attn.qkv
    inputs, labels = torch.rand(4, 3, 16, 16), torch.arange(4) % 3

    def step() -> None:
        optimizer.zero_grad()
        cross_entropy(module(inputs), labels).mean().backward()
        optimizer.step()

    frozen = layer.base_layer.weight.clone()
    step()  # step 0 = K: the rule applies only from t > K
    assert torch.equal(layer.base_layer.weight, frozen)
    old = layer.base_layer.weight.clone(), layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    step()
    expected = old[0] + 0.5 * layer.scaling * (layer.lora_B @ layer.lora_A - old[2] @ old[1])
    torch.testing.assert_close(layer.base_layer.weight, expected.detach())
    assert not torch.equal(layer.base_layer.weight, frozen)


def test_training_step_draws_a_dylora_rank_per_module():
    module = make_module("dylora", dylora_min_rank=1)
    layers = list(adapter_modules(module.model).values())
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        for _ in range(3):
            loss = module.training_step(batch, 0)
            expected = [int(torch.randint(1, 3, (1,), generator=generator)) for _ in layers]
            assert [layer.active_rank for layer in layers] == expected
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_forward_decodes_the_model_output():
    task = dense_task()
    module = make_module("lora", task).eval()
    inputs = task.train.tensors[0][:2]
    with torch.no_grad():
        raw = module.model(inputs)
        normalizer = task.output_transform.normalizer
        expected = raw.squeeze(1) * (normalizer.std + normalizer.eps) + normalizer.mean
        torch.testing.assert_close(module(inputs), expected)
