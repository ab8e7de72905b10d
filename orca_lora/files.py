"""Atomic writes: a temp file in the target's folder, then a rename, so no reader (or a resumed
run) ever sees half a file, and a failed write leaves nothing behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from safetensors.torch import save_file
from torch import Tensor


def _default_mode() -> int:
    """0666 less the umask: what open() would give a new file (mkstemp's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, _default_mode())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(Path(path), lambda temp: Path(temp).write_text(text))


def save_tensors_atomic(tensors: Mapping[str, Tensor], path: Path) -> None:
    """A safetensors file of `tensors` (detached, on the CPU, contiguous)."""
    state = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    _write_atomic(Path(path), lambda temp: save_file(state, temp))


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """An uncompressed .npz of `arrays` (np.savez; `path` should end in .npz, which np.savez would append)."""
    def write(temp: str) -> None:
        with open(temp, "wb") as stream:  # a file object, so np.savez does not add a second .npz suffix
            np.savez(stream, **arrays)
    _write_atomic(Path(path), write)
