"""`rank_law.json`: a fitted rank law with what it was fitted on, written by `orca-lora calibrate`
and read by stage 2 (`stage2.allocation: law`, `stage2.law: PATH`).

A law's x is a gap in units of its noise floor, and the floor depends on the body, the source proxy
set, the distance and the held-out sample size, so a law carries these (`LawProvenance`) and
`check_provenance` refuses a config that measures its gaps otherwise.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from orca_lora.config import Config, ConfigError, section_hash
from orca_lora.files import write_json_atomic
from orca_lora.rank.law import RankLaw, RankObservation


@dataclass(frozen=True)
class LawProvenance:
    source_hash: str  # hash of the config's source section (body, proxy set, pretraining)
    source_model: str
    proxy: str
    distance: str  # stage2.distance
    max_samples: int  # stage2.max_samples: the sample size the floors were measured at

    @classmethod
    def of(cls, config: Config) -> "LawProvenance":
        return cls(section_hash(config, "source"), config.source.model, config.source.proxy,
                   config.stage2.distance, config.stage2.max_samples)


@dataclass(frozen=True)
class LawFile:
    law: RankLaw
    provenance: LawProvenance
    observations: list[RankObservation]
    runs: list[str]


def write_law_file(path: Path, law_file: LawFile) -> None:
    """Strict JSON: a NaN statistic is written null, and so is an unbounded end of beta's interval."""
    write_json_atomic(path, asdict(law_file))


def read_law_file(path: Path | str) -> LawFile:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"stage2.law: {path} does not exist; write one with `orca-lora calibrate DIR... "
                          f"--output {path}`")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return LawFile(_law(data["law"]), _record(LawProvenance, data["provenance"]),
                       [_record(RankObservation, o) for o in data["observations"]], list(data["runs"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"stage2.law: {path} is not a rank law written by `orca-lora calibrate` ({error})") from None


def _record(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in data.items() if key in names})


def _law(data: dict[str, Any]) -> RankLaw:
    """The law as written: a null end of beta's interval is unbounded, another null statistic NaN."""
    unbounded = {"beta_low": -math.inf, "beta_high": math.inf}
    numbers = {f.name for f in fields(RankLaw) if f.type == "float"}
    return _record(RankLaw, {key: unbounded.get(key, math.nan) if value is None and key in numbers else value
                             for key, value in data.items()})


def check_provenance(config: Config, law_file: LawFile, path: Path | str) -> None:
    """Refuse a law fitted on another body, proxy set, distance or sample size, naming what differs."""
    here = LawProvenance.of(config)
    for name in ("source_hash", "source_model", "proxy", "distance", "max_samples"):
        fitted, now = getattr(law_file.provenance, name), getattr(here, name)
        if fitted != now:
            key = {"source_hash": "source (its body / pretraining settings)", "source_model": "source.model",
                   "proxy": "source.proxy", "distance": "stage2.distance",
                   "max_samples": "stage2.max_samples"}[name]
            raise ConfigError(f"stage2.law: {path} was fitted with {key} = {fitted!r}, this config has {now!r}; "
                              "a law's gap units hold only where it was fitted: calibrate on runs of this setting")
