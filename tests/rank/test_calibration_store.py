import numpy as np
import pytest

from orca_lora.rank import spectral
from orca_lora.rank.calibration_store import CalibrationDirectory


def test_a_stored_null_is_read_back_instead_of_simulated(tmp_path, monkeypatch):
    store = CalibrationDirectory(tmp_path)
    spectral.clear_calibration_cache()
    first = spectral.null_calibration(8, 40, 40, store=store)
    assert len(store) == 1
    def refuse(*args):
        raise AssertionError("simulated again although the store holds it")
    monkeypatch.setitem(spectral._SIMULATIONS, "extremes", refuse)
    assert spectral.null_calibration(8, 40, 40, store=CalibrationDirectory(tmp_path)) == first


def test_stored_and_simulated_nulls_agree_and_a_corrupt_file_is_simulated_again(tmp_path):
    spectral.clear_calibration_cache()
    simulated = spectral.null_calibration(8, 40, 40, resampled=True)
    store = CalibrationDirectory(tmp_path)
    assert spectral.null_calibration(8, 40, 40, resampled=True, store=store) == simulated
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(b"not an array")
    spectral.clear_calibration_cache()
    assert spectral.null_calibration(8, 40, 40, resampled=True, store=store) == simulated
    np.load(path)  # rewritten whole


def test_missing_keys_raise_key_error(tmp_path):
    with pytest.raises(KeyError):
        CalibrationDirectory(tmp_path)["absent"]
