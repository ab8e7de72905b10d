import subprocess
import sys
from pathlib import Path

import pytest

from orca_lora import cli
from orca_lora.config_load import load_config
from orca_lora.models.pretrain import PretrainResult
from orca_lora.records import GapRow, RunMetrics
from orca_lora.run_files import RunFiles, write_gaps

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
OVERRIDES = ["stage3.rank=4", "stage2.enabled=false", "stage3.rank_map={body.layers.0.blocks.0.attn.qkv: 2}",
             "trainer.limit_train_batches=0.5", "stage3.targets=[qkv$, fc2$]", "task.n_train=64"]


def run_cli(arguments: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(arguments)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def with_sets(*overrides: str) -> list[str]:
    return [part for item in overrides for part in ("--set", item)]


def test_help_of_the_installed_command_lists_every_command():
    script = Path(sys.executable).parent / "orca-lora"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "orca_lora.cli"]
    done = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for name in ("run", "gap", "check", "pretrain-source", "sweep", "table", "hypothesis", "plot"):
        assert f"    {name} " in done.stdout or f"    {name}\n" in done.stdout, name


def test_check_prints_yaml_that_load_config_reads_back(capsys, tmp_path):
    code, out, err = run_cli(["check", str(QUICKSTART), *with_sets(*OVERRIDES)], capsys)
    assert code == 0 and err == ""
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(out)
    expected = load_config(QUICKSTART, OVERRIDES)
    assert load_config(resolved) == expected
    assert expected.stage3.rank == 4 and expected.stage3.targets == ["qkv$", "fc2$"]
    assert expected.output.name == "quickstart"


