"""Read any file soundfile reads as mono float32 at 16 kHz, or say exactly why not.

torchaudio 2.9 no longer decodes files (it needs torchcodec), so decoding is libsndfile's
(WAV, FLAC, OGG, MP3) and only resampling is torchaudio's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from asr.errors import AudioError

log = logging.getLogger("asr.audio")

SAMPLE_RATE = 16_000  # every model in asr hears 16 kHz mono
# Rates a recording can have. Anything else is a damaged header: a flipped bit can claim 1 Hz
# (a second of audio per sample) or a billion.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 768_000
# The resampling filter for orig -> target has target/g phases of about orig/g taps each
# (g = gcd): tiny for the usual rates (44100 -> 16000 is 441 -> 160) but gigabytes and
# minutes for an odd one (16001 -> 16000). Such a ratio is taken as the nearest one with terms
# up to this, off by under 0.1% in length and pitch; the usual rates stay exact.
MAX_RATIO_TERM = 1000
# Float files hold samples in [-1, 1], a little beyond when mixed hot. Far beyond is a damaged
# file (random bytes read as float32 reach 1e38), whose log-mel would overflow to inf.
MAX_PEAK = 1000.0


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited (windowed sinc) resampling of a 1-D float32 signal (an odd rate ratio
    approximated, see MAX_RATIO_TERM)."""
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    ratio = Fraction(int(target_sr), int(orig_sr)).limit_denominator(MAX_RATIO_TERM)
    if ratio == 1:
        return wave
    with torch.no_grad():
        out = _resampler(ratio.denominator, ratio.numerator)(torch.from_numpy(np.ascontiguousarray(wave, np.float32)))
    return out.numpy()


@functools.lru_cache(maxsize=8)
def _resampler(orig: int, target: int) -> torchaudio.transforms.Resample:
    """The filter for one rate pair, built once: building it takes longer than applying it to a
    few seconds of audio (the same numbers as torchaudio.functional.resample)."""
    return torchaudio.transforms.Resample(orig, target, dtype=torch.float32)


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

    Any channel count and any rate from MIN_SAMPLE_RATE to MAX_SAMPLE_RATE is accepted;
    AudioError names the file and the problem when it is missing, empty, undecodable, holds no
    samples, or holds what no recording does (another rate, NaN, inf, samples beyond MAX_PEAK).
    """
    path = _check_path(path)
    try:
        with decoder_messages(path):
            wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"{path}: cannot decode audio ({_reason(e)})") from None
    except MemoryError:  # the array is sized from the header, which a damaged MP3 can make 1e11
        raise AudioError(f"{path}: cannot decode audio (its header claims more samples than "
                         "fit in memory)") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: holds no audio samples")
    _check_rate(path, sr)
    return resample(_checked_mono(path, wave), sr, sample_rate)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header; AudioError when the file is unreadable or
    shorter than its header says (a cut-off download keeps its header, so the last sample is
    read too: a seek, not a decode of the whole file)."""
    path = _check_path(path)
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"{path}: cannot read audio ({_reason(e)})") from None
    with f:
        frames, rate = f.frames, f.samplerate
        _check_rate(path, rate)
        if frames <= 0:
            raise AudioError(f"{path}: holds no audio samples")
        truncated = f"{path}: truncated or damaged: the header says {frames} samples, the last cannot be read"
        try:
            f.seek(frames - 1)
            last = f.read(1)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise AudioError(f"{truncated} ({_reason(e)})") from None
        if len(last) != 1:
            raise AudioError(truncated)
    return frames / rate


def _check_rate(path: Path, rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz is not a recording's "
                         f"({MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz): a damaged header?")


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.replace("Error opening", "error opening").rstrip(".")


# ---------------------------------------------------------------------------------------------
# Long files, a block at a time: memory follows the block, not the file.

# Input read beyond each side of a block before it is resampled, so that the filter's edges
# (it reaches about 6 input samples per output sample either way: under 2 ms at 16 kHz out)
# fall on samples that are thrown away.
RESAMPLE_MARGIN_SECONDS = 0.05


