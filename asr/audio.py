"""Read any file soundfile reads as mono float32 at 16 kHz, or say exactly why not.

torchaudio 2.9 no longer decodes files (it needs torchcodec), so decoding is libsndfile's
(WAV, FLAC, OGG, MP3) and only resampling is torchaudio's.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from asr.errors import AudioError

SAMPLE_RATE = 16_000  # every model in asr hears 16 kHz mono


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited (windowed sinc) resampling of a 1-D float32 signal."""
    if orig_sr == target_sr:
        return wave
    out = torchaudio.functional.resample(torch.from_numpy(wave), orig_sr, target_sr)
    return out.numpy()


def change_speed(wave: np.ndarray, speed: float) -> np.ndarray:
    """Play `wave` `speed` times faster, tempo and pitch together (Kaldi-style speed
    perturbation, Ko et al. 2015): resampling from `speed` x the rate back to the rate.
    `speed` is taken as a ratio of small integers (0.9 -> 9/10)."""
    ratio = Fraction(speed).limit_denominator(100)
    if ratio <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    return resample(wave, ratio.numerator, ratio.denominator)


def to_mono(wave: np.ndarray) -> np.ndarray:
    """(N,) or (N, C) -> (N,) float32, channels averaged."""
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    return np.ascontiguousarray(wave, dtype=np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode `path` to a mono float32 array in [-1, 1] at `sample_rate`.

    Any channel count and any input rate is accepted; AudioError names the file and the
    problem when it is missing, empty, undecodable or holds no samples.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"{path}: cannot decode audio ({_reason(e)})") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: holds no audio samples")
    wave = to_mono(wave)
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: holds NaN or infinite samples")
    return resample(wave, sr, sample_rate)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header; AudioError when the file is unreadable or
    shorter than its header says (a cut-off download keeps its header, so the last sample is
    read too: a seek, not a decode of the whole file)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        with sf.SoundFile(path) as f:
            frames, rate = f.frames, f.samplerate
            if frames <= 0:
                raise AudioError(f"{path}: holds no audio samples")
            f.seek(frames - 1)
            if len(f.read(1)) != 1:
                raise AudioError(f"{path}: truncated (header says {frames} samples)")
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"{path}: cannot read audio ({_reason(e)})") from None
    return frames / rate


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.replace("Error opening", "error opening").rstrip(".")
