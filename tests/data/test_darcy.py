from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from orca_lora.data import darcy, darcy_solver
from orca_lora.data.darcy import (
    DarcyFields,
    UnitGaussianNormalizer,
    darcy_inputs,
    downsample,
    generate_darcy,
    load_darcy_file,
    relative_l2,
    sample_grf,
)
from orca_lora.data.darcy_solver import solve_darcy


def _dct_matrix(s: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C; MATLAB's idct2(L) = C^T L C."""
    k, x = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    weights = np.where(k == 0, np.sqrt(1.0 / s), np.sqrt(2.0 / s))
    return weights * np.cos(np.pi * k * (2 * x + 1) / (2 * s))


def test_grf_matches_cosine_expansion():
    s, alpha, tau = 6, 2.0, 3.0
    fields = sample_grf(3, s, np.random.default_rng(5), alpha=alpha, tau=tau)
    xi = np.random.default_rng(5).standard_normal((3, s, s))
    dct = _dct_matrix(s)
    for field, noise in zip(fields, xi):
        coefficients = np.zeros((s, s))
        for k1 in range(s):
            for k2 in range(s):
                if (k1, k2) != (0, 0):
                    eigen = tau ** (alpha - 1) * (np.pi**2 * (k1**2 + k2**2) + tau**2) ** (-alpha / 2)
                    coefficients[k1, k2] = s * eigen * noise[k1, k2]
        np.testing.assert_allclose(field, dct.T @ coefficients @ dct, atol=1e-12)
        assert abs(field.mean()) < 1e-12  # L[0, 0] = 0 removes the constant mode


def test_generated_sample_is_physical():
    fields = generate_darcy(3, 20, seed=0)
    assert fields.a.shape == fields.u.shape == (3, 20, 20)
    assert fields.a.dtype == fields.u.dtype == np.float32
    assert set(np.unique(fields.a)) == {3.0, 12.0}
    assert np.all(fields.u >= 0) and fields.u.max() > 0
    assert np.all(fields.u[:, [0, -1], :] == 0) and np.all(fields.u[:, :, [0, -1]] == 0)


def test_generation_is_deterministic_in_the_seed():
    first, again, other = generate_darcy(2, 16, 3), generate_darcy(2, 16, 3), generate_darcy(2, 16, 4)
    np.testing.assert_array_equal(first.a, again.a)
    np.testing.assert_array_equal(first.u, again.u)
    assert not np.array_equal(first.a, other.a)


def test_generated_sample_does_not_depend_on_the_batching(monkeypatch):
    whole = generate_darcy(5, 100, seed=5)
    monkeypatch.setattr(darcy, "SOLVE_BATCH_NODES", 2 * 100**2)
    batched = generate_darcy(5, 100, seed=5)
    np.testing.assert_array_equal(batched.a, whole.a)
    np.testing.assert_array_equal(batched.u, whole.u)
    np.testing.assert_array_equal(generate_darcy(3, 100, seed=5).u, whole.u[:3])


def test_generated_solution_matches_the_direct_solve():
    fields = generate_darcy(3, 24, seed=9)
    for a, u in zip(fields.a, fields.u):
        direct = solve_darcy(a).astype(np.float32)
        np.testing.assert_allclose(u, direct, rtol=1e-6, atol=1e-6 * np.abs(direct).max())


def test_generation_cache_round_trip(tmp_path, monkeypatch):
    fields = generate_darcy(2, 16, seed=7, root=tmp_path)
    cache = tmp_path / "darcy" / "generated_n2_r16_seed7.npz"
    assert cache.is_file()
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name, cache.name + ".sha256"]

    def fail(*args, **kwargs):
        raise AssertionError("the cached fields should have been loaded, not solved again")

    monkeypatch.setattr(darcy, "sample_grf", fail)
    monkeypatch.setattr(darcy_solver, "solve_darcy_pcg", fail)
    cached = generate_darcy(2, 16, seed=7, root=tmp_path)
    np.testing.assert_array_equal(cached.a, fields.a)
    np.testing.assert_array_equal(cached.u, fields.u)


