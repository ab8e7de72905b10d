import pytest
from allocation_toys import swin_like_shapes

from orca_lora.config import ConfigError
from orca_lora.config_load import load_config
from orca_lora.records import RunMetrics
from orca_lora.run_files import RunFiles, write_metrics


@pytest.mark.parametrize("allocation", ["depth-increasing", "depth-decreasing", "stable-rank", "gradient"])
def test_score_allocations_need_a_budget(allocation):
    with pytest.raises(ConfigError, match=rf"stage2.budget: allocation '{allocation}' scales .* "
                                          "stage2.match_uniform_budget=true"):
        load_config(None, [f"stage2.allocation={allocation}"])
    assert load_config(None, [f"stage2.allocation={allocation}", "stage2.budget=5000"]).stage2.budget == 5000
    load_config(None, [f"stage2.allocation={allocation}", "stage2.match_uniform_budget=true"])


@pytest.mark.parametrize("link", ["linear", "sqrt"])
@pytest.mark.parametrize("budget", ["stage2.budget=5000", "stage2.match_uniform_budget=true"])
def test_gap_with_a_constant_reference_under_a_homogeneous_link_at_a_budget_is_refused(link, budget):
    settings = ["stage2.allocation=gap", "stage2.gap_reference=0.5", budget]
    with pytest.raises(ConfigError, match=r"stage2.link: .*gap-relative's ranks; set stage2.link=log1p"):
        load_config(None, settings + [f"stage2.link={link}"])
    load_config(None, settings + ["stage2.link=log1p"])
    load_config(None, ["stage2.allocation=gap", budget, f"stage2.link={link}"])  # per-block floors
    load_config(None, ["stage2.allocation=gap", "stage2.gap_reference=0.5", f"stage2.link={link}"])  # alpha0


def test_shuffled_takes_gaps_reference():
    assert load_config(None, ["stage2.allocation=shuffled", "stage2.gap_reference=0.5"]).stage2.gap_reference == 0.5


def test_posterior_run_is_required_iff_ibp_posterior_and_must_be_a_finished_ibp_lora_run(tmp_path):
    from orca_lora.rank.allocations.ibp_posterior import read_posterior_ranks
    with pytest.raises(ConfigError, match=r"stage2.posterior_run: allocation 'ibp-posterior' .* or neither"):
        load_config(None, ["stage2.allocation=ibp-posterior", "stage2.budget=5000"])
    with pytest.raises(ConfigError, match=r"stage2.posterior_run: .*or neither"):
        load_config(None, [f"stage2.posterior_run={tmp_path}"])
    settings = ["stage2.allocation=ibp-posterior", f"stage2.posterior_run={tmp_path}", "stage2.budget=5000"]
    # a sweep validates its points before the ibp-lora runs they read exist: the run is read before stage 1
    assert load_config(None, settings).stage2.posterior_run == str(tmp_path)
    with pytest.raises(ValueError, match=r"metrics.json does not exist; point it at a finished"):
        read_posterior_ranks(tmp_path)
    metrics = RunMetrics(task="darcy", method="lora", rank=8, gap_aware=False, seed=0, test_error=0.1,
                         baseline_error=1.0, best_val_error=0.1, trainable_params=100, ranks={}, mean_gap=None,
                         alignment={}, stage_seconds={}, device="cpu", torch="2")
    write_metrics(RunFiles(tmp_path), metrics)
    with pytest.raises(ValueError, match=r"a 'lora' run with no posterior ranks"):
        read_posterior_ranks(tmp_path)
    metrics.method, metrics.posterior_ranks = "ibp-lora", dict.fromkeys(swin_like_shapes([16]), 2)
    write_metrics(RunFiles(tmp_path), metrics)
    assert read_posterior_ranks(tmp_path) == dict.fromkeys(swin_like_shapes([16]), 2)
    with pytest.raises(ConfigError, match=r"stage2.budget: allocation 'ibp-posterior'"):
        load_config(None, settings[:2])


def test_block_ranks_need_uniform_ranks_and_no_rank_map():
    assert load_config(None, ["stage2.allocation=uniform", "stage3.block_ranks={2: 1}"]).stage3.block_ranks == {2: 1}
    with pytest.raises(ConfigError, match="stage3.block_ranks: overrides uniform ranks, but stage2.allocation is "
                                          "'gap-relative'"):
        load_config(None, ["stage3.block_ranks={2: 1}"])
    with pytest.raises(ConfigError, match="either stage3.rank_map .* or stage3.block_ranks"):
        load_config(None, ["stage2.enabled=false", "stage3.block_ranks={2: 1}",
                           "stage3.rank_map={body.layers.0.blocks.0.attn.qkv: 2}"])
    with pytest.raises(ConfigError, match=r"\{2: 0\} needs a block index >= 0 and a rank >= 1"):
        load_config(None, ["stage2.allocation=uniform", "stage3.block_ranks={2: 0}"])
