"""Spectrograms of synthetic 1-D signals: a new modality (time x frequency images) with unlimited data.

Ten classes of signals built with scipy.signal (chirps, modulated tones, periodic waveforms, noise
shapes), each sample with its own random parameters and white noise at a random level, turned
into a log-power short-time Fourier transform (Hann window, 50% overlap) of exactly s x s bins:
window length 2(s-1) gives s frequency bins (0 .. Nyquist), and a signal of 2(s-1) + (s-1)^2
samples with hop s-1 gives s frames. Frequencies are in cycles per sample (Nyquist 0.5).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.signal

LOG_FLOOR = 1e-8  # added to the power before the log, far below the noise floor of every sample
NOISE_STD = (0.1, 0.8)  # white noise std, against signals scaled to unit RMS
_SIGNAL_STREAM = 2  # seed-sequence tag (procedural uses 0 and 1)

Signal = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _chirp(t: np.ndarray, rng: np.random.Generator, up: bool) -> np.ndarray:
    low, high = rng.uniform(0.01, 0.15), rng.uniform(0.3, 0.48)
    f0, f1 = (low, high) if up else (high, low)
    return scipy.signal.chirp(t, f0=f0, t1=t[-1], f1=f1, method=rng.choice(["linear", "quadratic"]))


def _am(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    carrier, rate, depth = rng.uniform(0.05, 0.45), rng.uniform(2, 8) / len(t), rng.uniform(0.6, 1.0)
    return (1 + depth * np.sin(2 * np.pi * rate * t)) * np.sin(2 * np.pi * carrier * t)


def _fm(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    carrier, deviation, rate = rng.uniform(0.15, 0.35), rng.uniform(0.03, 0.1), rng.uniform(2, 6) / len(t)
    return np.sin(2 * np.pi * carrier * t + deviation / rate * np.sin(2 * np.pi * rate * t))


def _square(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return scipy.signal.square(2 * np.pi * rng.uniform(0.01, 0.06) * t + rng.uniform(0, 2 * np.pi))


def _sawtooth(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return scipy.signal.sawtooth(2 * np.pi * rng.uniform(0.01, 0.06) * t + rng.uniform(0, 2 * np.pi))


def _noise_bursts(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gate = np.zeros(len(t))
    for _ in range(rng.integers(2, 6)):
        start, width = rng.integers(0, len(t)), rng.integers(len(t) // 20, len(t) // 7)
        gate[start : start + width] = 1.0
    return gate * rng.standard_normal(len(t))


def _two_tones(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low = rng.uniform(0.03, 0.3)
    high = rng.uniform(low + 0.08, 0.47)
    return np.sin(2 * np.pi * low * t) + rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * high * t + rng.uniform(0, np.pi))


def _pulse_train(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    clicks = np.zeros(len(t))
    clicks[int(rng.integers(0, 40)) :: int(rng.integers(len(t) // 16, len(t) // 6))] = 1.0
    return clicks


def _band_noise(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    centre, width = rng.uniform(0.1, 0.38), rng.uniform(0.03, 0.08)
    bandpass = scipy.signal.butter(4, [2 * (centre - width / 2), 2 * (centre + width / 2)], btype="band", output="sos")
    return scipy.signal.sosfilt(bandpass, rng.standard_normal(len(t)))


SIGNAL_CLASSES: dict[str, Signal] = {
    "chirp-up": lambda t, rng: _chirp(t, rng, up=True),
    "chirp-down": lambda t, rng: _chirp(t, rng, up=False),
    "am": _am,
    "fm": _fm,
    "square": _square,
    "sawtooth": _sawtooth,
    "noise-bursts": _noise_bursts,
    "two-tones": _two_tones,
    "pulse-train": _pulse_train,
    "band-noise": _band_noise,
}


def signal_length(resolution: int) -> int:
    """2(s-1) + (s-1)^2 samples: s STFT frames of window 2(s-1) and hop s-1."""
    return 2 * (resolution - 1) + (resolution - 1) ** 2


def log_spectrogram(signals: np.ndarray, resolution: int) -> np.ndarray:
    """(N, L) signals -> (N, s, s) log-power STFT, high frequencies on top, each standardised to
    zero mean and unit variance (so loudness is no cue, only the time-frequency pattern)."""
    window = 2 * (resolution - 1)
    _, _, stft = scipy.signal.stft(signals, nperseg=window, noverlap=window // 2, boundary=None, padded=False)
    power = np.log(np.abs(stft) ** 2 + LOG_FLOOR)[:, ::-1]
    mean, std = power.mean(axis=(1, 2), keepdims=True), power.std(axis=(1, 2), keepdims=True)
    return ((power - mean) / std).astype(np.float32)


def generate_spectrograms(n_samples: int, resolution: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spectrograms (n_samples, 1, s, s) float32 and labels (n_samples,) int64 for samples start ..

    Sample i has class i mod 10 (balanced) and draws its parameters from default_rng([seed, 2, i]):
    a function of (seed, i) only, so disjoint index ranges give independent splits. Each clean
    signal is scaled to unit RMS, then white noise of std U(0.1, 0.8) is added.
    """
    if n_samples < 1 or resolution < 4:
        raise ValueError(f"generate_spectrograms needs n_samples >= 1 and resolution >= 4; got {n_samples}, "
                         f"{resolution}")
    t = np.arange(signal_length(resolution), dtype=np.float64)
    kinds = list(SIGNAL_CLASSES.values())
    labels = np.arange(start, start + n_samples) % len(kinds)
    signals = np.empty((n_samples, len(t)))
    for row, (index, label) in enumerate(zip(range(start, start + n_samples), labels)):
        rng = np.random.default_rng([seed, _SIGNAL_STREAM, index])
        clean = kinds[label](t, rng)
        clean = clean / np.sqrt(np.mean(clean**2))
        signals[row] = clean + rng.uniform(*NOISE_STD) * rng.standard_normal(len(t))
    return log_spectrogram(signals, resolution)[:, None], labels.astype(np.int64)
