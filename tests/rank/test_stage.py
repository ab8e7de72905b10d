import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from orca_lora.adapters.inject import add_adapters, match_targets
from orca_lora.config import DEFAULT_TARGETS, Stage2Config
from orca_lora.data.procedural import generate_procedural
from orca_lora.data.tasks import TaskData, cross_entropy, misclassification
from orca_lora.models.body import body_blocks, build_body
from orca_lora.models.embedder import Embedder
from orca_lora.models.features import labelled_target_sample
from orca_lora.models.model import build_orca_model
from orca_lora.rank import stage as rank_stage
from orca_lora.rank.gap import GapSettings, block_gaps
from orca_lora.rank.null import corrected_gap
from orca_lora.rank.select import ModuleShape, RankPrior, select_ranks
from orca_lora.run_files import RunFiles, read_gaps, read_ranks

TINY_KWARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
               "num_heads": (2, 4)}
BLOCKS = ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]


def make_body() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_body("swin_tiny_patch4_window7_224", model_kwargs=TINY_KWARGS).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def body() -> nn.Module:
    return make_body()


@pytest.fixture(scope="module")
def source() -> tuple[torch.Tensor, torch.Tensor]:
    """Class-major procedural source images (4 classes x 8) at 16 x 16, as `source_proxy` returns them."""
    images = generate_procedural(4, 8, image_size=16, seed=0)
    return torch.as_tensor(images.images), torch.as_tensor(images.labels)


@pytest.fixture(scope="module")
def task() -> TaskData:
    generator = torch.Generator().manual_seed(5)
    inputs = torch.rand(30, 3, 16, 16, generator=generator) ** 2
    train = TensorDataset(inputs, torch.arange(30) % 3)
    return TaskData(name="toy", train=train, val=train, test=train, in_channels=3, input_size=(16, 16),
                    head="classification", num_outputs=3, output_size=None, error=misclassification,
                    loss=cross_entropy, output_transform=nn.Identity(), baseline_error=2 / 3)


@pytest.fixture(scope="module")
def embedder(body) -> Embedder:
    return Embedder.from_body(body, 3, generator=torch.Generator().manual_seed(1))


def run_stage(tmp_path, body, embedder, task, source, **stage2):
    stage = Stage2Config(**{"max_samples": 16, "r_max": 8, **stage2})
    inputs = rank_stage.GapInputs(body, embedder, task, *source, list(DEFAULT_TARGETS), uniform_rank=4, seed=0,
                                  measure_seed=0)
    return stage, rank_stage.run(stage, inputs, RunFiles(tmp_path))


def test_adapted_module_shapes_for_the_default_targets(body):
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    expected = {}
    for index, block in enumerate(BLOCKS):
        width = 16 if block.startswith("layers.0") else 32
        for suffix, d_out, d_in in (("attn.qkv", 3 * width, width), ("attn.proj", width, width),
                                    ("mlp.fc1", 4 * width, width), ("mlp.fc2", width, 4 * width)):
            expected[f"body.{block}.{suffix}"] = ModuleShape(index, d_out, d_in)
    assert shapes == expected
    model = build_orca_model(make_body(), 3, "classification", 3, None)
    matched = match_targets(model, DEFAULT_TARGETS)
    assert set(matched) == set(shapes)
    for name, shape in shapes.items():
        assert tuple(matched[name].weight.shape) == (shape.d_out, shape.d_in)


def test_adapted_module_shapes_follow_the_targets(body):
    only_qkv = rank_stage.adapted_module_shapes(body, [r"\.attn\.qkv$"])
    assert list(only_qkv) == [f"body.{block}.attn.qkv" for block in BLOCKS]
    assert [shape.block for shape in only_qkv.values()] == [0, 1, 2, 3]
    later = rank_stage.adapted_module_shapes(body, [r"layers\.1\..*\.fc2$"])
    assert later == {f"body.{b}.mlp.fc2": ModuleShape(i + 2, 32, 128) for i, b in enumerate(BLOCKS[2:])}
    with pytest.raises(ValueError, match=r"stage3.targets .*head.* match no Linear inside the body's blocks"):
        rank_stage.adapted_module_shapes(body, [r"head\.fc$"])


