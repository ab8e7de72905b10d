"""The method specs: the registry against choices.py, each spec's weight-change rule against its
layer, PEFT export refusals, and a method defined only here run through validation, stage 3,
saving and `analyze` (what adding a method takes: one module like the one below)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from orca_lora import choices
from orca_lora.adapters.bottleneck import add_bottleneck_adapters
from orca_lora.adapters.inject import LinearAdapterMethod, add_adapters
from orca_lora.adapters.io import save_peft_adapter
from orca_lora.adapters.lora import LoRALinear, lora_product
from orca_lora.adapters.spec import METHODS, WeightChange, get_method, register_method
from orca_lora.config import ConfigError, Stage3Config
from orca_lora.config_load import load_config
from orca_lora.pipeline import run_pipeline
from orca_lora.reports.weight_report import analyze_runs

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_the_registry_holds_exactly_the_names_of_choices_py():
    assert set(METHODS) == set(choices.METHODS)
    assert all(spec.name == name for name, spec in METHODS.items())


def test_flags_of_the_shipped_methods():
    exported = {name for name, spec in METHODS.items() if spec.peft_export}
    assert exported == {"lora", "lora-plus", "delta-lora", "dylora", "dora", "qlora", "ibp-lora"}
    assert {name for name, spec in METHODS.items() if not spec.mergeable} == {"houlsby", "full", "linear"}
    assert {name for name, spec in METHODS.items() if not spec.uses_targets} == {"full", "linear"}


def trained_layer(method: str, seed: int = 0, **options) -> nn.Module:
    """An adapter layer on a random Linear with a nonzero B, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(10, 7).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(7, 10, generator=generator, dtype=torch.float64))
    layer = get_method(method).layer(base, rank=3, alpha=6.0, generator=generator, **options).double().eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(7, 3, generator=generator, dtype=torch.float64))
        if method == "dora":
            layer.lora_magnitude_vector.mul_(1.5)
    return layer


@pytest.mark.parametrize("method,rslora", [("lora", False), ("lora", True), ("lora-plus", False),
                                           ("dylora", False), ("delta-lora", False), ("dora", False)])
def test_weight_change_equals_the_merged_layer_minus_w0(method, rslora):
    layer = trained_layer(method, use_rslora=rslora)
    source_weight = layer.base_layer.weight.detach().clone()
    if method == "delta-lora":  # training moved W0 itself
        with torch.no_grad():
            layer.base_layer.weight.add_(0.1 * torch.randn(7, 10, generator=torch.Generator().manual_seed(5),
                                                           dtype=torch.float64))
    params = {key: value.detach().clone() for key, value in layer.state_dict().items()}
    rule = get_method(method).weight_change
    assert set(rule.needs) <= set(params)
    change = rule.compute(params, lambda: source_weight, Stage3Config(method=method, alpha=6.0, rslora=rslora))
    layer.merge()
    torch.testing.assert_close(change, layer.base_layer.weight.detach() - source_weight)


def test_qlora_change_is_the_learned_part_without_the_quantization_error():
    layer = trained_layer("qlora")
    params = {key: value.detach().clone() for key, value in layer.state_dict().items()}
    change = get_method("qlora").weight_change.compute(params, lambda: None, Stage3Config(method="qlora", alpha=6.0))
    dequantized = layer.base_layer.dequantized_weight(torch.float64)
    layer.merge()
    torch.testing.assert_close(change, layer.merged_weight - dequantized)


def test_plain_lora_changes_need_no_source_body():
    layer = trained_layer("lora")
    params = dict(layer.state_dict())

    def no_body():
        raise AssertionError("a LoRA update is s B A; it must not load W0")

    change = get_method("lora").weight_change.compute(params, no_body, Stage3Config(alpha=6.0))
    torch.testing.assert_close(change, 2.0 * params["lora_B"] @ params["lora_A"])


def test_full_change_subtracts_the_source_weight():
    trained, source = torch.ones(3, 2), torch.full((3, 2), 0.25, dtype=torch.float64)
    change = get_method("full").weight_change.compute({"weight": trained}, lambda: source, Stage3Config(method="full"))
    torch.testing.assert_close(change, torch.full((3, 2), 0.75, dtype=torch.float64))