@pytest.fixture
def small_fields() -> DarcyFields:
    rng = np.random.default_rng(2)
    return DarcyFields(
        a=rng.uniform(3, 12, (4, 7, 7)).astype(np.float32), u=rng.uniform(0, 1, (4, 7, 7)).astype(np.float32)
    )


def _assert_same(loaded: DarcyFields, expected: DarcyFields) -> None:
    assert loaded.a.dtype == loaded.u.dtype == np.float32
    np.testing.assert_array_equal(loaded.a, expected.a)
    np.testing.assert_array_equal(loaded.u, expected.u)


def test_mat_v5_round_trip(tmp_path, small_fields):
    path = tmp_path / "piececonst_r7_N4_smooth1.mat"
    scipy.io.savemat(path, {"coeff": small_fields.a.astype(np.float64), "sol": small_fields.u.astype(np.float64)})
    _assert_same(load_darcy_file(path), small_fields)


def _write_mat_v73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A MATLAB v7.3 file: HDF5 after a 512-byte text header, arrays stored column-major (axes reversed)."""
    with h5py.File(path, "w", userblock_size=512) as file:
        for key, array in arrays.items():
            file.create_dataset(key, data=np.asarray(array, dtype=np.float64).T)
            file[key].attrs["MATLAB_class"] = np.bytes_("double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as file:
        file.write(header.ljust(116) + b"\x00" * 8 + b"\x00\x02" + b"IM")


def test_mat_v73_round_trip(tmp_path, small_fields):
    path = tmp_path / "piececonst_r7_N4_smooth2.mat"
    _write_mat_v73(path, {"coeff": small_fields.a, "sol": small_fields.u})
    assert open(path, "rb").read(19) == b"MATLAB 7.3 MAT-file"
    _assert_same(load_darcy_file(path), small_fields)


@pytest.mark.parametrize("suffix", [".hdf5", ".h5"])
def test_pdebench_round_trip(tmp_path, small_fields, suffix):
    path = tmp_path / f"2D_DarcyFlow_beta1.0_Train{suffix}"
    with h5py.File(path, "w") as file:
        file["nu"] = small_fields.a
        file["tensor"] = small_fields.u[:, None]
        file["x-coordinate"] = np.linspace(0, 1, 7)
    _assert_same(load_darcy_file(path), small_fields)


@pytest.mark.parametrize("channel", [False, True])
def test_neuraloperator_pt_round_trip(tmp_path, small_fields, channel):
    path = tmp_path / "darcy_train_16.pt"
    a, u = torch.from_numpy(small_fields.a), torch.from_numpy(small_fields.u)
    if channel:
        a, u = a[:, None], u[:, None]
    torch.save({"x": a, "y": u}, path)
    _assert_same(load_darcy_file(path), small_fields)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.mat"):
        load_darcy_file(tmp_path / "nowhere.mat")


def test_missing_key_is_named(tmp_path, small_fields):
    path = tmp_path / "bad.mat"
    scipy.io.savemat(path, {"coeff": small_fields.a})
    with pytest.raises(KeyError, match=r"bad\.mat.*'sol'"):
        load_darcy_file(path)
    path = tmp_path / "bad.pt"
    torch.save({"x": torch.from_numpy(small_fields.a)}, path)
    with pytest.raises(KeyError, match=r"bad\.pt.*'y'"):
        load_darcy_file(path)


def test_pt_with_non_tensor_payload_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"x": np.zeros((2, 3, 3)), "y": np.zeros((2, 3, 3))}, path)
    with pytest.raises(ValueError, match=r"pickled\.pt.*dict of tensors"):
        load_darcy_file(path)


def test_wrong_shape_is_named(tmp_path, small_fields):
    path = tmp_path / "flat.h5"
    with h5py.File(path, "w") as file:
        file["nu"] = small_fields.a.reshape(4, -1)
        file["tensor"] = small_fields.u[:, None]
    with pytest.raises(ValueError, match=r"flat\.h5.*'nu'"):
        load_darcy_file(path)


def test_unknown_suffix_lists_supported(tmp_path):
    path = tmp_path / "fields.npy"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.hdf5.*\.mat.*\.pt"):
        load_darcy_file(path)


def test_downsample_every_fifth_node():
    fields = np.random.default_rng(0).standard_normal((2, 421, 421)).astype(np.float32)
    coarse = downsample(fields, 5)
    assert coarse.shape == (2, 85, 85)
    np.testing.assert_array_equal(coarse[1, 3, 4], fields[1, 15, 20])
    with pytest.raises(ValueError, match="factor"):
        downsample(fields, 0)


def test_darcy_inputs_channels():
    a = torch.rand(2, 5, 4)
    inputs = darcy_inputs(a)
    assert inputs.shape == (2, 3, 5, 4)
    torch.testing.assert_close(inputs[:, 0], a)
    torch.testing.assert_close(inputs[0, 1, :, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(inputs[1, 2, 3], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert torch.all(inputs[:, 1].diff(dim=2) == 0) and torch.all(inputs[:, 2].diff(dim=1) == 0)


def test_normalizer_standardises_train_and_round_trips():
    x = torch.randn(50, 6, 6, dtype=torch.float64) * torch.linspace(0.5, 3, 6) + 4.0
    normalizer = UnitGaussianNormalizer(x)
    encoded = normalizer.encode(x)
    torch.testing.assert_close(encoded.mean(0), torch.zeros(6, 6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(encoded.std(0), torch.ones(6, 6, dtype=torch.float64), atol=1e-4, rtol=0)
    expected = (x - x.numpy().mean(0)) / (x.numpy().std(0, ddof=1) + 1e-5)
    torch.testing.assert_close(encoded, expected)
    torch.testing.assert_close(normalizer.decode(encoded), x)


def test_normalizer_state_moves_and_saves():
    normalizer = UnitGaussianNormalizer(torch.randn(10, 4, 4))
    assert set(normalizer.state_dict()) == {"mean", "std"}
    restored = UnitGaussianNormalizer(torch.zeros(2, 4, 4))
    restored.load_state_dict(normalizer.state_dict())
    torch.testing.assert_close(restored.std, normalizer.std)
    assert normalizer.to(torch.float64).mean.dtype == torch.float64
    assert "shape=(4, 4)" in repr(normalizer)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        normalizer.encode(torch.zeros(3, 5, 5))


def test_relative_l2_against_numpy():
    pred, target = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    p, t = pred.numpy().reshape(5, -1), target.numpy().reshape(5, -1)
    expected = np.sqrt(((p - t) ** 2).sum(1)) / np.sqrt((t**2).sum(1))
    np.testing.assert_allclose(relative_l2(pred, target).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="equal shape"):
        relative_l2(pred, target[:, 0])


@pytest.mark.parametrize("name, contents, message", [
    ("garbage.mat", None, "cannot be read as a .mat Darcy file"),
    ("garbage.hdf5", None, "cannot be read as a .hdf5 Darcy file"),
    ("other_keys.mat", {"x": np.ones((3, 4, 4)), "y": np.ones((3, 4, 4))}, "found ['x', 'y']"),
    ("zero.mat", {"coeff": np.ones((3, 4, 4)), "sol": np.zeros((3, 4, 4))}, "'sol' is zero everywhere"),
    ("one.mat", {"coeff": np.ones((1, 4, 4)), "sol": np.ones((1, 4, 4))}, "holds 1 sample(s)"),
])
def test_a_bad_darcy_file_is_one_message_naming_it(tmp_path, name, contents, message):
    path = tmp_path / name
    if contents is None:
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    else:
        scipy.io.savemat(path, contents)
    with pytest.raises((ValueError, KeyError)) as raised:
        darcy.load_darcy_file(path)
    text = raised.value.args[0]
    assert text.startswith(str(path)) and message in text