@pytest.mark.parametrize("override, named", [
    ("stage3.rnak=3", "unknown key 'stage3.rnak'"),
    ("stage3.rank=abc", "key 'stage3.rank'"),
    ("stage3.rank=0", "stage3.rank: 0 must be >= 1"),
    ("stage3.method=lorra", "stage3.method: 'lorra' is not one of"),
    ("stage3.rank", "override 'stage3.rank' is not of the form key=value"),
])
def test_a_bad_set_is_exit_code_2_and_one_line_naming_the_key(override, named, capsys):
    code, out, err = run_cli(["check", str(QUICKSTART), "--set", override], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("orca-lora check: error: ")
    assert named in err


def test_a_missing_config_file_is_exit_code_2(capsys, tmp_path):
    code, _, err = run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml does not exist" in err and len(err.strip().splitlines()) == 1


def test_errors_from_the_library_are_one_line_without_key_error_quotes(capsys, monkeypatch):
    def fail(config, last_stage=3):
        raise KeyError("stage3.rank_map: 'x' is not an adapted module")

    monkeypatch.setattr("orca_lora.pipeline.run_pipeline", fail)
    code, _, err = run_cli(["run", str(QUICKSTART)], capsys)
    assert code == 2 and err == "orca-lora run: error: stage3.rank_map: 'x' is not an adapted module\n"


def test_debug_re_raises_the_library_error_with_its_traceback(monkeypatch):
    def fail(config, last_stage=3):
        raise KeyError("a bug deep in the library")

    monkeypatch.setattr("orca_lora.pipeline.run_pipeline", fail)
    with pytest.raises(KeyError, match="a bug deep in the library"):
        cli.main(["--debug", "run", str(QUICKSTART)])


def test_run_passes_the_resolved_config_and_prints_the_metrics(capsys, monkeypatch, tmp_path):
    from orca_lora.pipeline import RunResult

    seen = {}

    def fake(config, last_stage=3):
        seen["config"], seen["last_stage"] = config, last_stage
        return RunResult(tmp_path, RunMetrics(
            task="darcy", method="lora", rank=2, gap_aware=True, seed=0, test_error=0.01234, baseline_error=0.5,
            best_val_error=0.011, trainable_params=123456, ranks={}, mean_gap=None, alignment={},
            stage_seconds={"stage1": 1.0, "stage2": 2.0, "stage3": 3.0}, device="cpu", torch="2"))

    monkeypatch.setattr("orca_lora.pipeline.run_pipeline", fake)
    code, out, _ = run_cli(["run", str(QUICKSTART), *with_sets("stage3.rank=2")], capsys)
    assert code == 0 and seen == {"config": load_config(QUICKSTART, ["stage3.rank=2"]), "last_stage": 3}
    assert f"run directory: {tmp_path}" in out and "test error (darcy, lora): 0.0123" in out
    assert "trivial predictor: 0.5000" in out and "trainable parameters: 123,456" in out


def test_gap_prints_the_gap_and_rank_table(capsys, monkeypatch, tmp_path):
    from orca_lora.pipeline import RunResult

    run = RunFiles(tmp_path)
    write_gaps(run, [GapRow(0, "layers.0.blocks.0", 16, 0.25, 0.3, 0.4, 0.1, 0.4, 0.0, 3),
                     GapRow(1, "layers.0.blocks.1", 16, 1.5, 0.3, 0.002, 1.1, 1.9, 1.2, 7)])
    seen = {}

    def fake(config, last_stage=3):
        seen["last_stage"] = last_stage
        return RunResult(tmp_path, None)

    monkeypatch.setattr("orca_lora.pipeline.run_pipeline", fake)
    code, out, _ = run_cli(["gap", str(QUICKSTART)], capsys)
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert code == 0 and seen["last_stage"] == 2
    assert rows == [["0", "layers.0.blocks.0", "16", "0.25", "0.3", "0.400", "[0.1,", "0.4]", "0", "3"],
                    ["1", "layers.0.blocks.1", "16", "1.5", "0.3", "0.002", "[1.1,", "1.9]", "1.2", "7"]]

    run.gaps.unlink()
    code, out, _ = run_cli(["gap", str(QUICKSTART)], capsys)
    assert code == 0 and "no gaps measured" in out


def test_pretrain_source_builds_the_configured_body(capsys, monkeypatch, tmp_path):
    calls = []

    def fake(pretrain, data_root, seed, trainer_options=None):
        calls.append((pretrain.embed_dim, data_root, seed, trainer_options))
        path = tmp_path / "body.safetensors"
        return path, (PretrainResult(path, 0.75, 0.25, 12.0) if len(calls) == 1 else None)

    monkeypatch.setattr("orca_lora.models.pretrain.cached_source_body_path", fake)
    arguments = ["pretrain-source", str(QUICKSTART), *with_sets("source.pretrain.embed_dim=24", "data_root=/d")]
    code, out, _ = run_cli(arguments, capsys)
    assert code == 0 and "held-out accuracy 0.750 (chance 0.250)" in out
    assert calls == [(24, "/d", 0, {"accelerator": "cpu"})]
    code, out, _ = run_cli(arguments, capsys)
    assert code == 0 and "already built" in out


def test_a_failed_hub_download_is_one_line(capsys, monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("timm.create_model", offline)
    overrides = ["task.name=procedural", "task.n_train=8", "task.n_test=4", "source.pretrained=true",
                 "source.model=swin_tiny_patch4_window7_224", f"output.root={tmp_path / 'runs'}"]
    code, _, err = run_cli(["run", str(QUICKSTART), *with_sets(*overrides)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "checkpoint" in err
    assert not (tmp_path / "runs").exists()


def test_sweep_prints_one_run_command_per_point(capsys, tmp_path, tiny_sweep_file):
    code, out, _ = run_cli(["sweep", str(tiny_sweep_file), "--print-commands", "--set", f"output.root={tmp_path}"],
                           capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 5 and all(line.startswith("orca-lora run ") for line in lines)
    assert not (tmp_path / "tiny").exists()


def test_sweep_with_a_bad_point_is_one_line_naming_the_point(capsys, tmp_path, tiny_sweep_file):
    tiny_sweep_file.write_text(tiny_sweep_file.read_text().replace("stage3.rank: [2]", "stage3.rank: [2, 0]"))
    code, _, err = run_cli(["sweep", str(tiny_sweep_file), "--set", f"output.root={tmp_path}"], capsys)
    assert code == 2 and "point darcy_rank0_gap-aware" in err and "stage3.rank" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("command", ["hypothesis", "table", "plot", "analyze"])
def test_reading_commands_name_a_missing_directory(command, capsys, tmp_path):
    code, _, err = run_cli([command, str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1
