"""What a config and the source body's shapes show before any training
(README, "Interruptions and failures"): the checks that
`check`, `run` and `sweep` share, so a rank no module can hold or a budget no allocation can meet
fails in seconds, not after stage 1."""
from __future__ import annotations

from torch import nn

from orca_lora.adapters.spec import get_method
from orca_lora.config import Config, ConfigError, SourceConfig
from orca_lora.models.body import build_body
from orca_lora.rank import stage as rank_stage
from orca_lora.rank.allocations.ibp_posterior import check_posterior_modules, read_posterior_ranks
from orca_lora.rank.law_file import check_provenance, read_law_file
from orca_lora.rank.select import trainable_params
from orca_lora.run_files import EMBEDDER_PROJECTION


def body_architecture(source: SourceConfig) -> nn.Module:
    """The source body's layers with random weights: their shapes are all the checks need, and
    building them needs neither the hub, nor the checkpoint, nor the offline body's pretraining."""
    if source.model == "offline":
        from orca_lora.models.pretrain import pretrain_model_kwargs

        return build_body(source.pretrain.model, model_kwargs=pretrain_model_kwargs(source.pretrain))
    return build_body(source.model, model_kwargs=dict(source.model_kwargs))


def check_against_body(config: Config, body: nn.Module, read_other_runs: bool = True,
                       in_channels: int | None = None) -> None:
    """The spectral gap's sample size, targets, rank map, a uniform rank, a stage-2 budget and (unless
    `read_other_runs` is false: a sweep point whose posterior run is another point, not run yet) the
    modules of an ibp-posterior allocation's posterior run against the body's blocks and adapted modules;
    with the task's `in_channels`, that an adapted embedder projection has the body's patch shape."""
    s2, s3 = config.stage2, config.stage3
    rank_stage.check_gap_sample_sizes(body, s2)
    if s2.enabled and s2.law is not None:
        check_provenance(config, read_law_file(s2.law), s2.law)
    if s3.rank_map:
        rank_stage.check_rank_map(body, s3.targets, s3.rank_map)
    if s3.block_ranks:
        rank_stage.check_block_ranks(body, s3.targets, s3.block_ranks)
    if not get_method(s3.method).uses_targets:
        return
    shapes = rank_stage.adapted_module_shapes(body, s3.targets)  # a target typo fails here
    body_channels = body.patch_embed.proj.in_channels
    if EMBEDDER_PROJECTION in shapes and in_channels not in (None, body_channels):
        raise ConfigError(f"stage3.targets: LoRA on {EMBEDDER_PROJECTION} needs a task with the body's "
                          f"{body_channels} input channels (task.name {config.task.name} has {in_channels}); "
                          "drop that target")
    if s2.enabled and s2.posterior_run is not None and read_other_runs:
        check_posterior_modules(read_posterior_ranks(s2.posterior_run), shapes, s2.posterior_run)
    if not s3.rank_map and (not s2.enabled or s2.allocation == "uniform"):
        name, shape = min(shapes.items(), key=lambda item: min(item[1].d_out, item[1].d_in))
        cap = min(shape.d_out, shape.d_in)
        if s3.rank > cap:
            raise ConfigError(f"stage3.rank: {s3.rank} is above min(d_out, d_in) = {cap} of {name} (weight "
                              f"{shape.d_out} x {shape.d_in}), which gets it as a uniform rank; use at most "
                              f"{cap}, or gap-aware ranks (stage2.allocation: gap-relative caps each module)")
    if s2.enabled and s2.allocation != "uniform" and (s2.budget is not None or s2.match_uniform_budget):
        budget = trainable_params(dict.fromkeys(shapes, s3.rank), shapes) if s2.match_uniform_budget else s2.budget
        floor = trainable_params(dict.fromkeys(shapes, s2.r_min), shapes)
        ceiling = trainable_params({name: min(s2.r_max, shape.d_out, shape.d_in) for name, shape in shapes.items()},
                                   shapes)
        key = "stage3.rank (through stage2.match_uniform_budget)" if s2.match_uniform_budget else "stage2.budget"
        if not floor <= budget <= ceiling:
            raise ConfigError(f"{key}: a budget of {budget} adapter parameters is outside the feasible range "
                              f"[{floor}, {ceiling}] for these targets (every module at stage2.r_min={s2.r_min} "
                              f".. every module at min(stage2.r_max={s2.r_max}, d_out, d_in))")
