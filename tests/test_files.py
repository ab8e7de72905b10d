import pytest
import torch
from safetensors.torch import load_file

from orca_lora.files import save_tensors_atomic, write_text_atomic


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

    monkeypatch.setattr("safetensors.torch.save_file", half_written)  # files.py imports it per call
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
