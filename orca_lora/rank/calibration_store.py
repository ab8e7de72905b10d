"""Simulated spectral nulls kept on disk, so every stage-2 run at the same sizes reads them.

The spectral gap's cut-offs (`rank/spectral.py`) come from simulations that depend only on the
width and the two sample sizes, not on any data; a study measures every task at the same sizes, so
the simulation is paid once per (width, n_s, n_t) and machine. Each simulation is one `.npy` file
named by its key (which carries `NULL_VERSION`), written atomically; a file that does not load is
simulated again and rewritten.
"""
from __future__ import annotations

import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator

import numpy as np

from orca_lora.files import write_atomic

log = logging.getLogger("orca_lora")


class CalibrationDirectory(MutableMapping):
    """A folder of `<key>.npy` arrays, read and written as a mapping (`spectral.CalibrationStore`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._path(key)
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise KeyError(key) from None
        except (OSError, ValueError) as error:
            log.warning("stage2: stored null %s does not load (%s); simulating it again", path, error)
            raise KeyError(key) from None
        array.flags.writeable = False
        return array

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __setitem__(self, key: str, array: np.ndarray) -> None:
        def save(temp: str) -> None:
            with open(temp, "wb") as handle:
                np.save(handle, np.asarray(array), allow_pickle=False)
        write_atomic(self._path(key), save)

    def __delitem__(self, key: str) -> None:
        self._path(key).unlink()

    def __iter__(self) -> Iterator[str]:
        return (path.stem for path in sorted(self.directory.glob("*.npy")))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"CalibrationDirectory({str(self.directory)!r})"
