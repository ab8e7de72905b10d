"""study_runs: a study's run files read back, grouped into curves and checked (synthetic runs, no training)."""
import numpy as np
import pytest

from study_toys import BLOCKS, modules, write_study_run

from orca_lora.studies.study_runs import (block_mean_posterior_ranks, block_index, describe, epochs_phrase,
                                          primary_regime,
                                          rank_curves, read_study, Regime)

GAPS = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


def run(root, name, val=0.2, test=0.3, n_val=4, n_test=5, gaps=GAPS, **settings):
    """A run whose per-sample errors are val + 0.01 * index (validation) and test + 0.01 * index (test)."""
    return write_study_run(root, name, val_errors=val + 0.01 * np.arange(n_val),
                           test_errors=test + 0.01 * np.arange(n_test), block_gaps=gaps, **settings)


def test_read_study_reads_every_run_file(tmp_path):
    posterior = {module: index for index, module in enumerate(m for block in BLOCKS for m in modules(block))}
    run(tmp_path, "lora", rank=4, seed=2, val=0.2, test=0.3)
    run(tmp_path, "linear", method="linear", rank=8, seed=2)
    run(tmp_path, "full", method="full", seed=2)
    run(tmp_path, "ibp", method="ibp-lora", allocation="flat", seed=2, posterior_ranks=posterior)
    run(tmp_path, "block", rank=8, seed=2, block_ranks={3: 1}, train_embedder=True, epochs=30)
    runs = {r.directory.name: r for r in read_study([tmp_path])}
    lora = runs["lora"]
    assert (lora.task, lora.method, lora.allocation, lora.rank, lora.seed) == ("darcy", "lora", "uniform", 4, 2)
    assert lora.regime == Regime(False) and lora.epochs == 6 and lora.block_ranks == ()
    np.testing.assert_allclose(lora.val_errors, 0.2 + 0.01 * np.arange(4))
    np.testing.assert_allclose(lora.test_errors, 0.3 + 0.01 * np.arange(5))
    assert lora.val_error == pytest.approx(0.215) and lora.test_error == pytest.approx(0.32)
    np.testing.assert_allclose(lora.block_gaps, GAPS)
    assert lora.block_names == BLOCKS and lora.mean_gap == pytest.approx(0.35)
    assert lora.posterior_ranks is None and lora.settings["stage3.rank"] == 4
    assert runs["linear"].rank == 0 and runs["full"].rank is None  # linear is rank 0 whatever stage3.rank says
    assert runs["ibp"].allocation == "flat" and runs["ibp"].posterior_ranks == posterior
    block = runs["block"]
    assert block.block_ranks == ((3, 1),) and block.regime == Regime(True, 5.0) and block.epochs == 30
    assert block.curve == ("darcy", "lora", "uniform", Regime(True, 5.0), ((3, 1),))
    assert len({r.curve for r in runs.values()}) == 5


def test_tasks_trained_for_their_own_lengths_share_a_regime_and_a_longer_check_has_its_own(tmp_path):
    for rank in (1, 2):
        run(tmp_path, f"short_r{rank}", task="darcy", rank=rank, epochs=20)
        run(tmp_path, f"long_r{rank}", task="procedural", rank=rank, epochs=60)
    run(tmp_path, "check", task="darcy", rank=2, epochs=60)  # darcy trained 3x its sweep
    runs = {r.directory.name: r for r in read_study([tmp_path])}
    assert {runs[f"{name}_r{rank}"].regime for name in ("short", "long") for rank in (1, 2)} == {Regime(False)}
    assert runs["check"].regime == Regime(False, 3.0) and str(runs["check"].regime) == \
        "frozen embedder, 3x the sweep's epochs"
    assert [curve.task for curve in rank_curves(list(runs.values()), Regime(False))] == ["darcy", "procedural"]
    assert epochs_phrase(list(runs.values()), Regime(False)) == "epochs by task: darcy 20, procedural 60"
    assert epochs_phrase(list(runs.values()), Regime(False, 3.0)) == "60 epochs"


