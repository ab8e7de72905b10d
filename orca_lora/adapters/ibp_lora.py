"""IBP-LoRA: LoRA whose rank is inferred, per module, under an Indian buffet process prior (Griffiths &
Ghahramani 2005/2011; README, "Stage 3: refine"); the `ibp-lora` method spec.

Each adapted nn.Linear carries r_max rank-1 components, each behind a gate z_k in [0, 1]:

    h = W0 x + b + s B diag(z) A x,   A (r_max x d_in) Kaiming-uniform, B (d_out x r_max) zeros,
                                      s = alpha / r_max (rsLoRA: alpha / sqrt(r_max)), alpha = stage3.alpha.

Prior, per module (each module breaks its own sticks v_1..v_rmax; no stick is shared between modules):
v_j ~ Beta(alpha_i, 1), pi_k = prod_{j<=k} v_j, z_k ~ Bernoulli(pi_k) (Teh, Gorur & Ghahramani 2007),
alpha_i the module's block mass from stage 2 (`GapResult.prior_masses`). Variational posterior
(Kessler et al. 2021; Nalisnick & Smyth 2017): q(v_j) = Kumaraswamy(a_j, b_j), a and b softplus-
parametrised and started at (alpha_i, 1), which is the prior itself; q(z_k) = Bernoulli(q_k), q_k =
sigmoid(logit_k), relaxed to the binary Concrete at temperature `stage3.ibp_temperature` for training.
Stage 3 minimises the negative ELBO, task loss + KL / n_train (rank/ibp.py ibp_kl, one Kumaraswamy sample
of v per step), the KL summed over modules.

Defaults and rules (pinned here):
- r_max per module = min(stage3.ibp_r_max, d_out, d_in); stage3.ibp_r_max None means stage2.r_max (64),
  which `load_config` fills in. Stage 2's own rank for the module is not used: its mass alpha_i is.
- alpha_i: stage 2's `prior_masses`; with stage2.allocation flat every block gets stage2.alpha0 (None:
  stage3.rank), the hypothesis test's prior. A mass of 0 is allowed; the KL uses max(alpha_i, 1e-6).
- temperature 2/3 (Maddison et al. 2017's suggestion for binary Concrete variables).
- q(z_k = 1) starts at the prior's E[pi_k] = (alpha_i / (1 + alpha_i))^k (clipped to [1e-3, 1 - 1e-3]):
  the leading components start open and learn first, which gathers the signal in them. Started all
  open (q = 0.95), every component takes a share of the signal and the KL closes none: on the
  planted-rank setting of tests/adapters/test_ibp_lora.py (k = 2, 4; r_max = 12) every gate stayed
  open. The gates and sticks learn at stage3.lr with the adapter: at 10 x stage3.lr they open before
  the signal has gathered (posterior ranks 9 to 12 there); at 1 x it finds k or k + 1.
- Validation and test use the deterministic gate z_k = q_k (the posterior probability of the gate).
- After training (best checkpoint restored, before the test split), a module's posterior rank is the
  number of components with q_k > 0.5; the layer is pruned to a plain LoRA of that rank (the gates'
  q_k and the scale folded into B), a module of posterior rank 0 keeps no adapter. The reported test
  error, the saved weights and the PEFT export (per-module `rank_pattern`) are the pruned adapter's.
- Records: metrics.json's `posterior_ranks` and `posterior_caps` (module -> r_max, for right-censoring);
  `trainable_params` counts the pruned model (adapters sum r_i (d_in + d_out), plus the embedder and
  head, as for every method), `trained_params` the one that trained (r_max components, gates, sticks).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orca_lora.adapters.base import AdapterLayer, kaiming_lora_A
from orca_lora.adapters.inject import (LinearAdapterMethod, mark_only_adapters_trainable, match_targets,
                                       replace_modules)
from orca_lora.adapters.lora import LORA_CHANGE, LoRALinear
from orca_lora.adapters.spec import PosteriorRanks, register_method, train_embedder_and_head
from orca_lora.config import ConfigError, Stage2Config, Stage3Config
from orca_lora.rank.ibp import ibp_kl, relaxed_bernoulli_sample

MIN_PRIOR_MASS = 1e-6  # Beta(0, 1) is improper; the KL's log alpha and 1/a need alpha > 0
POSTERIOR_THRESHOLD = 0.5  # a component counts towards the posterior rank when q(z_k = 1) > 0.5
DEFAULT_TEMPERATURE = 2.0 / 3.0


def _softplus_inverse(value: float) -> float:
    """x with softplus(x) = value > 0 (log(e^value - 1), written to hold for tiny values)."""
    return value + math.log(-math.expm1(-value))


class IBPLoRALinear(AdapterLayer):
    """h = W0 x + b + s B diag(z) A x with z_k gated by a truncated stick-breaking IBP; `rank` is r_max."""

    method = "ibp-lora"
    adapter_parameter_names = ("lora_A", "lora_B", "ibp_logits", "ibp_a", "ibp_b")

    def init_adapter(self, generator: torch.Generator | None, *, prior_mass: float = 1.0,
                     temperature: float = DEFAULT_TEMPERATURE) -> None:
        if not (math.isfinite(prior_mass) and prior_mass >= 0):
            raise ValueError(f"prior_mass must be a finite number >= 0 (the IBP mass alpha), got {prior_mass}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weight = self.base_layer.weight
        self.prior_mass, self.temperature = float(prior_mass), float(temperature)
        self.lora_A = nn.Parameter(kaiming_lora_A(self.base_layer, self.rank, generator))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], self.rank, dtype=weight.dtype, device=weight.device))

        def vector(value: float) -> nn.Parameter:
            return nn.Parameter(torch.full((self.rank,), value, dtype=weight.dtype, device=weight.device))

        mass = max(self.prior_mass, MIN_PRIOR_MASS)
        # q(z_k = 1) starts at the prior's E[pi_k] = (alpha / (1 + alpha))^k, kept off 0 and 1
        prior_mean = (mass / (1.0 + mass)) ** torch.arange(1, self.rank + 1, dtype=torch.float64)
        self.ibp_logits = nn.Parameter(torch.logit(prior_mean.clamp(1e-3, 1 - 1e-3)).to(weight))
        # q(v) starts at Kumaraswamy(alpha, 1), which equals the prior Beta(alpha, 1)
        self.ibp_a = vector(_softplus_inverse(mass))
        self.ibp_b = vector(_softplus_inverse(1.0))

    def gate_probabilities(self) -> Tensor:
        """q(z_k = 1) per component."""
        return torch.sigmoid(self.ibp_logits)

    @property
    def posterior_rank(self) -> int:
        return int((self.gate_probabilities() > POSTERIOR_THRESHOLD).sum())

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(A, B diag(q), s): the deterministic gates, as evaluation and merging use them."""
        return self.lora_A, self.lora_B * self.gate_probabilities(), self.scaling

    def gates(self) -> Tensor:
        """A relaxed Bernoulli draw per component while training (torch's global generator, as dropout),
        q(z_k = 1) in evaluation."""
        if self.training:
            return relaxed_bernoulli_sample(self.ibp_logits, self.temperature)
        return self.gate_probabilities()

    def kl(self) -> Tensor:
        """KL(q(v, z) || p(v, z)) of this module's sticks and gates (one sample of v, see rank/ibp.py ibp_kl)."""
        return ibp_kl(F.softplus(self.ibp_a), F.softplus(self.ibp_b), self.ibp_logits,
                      max(self.prior_mass, MIN_PRIOR_MASS))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer(x)
        hidden = F.linear(self.adapter_input(x), self.lora_A) * self.gates()
        out = torch.addmm(base.reshape(-1, base.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), self.lora_B.t(),
                          alpha=self.scaling)
        return out.view(base.shape)

    def pruned(self) -> nn.Module:
        """The layer as a plain LoRA of its posterior rank (the components with q_k > 0.5, in order), or
        its bare base layer at rank 0. Equal to this layer in evaluation, less the dropped components:
        B's kept columns take q_k s / s_r, with s_r the LoRA scale at the pruned rank r."""
        self._check_merged(False)
        keep = self.gate_probabilities() > POSTERIOR_THRESHOLD
        rank = int(keep.sum())
        if rank == 0:
            return self.base_layer
        lora = LoRALinear(self.base_layer, rank, self.alpha, self.use_rslora, self.lora_dropout.p,
                          generator=torch.Generator().manual_seed(0))  # its random A is overwritten below
        factor = self.gate_probabilities()[keep] * self.scaling / lora.scaling
        with torch.no_grad():
            lora.lora_A.copy_(self.lora_A[keep])
            lora.lora_B.copy_(self.lora_B[:, keep] * factor)
        return lora.train(self.training)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, prior_mass={self.prior_mass:g}, temperature={self.temperature:.4g}, "
                f"posterior_rank={self.posterior_rank}")


