import hashlib
import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from orca_lora.choices import METHODS
from orca_lora.config import Config, ConfigError, run_directory, saved_config_matches, section_hash, to_yaml
from orca_lora.config_load import load_config


def write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_load_and_round_trip(tmp_path):
    config = load_config()
    assert isinstance(config, Config)
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == Config(output=config.output.__class__(name="resolved"))


def test_yaml_and_overrides_apply_in_order(tmp_path):
    path = write_yaml(tmp_path, {"seed": 3, "stage3": {"rank": 4, "method": "dora"}})
    config = load_config(path, ["stage3.rank=16", "trainer.devices=2"])
    assert config.seed == 3
    assert config.stage3.rank == 16
    assert config.stage3.method == "dora"
    assert config.trainer.devices == 2
    assert config.output.name == "experiment"


@pytest.mark.parametrize(
    "override, key",
    [
        ("stage3.rank=0", "stage3.rank"),
        ("stage3.method=lorra", "stage3.method"),
        ("stage1.distance=wasserstein", "stage1.distance"),
        ("stage2.decision=median", "stage2.decision"),
        ("stage2.quantile=1.5", "stage2.quantile"),
        ("stage3.lr=-0.1", "stage3.lr"),
        ("task.name=imagenet", "task.name"),
        ("task.file=/no/such/file.mat", "task.file"),
        ("source.checkpoint=/no/such/weights.safetensors", "source.checkpoint"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
        ("stage3.foo=1", "stage3.foo"),
        ("stage3.rank=many", "stage3.rank"),
        ("task.name=planted-shift task.planted_k=0", "task.planted_k"),
        ("task.name=planted-shift task.planted_angle=4.0", "task.planted_angle"),
        ("task.name=planted-shift task.planted_planes=-1", "task.planted_planes"),
        ("task.name=planted-function task.planted_scale=0", "task.planted_scale"),
        ("task.name=planted-shift task.resolution=16", "task.resolution"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override.split())


@pytest.mark.parametrize("method", ["lora", "ibp-lora", "dora", "mora"])
def test_alpha_must_be_positive_for_the_methods_it_scales(method):
    with pytest.raises(ConfigError, match=rf"stage3\.alpha: 0\.0 must be > 0 for {method}.*stage3\.alpha=16"):
        load_config(None, [f"stage3.method={method}", "stage3.alpha=0"])
    assert load_config(None, ["stage3.method=full", "stage3.alpha=0"]).stage3.alpha == 0  # full has no adapter


def test_bad_choice_lists_valid_choices():
    with pytest.raises(ConfigError, match=re.escape(", ".join(METHODS))):
        load_config(None, ["stage3.method=lorra"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="stage3.dropout"):
        load_config(None, ["stage3.method=delta-lora", "stage3.dropout=0.1"])
    with pytest.raises(ConfigError, match="stage3.dylora_min_rank"):
        load_config(None, ["stage3.method=dylora", "stage3.rank=4", "stage3.dylora_min_rank=5"])
    with pytest.raises(ConfigError, match="stage2.budget"):
        load_config(None, ["stage2.alpha0=2", "stage2.budget=1000"])
    with pytest.raises(ConfigError, match="task.n_train"):
        load_config(None, ["task.n_train=null"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["stage3.rank"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_top_level_section(tmp_path):
    path = write_yaml(tmp_path, {"stage4": {"rank": 1}})
    with pytest.raises(ConfigError, match="stage4"):
        load_config(path)


def test_section_hash_tracks_only_named_sections():
    base = load_config()
    changed_stage3 = load_config(None, ["stage3.rank=4"])
    assert section_hash(base, "task", "stage1") == section_hash(changed_stage3, "task", "stage1")
    assert section_hash(base, "stage3") != section_hash(changed_stage3, "stage3")


def test_keys_added_later_leave_the_hash_of_their_default_unchanged():
    base = load_config()
    payload = {"task": {key: value for key, value in asdict(base.task).items() if not key.startswith("planted_")}}
    before = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert section_hash(base, "task") == before
    assert section_hash(load_config(None, ["task.planted_k=2"]), "task") != before
    assert section_hash(base, "stage3") != section_hash(load_config(None, ["stage3.body_stochastic_depth=false"]),
                                                       "stage3")


def test_a_run_saved_before_a_later_key_existed_matches_while_the_key_is_at_its_default(tmp_path):
    config = load_config()
    old_text = "\n".join(line for line in to_yaml(config).splitlines() if "planted_" not in line)
    saved = tmp_path / "config.yaml"
    saved.write_text(old_text + "\n")
    assert saved.read_text() != to_yaml(config)  # the text differs; the run is the same
    assert saved_config_matches(saved, config)
    assert not saved_config_matches(saved, load_config(None, ["task.planted_k=2"]))
    assert not saved_config_matches(saved, load_config(None, ["stage3.rank=4"]))
    saved.write_text(to_yaml(config) + "removed_section: {a: 1}\n")
    assert not saved_config_matches(saved, config)  # a key since removed: nothing to compare


def test_run_directory_holds_resolved_config(tmp_path):
    config = load_config(None, [f"output.root={tmp_path}", "output.name=demo", "stage3.rank=2"])
    directory = run_directory(config)
    assert directory == tmp_path / "demo"
    assert load_config(directory / "config.yaml").stage3.rank == 2


def test_ibp_r_max_null_is_stage2_r_max_in_the_loaded_and_saved_config():
    ibp = ["stage3.method=ibp-lora", "stage2.allocation=flat", "stage2.r_max=12"]
    resolved = load_config(None, ibp)
    assert resolved.stage3.ibp_r_max == 12
    assert yaml.safe_load(to_yaml(resolved))["stage3"]["ibp_r_max"] == 12
    explicit = load_config(None, [*ibp, "stage3.ibp_r_max=12"])
    assert section_hash(resolved, "stage3") == section_hash(explicit, "stage3")  # the same stage 3 runs
    assert load_config(None, [*ibp, "stage3.ibp_r_max=5"]).stage3.ibp_r_max == 5
    assert load_config(None).stage3.ibp_r_max is None, "other methods keep the null, and their stage-3 hash"


def test_allocation_and_matched_budget_are_checked():
    assert load_config(None, ["stage2.allocation=uniform"]).stage2.allocation == "uniform"
    with pytest.raises(ConfigError, match=r"stage2.allocation.*gap-relative.*uniform"):
        load_config(None, ["stage2.allocation=even"])
    with pytest.raises(ConfigError, match=r"stage2.allocation: 'ibp' is now called 'gap-relative'"):
        load_config(None, ["stage2.allocation=ibp"])
    with pytest.raises(ConfigError, match=r"stage2.gap_reference: only allocation 'gap'"):
        load_config(None, ["stage2.gap_reference=1.0"])
    with pytest.raises(ConfigError, match=r"stage2.gap_reference: 0.0 must be > 0"):
        load_config(None, ["stage2.allocation=gap", "stage2.gap_reference=0.0"])
    with pytest.raises(ConfigError, match=r"stage2.match_uniform_budget.*drop stage2.alpha0"):
        load_config(None, ["stage2.match_uniform_budget=true", "stage2.budget=1000"])


def test_merged_weights_are_for_mergeable_adapters_only():
    assert load_config(None, ["stage3.method=mora", "stage3.save_merged=true"]).stage3.save_merged
    for method in ("houlsby", "full", "linear"):
        with pytest.raises(ConfigError, match=f"stage3.save_merged: {method} has no adapters to merge"):
            load_config(None, [f"stage3.method={method}", "stage3.save_merged=true"])


def test_importing_the_config_leaves_torch_unimported():
    """Names are checked before any heavy import; only the method specs (validate's last step) need torch."""
    code = "import sys, orca_lora.config; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("allocation, stage3, key", [
    ("eva", {"method": "dora"}, "stage3.method"),
    ("adalora", {"method": "lora-plus"}, "stage3.method"),
    ("adalora", {"early_stopping_patience": 3}, "stage3.early_stopping_patience"),
    ("gradient", {"method": "full"}, "stage3.method"),
])
def test_stage_3_allocations_refuse_what_they_cannot_train(allocation, stage3, key):
    from orca_lora.config import ConfigError, Stage3Config
    from orca_lora.config_load import _validate_training_allocation

    with pytest.raises(ConfigError, match=key):
        _validate_training_allocation(allocation, Stage3Config(**stage3))
