"""Checks that need only the config and the body's shapes run before any training, in `check`, `run` and
`sweep` alike."""
from pathlib import Path

import pytest

from orca_lora import cli
from orca_lora.config import ConfigError
from orca_lora.config_load import load_config
from orca_lora.preflight import body_architecture, check_against_body
from orca_lora.sweeps.sweep import load_sweep

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def sets(overrides: list[str]) -> list[str]:
    return [part for item in overrides for part in ("--set", item)]


@pytest.fixture(scope="module")
def architecture(tiny_settings):
    return body_architecture(load_config(QUICKSTART, tiny_settings).source)


@pytest.mark.parametrize("overrides, key", [
    (["stage2.enabled=false", "stage3.rank=99"], "stage3.rank: 99 is above min(d_out, d_in) = 24"),
    (["stage2.allocation=uniform", "stage3.rank=25"], "stage3.rank: 25 is above"),
    (["stage2.budget=10"], "stage2.budget: a budget of 10 adapter parameters is outside the feasible range"),
    (["stage2.match_uniform_budget=true", "stage3.rank=64", "stage2.r_max=2"],
     "stage3.rank (through stage2.match_uniform_budget)"),
])
def test_impossible_ranks_and_budgets_fail_against_the_body(overrides, key, tiny_settings, architecture):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        check_against_body(load_config(QUICKSTART, tiny_settings + overrides), architecture)
    check_against_body(load_config(QUICKSTART, tiny_settings), architecture)


def test_check_warns_of_a_missing_gpu_and_run_refuses_it(tiny_overrides, capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gpu = sets(tiny_overrides + ["trainer.accelerator=gpu"])
    assert cli.main(["check", str(QUICKSTART), *gpu]) == 0
    assert "warning: trainer.accelerator=gpu but this machine has no GPU" in capsys.readouterr().err
    assert cli.main(["run", str(QUICKSTART), *gpu]) == 2
    assert "trainer:" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_an_empty_config_is_refused_unless_defaults(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert cli.main(["check", str(empty)]) == 2
    error = capsys.readouterr().err
    assert "the config is empty" in error and "task, source, stage1" in error and "--defaults" in error
    assert load_config(empty, allow_empty=True).task.name == "darcy"


def test_sweep_points_are_checked_against_the_body_and_bad_yaml_is_one_line(tmp_path, tiny_settings):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nbase: {QUICKSTART}\ngrid:\n  stage3.rank: [2, 99]\n"
                     "set: [stage2.enabled=false]\n")
    with pytest.raises(ConfigError, match="point rank99: stage3.rank: 99 is above"):
        load_sweep(sweep, tiny_settings + [f"output.root={tmp_path}"])
    sweep.write_text("name: s\ngrid: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(sweep)