def test_the_embedder_projection_is_adapted_as_a_block_0_module(body):
    shapes = rank_stage.adapted_module_shapes(body, [r"^embedder\.proj$", r"\.attn\.qkv$"])
    projection = body.patch_embed.proj
    assert shapes["embedder.proj"] == ModuleShape(0, projection.out_channels, projection.weight[0].numel())
    assert list(shapes)[0] == "embedder.proj" and len(shapes) == 1 + len(body_blocks(body))


def test_targets_selecting_a_linear_outside_the_blocks_are_refused(body):
    targets = [r"\.attn\.qkv$", r"downsample\.reduction$"]
    with pytest.raises(ValueError, match="outside the Swin blocks"):
        rank_stage.uniform_ranks(body, targets, 2)


def test_uniform_ranks_give_every_adapted_module_the_rank(body):
    ranks = rank_stage.uniform_ranks(body, DEFAULT_TARGETS, 3)
    assert ranks == dict.fromkeys(rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS), 3)
    adapters = add_adapters(build_orca_model(make_body(), 3, "classification", 3, None), DEFAULT_TARGETS, ranks)
    assert {name: layer.rank for name, layer in adapters.items()} == ranks


def test_check_rank_map_accepts_adapted_modules_and_names_the_problem_otherwise(body):
    rank_stage.check_rank_map(body, DEFAULT_TARGETS, {"body.layers.0.blocks.1.attn.qkv": 16,
                                                      "body.layers.1.blocks.0.mlp.fc2": 1})
    with pytest.raises(KeyError, match=r"blocks\.7\.attn\.qkv.*body\.layers\.0\.blocks\.0\.attn\.qkv"):
        rank_stage.check_rank_map(body, DEFAULT_TARGETS, {"body.layers.0.blocks.7.attn.qkv": 2})
    with pytest.raises(KeyError, match="not an adapted module"):
        rank_stage.check_rank_map(body, [r"\.attn\.qkv$"], {"body.layers.0.blocks.0.mlp.fc1": 2})
    with pytest.raises(ValueError, match=r"rank 17 .* \[1, 16\] .* 48 x 16"):
        rank_stage.check_rank_map(body, DEFAULT_TARGETS, {"body.layers.0.blocks.0.attn.qkv": 17})
    with pytest.raises(ValueError, match=r"rank 0 "):
        rank_stage.check_rank_map(body, DEFAULT_TARGETS, {"body.layers.1.blocks.1.attn.proj": 0})


def test_run_writes_gaps_and_ranks_that_agree(tmp_path, body, embedder, task, source):
    stage, result = run_stage(tmp_path, body, embedder, task, source)
    assert result.blocks == BLOCKS and len(result.gaps) == 4
    assert result.alpha0 == 4.0 and result.budget is None
    run = RunFiles(tmp_path)
    assert read_ranks(run) == result
    assert json.loads(run.ranks.read_text())["ranks"] == result.ranks
    assert sorted(path.name for path in run.stage("stage2").iterdir()) == ["gaps.csv", "ranks.json"]
    assert [row.gap for row in read_gaps(run)] == pytest.approx(result.gaps, rel=1e-5)

    with open(run.gaps, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["block"]) for r in rows] == [0, 1, 2, 3] and [r["name"] for r in rows] == BLOCKS
    assert [float(r["gap"]) for r in rows] == pytest.approx(result.gaps, rel=1e-5)
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    for name, shape in shapes.items():  # r_max=8 caps no module, so each takes its block's rank
        assert result.ranks[name] == int(rows[shape.block]["rank"])
    assert result.trainable_params == sum(result.ranks[n] * (s.d_out + s.d_in) for n, s in shapes.items())


def test_run_measures_the_gaps_of_its_samples_and_maps_them_to_ranks(tmp_path, body, embedder, task, source):
    """As many source images as max_samples, so the check holds whichever order stage 2 takes them in."""
    images, labels = source[0][::2], source[1][::2]
    stage, result = run_stage(tmp_path, body, embedder, task, (images, labels), distance="otdd", decision="mode",
                              otdd_inner="gaussian", entropic_reg=0.5)
    target_x, target_y = labelled_target_sample(task, 16, stage.n_pseudo_labels, seed=0)
    with torch.no_grad():
        tokens = body.patch_embed(F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False))
        target = embedder(target_x)
    settings = GapSettings("otdd", stage.permutations, stage.bootstraps, seed=0,
                           options={"inner": "gaussian", "entropic_reg": 0.5})
    expected = block_gaps(body, tokens, target, settings, labels, target_y)
    assert result.gaps == pytest.approx([g.estimate.gap for g in expected], rel=1e-5)
    assert result.corrected_gaps == pytest.approx([corrected_gap(g.estimate) for g in expected], rel=1e-5)
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    prior = RankPrior(decision="mode", r_max=8, alpha0=4.0, seed=0)
    assert result.ranks == select_ranks(result.corrected_gaps, shapes, prior).ranks


