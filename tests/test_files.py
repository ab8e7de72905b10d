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
