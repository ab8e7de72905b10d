"""Atomic writes: a temp file in the target's folder, then a rename, so no reader (or a resumed
run) ever sees half a file, and a failed write leaves nothing behind. Temp names come from
mkstemp, so concurrent writers of one path never share a temp file.

Cached artefacts (generated data, the offline source body) also get a content hash beside them,
`<file>.sha256`, written after the file: `cache_is_valid` checks it on read, so a cache truncated or
overwritten outside this module (a full disk, a copy cut short) is noticed, named and rebuilt.

JSON files (records, reports, bench results) are written strict (RFC 8259: no NaN or Infinity, which
jq, JavaScript and most dashboards refuse): `strict_json_text` writes a non-finite number as null."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
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


class WriteFailed(OSError):
    """A file that could not be written, said in one line: the path, why (no space left on device, not
    writable) and the fix. An OSError, so the CLI prints it as it prints any other."""

    def __str__(self) -> str:
        return self.strerror


FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
NEARLY_FULL = 1 << 20  # bytes available below which a failed write is taken for a full disk
RERUN = "then run the same command (finished stages are kept; stage 3 resumes from its last checkpoint)"


def write_failed(path: Path | str, error: BaseException) -> WriteFailed | None:
    """`error` (raised writing `path`) as a WriteFailed when it means a full disk or an unwritable place,
    else None. Writers that report a full disk in their own words (torch.save's `unexpected pos`,
    safetensors' StorageFull) are recognised by the space left where they wrote."""
    code = getattr(error, "errno", None)
    if code in NOT_WRITABLE:
        return WriteFailed(code, f"{path}: not writable ({os.strerror(code)}); fix its permissions or choose a "
                                 f"writable output.root (data_root for data), {RERUN}")
    if code in FULL or (isinstance(error, Exception) and _space_left(Path(path).parent) < NEARLY_FULL):
        said = str(error).splitlines()[0] if str(error) else type(error).__name__
        return WriteFailed(errno.ENOSPC, f"{path}: no space left on device ({said}); free space there or set "
                                         f"output.root (data_root for data) to a disk with room, {RERUN}")
    return None


def _space_left(directory: Path) -> float:
    """Bytes available to this user under `directory` (its nearest existing ancestor); inf when unknown."""
    for folder in (directory, *directory.parents):
        try:
            stats = os.statvfs(folder)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return math.inf


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)`, then rename the temp file onto `path` (removed if `write` fails). A full
    disk or an unwritable folder raises WriteFailed, naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        failure = write_failed(path, error)
        if failure is None:
            raise
        raise failure from error
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, _default_mode())
        os.replace(temp, path)
    except BaseException as error:
        failure = write_failed(path, error)  # before the partial temp file goes, freeing its space
        Path(temp).unlink(missing_ok=True)
        if failure is not None:
            raise failure from error
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(Path(path), lambda temp: Path(temp).write_text(text))


def json_ready(value: Any) -> Any:
    """`value` as plain JSON values: numpy arrays and scalars as lists and numbers, tuples as lists, keys
    as strings where JSON needs them, and NaN and +-inf as None (an undefined statistic, or an unbounded
    end of an interval: the file's reader says which)."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key if isinstance(key, (str, int, float, bool)) else str(key): json_ready(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def strict_json_text(value: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = str) -> str:
    """`value` as strict JSON text (`json_ready`, then json.dumps with allow_nan=False), newline-ended;
    `default` turns what JSON has no type for (a Path) into a value."""
    return json.dumps(json_ready(value), indent=indent, allow_nan=False, default=default) + "\n"


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, strict_json_text(value))


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