def test_a_diverged_run_is_left_out(tmp_path):
    run(tmp_path, "ok", seed=0)
    write_study_run(tmp_path, "nan", seed=1, val_errors=np.full(4, 0.2), test_errors=np.full(5, np.nan),
                    block_gaps=GAPS)
    assert [r.directory.name for r in read_study([tmp_path])] == ["ok"]


def test_curves_group_seeds_and_ranks_and_describe_lists_them(tmp_path):
    for seed in (0, 1):
        for rank in (1, 4):
            run(tmp_path, f"lora_r{rank}_s{seed}", rank=rank, seed=seed)
    run(tmp_path, "trained", rank=1, seed=0, train_embedder=True)
    runs = read_study([tmp_path])
    curves = {r.curve for r in runs}
    assert curves == {("darcy", "lora", "uniform", Regime(False), ()),
                      ("darcy", "lora", "uniform", Regime(True), ())}
    lines = describe(runs).splitlines()
    assert len(lines) == 2
    frozen = next(line for line in lines if "frozen" in line)
    assert "4 runs, seeds [0, 1], ranks [1, 4]" in frozen


def test_a_setting_outside_the_sweep_differing_inside_one_curve_is_refused(tmp_path):
    run(tmp_path, "a", rank=1, seed=0)
    run(tmp_path, "b", rank=2, seed=1, extra_overrides=("stage1.epochs=3",))
    with pytest.raises(ValueError, match=r"stage1\.epochs differs .*inside one curve"):
        read_study([tmp_path])


def test_settings_may_differ_between_tasks_and_along_the_design_axes(tmp_path):
    run(tmp_path, "darcy", rank=1, seed=0)
    run(tmp_path, "other_task", task="procedural", rank=1, seed=0, extra_overrides=("stage1.epochs=3",))
    run(tmp_path, "linear_lr", method="linear", seed=0, extra_overrides=("stage3.lr=0.01",))
    run(tmp_path, "long", rank=1, seed=0, epochs=30)
    assert len(read_study([tmp_path])) == 4


def test_a_task_setting_differing_between_methods_of_one_task_is_refused(tmp_path):
    """linear and lora runs of darcy must share their data: task.n_train may not differ (it is not a
    design axis), even though it is a task setting that task labels would otherwise split on."""
    run(tmp_path, "lora", rank=1, seed=0)
    run(tmp_path, "linear", method="linear", seed=0, extra_overrides=("task.n_train=300",))
    with pytest.raises(ValueError, match=r"task\.n_train differs .*inside one task"):
        read_study([tmp_path])


def test_a_stage1_setting_differing_between_methods_of_one_task_is_refused(tmp_path):
    run(tmp_path, "lora", rank=1, seed=0)
    run(tmp_path, "full", method="full", seed=0, extra_overrides=("stage1.lr=0.01",))
    with pytest.raises(ValueError, match=r"stage1\.lr differs .*inside one task"):
        read_study([tmp_path])


def test_primary_regime_is_the_one_with_most_uniform_lora_runs(tmp_path):
    for seed in (0, 1, 2):
        run(tmp_path, f"trained_s{seed}", rank=1, seed=seed, train_embedder=True)
    run(tmp_path, "frozen", rank=1, seed=0)
    for block in range(3):  # one-block runs and other methods do not count
        run(tmp_path, f"block{block}", rank=8, seed=0, block_ranks={block: 1})
    run(tmp_path, "dora", method="dora", rank=8, seed=1)
    runs = read_study([tmp_path])
    assert primary_regime(runs) == Regime(True)
    assert primary_regime([r for r in runs if r.directory.name != "trained_s2"]) == Regime(True)
    tied = [r for r in runs if r.directory.name not in ("trained_s1", "trained_s2")]
    assert primary_regime(tied) == Regime(False)  # a tie goes to the frozen embedder (the plan's regime)
    with pytest.raises(ValueError, match="no uniform LoRA runs"):
        primary_regime([r for r in runs if r.method != "lora" or r.block_ranks])


