"""`asr transcribe` on everything a user may hand it, in one call.

A folder is built at test time: files that cannot be used (missing, empty, cut off, damaged,
not audio, a folder, NaN or absurd samples, a header that claims 1 Hz) between files that can,
however odd (digital silence, one sample, six channels, 8 to 48 kHz, 16/32-bit and float,
FLAC and WAV), most of them the session model's own training sentences re-encoded. One run of
the command line must report each bad file on one stderr line that names it, print one
`path<TAB>text` line for each good one, never show a traceback, and exit non-zero.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import asr
from asr.audio import load_audio
from asr.metrics import error_rates
from conftest import noise, run_asr, sine, write_audio

pytestmark = pytest.mark.slow  # needs the session's trained model

# Speech re-encoded as (rate, subtype, channels, extension). Every channel holds the same
# signal, so the mono mix is the sentence at its own level.
EXACT_FORMATS = [
    (16000, "PCM_16", 1, "wav"),
    (16000, "PCM_32", 1, "wav"),
    (16000, "PCM_16", 6, "wav"),
    (22050, "PCM_16", 1, "flac"),
    (44100, "FLOAT", 1, "wav"),
    (44100, "PCM_32", 2, "wav"),
    (48000, "PCM_16", 2, "flac"),
    (48000, "PCM_24", 6, "flac"),
]
# Below 16 kHz the sentences lose the high band the model learned them with: on the 8
# sentences 11.025 kHz got 3 right and a letter off in the others (CER 4.5%), 8 kHz none
# (CER 34%). So these are held to a CER bound (garbled resampling gives near 100%).
LOW_RATE_CER = {11025: 0.10, 8000: 0.50}


@dataclass
class Inputs:
    bad: dict[Path, str] = field(default_factory=dict)  # path -> a word its error must hold
    exact: dict[Path, str] = field(default_factory=dict)  # path -> the text it must give
    low_rate: dict[int, dict[Path, str]] = field(default_factory=dict)  # rate -> {path: text}
    any_text: list[Path] = field(default_factory=list)  # usable audio, no text to expect
    silence: Path | None = None

    def order(self) -> list[Path]:
        """Every input, the bad ones spread among the good, as given to the command."""
        good = [self.silence, *self.exact, *self.any_text] + [p for r in self.low_rate.values() for p in r]
        bad = list(self.bad)
        out = []
        for i in range(max(len(good), len(bad))):
            out += good[i:i + 1] + bad[i:i + 1]
        return out


def corrupt(source: Path, target: Path, at: int, data: bytes) -> Path:
    """A copy of `source` with `data` written over its bytes from offset `at`."""
    raw = bytearray(source.read_bytes())
    raw[at:at + len(data)] = data
    target.write_bytes(bytes(raw))
    return target


@pytest.fixture(scope="module")
def inputs(trained, tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    got = Inputs()
    ids = list(trained.texts)
    speech = {uid: load_audio(trained.espeak_wavs[uid]) for uid in ids}  # 16 kHz mono

    def spoken(uid: str, rate: int, subtype: str, channels: int, ext: str) -> Path:
        wave = speech[uid] if rate == 16000 else load_audio(trained.espeak_wavs[uid], sample_rate=rate)
        if channels > 1:
            wave = np.stack([wave] * channels, axis=1)  # (N,) -> (N, C)
        path = write_audio(root / f"speech_{uid}_{rate}_{subtype}_{channels}ch.{ext}", wave, rate, subtype)
        info = sf.info(path)
        assert (info.samplerate, info.subtype, info.channels) == (rate, subtype, channels)
        return path

    # Good: the training sentences, two per format so that every sentence appears.
    for k, spec in enumerate(EXACT_FORMATS):
        for uid in (ids[k % len(ids)], ids[(k + 3) % len(ids)]):
            got.exact[spoken(uid, *spec)] = trained.texts[uid]
    got.exact[trained.espeak_wavs[ids[0]]] = trained.texts[ids[0]]  # espeak's own 22.05 kHz WAV
    for rate in LOW_RATE_CER:
        got.low_rate[rate] = {spoken(uid, rate, "PCM_16", 1, "wav"): trained.texts[uid] for uid in ids}

    # Good, though nothing is said or there is nearly nothing to hear.
    got.silence = write_audio(root / "silence.wav", np.zeros(16000, np.float32))
    got.any_text += [
        write_audio(root / "five_samples.wav", sine(440, 5 / 16000)),
        write_audio(root / "one_sample.wav", np.full(1, 0.25, np.float32)),
        write_audio(root / "one_sample_48k.flac", np.full(1, 0.25, np.float32), 48000),
        write_audio(root / "noise_2ch_11k.wav", np.stack([noise(0.5, 11025), noise(0.5, 11025, seed=1)], 1), 11025),
        write_audio(root / "noise_6ch_8k.flac", np.stack([noise(0.3, 8000, seed=s) for s in range(6)], 1), 8000),
        write_audio(root / "tone_float_22k.wav", sine(300, 0.4, 22050), 22050, "FLOAT"),
    ]
    # Damaged sample data under an intact header still decodes: noise, not an error.
    clean = write_audio(root / "clean.wav", sine(440, 0.5))
    got.any_text.append(corrupt(clean, root / "garbled_data.wav", 1000,
                                rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()))
    clean.unlink()

    # Bad: each with a word its one-line error must hold.
    got.bad[root / "missing.wav"] = "no such file"
    (root / "zero_bytes.wav").write_bytes(b"")
    got.bad[root / "zero_bytes.wav"] = "empty"
    real_flac = next(trained.corpus.rglob("*.flac"))
    data = real_flac.read_bytes()
    (root / "cut_in_half.flac").write_bytes(data[: len(data) // 2])
    got.bad[root / "cut_in_half.flac"] = "cannot decode"
    wav = write_audio(root / "intact.wav", speech[ids[0]])
    got.bad[corrupt(wav, root / "no_riff_magic.wav", 0, b"JUNK")] = "cannot decode"
    got.bad[corrupt(wav, root / "zero_channels.wav", 22, (0).to_bytes(2, "little"))] = "cannot decode"
    rate_1 = corrupt(wav, root / "rate_1hz.wav", 24, (1).to_bytes(4, "little"))
    assert sf.info(rate_1).samplerate == 1
    got.bad[rate_1] = "sample rate"
    wav.unlink()
    (root / "notes.wav").write_text("these are meeting notes, not a recording\n" * 30)
    got.bad[root / "notes.wav"] = "cannot decode"
    (root / "video.mp4").write_bytes(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
    got.bad[root / "video.mp4"] = "cannot decode"
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(2000))
    got.bad[root / "picture.png"] = "cannot decode"
    (root / "a_folder.wav").mkdir()
    got.bad[root / "a_folder.wav"] = "folder"
    with_nan = sine(440, 0.5)
    with_nan[100:110] = np.nan
    got.bad[write_audio(root / "nan_samples.wav", with_nan, subtype="FLOAT")] = "NaN"
    with_inf = sine(440, 0.5, 44100)
    with_inf[-1] = np.inf
    got.bad[write_audio(root / "inf_samples.wav", with_inf, 44100, "FLOAT")] = "infinite"
    absurd = sine(440, 0.5)
    absurd[5] = 3e37  # finite, but its power overflows float32
    got.bad[write_audio(root / "absurd_float.wav", absurd, subtype="FLOAT")] = "far outside"
    return got


@pytest.fixture(scope="module")
def done(trained, inputs) -> subprocess.CompletedProcess:
    return run_asr("transcribe", "--model", trained.exp / "best.pt", *inputs.order())


def stdout_lines(done) -> dict[str, str]:
    out = {}
    for line in done.stdout.splitlines():
        path, sep, text = line.partition("\t")
        assert sep, f"not a path<TAB>text line: {line!r}"
        assert path not in out, f"{path} printed twice"
        out[path] = text
    return out


def test_nothing_crashes_and_the_exit_status_says_some_failed(done):
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 1, done.stderr[-3000:]


def test_each_bad_file_is_one_stderr_line_naming_it(done, inputs):
    lines = done.stderr.splitlines()
    bad = [p for p in inputs.order() if p in inputs.bad]
    assert len(lines) == len(bad), done.stderr
    for line, path in zip(lines, bad):
        assert line.startswith("asr transcribe: error: "), line
        assert str(path) in line, f"{path} not named in: {line}"
        assert inputs.bad[path] in line, f"{inputs.bad[path]!r} not in: {line}"
        assert sum(str(p) in line for p in bad) == 1, line


def test_each_good_file_is_one_stdout_line_in_order(done, inputs):
    good = [str(p) for p in inputs.order() if p not in inputs.bad]
    assert list(stdout_lines(done)) == good


def test_digital_silence_is_empty_text(done, inputs):
    assert stdout_lines(done)[str(inputs.silence)] == ""


def test_speech_in_any_container_rate_and_channel_count(done, inputs):
    out = stdout_lines(done)
    wrong = {str(p): (out[str(p)], text) for p, text in inputs.exact.items() if out[str(p)] != text}
    assert not wrong, wrong


@pytest.mark.parametrize("rate", sorted(LOW_RATE_CER))
def test_speech_at_low_rates_is_mostly_right(done, inputs, rate):
    out = stdout_lines(done)
    files = inputs.low_rate[rate]
    rates = error_rates([str(p) for p in files], list(files.values()), [out[str(p)] for p in files])
    assert rates.cer <= LOW_RATE_CER[rate], [(u.reference, u.hypothesis) for u in rates.utterances]


def test_tiny_inputs_through_the_python_api(trained, inputs):
    model = asr.load_model(trained.exp / "best.pt", device="cpu")
    assert model.transcribe(inputs.silence) == ""
    assert model.transcribe_with_timestamps(inputs.silence) == ("", [])
    assert model.transcribe(np.zeros((800, 2), np.float32), sample_rate=8000) == ""
    for path in inputs.any_text[:3]:  # 5 samples, 1 sample, 1 sample at 48 kHz
        duration = len(load_audio(path)) / 16000  # one 48 kHz sample becomes one 16 kHz sample
        text, words = model.transcribe_with_timestamps(path)
        assert text == model.transcribe(path)
        assert " ".join(w.word for w in words) == text
        assert all(0.0 <= w.start <= w.end <= duration for w in words), (path, words)
