"""IBP-LoRA: the gated layer and its pruning, the posterior rank of a planted low-rank target, the
method through config validation, and a tiny pipeline whose records and PEFT export are the pruned
adapter's."""
import copy
import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from torch import nn

from orca_lora import choices
from orca_lora.adapters.ibp_lora import IBPLoRALinear, ibp_layers, prune, total_kl
from orca_lora.adapters.inject import match_targets, replace_modules
from orca_lora.adapters.io import CONFIG_NAME, save_peft_adapter
from orca_lora.adapters.lora import LORA_CHANGE, LoRALinear
from orca_lora.adapters.spec import METHODS, get_method
from orca_lora.config import ConfigError, Stage3Config
from orca_lora.config_load import load_config
from orca_lora.pipeline import run_pipeline
from orca_lora.reports.run_plots import plot_run
from orca_lora.reports.weight_report import analyze_runs
from orca_lora.run_files import RunFiles, read_marker, read_sample_errors

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def gated_layer(logits, seed: int = 0, **options) -> IBPLoRALinear:
    """An IBP-LoRA layer on a random 10 -> 7 Linear with a nonzero B and the given gate logits."""
    generator = torch.Generator().manual_seed(seed)
    layer = IBPLoRALinear(nn.Linear(10, 7).double(), rank=len(logits), alpha=6.0, generator=generator,
                          **options).double().eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator, dtype=torch.float64))
        layer.ibp_logits.copy_(torch.tensor(logits, dtype=torch.float64))
    return layer


def test_evaluation_uses_the_deterministic_gates_and_merges_exactly():
    layer = gated_layer([2.0, -1.0, 0.5], use_rslora=True)
    x = torch.randn(4, 10, dtype=torch.float64)
    q = torch.sigmoid(layer.ibp_logits)
    expected = layer.base_layer(x) + layer.scaling * x @ (layer.lora_B * q @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    assert layer.posterior_rank == 2 and "prior_mass=1, temperature=0.6667, posterior_rank=2" in layer.extra_repr()


def test_pruning_keeps_the_open_components_as_a_plain_lora():
    layer = gated_layer([2.0, -1.0, 0.5, -3.0])
    x = torch.randn(4, 10, dtype=torch.float64)
    dropped = copy.deepcopy(layer)
    with torch.no_grad():
        dropped.lora_B[:, [1, 3]] = 0.0  # what pruning leaves out
    pruned = layer.pruned()
    assert isinstance(pruned, LoRALinear) and pruned.rank == 2 and pruned.alpha == layer.alpha
    torch.testing.assert_close(pruned(x), dropped(x))
    # `analyze` reads the pruned tensors as a plain LoRA's: the change is what pruning kept
    saved = {name: getattr(pruned, name).detach() for name in ("lora_A", "lora_B")}
    change = get_method("ibp-lora").weight_change.compute(saved, None, Stage3Config(alpha=layer.alpha))
    torch.testing.assert_close(change, dropped.delta_weight())
    closed = gated_layer([-1.0, -2.0])
    assert closed.pruned() is closed.base_layer


def test_training_draws_relaxed_gates_and_the_kl_starts_small():
    layer = gated_layer([0.0, 0.0, 0.0], prior_mass=2.0).train()
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.manual_seed(0)
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)  # a fresh gate draw per forward
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    fresh = IBPLoRALinear(nn.Linear(10, 7), rank=6, prior_mass=2.0)  # q(v) and E q(z) start at the prior
    assert 0 <= float(total_kl(fresh).detach()) < 3.0
    assert total_kl(nn.Linear(2, 2)) is None


