"""Stage 3's checkpoints: written atomically in the run directory, checked before a resume.

Lightning's own writer saves through fsspec, which on another filesystem than the temp directory
writes elsewhere and copies; a full disk during the copy leaves a truncated `last.ckpt` that every
re-run would resume from and die on. Here the temp file lies beside the target and is renamed onto it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from orca_lora.files import write_atomic

log = logging.getLogger("orca_lora")


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temp file in the checkpoint's folder, then a rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_atomic(Path(path), lambda temp: torch.save(checkpoint, temp))


def resumable_checkpoint(path: Path, aside_directory: Path) -> int | None:
    """The global step of the checkpoint at `path` when it loads; None when there is none, or when it does not load,
    in which case it is moved to `aside_directory/<name>.corrupt-<time>` with a warning naming it and
    the error, so that this and every later attempt starts stage 3 afresh instead of failing on it."""
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception as error:  # truncated zip, random bytes, pickling errors: all mean "not usable"
        aside = aside_directory / f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        path.rename(aside)
        log.warning("stage 3: checkpoint %s does not load (%s: %s); moved it to %s and starting stage 3 afresh",
                    path, type(error).__name__, str(error).splitlines()[0] if str(error) else "", aside)
        return None