def ibp_layers(model: nn.Module) -> dict[str, IBPLoRALinear]:
    """{name: layer} of the model's IBP-LoRA layers, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, IBPLoRALinear)}


def total_kl(model: nn.Module) -> Tensor | None:
    """The sum over the model's IBP-LoRA layers of their KL; None when it has none."""
    kls = [layer.kl() for layer in ibp_layers(model).values()]
    return torch.stack(kls).sum() if kls else None


def prune(model: nn.Module) -> PosteriorRanks:
    """Replace every IBP-LoRA layer by its pruned LoRA (or bare base layer); returns the posterior
    ranks and the truncations r_max they were read against."""
    layers = ibp_layers(model)
    posterior = PosteriorRanks({name: layer.posterior_rank for name, layer in layers.items()},
                               {name: layer.rank for name, layer in layers.items()})
    replace_modules(model, {name: layer.pruned() for name, layer in layers.items()})
    return posterior


_MASS_SOURCES = "stage2.allocation flat (every block alpha_0), gap or gap-relative, with stage2.enabled true"


@register_method
class IBPLoRA(LinearAdapterMethod):
    name, layer = "ibp-lora", IBPLoRALinear
    peft_export = mergeable = True
    # trainable.safetensors holds the pruned adapters, plain LoRAs at the posterior ranks (`pruned` rescales B
    # to s = alpha / r of the pruned rank r); `analyze` reads the posterior ranks and leaves out rank-0 modules
    weight_change = LORA_CHANGE

    def options(self, stage3: Stage3Config) -> dict:
        return {**super().options(stage3), "temperature": stage3.ibp_temperature}

    def validate(self, stage3: Stage3Config) -> None:
        super().validate(stage3)
        if not stage3.ibp_temperature > 0:
            raise ConfigError(f"stage3.ibp_temperature: {stage3.ibp_temperature} must be > 0 (default 2/3)")
        if stage3.ibp_r_max is not None and stage3.ibp_r_max < 1:
            raise ConfigError(f"stage3.ibp_r_max: {stage3.ibp_r_max} must be >= 1, or null for stage2.r_max")

    def validate_ranks(self, stage2: Stage2Config) -> None:
        if not stage2.enabled or stage2.allocation == "uniform":
            where = "stage2.enabled is false" if not stage2.enabled else "stage2.allocation is uniform"
            raise ConfigError(f"stage2.allocation: ibp-lora takes each module's IBP prior mass from stage 2, and "
                              f"{where}, which gives none; use {_MASS_SOURCES}")

    def prepare(self, model: nn.Module, stage3: Stage3Config, ranks: Mapping[str, int], seed: int,
                prior_masses: Mapping[str, float] | None = None) -> None:
        """IBP-LoRA layers on the modules stage3.targets select, each with r_max = min(stage3.ibp_r_max,
        d_out, d_in) components and its module's mass from `prior_masses`; stage 2's `ranks` are not read."""
        if prior_masses is None:
            raise ValueError(f"ibp-lora needs stage 2's prior masses (GapResult.prior_masses); use {_MASS_SOURCES}")
        if stage3.ibp_r_max is None:
            raise ValueError("stage3.ibp_r_max is null: load_config sets it to stage2.r_max; give it when "
                             "preparing a model by hand")
        matched = match_targets(model, stage3.targets)
        missing = sorted(set(matched) - set(prior_masses))
        if missing:
            raise KeyError(f"stage 2's prior masses miss adapted modules {missing}; re-run stage 2")
        generator = torch.Generator().manual_seed(seed)
        layers = {name: IBPLoRALinear(module, min(stage3.ibp_r_max, *module.weight.shape), generator=generator,
                                      prior_mass=float(prior_masses[name]), **self.options(stage3))
                  for name, module in matched.items()}
        replace_modules(model, layers)
        mark_only_adapters_trainable(model)
        train_embedder_and_head(model)

    def regularizer(self, model: nn.Module) -> Tensor | None:
        return total_kl(model)

    def finalize(self, model: nn.Module) -> PosteriorRanks:
        return prune(model)
