import errno
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from orca_lora import files
from orca_lora.files import save_npz_atomic, save_tensors_atomic, write_text_atomic


def test_atomic_text_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    write_text_atomic(target, "hello")
    assert target.read_text() == "hello"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_tensors_round_trip_from_non_contiguous_grad_tensors(tmp_path):
    weight = torch.randn(3, 4, requires_grad=True)
    tensors = {"w": weight.t(), "b": torch.arange(3.0)}
    save_tensors_atomic(tensors, tmp_path / "state.safetensors")
    loaded = load_file(str(tmp_path / "state.safetensors"))
    assert torch.equal(loaded["w"], weight.detach().t()) and torch.equal(loaded["b"], tensors["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_a_failed_write_leaves_neither_file_nor_temp(tmp_path, monkeypatch):
    def half_written(state, temp):
        with open(temp, "wb") as stream:
            stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_tensors_atomic({"w": torch.zeros(2)}, tmp_path / "state.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_get_the_permissions_a_plain_write_would(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text_atomic(tmp_path / "atomic.txt", "x")
    save_tensors_atomic({"w": torch.zeros(1)}, tmp_path / "atomic.safetensors")
    expected = plain.stat().st_mode
    assert (tmp_path / "atomic.txt").stat().st_mode == expected
    assert (tmp_path / "atomic.safetensors").stat().st_mode == expected


def test_npz_round_trip_keeps_the_name_and_leaves_no_temp(tmp_path):
    target = tmp_path / "cache" / "fields.npz"
    save_npz_atomic(target, a=np.arange(6.0).reshape(2, 3), u=np.ones(4, dtype=np.float32))
    with np.load(target) as stored:
        assert np.array_equal(stored["a"], np.arange(6.0).reshape(2, 3)) and stored["u"].dtype == np.float32
    assert [p.name for p in target.parent.iterdir()] == ["fields.npz"]


def test_concurrent_writers_of_one_path_never_share_a_temp_file(tmp_path):
    """Both writers hold their temp file open at once; with one shared temp name the second would
    clobber the first's half-written bytes."""
    temps, both_inside = [], threading.Barrier(2)
    original = files.write_atomic

    def write(path, text):
        def slow(temp):
            temps.append(temp)
            both_inside.wait(timeout=10)
            open(temp, "w").write(text)
        original(path, slow)

    threads = [threading.Thread(target=write, args=(tmp_path / "same.txt", text)) for text in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(temps)) == 2
    assert (tmp_path / "same.txt").read_text() in ("first", "second")
    assert [p.name for p in tmp_path.iterdir()] == ["same.txt"]


def test_a_staged_folder_gets_the_mode_mkdir_would_give(tmp_path):
    import tempfile

    from orca_lora.files import give_directory_default_mode

    umask = os.umask(0o022)
    try:
        staged = Path(tempfile.mkdtemp(dir=tmp_path))
        give_directory_default_mode(staged)
        assert staged.stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(umask)


def test_strict_json_writes_undefined_numbers_as_null_and_numpy_as_plain_values():
    value = {"nan": float("nan"), "bounds": (float("-inf"), np.float32(2.5)), "array": np.array([1.0, np.nan]),
             np.int64(3): np.int64(4), "path": Path("a/b"), "flag": True}
    text = files.strict_json_text(value)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=refuse) == {"nan": None, "bounds": [None, 2.5], "array": [1.0, None],
                                                        "3": 4, "path": "a/b", "flag": True}
    assert text.endswith("}\n")


def test_a_full_disk_is_named_even_where_the_writer_says_it_in_its_own_words(tmp_path, monkeypatch):
    def torch_save_on_a_full_disk(temp):
        Path(temp).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 47936 vs 47824")

    monkeypatch.setattr(files, "_space_left", lambda directory: 0)
    with pytest.raises(files.WriteFailed, match=r"best.ckpt: no space left on device \(\[enforce fail.*\); free space"):
        files.write_atomic(tmp_path / "best.ckpt", torch_save_on_a_full_disk)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(files, "_space_left", lambda directory: 1 << 30)  # room left: the writer's own error
    with pytest.raises(RuntimeError, match="unexpected pos"):
        files.write_atomic(tmp_path / "best.ckpt", torch_save_on_a_full_disk)


def test_an_unwritable_folder_is_named_with_the_fix(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(files.WriteFailed, match=r"^.*/out/x.json: not writable \(Read-only file system\); fix its "
                                                r"permissions or choose a writable output.root"):
        files.write_text_atomic(tmp_path / "out" / "x.json", "{}")
