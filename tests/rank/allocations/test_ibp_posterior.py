import pytest
from allocation_toys import assert_meets_budget, make_inputs, swin_like_shapes

from orca_lora.config_load import load_config
from orca_lora.pipeline import stage_hash
from orca_lora.rank.allocations import get_allocation
from orca_lora.rank.allocations.ibp_posterior import check_posterior_modules, read_posterior_ranks
from orca_lora.records import RunMetrics
from orca_lora.run_files import RunFiles, write_metrics


def write_run(directory, posterior_ranks, method="ibp-lora"):
    metrics = RunMetrics(task="darcy", method=method, rank=8, gap_aware=True, seed=0, test_error=0.1,
                         baseline_error=1.0, best_val_error=0.1, trainable_params=100, ranks={}, mean_gap=0.5,
                         alignment={}, stage_seconds={}, device="cpu", torch="2", posterior_ranks=posterior_ranks)
    write_metrics(RunFiles(directory), metrics)
    return str(directory)


@pytest.fixture
def posterior(mixed_shapes) -> dict[str, int]:
    """Every module's posterior rank = 2 x its block index (block 0 pruned to 0), qkv one more."""
    return {name: 2 * shape.block + name.endswith("qkv") for name, shape in mixed_shapes.items()}


def test_posterior_ranks_are_scaled_to_the_budget_and_pruned_modules_keep_r_min(tmp_path, mixed_shapes, posterior):
    run = write_run(tmp_path / "posterior", posterior)
    assert read_posterior_ranks(run) == posterior
    budget = 9000
    inputs = make_inputs(mixed_shapes, allocation="ibp-posterior", posterior_run=run, budget=budget, r_min=1)
    result = get_allocation("ibp-posterior").allocate(inputs)
    assert_meets_budget(result.ranks, mixed_shapes, budget)
    pruned = [name for name, rank in posterior.items() if rank == 0]
    assert pruned and all(result.ranks[name] == 1 for name in pruned)
    levels = sorted(set(posterior.values()))  # the top-up may part equal scores by one rank, so compare means
    means = [sum(result.ranks[n] for n in posterior if posterior[n] == level) / list(posterior.values()).count(level)
             for level in levels]
    assert means == sorted(means) and means[0] < means[-1]


def test_a_posterior_run_with_other_modules_is_refused_naming_them(tmp_path, mixed_shapes, posterior):
    with pytest.raises(ValueError, match=r"this run's \['body.layers.1.blocks.1.attn.proj'\] are not in it"):
        check_posterior_modules({k: v for k, v in posterior.items() if "1.blocks.1.attn.proj" not in k},
                                mixed_shapes, "elsewhere")
    run = write_run(tmp_path / "other", {**posterior, "body.layers.2.blocks.0.attn.qkv": 3})
    inputs = make_inputs(mixed_shapes, allocation="ibp-posterior", posterior_run=run, budget=9000)
    with pytest.raises(ValueError, match=r"its \['body.layers.2.blocks.0.attn.qkv'\] are not adapted here"):
        get_allocation("ibp-posterior").allocate(inputs)


def test_a_run_without_posterior_ranks_is_refused(tmp_path):
    run = write_run(tmp_path / "lora", None, method="lora")
    with pytest.raises(ValueError, match=r"'lora' run with no posterior ranks"):
        read_posterior_ranks(run)


def test_the_stage_2_hash_follows_the_posterior_runs_metrics(tmp_path):
    shapes = swin_like_shapes([16])
    run = write_run(tmp_path / "posterior", dict.fromkeys(shapes, 2))
    config = load_config(None, ["stage2.allocation=ibp-posterior", f"stage2.posterior_run={run}",
                                "stage2.match_uniform_budget=true"])
    before = stage_hash(config, "stage2")
    assert stage_hash(config, "stage2") == before
    write_run(tmp_path / "posterior", dict.fromkeys(shapes, 3))
    assert stage_hash(config, "stage2") != before


def test_preflight_refuses_a_posterior_run_of_other_modules_before_stage_1(tmp_path):
    from orca_lora.models.body import build_body
    from orca_lora.preflight import check_against_body

    body = build_body("swin_tiny_patch4_window7_224", model_kwargs={
        "img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4)})
    run = write_run(tmp_path / "posterior", dict.fromkeys(swin_like_shapes([16]), 2))  # block 0's modules only
    config = load_config(None, ["stage2.allocation=ibp-posterior", f"stage2.posterior_run={run}",
                                "stage2.match_uniform_budget=true"])
    with pytest.raises(ValueError, match=r"this run's \['body.layers.0.blocks.1.attn.proj'.* are not in it; use"):
        check_against_body(config, body)