def planted_rank(k: int, prior_mass: float, d: int = 24, r_max: int = 12, n: int = 512, steps: int = 800) -> int:
    """Posterior rank of one IBP-LoRA Linear fitted by Adam on the ELBO to y = (W0 + U V^T) x + noise."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = nn.Linear(d, d)
    u, v = (torch.randn(d, k, generator=generator) / d ** 0.25 for _ in range(2))
    x = torch.randn(n, d, generator=generator)
    with torch.no_grad():
        y = base(x) + x @ v @ u.T + 0.05 * torch.randn(n, d, generator=generator)
    layer = IBPLoRALinear(base, r_max, alpha=r_max, prior_mass=prior_mass, generator=generator).train()
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        batch = torch.randint(0, n, (64,), generator=generator)
        loss = (layer(x[batch]) - y[batch]).pow(2).mean() + layer.kl() / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer.posterior_rank


@pytest.mark.parametrize("k", [2, 4])
def test_the_posterior_rank_finds_a_planted_rank(k):
    assert abs(planted_rank(k, prior_mass=2.0) - k) <= 1


def test_a_vanishing_prior_mass_shuts_the_gates():
    assert planted_rank(4, prior_mass=1e-3, steps=300) == 0


def test_the_method_is_registered_and_refuses_ranks_without_masses():
    assert "ibp-lora" in METHODS and "ibp-lora" in choices.METHODS
    spec = get_method("ibp-lora")
    assert spec.peft_export and spec.mergeable and spec.weight_change is LORA_CHANGE  # of the pruned adapters
    for setting in ("stage2.allocation=uniform", "stage2.enabled=false"):
        with pytest.raises(ConfigError, match=r"stage2.allocation: ibp-lora .* use stage2.allocation flat .*, gap "
                                              r"or gap-relative"):
            load_config(None, ["stage3.method=ibp-lora", setting])
    with pytest.raises(ConfigError, match="stage3.ibp_temperature: -1.0 must be > 0"):
        load_config(None, ["stage3.method=ibp-lora", "stage2.allocation=flat", "stage3.ibp_temperature=-1"])
    with pytest.raises(ConfigError, match="stage3.ibp_r_max: 0 must be >= 1"):
        load_config(None, ["stage3.method=ibp-lora", "stage2.allocation=flat", "stage3.ibp_r_max=0"])
    with pytest.raises(ValueError, match="ibp-lora needs stage 2's prior masses"):
        spec.prepare(nn.Module(), Stage3Config(method="ibp-lora", ibp_r_max=4), {}, 0)


def test_peft_loads_the_pruned_adapters_with_their_rank_pattern(swin, images, tmp_path):
    base_copy = copy.deepcopy(swin)
    matched = match_targets(swin, [r"\.attn\.qkv$", r"\.mlp\.fc1$"])
    generator = torch.Generator().manual_seed(0)
    layers = {name: IBPLoRALinear(module, 6, alpha=8.0, generator=generator) for name, module in matched.items()}
    for index, layer in enumerate(layers.values()):
        with torch.no_grad():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=generator))
            layer.ibp_logits.copy_(torch.linspace(3.0, -3.0, 6) + index % 3 - 1)  # 2, 3 or 4 open
    closed = next(iter(layers))
    layers[closed].ibp_logits.data.fill_(-4.0)
    replace_modules(swin, layers)
    posterior = prune(swin.eval())
    assert posterior.ranks[closed] == 0 and set(posterior.ranks.values()) == {0, 2, 3, 4}
    assert set(posterior.caps.values()) == {6} and not ibp_layers(swin)
    save_peft_adapter(swin, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert closed not in config["target_modules"] and config["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(base_copy, tmp_path / "adapter").eval()
    torch.testing.assert_close(theirs(images), swin(images), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_tiny_flat_prior_run_reports_its_pruned_adapter(tiny_overrides):
    overrides = tiny_overrides + ["stage3.method=ibp-lora", "stage2.allocation=flat", "stage2.alpha0=3",
                                  "stage2.r_max=4", "stage1.epochs=1", "trainer.max_epochs=1"]
    result = run_pipeline(load_config(QUICKSTART, overrides))
    metrics = result.metrics
    assert set(metrics.posterior_ranks) == set(metrics.posterior_caps) == set(metrics.ranks)
    assert set(metrics.posterior_caps.values()) == {4}
    assert "\n  ibp_r_max: 4\n" in RunFiles(result.directory).config.read_text()  # the saved config says what ran
    assert all(0 <= rank <= 4 for rank in metrics.posterior_ranks.values())
    assert metrics.trained_params > metrics.trainable_params
    saved = json.loads((result.directory / "metrics.json").read_text())
    assert saved["posterior_ranks"] == metrics.posterior_ranks and saved["posterior_caps"] == metrics.posterior_caps
    # the test split was scored on the pruned model: its per-sample errors average to the reported error,
    # and so do its validation errors; the unpruned model's, which chose the checkpoint, stand beside them
    errors = read_sample_errors(RunFiles(result.directory))
    assert np.isclose(errors.test.mean(), metrics.test_error, rtol=1e-5)
    assert np.isclose(errors.val.mean(), metrics.best_val_error, rtol=1e-5)
    stage3 = read_marker(RunFiles(result.directory), "stage3").result
    assert stage3["best_val_error"] == metrics.best_val_error and 0 <= stage3["unpruned_val_error"] <= 1
    assert metrics.unpruned_val_error == stage3["unpruned_val_error"]  # named so in metrics.json too
    # `analyze` reads the pruned adapters at their posterior ranks, leaving out the modules pruned to rank 0
    kept = {name: rank for name, rank in metrics.posterior_ranks.items() if rank > 0}
    analysed = analyze_runs([result.directory], result.directory / "analysis")
    assert {(s.module, s.diagnostic.rank) for s in analysed.spectra} == set(kept.items())
    adapter = RunFiles(result.directory).adapter
    config = peft.LoraConfig.from_pretrained(str(adapter))
    assert set(config.target_modules) == set(kept)
    assert {name: config.rank_pattern.get(name.replace(".", r"\."), config.r) for name in kept} == kept
    assert RunFiles(result.directory).plots / "posterior_ranks.png" in plot_run(result.directory)