def test_run_meets_a_parameter_budget_within_one_rank_one_component(tmp_path, body, embedder, task, source):
    budget = 5000
    _, result = run_stage(tmp_path, body, embedder, task, source, budget=budget)
    model = build_orca_model(make_body(), 3, "classification", 3, None)
    adapters = add_adapters(model, DEFAULT_TARGETS, result.ranks)
    counted = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in adapters.values())
    largest_component = max(layer.lora_A.shape[1] + layer.lora_B.shape[0] for layer in adapters.values())
    assert counted == result.trainable_params
    assert budget - largest_component < counted <= budget
    assert result.budget == budget and result.alpha0 > 0
    assert read_ranks(RunFiles(tmp_path)).budget == budget


def test_run_measures_on_every_held_out_source_sample(tmp_path, body, embedder, task, source, monkeypatch):
    seen = {}

    def spy(body, source_tokens, target_tokens, settings, source_labels=None, target_labels=None):
        seen["labels"] = source_labels
        return block_gaps(body, source_tokens, target_tokens, settings, source_labels, target_labels)

    monkeypatch.setattr(rank_stage, "block_gaps", spy)
    run_stage(tmp_path, body, embedder, task, source)
    assert torch.equal(seen["labels"], source[1]), "stage 2 measures on the whole held-out source sample"


def test_uniform_allocation_measures_the_gaps_and_gives_every_module_the_rank(tmp_path, body, embedder, task, source):
    _, ibp = run_stage(tmp_path / "ibp", body, embedder, task, source)
    _, uniform = run_stage(tmp_path / "uniform", body, embedder, task, source, allocation="uniform")
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    assert uniform.gaps == pytest.approx(ibp.gaps)
    assert uniform.ranks == dict.fromkeys(shapes, 4) and uniform.alpha0 is None
    assert uniform.allocation == "uniform" and ibp.allocation == "gap-relative"
    assert uniform.trainable_params == 4 * sum(s.d_out + s.d_in for s in shapes.values())
    assert [row.rank for row in read_gaps(RunFiles(tmp_path / "uniform"))] == [4, 4, 4, 4]


def test_matched_budget_spends_what_the_uniform_rank_costs(tmp_path, body, embedder, task, source):
    _, result = run_stage(tmp_path, body, embedder, task, source, match_uniform_budget=True)
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    uniform_cost = 4 * sum(s.d_out + s.d_in for s in shapes.values())
    largest_component = max(s.d_out + s.d_in for s in shapes.values())
    assert result.budget == uniform_cost
    assert uniform_cost - largest_component < result.trainable_params <= uniform_cost


def test_explicit_ranks_write_the_map_or_the_uniform_rank_without_gaps(tmp_path, body):
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    run = RunFiles(tmp_path / "uniform")
    result = rank_stage.explicit_ranks(body, DEFAULT_TARGETS, 3, {}, run)
    assert result.ranks == dict.fromkeys(shapes, 3) and result.gaps is None and result.allocation == "explicit"
    assert read_ranks(run) == result and read_gaps(run) is None
    chosen = {"body.layers.0.blocks.1.attn.qkv": 5}
    mapped = rank_stage.explicit_ranks(body, [r"\.attn\.qkv$"], 3, chosen, RunFiles(tmp_path / "map"))
    assert mapped.ranks == chosen and mapped.trainable_params == 5 * (48 + 16)
    with pytest.raises(FileNotFoundError, match=r"ranks.json not found.*re-run stage 2 \(delete the run's stage2/"):
        read_ranks(RunFiles(tmp_path / "none"))


def test_the_spectral_gap_sample_size_is_checked_before_stage_1(body):
    rank_stage.check_gap_sample_sizes(body, Stage2Config(distance="spectral", max_samples=128))
    rank_stage.check_gap_sample_sizes(body, Stage2Config(distance="mmd", max_samples=16))
    with pytest.raises(ValueError, match=r"4 x width = 128 .* n_s=64.*stage2.max_samples"):
        rank_stage.check_gap_sample_sizes(body, Stage2Config(distance="spectral", max_samples=64))


