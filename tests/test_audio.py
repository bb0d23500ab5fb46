import math
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from asr.audio import MAX_RATIO_TERM, SAMPLE_RATE, _resampler, audio_duration, change_speed, load_audio, resample
from asr.errors import AudioError
from conftest import assert_error_names_file, read_jsonl, sine, write_audio


def peak_frequency(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[spectrum.argmax()])


@pytest.mark.parametrize("name, subtype, atol", [
    ("a.wav", "PCM_16", 1 / 2**15),
    ("a.wav", "PCM_32", 1e-6),
    ("a.wav", "FLOAT", 0.0),
    ("a.flac", "PCM_16", 1 / 2**15),
    ("a.flac", "PCM_24", 1 / 2**23),
])
def test_load_audio_formats(tmp_path, name, subtype, atol):
    wave = sine(440, 0.5)
    path = write_audio(tmp_path / name, wave, subtype=subtype)
    assert sf.info(path).subtype == subtype
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    assert len(loaded) == len(wave)
    np.testing.assert_allclose(loaded, wave, atol=atol + 1e-7)


def test_load_audio_accepts_a_str_path(tmp_path):
    path = write_audio(tmp_path / "a.wav", sine(440, 0.1))
    assert len(load_audio(str(path))) == 1600


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = sine(440, 0.25), sine(1000, 0.25, amplitude=0.25)
    path = write_audio(tmp_path / "stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-7)


def test_four_channels_are_averaged(tmp_path):
    channels = np.stack([np.full(800, v, dtype=np.float32) for v in (0.1, 0.2, 0.3, 0.6)], axis=1)
    path = write_audio(tmp_path / "quad.flac", channels, subtype="PCM_24")
    np.testing.assert_allclose(load_audio(path), np.full(800, 0.3), atol=1e-6)


@pytest.mark.parametrize("sr, ext", [(8000, "wav"), (22050, "flac"), (44100, "wav"), (48000, "flac")])
def test_resampled_to_16k_with_length_and_pitch_kept(tmp_path, sr, ext):
    seconds, freq = 1.0, 1000.0
    path = write_audio(tmp_path / f"tone.{ext}", sine(freq, seconds, sr), sr)
    loaded = load_audio(path)
    assert len(loaded) == math.ceil(round(seconds * sr) * SAMPLE_RATE / sr) == 16000
    assert abs(peak_frequency(loaded, SAMPLE_RATE) - freq) <= 1.0  # 1 Hz bins for 1 s
    # Band-limited resampling keeps the tone's level (RMS of a 0.5 sine = 0.354).
    middle = loaded[1000:-1000]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize("speed", [0.9, 1.1, 1.25])
def test_change_speed_scales_length_and_pitch(speed):
    wave = sine(1000.0, 1.0, SAMPLE_RATE)
    faster = change_speed(wave, speed)
    assert len(faster) == pytest.approx(SAMPLE_RATE / speed, abs=1)
    # 1 s at 1000 Hz played `speed` times faster: 1000 * speed Hz for 1/speed s.
    assert peak_frequency(faster, SAMPLE_RATE) == pytest.approx(1000.0 * speed, abs=1.5 * speed)


def test_change_speed_one_is_the_same_wave():
    wave = sine(440.0, 0.5, SAMPLE_RATE)
    np.testing.assert_array_equal(change_speed(wave, 1.0), wave)


def test_change_speed_refuses_zero():
    with pytest.raises(ValueError, match="positive"):
        change_speed(np.zeros(100, np.float32), 0.0)


def test_load_audio_to_another_rate(tmp_path):
    path = write_audio(tmp_path / "tone.wav", sine(440, 1.0, 16000), 16000)
    loaded = load_audio(path, sample_rate=8000)
    assert len(loaded) == 8000
    assert abs(peak_frequency(loaded, 8000) - 440) <= 1.0


def test_odd_length_resample(tmp_path):
    # 44100 -> 16000 is the ratio 160/441: 1001 samples give ceil(1001 * 160 / 441) = 364
    path = write_audio(tmp_path / "odd.wav", sine(440, 1001 / 44100, 44100), 44100)
    assert len(load_audio(path)) == 364


@pytest.mark.parametrize("orig", [22050, 44100, 8000, 16001])
def test_resample_keeps_one_filter_per_rate_pair_with_torchaudios_numbers(orig):
    """The filter is built once per pair of rates (espeak-ng's 22050 Hz, a CD's 44100 Hz, ...) and
    gives what torchaudio.functional.resample gives, bit for bit, an odd rate (16001 Hz) included
    as the nearest ratio with terms up to MAX_RATIO_TERM."""
    wave = np.random.default_rng(orig).standard_normal(orig // 3).astype(np.float32)
    ratio = Fraction(SAMPLE_RATE, orig).limit_denominator(MAX_RATIO_TERM)
    expected = torchaudio.functional.resample(torch.from_numpy(wave), ratio.denominator, ratio.numerator).numpy()
    for _ in range(2):
        np.testing.assert_array_equal(resample(wave, orig), expected)
    assert _resampler(ratio.denominator, ratio.numerator) is _resampler(ratio.denominator, ratio.numerator)


def assert_audio_error(path, *words):
    return assert_error_names_file(AudioError, load_audio, path, *words)


def test_missing_file(tmp_path):
    assert_audio_error(tmp_path / "nope.flac", "no such file")


def test_folder_is_not_audio(tmp_path):
    assert_audio_error(tmp_path, "folder")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    assert_audio_error(path, "empty")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all\n" * 20)
    assert_audio_error(path, "cannot decode")


def test_random_bytes_named_flac(tmp_path):
    path = tmp_path / "noise.flac"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert_audio_error(path, "cannot decode")


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_flac(tmp_path, fraction):
    good = write_audio(tmp_path / "good.flac", np.random.default_rng(1).uniform(-0.5, 0.5, 32000).astype(np.float32))
    data = good.read_bytes()
    bad = tmp_path / "cut.flac"
    bad.write_bytes(data[: int(len(data) * fraction)])
    assert_audio_error(bad, "cannot decode")


def test_wav_header_without_samples(tmp_path):
    path = write_audio(tmp_path / "none.wav", np.zeros(0, dtype=np.float32))
    assert_audio_error(path, "no audio samples")


def test_nan_samples_are_refused(tmp_path):
    wave = sine(440, 0.1)
    wave[10] = np.nan
    path = write_audio(tmp_path / "nan.wav", wave, subtype="FLOAT")
    assert_audio_error(path, "NaN")


def test_audio_duration_from_header(tmp_path):
    assert audio_duration(write_audio(tmp_path / "a.flac", sine(440, 1.5, 22050), 22050)) == 1.5
    assert audio_duration(write_audio(tmp_path / "b.wav", np.zeros((8000, 2), np.float32), 8000)) == 1.0
    assert audio_duration(write_audio(tmp_path / "c.wav", sine(440, 0.25))) == 0.25


def test_audio_duration_errors(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        audio_duration(tmp_path / "missing.flac")
    text = tmp_path / "text.flac"
    text.write_text("hello")
    with pytest.raises(AudioError, match="text.flac"):
        audio_duration(text)
    empty = write_audio(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    with pytest.raises(AudioError, match="no audio samples"):
        audio_duration(empty)


def test_real_recordings_load_at_16k(real_samples):
    rows = read_jsonl(real_samples / "manifest.jsonl")
    assert len(rows) >= 30
    rates = set()
    for row in rows:
        path = real_samples / row["audio"]
        info = sf.info(path)
        rates.add(info.samplerate)
        assert audio_duration(path) == pytest.approx(row["duration"], abs=1e-3)
        wave = load_audio(path)
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert len(wave) == math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
        assert np.abs(wave).max() <= 1.0
        assert np.sqrt(np.mean(wave**2)) > 1e-3, f"{path} decodes to silence"
    assert {16000, 22050, 44100} <= rates


def test_a_damaged_mp3_is_one_warning_not_a_screenful(tmp_path, capfd, caplog):
    """libmpg123 prints a line to the process's stderr for each damaged frame it skips; they are
    held back and become one warning naming the file, and the audio that decoded is returned."""
    import logging

    import soundfile as sf

    path = tmp_path / "damaged.mp3"
    sf.write(path, sine(440, 3.0), 16000, format="MP3")
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(1)
    for i in rng.integers(len(data) // 4, len(data), 40):
        data[i] = rng.integers(0, 256)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="asr.audio"):
        wave = load_audio(path)
    assert 0 < len(wave) <= 3.1 * 16000 and np.isfinite(wave).all()  # what could be decoded
    assert capfd.readouterr().err == ""
    (record,) = [r for r in caplog.records if r.name == "asr.audio"]
    assert str(path) in record.getMessage() and "reported damage" in record.getMessage()
    # An intact file decodes without a word.
    caplog.clear()
    sf.write(tmp_path / "fine.mp3", sine(440, 1.0), 16000, format="MP3")
    load_audio(tmp_path / "fine.mp3")
    assert not caplog.records and capfd.readouterr().err == ""
