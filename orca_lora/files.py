"""Atomic writes: a temp file in the target's folder, then a rename, so no reader (or a resumed
run) ever sees half a file, and a failed write leaves nothing behind. Temp names come from
mkstemp, so concurrent writers of one path never share a temp file.

Cached artefacts (generated data, the offline source body) also get a content hash beside them,
`<file>.sha256`, written after the file: `cache_is_valid` checks it on read, so a cache truncated or
overwritten outside this module (a full disk, a copy cut short) is noticed, named and rebuilt."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

log = logging.getLogger("orca_lora")

if TYPE_CHECKING:  # torch and numpy load lazily: config.py imports this module and stays light
    import numpy as np
    from torch import Tensor


def _default_mode() -> int:
    """0666 less the umask: what open() would give a new file (mkstemp's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def give_directory_default_mode(path: Path) -> None:
    """0777 less the umask, what mkdir gives (mkdtemp's folders are 0700): run folders are shared
    across the nodes of a cluster."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)`, then rename the temp file onto `path` (removed if `write` fails)."""
    path = Path(path)
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
    write_atomic(Path(path), lambda temp: Path(temp).write_text(text))


def save_tensors_atomic(tensors: Mapping[str, "Tensor"], path: Path) -> None:
    """A safetensors file of `tensors` (detached, on the CPU, contiguous)."""
    from safetensors.torch import save_file

    state = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    write_atomic(Path(path), lambda temp: save_file(state, temp))


def save_npz_atomic(path: Path, **arrays: "np.ndarray") -> None:
    """An uncompressed `.npz` of `arrays`."""
    import numpy as np

    def write(temp: str) -> None:
        with open(temp, "wb") as stream:  # a file object, or np.savez would append ".npz" to the name
            np.savez(stream, **arrays)

    write_atomic(Path(path), write)


def save_figure_atomic(figure: Any, path: Path, **savefig_options: Any) -> None:
    """`figure.savefig` into `path`, in the format its suffix names."""
    fmt = Path(path).suffix.lstrip(".")
    write_atomic(Path(path), lambda temp: figure.savefig(temp, format=fmt, **savefig_options))


def digest_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_digest(path: Path) -> None:
    """`<path>.sha256`, the content hash `cache_is_valid` checks; write it after `path` is complete."""
    write_text_atomic(digest_path(path), file_digest(path) + "\n")


def cache_is_valid(path: Path) -> bool:
    """True when the cached `path` matches its `.sha256`. When it is there but does not (or has no
    hash: an older version or a write cut short wrote it), log a warning naming it, delete both and
    return False, so that the caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return False
    sidecar = digest_path(path)
    expected = sidecar.read_text().strip() if sidecar.is_file() else None
    if expected is not None and expected == file_digest(path):
        return True
    problem = "has no content hash beside it" if expected is None else "does not match its content hash"
    log.warning("cached %s %s (truncated, overwritten or from an older version); deleting and rebuilding it",
                path, problem)
    path.unlink()
    sidecar.unlink(missing_ok=True)
    return False