def test_gap_allocation_divides_by_each_blocks_floor_and_records_the_masses(tmp_path, body, embedder, task, source):
    _, result = run_stage(tmp_path, body, embedder, task, source, allocation="gap", alpha0=3.0)
    rows = read_gaps(RunFiles(tmp_path))
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    prior = RankPrior(r_max=8, alpha0=3.0, reference=[row.floor for row in rows])
    assert result.ranks == select_ranks([row.corrected for row in rows], shapes, prior).ranks
    expected = {name: 3.0 * rows[shape.block].corrected / rows[shape.block].floor for name, shape in shapes.items()}
    assert result.prior_masses == pytest.approx(expected, rel=1e-4)  # gaps.csv keeps 6 digits
    assert read_ranks(RunFiles(tmp_path)).prior_masses == result.prior_masses


def test_flat_allocation_gives_every_block_alpha0(tmp_path, body, embedder, task, source):
    _, result = run_stage(tmp_path, body, embedder, task, source, allocation="flat", alpha0=3.0)
    assert set(result.prior_masses.values()) == {3.0}
    assert set(result.ranks.values()) == {3}


def test_law_allocation_takes_each_blocks_rate_from_the_fitted_law(tmp_path, body, embedder, task, source):
    from orca_lora.config_load import load_config
    from orca_lora.rank.law import RankLaw, floor_units
    from orca_lora.rank.law_file import LawFile, LawProvenance, write_law_file

    law = RankLaw(c=1.5, beta=0.5, beta_low=0.2, beta_high=0.8, p_beta_0=0.01, p_beta_1=0.02, log_likelihood=-3.0,
                  leave_one_task_out_error=1.0, n_observations=8, n_tasks=2, n_censored=0)
    path = tmp_path / "law.json"
    write_law_file(path, LawFile(law, LawProvenance.of(load_config()), [], []))
    _, result = run_stage(tmp_path / "run", body, embedder, task, source, allocation="law", law=str(path),
                          decision="mode")
    rows = read_gaps(RunFiles(tmp_path / "run"))
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    rates = [law.rate(floor_units(row.corrected, row.floor)) for row in rows]
    expected = select_ranks(rates, shapes, RankPrior(decision="mode", r_max=8, alpha0=1.0, reference=1.0)).ranks
    assert result.ranks == expected and result.allocation == "law"
    assert result.prior_masses == pytest.approx({name: rates[shape.block] for name, shape in shapes.items()}, rel=1e-4)


def test_block_ranks_override_the_uniform_rank_in_their_block_only(tmp_path, body, embedder, task, source):
    shapes = rank_stage.adapted_module_shapes(body, DEFAULT_TARGETS)
    inputs = rank_stage.GapInputs(body, embedder, task, *source, list(DEFAULT_TARGETS), uniform_rank=4, seed=0,
                                  measure_seed=0, block_ranks={1: 2})
    result = rank_stage.run(Stage2Config(max_samples=16, allocation="uniform"), inputs, RunFiles(tmp_path))
    assert result.ranks == {name: 2 if shape.block == 1 else 4 for name, shape in shapes.items()}
    assert [row.rank for row in read_gaps(RunFiles(tmp_path))] == [4, 2, 4, 4]
    assert len(result.gaps) == 4  # the gap of every block is still measured
    explicit = rank_stage.explicit_ranks(body, DEFAULT_TARGETS, 4, {}, RunFiles(tmp_path / "off"), {3: 1})
    assert explicit.ranks == {name: 1 if shape.block == 3 else 4 for name, shape in shapes.items()}


def test_check_block_ranks_names_a_missing_block_and_a_rank_too_large(body):
    rank_stage.check_block_ranks(body, DEFAULT_TARGETS, {0: 16, 3: 1})
    with pytest.raises(ValueError, match=r"block 4 does not exist; the body has blocks 0 to 3"):
        rank_stage.check_block_ranks(body, DEFAULT_TARGETS, {4: 1})
    with pytest.raises(ValueError, match=r"rank 17 for block 0 is above min\(d_out, d_in\) = 16"):
        rank_stage.check_block_ranks(body, DEFAULT_TARGETS, {0: 17})
