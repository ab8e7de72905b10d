"""Stage 3's checkpoints: written atomically in the run directory, checked before a resume, and under DDP
the same checked file for every process.

Lightning's own writer saves through fsspec, which on another filesystem than the temp directory
writes elsewhere and copies; a full disk during the copy leaves a truncated `last.ckpt` that every
re-run would resume from and die on. Here the temp file lies beside the target and is renamed onto it
(a full disk then names the file and the fix: `files.write_atomic`).

Under DDP every process checks the `last.ckpt` it would load (only rank 0 sets a damaged one aside);
once the processes are connected, rank 0's choice is sent to all and a process that saw otherwise
stops every one of them (`SameResume`), and the load itself checks the file's content hash against the
one checked, so that every process resumes from the same verified file or every one starts afresh.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from orca_lora.files import file_digest, write_atomic

log = logging.getLogger("orca_lora")


@dataclass(frozen=True)
class Resumable:
    """A checkpoint that loads: its global step and its content hash."""

    step: int
    sha256: str


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temp file in the checkpoint's folder, then a rename; a checkpoint loaded
    for a resume must still have the content hash it was checked with (`verified`)."""

    def __init__(self) -> None:
        super().__init__()
        self.verified: dict[str, str] = {}  # path -> sha256 of the checkpoint checked before training

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_atomic(Path(path), lambda temp: torch.save(checkpoint, temp))

    def load_checkpoint(self, path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        expected = self.verified.get(str(path))
        if expected is not None and file_digest(path) != expected:
            raise ValueError(f"stage 3: {path} changed between its check and its load (another process wrote "
                             "it?); run the same command again once no other run writes this run directory")
        return super().load_checkpoint(path, *args, **kwargs)


def resumable_checkpoint(path: Path, aside_directory: Path | None) -> Resumable | None:
    """The checkpoint at `path` when it loads; None when there is none, or when it does not load, in which
    case it is moved to `aside_directory/<name>.corrupt-<time>` with a warning naming it and the error, so
    that this and every later attempt starts stage 3 afresh instead of failing on it. A process other than
    rank 0 passes `aside_directory` None: it writes nothing, rank 0 sets the file aside."""
    if not path.is_file():
        return None
    try:
        digest = file_digest(path)
        return Resumable(int(torch.load(path, map_location="cpu", weights_only=False)["global_step"]), digest)
    except Exception as error:  # truncated zip, random bytes, pickling errors, moved meanwhile: "not usable"
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if aside_directory is None:
            log.debug("stage 3: checkpoint %s does not load here (%s); starting afresh", path, reason)
            return None
        aside = aside_directory / f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        path.rename(aside)
        log.warning("stage 3: checkpoint %s does not load (%s); moved it to %s and starting stage 3 afresh",
                    path, reason, aside)
        return None


def _choice(resume: Resumable | None) -> str:
    return "starts afresh" if resume is None else f"resumes from step {resume.step} (sha256 {resume.sha256[:12]})"


class SameResume(Callback):
    """Under DDP, before anything loads or trains: every process resumes from the checkpoint rank 0
    checked, or every one starts afresh. A process whose own check found otherwise (another file, a
    file that does not load, or none: a run directory not shared by every node) stops them all."""

    def __init__(self, path: Path, resume: Resumable | None):
        self.path, self.resume = path, resume

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or trainer.world_size == 1:
            return
        chosen = trainer.strategy.broadcast(self.resume, src=0)
        if trainer.strategy.reduce_boolean_decision(chosen == self.resume, all=True):
            return
        here = (f"rank {trainer.global_rank} {_choice(self.resume)}" if chosen != self.resume
                else "another rank does not")
        raise ValueError(f"stage 3: the {trainer.world_size} training processes do not see the same {self.path} "
                         f"(rank 0 {_choice(chosen)}, {here}); put output.root on a file system that every node "
                         "shares, then run the same command")