def test_rules_cover_the_lora_family_and_full_fine_tuning():
    analysed = {name for name, spec in METHODS.items() if spec.weight_change is not None}
    assert {"lora", "lora-plus", "delta-lora", "dylora", "dora", "qlora", "full"} <= analysed
    assert "linear" not in analysed  # only the head trains


@pytest.mark.parametrize("method", ["mora", "sbora-fa", "sbora-fb"])
def test_methods_without_a_peft_layout_are_named_when_saving(method, swin, tmp_path):
    add_adapters(swin, ranks=2, method=method)
    with pytest.raises(ValueError, match=f"method {method} has no PEFT format"):
        save_peft_adapter(swin, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_houlsby_has_no_peft_layout_either(swin, tmp_path):
    add_bottleneck_adapters(swin, ranks=2)
    with pytest.raises(ValueError, match="method houlsby has no PEFT format"):
        save_peft_adapter(swin, tmp_path / "adapter")


# A method only this test knows, written as a method module would be: its layer, rule and spec.
class ScaledLoRALinear(LoRALinear):
    """LoRA at twice the scale, s = 2 alpha / r."""

    method = "scaled-lora"

    @property
    def scaling(self) -> float:
        return 2 * super().scaling


def scaled_change(params, frozen_weight, stage3: Stage3Config) -> torch.Tensor:
    return 2 * lora_product(params, stage3)


class ScaledLoRA(LinearAdapterMethod):
    name, layer = "scaled-lora", ScaledLoRALinear
    mergeable = True
    weight_change = WeightChange(needs=("lora_A", "lora_B"), compute=scaled_change)

    def validate(self, stage3: Stage3Config) -> None:
        super().validate(stage3)
        if stage3.rslora:
            raise ConfigError("stage3.rslora: scaled-lora fixes its own scale; set it to false")


@pytest.fixture
def scaled_lora(monkeypatch):
    """The method registered, and its name in choices.py's table, for one test."""
    monkeypatch.setattr(choices, "METHODS", (*choices.METHODS, ScaledLoRA.name))
    register_method(ScaledLoRA)
    yield METHODS[ScaledLoRA.name]
    del METHODS[ScaledLoRA.name]


def test_an_unregistered_method_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="stage3.method: 'scaled-lora' is not one of"):
        load_config(None, ["stage3.method=scaled-lora"])


def test_a_registry_out_of_step_with_choices_py_fails(scaled_lora, monkeypatch):
    monkeypatch.setattr(choices, "METHODS", tuple(name for name in choices.METHODS if name != "scaled-lora"))
    with pytest.raises(RuntimeError, match=r"registered but not listed \['scaled-lora'\]"):
        get_method("lora")


@pytest.mark.slow
def test_a_new_method_runs_through_validation_stage3_saving_and_analyze(scaled_lora, tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="stage3.rslora: scaled-lora"):
        load_config(QUICKSTART, tiny_overrides + ["stage3.method=scaled-lora", "stage3.rslora=true"])
    overrides = tiny_overrides + ["stage3.method=scaled-lora", "stage1.epochs=1", "trainer.max_epochs=1",
                                  "stage3.save_merged=true"]
    result = run_pipeline(load_config(QUICKSTART, overrides))
    assert result.metrics.method == "scaled-lora" and np.isfinite(result.metrics.test_error)
    stage3 = result.directory / "stage3"
    assert not (stage3 / "adapter").exists()  # no PEFT layout: PEFT's scale is not this method's
    trained = load_file(str(stage3 / "trainable.safetensors"))
    merged = load_file(str(stage3 / "merged.safetensors"))
    analysis = analyze_runs([result.directory], tmp_path / "analysis")
    assert analysis.runs == {result.directory.name: "scaled-lora"} and analysis.spectra
    alpha = load_config(result.directory / "config.yaml").stage3.alpha
    for spectrum in analysis.spectra:
        lora_A, lora_B = (trained[f"model.{spectrum.module}.{name}"].double() for name in ("lora_A", "lora_B"))
        change = 2 * alpha / lora_A.shape[0] * lora_B @ lora_A
        sigma = np.linalg.svd(change.numpy(), compute_uv=False)
        np.testing.assert_allclose(spectrum.diagnostic.singular_values, sigma, rtol=1e-6, atol=1e-9 * sigma[0])
        assert f"{spectrum.module}.base_layer.weight" in merged