def test_rank_curves_keep_the_seeds_present_at_every_rank(tmp_path):
    frozen = Regime(False)
    for seed in (0, 1, 2):
        for rank in (1, 2, 8):
            if seed == 2 and rank == 8:
                continue  # seed 2 misses rank 8: it leaves the curve
            run(tmp_path, f"d_r{rank}_s{seed}", rank=rank, seed=seed, val=0.1 * rank + seed, test=9.0,
                n_val=3, gaps=GAPS * (1 + seed + rank))
    run(tmp_path, "d_linear", method="linear", seed=0)  # rank 0 is no point of the sweep
    run(tmp_path, "d_block", rank=8, seed=0, block_ranks={1: 1})
    for rank in (1, 2):
        run(tmp_path, f"p_r{rank}", task="procedural", rank=rank, seed=5, n_val=7)
    run(tmp_path, "g_r1", task="grf-texture", rank=1, seed=0)  # one rank only: left out
    runs = read_study([tmp_path])
    darcy, procedural = rank_curves(runs, frozen)
    assert darcy.task == "darcy" and procedural.task == "procedural"
    assert darcy.errors.shape == (2, 3, 3) and procedural.errors.shape == (1, 2, 7)
    np.testing.assert_array_equal(darcy.ranks, [1, 2, 8])
    for s, seed in enumerate((0, 1)):
        for r, rank in enumerate((1, 2, 8)):  # validation errors, never the test ones
            np.testing.assert_allclose(darcy.errors[s, r], 0.1 * rank + seed + 0.01 * np.arange(3))
    expected_gap = np.mean([GAPS.mean() * (1 + seed + rank) for seed in (0, 1) for rank in (1, 2, 8)])
    assert darcy.gap == pytest.approx(expected_gap, rel=1e-5)
    [only_one] = rank_curves(runs, frozen, seeds=[1, 2])  # procedural ran seed 5 only
    assert only_one.errors.shape == (1, 3, 3)
    np.testing.assert_allclose(only_one.errors[0, 0], 1.1 + 0.01 * np.arange(3))
    assert rank_curves(runs, Regime(True)) == []


def test_rank_curves_need_the_gaps(tmp_path):
    for rank in (1, 2):
        run(tmp_path, f"r{rank}", rank=rank)
    (tmp_path / "r2" / "stage2" / "gaps.csv").unlink()
    with pytest.raises(ValueError, match="no gaps.csv"):
        rank_curves(read_study([tmp_path]), Regime(False))


def test_block_index_finds_the_block_holding_a_module_or_names_it():
    assert block_index("body.layers.0.blocks.0.attn.qkv", BLOCKS) == 0
    assert block_index("body.layers.1.blocks.1.mlp.fc2", BLOCKS) == 3
    assert block_index("body.layers.2.blocks.1.attn.proj", BLOCKS) == 5
    names = ("layers.0.blocks.1", "layers.0.blocks.10")
    assert block_index("body.layers.0.blocks.10.mlp.fc1", names) == 1  # not the prefix-sharing block 1
    assert block_index("layers.0.blocks.1.mlp.fc1", names) == 0
    with pytest.raises(ValueError, match="lies in none of the blocks"):
        block_index("body.layers.3.blocks.0.attn.qkv", BLOCKS)
    with pytest.raises(ValueError, match="lies in none"):
        block_index("body.xlayers.0.blocks.0.attn.qkv", BLOCKS)


def test_block_mean_posterior_ranks_average_each_blocks_modules(tmp_path):
    rng = np.random.default_rng(3)
    posterior = {module: int(rng.integers(0, 9)) for block in BLOCKS for module in modules(block)}
    run(tmp_path, "ibp", method="ibp-lora", allocation="flat", posterior_ranks=posterior)
    run(tmp_path, "lora", method="lora", seed=1)
    runs = {r.method: r for r in read_study([tmp_path])}
    expected = [np.mean([posterior[module] for module in modules(block)]) for block in BLOCKS]
    np.testing.assert_allclose(block_mean_posterior_ranks(runs["ibp-lora"]), expected)
    with pytest.raises(ValueError, match="no posterior ranks"):
        block_mean_posterior_ranks(runs["lora"])
