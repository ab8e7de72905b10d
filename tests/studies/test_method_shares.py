"""method_shares: shares of the linear -> full gap, rank benefits per regime, the minimum-of-training check."""
import numpy as np
import pytest

from study_toys import write_study_run

from orca_lora.studies.method_shares import method_shares, rank_benefits, training_checks
from orca_lora.studies.study_runs import read_study, Regime

GAPS = np.full(6, 0.2)
FROZEN, TRAINED = Regime(False), Regime(True)
CENTERED = np.array([-0.03, 0.02, -0.01, 0.04, 0.0, -0.02])  # sums to 0: the means are exact


def run(root, name, test_mean, seed=0, wiggle=1.0, **settings):
    test = test_mean + wiggle * CENTERED * (1 + 0.3 * seed)
    return write_study_run(root, name, seed=seed, val_errors=np.full(3, test_mean), test_errors=test,
                           block_gaps=GAPS, **settings)


def test_share_of_the_linear_to_full_gap_on_constructed_runs(tmp_path):
    for seed in (0, 1, 2):
        run(tmp_path, f"linear{seed}", 0.5, seed, method="linear")
        run(tmp_path, f"full{seed}", 0.1, seed, method="full")
        run(tmp_path, f"lora{seed}", 0.3, seed, rank=4, wiggle=-1.0)
        run(tmp_path, f"ibp{seed}", 0.2, seed, method="ibp-lora", allocation="flat")
    for seed in (1, 2):
        run(tmp_path, f"dora{seed}", 0.45, seed, method="dora")
    run(tmp_path, "block", 0.35, 0, rank=8, block_ranks={2: 1})  # one-block runs are no method point
    run(tmp_path, "trained", 0.05, 0, rank=4, train_embedder=True)  # another regime
    run(tmp_path, "other_linear", 0.5, 0, task="procedural", method="linear")  # no full run: no shares
    run(tmp_path, "other_lora", 0.3, 0, task="procedural", rank=4)
    shares = {(s.task, s.method, s.rank): s for s in method_shares(read_study([tmp_path]), FROZEN, 299)}
    assert set(shares) == {("darcy", "lora", 4), ("darcy", "ibp-lora", 8), ("darcy", "dora", 8)}
    lora = shares["darcy", "lora", 4]
    assert lora.share == pytest.approx(0.5) and lora.seeds == [0, 1, 2]
    assert lora.test_error == pytest.approx(0.3)
    assert lora.linear_error == pytest.approx(0.5) and lora.full_error == pytest.approx(0.1)
    low, high = lora.share_interval
    assert low < 0.5 < high and high - low < 0.3
    assert shares["darcy", "ibp-lora", 8].share == pytest.approx(0.75)
    dora = shares["darcy", "dora", 8]  # paired on the seeds all three ran
    assert dora.seeds == [1, 2] and dora.share == pytest.approx(0.125)
    assert method_shares(read_study([tmp_path]), TRAINED, 99) == []  # no linear / full runs trained


def test_rank_benefits_compare_the_regimes_on_the_same_seeds(tmp_path):
    for seed in (0, 1, 2):
        offset = 0.05 * (seed == 2)  # seed 2 only ran frozen: it must not enter either benefit
        for rank, error in ((1, 0.3), (2, 0.25), (32, 0.2)):
            run(tmp_path, f"frozen_r{rank}_s{seed}", error + offset, seed, rank=rank)
    for seed in (0, 1):
        for rank, error in ((1, 0.3), (32, 0.1)):
            run(tmp_path, f"trained_r{rank}_s{seed}", error, seed, rank=rank, train_embedder=True)
    benefits = {b.regime: b for b in rank_benefits(read_study([tmp_path]), [FROZEN, TRAINED], 199)}
    frozen, trained = benefits[str(FROZEN)], benefits[str(TRAINED)]
    for benefit in (frozen, trained):
        assert benefit.seeds == [0, 1] and (benefit.low_rank, benefit.high_rank) == (1, 32)
    assert frozen.low_error == pytest.approx(0.3) and frozen.high_error == pytest.approx(0.2)
    assert frozen.benefit == pytest.approx(0.5) and trained.benefit == pytest.approx(2.0)
    assert frozen.benefit_interval[0] <= 0.5 <= frozen.benefit_interval[1]
    assert trained.benefit_interval[0] <= 2.0 <= trained.benefit_interval[1]
    assert rank_benefits(read_study([tmp_path]), [FROZEN], 19) == []  # one regime: nothing to compare


def test_training_check_sets_the_study_epochs_against_the_long_run(tmp_path):
    for seed in (0, 1):
        run(tmp_path, f"r8_s{seed}", 0.115 + 0.1 * seed, seed, rank=8)
    run(tmp_path, "r4_s0", 0.5, 0, rank=4)
    run(tmp_path, "long_r8_s0", 0.1, 0, rank=8, epochs=30)
    run(tmp_path, "long_trained", 0.1, 0, rank=8, epochs=30, train_embedder=True)  # other embedder setting
    check, = training_checks(read_study([tmp_path]), FROZEN)
    assert (check.task, check.rank, check.seeds, check.study_epochs, check.long_epochs) == ("darcy", 8, [0], 6, 30)
    assert check.study_test == pytest.approx(0.115) and check.long_test == pytest.approx(0.1)
    assert check.study_val == pytest.approx(0.115) and check.long_val == pytest.approx(0.1)
    assert check.ratio == pytest.approx(1.15)
    assert training_checks(read_study([tmp_path]), Regime(False, 5.0)) == []