def stream_audio(path: str | os.PathLike, block_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Decode `path` a block at a time into consecutive mono float32 arrays at SAMPLE_RATE, of
    about `block_seconds` each; joined they are load_audio(path) (to float rounding), and only a
    block is held at once. AudioError names the file as load_audio's does; a fault inside the
    file (NaN, a damaged frame) is raised when its block is reached.

    Each block is resampled with RESAMPLE_MARGIN_SECONDS of its neighbours' input and cut where
    the whole file's resampling would put it: blocks start on multiples of the rate ratio's input
    term, where the output sample grid restarts exactly (441 -> 320 for 22.05 kHz in).
    """
    path = _check_path(path)
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"{path}: cannot decode audio ({_reason(e)})") from None
    with f:
        rate = f.samplerate
        _check_rate(path, rate)
        ratio = Fraction(SAMPLE_RATE, rate).limit_denominator(MAX_RATIO_TERM)  # as resample() takes it
        step_in, step_out = ratio.denominator, ratio.numerator
        block = step_in * max(1, math.ceil(block_seconds * rate / step_in))
        margin = 0 if ratio == 1 else step_in * math.ceil(RESAMPLE_MARGIN_SECONDS * rate / step_in)
        held, held_from = np.empty(0, np.float32), 0  # input samples held_from, held_from + 1, ...
        done = total = 0  # input samples already given out as output; read so far
        while True:
            new = _read_block(f, path, block)
            total += len(new)
            held = np.concatenate([held, new])
            ended = len(new) < block
            # Give out all but the last `margin` samples read (the next block's left margin),
            # up to a multiple of step_in; at the end, everything.
            upto = total if ended else (total - margin) // step_in * step_in
            if upto > done:
                out = resample(held, rate, SAMPLE_RATE)
                first = (done - held_from) * step_out // step_in
                last = len(out) if ended else (upto - held_from) * step_out // step_in
                yield out[first:last]
                done = upto
                drop = max(0, done - margin) - held_from
                held, held_from = held[drop:], held_from + drop
            if ended:
                break
    if total == 0:
        raise AudioError(f"{path}: holds no audio samples")


def windows(blocks: Iterable[np.ndarray], length: int, step: int) -> Iterator[tuple[int, np.ndarray, bool]]:
    """Windows of `length` samples, one every `step`, over audio given as consecutive blocks:
    (first sample, window, whether it is the last). The last window ends where the audio does
    and may be shorter; no window starts after one that reached the end. Holds one window and
    one block at a time."""
    if not 0 < step <= length:
        raise ValueError(f"need 0 < step <= length, got step {step}, length {length}")
    blocks = iter(blocks)
    held, start, ended = np.empty(0, np.float32), 0, False  # held: samples from `start` on
    while True:
        # One sample past the window tells whether another window follows.
        while not ended and len(held) <= length:
            block = next(blocks, None)
            ended = block is None
            if not ended:  # (a whole array given as one block is sliced, never copied)
                held = block if len(held) == 0 else np.concatenate([held, block])
        last = len(held) <= length
        yield start, held[:length], last
        if last:
            return
        held, start = held[step:], start + step


@contextlib.contextmanager
def decoder_messages(path: Path):
    """Hold back what the decoding C libraries print straight to the process's stderr while
    `path` is read (libmpg123 writes a line for every damaged MP3 frame it skips), and log it
    as one warning naming the file: a damaged file that still decodes says so once, and a
    batch of files keeps one line per problem."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to hold back
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = [line.strip() for line in held.read().decode(errors="replace").splitlines() if line.strip()]
            if lines:
                log.warning("%s: the decoder reported damage, the audio may be incomplete (%d message(s), "
                            "first: %s)", path, len(lines), lines[0])


def _check_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, or AudioError when it is missing, a folder or empty."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    return path


def _read_block(f: sf.SoundFile, path: Path, frames: int) -> np.ndarray:
    """The next `frames` samples of an open file (fewer at its end) as mono float32, checked as
    load_audio checks a whole file."""
    try:
        with decoder_messages(path):
            wave = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"{path}: cannot decode audio ({_reason(e)})") from None
    return _checked_mono(path, wave)


def _checked_mono(path: Path, wave: np.ndarray) -> np.ndarray:
    """(N, C) decoded samples -> (N,) mono, or AudioError when they hold what no recording does.
    Checked before the channels are summed, where huge values could overflow to inf."""
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: holds NaN or infinite samples")
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak > MAX_PEAK:
        raise AudioError(f"{path}: samples reach {peak:.3g}, far outside [-1, 1] (a damaged float file?)")
    return to_mono(wave)
