"""A sweep's SLURM settings (README, "Sweeps on a cluster"): the sweep file's `slurm:` section, then the
command line's flags, as the parameters of submitit's `AutoExecutor`. No submitit import here: `load_sweep`
checks the section's keys before anything runs, on machines without submitit too.

    slurm:
      partition: gpu
      time: 240                 # per job: minutes, or SLURM's "[days-]hours:minutes[:seconds]", quoted
                                # (YAML reads an unquoted 4:00:00 as the number 14400)
      gpus_per_job: 1           # --gres=gpu:1
      cpus_per_job: 8           # --cpus-per-task
      array_parallelism: 32     # jobs of one array running at once (--array=0-N%32)
      slurm_account: my-lab     # any further submitit SLURM parameter, passed as it is
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from orca_lora.errors import ConfigError

CLUSTERS = ("slurm", "local")  # submitit's executors: SLURM, or processes of this machine running the same jobs
PASSED_PREFIX = "slurm_"  # submitit's own SLURM parameters (slurm_account, slurm_qos, slurm_setup, ...)


@dataclass(frozen=True)
class SlurmSettings:
    cluster: str = "slurm"  # "local" rehearses the jobs here with submitit's local executor (no SLURM)
    partition: str | None = None
    time: int = 60  # minutes a job may run; one that reaches it is requeued and resumes (submitit's USR2)
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 256  # submitit's default
    max_array_size: int = 1000  # the cluster's MaxArraySize (`scontrol show config`): bigger levels are split
    passed: dict[str, Any] = field(default_factory=dict)  # slurm_* parameters for submitit, as they are


SETTING_KEYS = tuple(item.name for item in fields(SlurmSettings) if item.name != "passed")


def check_section(section: Any, where: str) -> None:
    """The `slurm:` section's keys: this module's settings and submitit's slurm_* parameters."""
    if section is None:
        return
    if not isinstance(section, Mapping):
        raise ConfigError(f"'slurm' must be a mapping of settings, got {section!r} ({where})")
    unknown = sorted(str(key) for key in section
                     if key not in SETTING_KEYS and not str(key).startswith(PASSED_PREFIX))
    if unknown:
        raise ConfigError(f"unknown slurm setting(s) {unknown} ({where}); the settings are "
                          f"{', '.join(SETTING_KEYS)}, plus submitit's slurm_* parameters (slurm_account, "
                          "slurm_qos, slurm_constraint, ...)")


def slurm_settings(section: Mapping[str, Any], flags: Mapping[str, Any]) -> SlurmSettings:
    """The sweep file's section with each flag given on the command line (not None) in its place."""
    values = {**section, **{key: value for key, value in flags.items() if value is not None}}
    check_section(values, "slurm settings")
    own = {key: value for key, value in values.items() if key in SETTING_KEYS}
    if "time" in own:
        own["time"] = minutes(own["time"])
    settings = SlurmSettings(**own, passed={k: v for k, v in values.items() if k.startswith(PASSED_PREFIX)})
    _validate(settings)
    return settings


def _validate(settings: SlurmSettings) -> None:
    if settings.cluster not in CLUSTERS:
        raise ConfigError(f"slurm.cluster: {settings.cluster!r} is not one of {', '.join(CLUSTERS)} (local: "
                          "the same jobs as processes on this machine, through submitit's local executor)")
    for key, low in (("time", 1), ("gpus_per_job", 0), ("cpus_per_job", 1), ("array_parallelism", 1),
                     ("max_array_size", 1)):
        value = getattr(settings, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"slurm.{key}: {value!r} must be a whole number >= {low}")


def minutes(value: Any) -> int:
    """A SLURM time limit in whole minutes (seconds round up): 90, "90", "45:30" (minutes:seconds),
    "1:30:00", "2-00:00:00", "2-12" (days-hours)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    days, _, clock = str(value).strip().rpartition("-")
    try:
        numbers, day = [int(part) for part in clock.split(":")], int(days or 0)
    except ValueError:
        raise ConfigError(f"slurm.time: {value!r} is not a time limit; give minutes (90) or SLURM's "
                          "[days-]hours:minutes[:seconds] (1:30:00)") from None
    if days:  # days-hours[:minutes[:seconds]]
        hours, mins, seconds = (numbers + [0, 0])[:3]
    elif len(numbers) <= 2:  # minutes[:seconds]
        hours, (mins, seconds) = 0, (numbers + [0])[:2]
    else:
        hours, mins, seconds = numbers[:3]
    return day * 24 * 60 + hours * 60 + mins + int(seconds > 0)


def executor_parameters(settings: SlurmSettings, job_name: str) -> dict[str, Any]:
    """The settings as `AutoExecutor.update_parameters` takes them: shared names (timeout_min,
    cpus_per_task, mem_gb) for either cluster, slurm_* ones for SLURM alone, local_* ones for the rehearsal."""
    parameters: dict[str, Any] = {"name": job_name, "timeout_min": settings.time,
                                  "slurm_array_parallelism": settings.array_parallelism}
    if settings.partition:
        parameters["slurm_partition"] = settings.partition
    if settings.gpus_per_job:  # --gres, which every SLURM with GPUs takes; locally, CUDA_VISIBLE_DEVICES
        parameters.update(slurm_gres=f"gpu:{settings.gpus_per_job}",
                          local_gpus_per_node=settings.gpus_per_job)
    if settings.cpus_per_job:
        parameters["cpus_per_task"] = settings.cpus_per_job
    if settings.mem_gb:
        parameters["mem_gb"] = settings.mem_gb
    return {**parameters, **settings.passed}
