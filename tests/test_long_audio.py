"""Long audio in bounded memory: files read a block at a time, heard in overlapping windows whose
middles join into the whole file's log-probs, decoded once; peak memory flat from 5 to 60 minutes.

Which model can judge the seams: the session's tiny model (conftest `trained`) learned its eight
utterances exactly as espeak-ng spoke them, and nothing else: even in one pass it spells garbage
once two of them share a file, or with a tenth of a second more silence around one (measured:
"HELLO WORLD" becomes "PLE LLO WORLD"). So its transcripts
cannot show text lost or doubled at a seam. Two stand-ins can:
  * its own weights with the recurrent layers taken out: only the convolutions remain, which
    reach 736 samples either way, so the windows must give one pass's log-probs to the bit;
  * a BiLSTM with random weights, whose memory fades within a second or two: windows with a few
    seconds of context must give one pass's log-probs, text and word times.
The tiny model itself still shows that the windows hold together and word times stay in order.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from asr.audio import load_audio, resample, stream_audio, windows
from asr.decode import GreedyDecoder
from asr.errors import AudioError, ConfigError
from asr.features import LogMel
from asr.model import BiLSTMCTC, ModelConfig
from asr.text import CharTokenizer
from asr.transcribe import Transcriber, load_model
from conftest import SR, assert_error_names_file, noise, sine, write_audio


def medley(trained, seconds: float, pause: float = 0.5) -> np.ndarray:
    """The trained utterances one after another with quiet pauses (faint noise), to `seconds`."""
    rng = np.random.default_rng(0)
    waves = [load_audio(trained.espeak_wavs[uid]) for uid in trained.texts]
    parts, total, k = [], 0, 0
    while total < seconds * SR:
        gap = (0.003 * rng.standard_normal(int(pause * SR))).astype(np.float32)
        parts += [waves[k % len(waves)], gap]
        total, k = total + len(waves[k % len(waves)]) + len(gap), k + 1
    return np.concatenate(parts)[: int(seconds * SR)]


def windowed(t: Transcriber, chunk_seconds: float, context_seconds: float, model: nn.Module | None = None,
             ) -> Transcriber:
    """`t` (or `model` with t's features and decoder) hearing long audio in windows as given."""
    return Transcriber(model or t.model, t.log_mel, t.tokenizer, t.decoder, torch.device("cpu"),
                       chunk_seconds=chunk_seconds, context_seconds=context_seconds)


def one_pass(t: Transcriber, wave: np.ndarray) -> torch.Tensor:
    log_probs, lengths = t.log_probs([wave])
    return log_probs[0, : int(lengths[0])]


class ConvOnly(nn.Module):
    """Stands in for the BiRNN: passes the subsampled features on (twice, for the 2H the output
    layer takes), so the model's reach is the convolutions' alone."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=-1)  # (B, T', H) -> (B, T', 2H)


@pytest.fixture(scope="module")
def tiny(trained) -> Transcriber:
    return load_model(trained.exp / "best.pt", device="cpu")


# ---------------------------------------------------------------------------------------------
# Reading a file a block at a time


@pytest.mark.parametrize("rate, channels", [(16_000, 1), (22_050, 2), (44_100, 1), (8_000, 2), (48_000, 1)])
def test_streamed_blocks_join_into_the_whole_file(tmp_path, rate, channels):
    wave = np.stack([sine(440 + 110 * c, 7.3, sr=rate) + noise(7.3, sr=rate, seed=c) for c in range(channels)], 1)
    path = write_audio(tmp_path / f"a{rate}.wav", wave, sr=rate, subtype="FLOAT")
    blocks = list(stream_audio(path, block_seconds=0.7))
    assert len(blocks) >= 10 and max(len(b) for b in blocks) <= 0.8 * SR
    whole, joined = load_audio(path), np.concatenate(blocks)
    assert joined.dtype == np.float32 and len(joined) == len(whole)
    np.testing.assert_allclose(joined, whole, rtol=0, atol=1e-6)  # each block resampled alone
    assert np.array_equal(np.concatenate(list(stream_audio(path, block_seconds=30))), whole)  # one block


def test_windows_by_hand():
    audio = np.arange(100, dtype=np.float32)
    blocks = [audio[:7], audio[7:50], audio[50:]]
    got = [(start, len(w), last) for start, w, last in windows(blocks, 30, 20)]
    assert got == [(0, 30, False), (20, 30, False), (40, 30, False), (60, 30, False), (80, 20, True)]
    for start, w, _ in windows(blocks, 30, 20):
        assert np.array_equal(w, audio[start : start + len(w)])
    # A window that ends exactly at the end is the last; audio that fits in one is one window.
    assert [(s, len(w), last) for s, w, last in windows(blocks, 40, 20)] == [
        (0, 40, False), (20, 40, False), (40, 40, False), (60, 40, True)]
    assert [(s, len(w), last) for s, w, last in windows([audio], 100, 20)] == [(0, 100, True)]
    with pytest.raises(ValueError, match="step"):
        next(windows([audio], 10, 11))


def test_stream_errors_name_the_file(tmp_path):
    read = lambda p: list(stream_audio(p, block_seconds=1.0))  # noqa: E731
    assert_error_names_file(AudioError, read, tmp_path / "gone.flac", "no such file")
    assert_error_names_file(AudioError, read, tmp_path, "folder")
    (tmp_path / "empty.wav").touch()
    assert_error_names_file(AudioError, read, tmp_path / "empty.wav", "empty file")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    assert_error_names_file(AudioError, read, tmp_path / "junk.wav", "cannot decode")
    assert_error_names_file(AudioError, read, write_audio(tmp_path / "none.wav", np.zeros(0, np.float32)),
                            "no audio samples")
    # A fault 5 s in surfaces when its block is read, after the blocks before it.
    wave = sine(440, 8.0)
    wave[5 * SR] = np.nan
    path = write_audio(tmp_path / "nan.wav", wave, subtype="FLOAT")
    blocks = stream_audio(path, block_seconds=1.0)
    assert len(next(blocks)) == SR
    assert_error_names_file(AudioError, lambda p: list(blocks), path, "NaN")


# ---------------------------------------------------------------------------------------------
# Windows joined into one pass


@pytest.mark.slow
def test_windows_line_up_with_one_pass_frame_for_frame(tiny, trained):
    """Without the RNN, the model reaches 736 samples (1.15 frames) either side, so two frames of
    context make every kept frame exact, and one frame does not: the check is frame-sharp."""
    wave = medley(trained, 70.0)
    conv_only = copy.deepcopy(tiny.model)
    conv_only.rnn = ConvOnly()
    whole = one_pass(windowed(tiny, 8.0, 0.08, conv_only), wave)
    joined, seconds = windowed(tiny, 8.0, 0.08, conv_only).long_log_probs(stream_of(wave))  # 2 frames
    assert seconds == len(wave) / SR and joined.shape == whole.shape == (1751, len(tiny.tokenizer))
    torch.testing.assert_close(joined, whole, rtol=0, atol=1e-5)
    too_little, _ = windowed(tiny, 8.0, 0.04, conv_only).long_log_probs([wave])  # 1 frame
    assert (too_little - whole).abs().max() > 0.1


def stream_of(wave: np.ndarray, block: int = 12_345) -> list[np.ndarray]:
    """`wave` as blocks of an odd size, as a file would arrive."""
    return [wave[i : i + block] for i in range(0, len(wave), block)]


@pytest.mark.slow
def test_a_model_whose_memory_fades_gives_one_pass_text_and_times(tiny, trained, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(rnn_type="lstm", hidden_size=32, num_layers=2, conv_channels=4, dropout=0.0)
    model = BiLSTMCTC(config, len(tiny.tokenizer)).eval()
    wave = medley(trained, 70.0)
    long, whole = windowed(tiny, 8.0, 3.0, model), windowed(tiny, 1000.0, 3.0, model)
    joined, _ = long.long_log_probs(stream_of(wave))
    torch.testing.assert_close(joined, one_pass(whole, wave), rtol=0, atol=1e-4)  # measured 3e-6
    text, words = long.transcribe_with_timestamps(wave, SR)
    expected_text, expected_words = whole.transcribe_with_timestamps(wave, SR)
    assert len(text) > 50 and text == expected_text
    assert [(w.word, w.start, w.end) for w in words] == [(w.word, w.start, w.end) for w in expected_words]
    assert [w.confidence for w in words] == pytest.approx([w.confidence for w in expected_words], abs=1e-4)
    # From a file at 22.05 kHz: streamed, resampled block by block, heard in windows.
    path = write_audio(tmp_path / "long.flac", resample(wave, SR, 22_050), sr=22_050)
    assert long.transcribe(path) == whole.transcribe(path)


@pytest.mark.slow
def test_the_tiny_model_over_many_windows(tiny, trained):
    wave = medley(trained, 70.0)
    long = windowed(tiny, 8.0, 2.0)
    joined, seconds = long.long_log_probs([wave])
    whole = one_pass(tiny, wave)
    # Its memory reaches far past 2 s (see the module docstring), yet most frames agree.
    assert joined.shape == whole.shape
    assert (joined.argmax(-1) == whole.argmax(-1)).float().mean() > 0.7  # measured 0.85
    text, words = long.transcribe_with_timestamps(wave, SR)
    assert text == long.transcribe(wave, SR) and [w.word for w in words] == text.split()
    assert all(0 <= w.start <= w.end <= seconds for w in words)
    assert all(a.end <= b.start for a, b in zip(words, words[1:]))


@pytest.mark.slow
def test_short_audio_is_heard_in_one_pass_as_before(tiny, trained):
    for uid, wav in trained.espeak_wavs.items():
        log_probs, seconds = tiny.audio_log_probs(wav)
        assert torch.equal(log_probs, one_pass(tiny, load_audio(wav)))  # not a bit changed
        assert tiny.transcribe(wav) == trained.texts[uid]


def test_a_window_must_keep_something():
    tokenizer = CharTokenizer()
    model = BiLSTMCTC(ModelConfig(hidden_size=8, num_layers=1, conv_channels=2), len(tokenizer))
    args = (model, LogMel(), tokenizer, GreedyDecoder(tokenizer), torch.device("cpu"))
    with pytest.raises(ConfigError, match="chunk_seconds=8 must be more than twice context_seconds=4"):
        Transcriber(*args, chunk_seconds=8.0, context_seconds=4.0)
    for chunk in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="chunk_seconds"):
            Transcriber(*args, chunk_seconds=chunk)
    assert Transcriber(*args, chunk_seconds=8.0, context_seconds=3.9).chunk_frames == 200  # 40 ms frames
    # 8.01 s is 200 frames, all context: the window grows by the one frame it must keep.
    assert Transcriber(*args, chunk_seconds=8.01, context_seconds=4.0).chunk_frames == 201


# ---------------------------------------------------------------------------------------------
# Peak memory, 5 against 60 minutes, through the command line

PEAK_RSS = """
import resource, sys
from asr.cli import main
code = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def write_speech(path, minutes: float, trained) -> None:
    """`minutes` of the trained utterances with pauses and faint noise, a 14 s stretch at a time."""
    rng = np.random.default_rng(0)
    unit = medley(trained, 14.0)
    total = int(minutes * 60 * SR)
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16") as f:
        for start in range(0, total, len(unit)):
            part = unit[: total - start]
            f.write(part + (0.003 * rng.standard_normal(len(part))).astype(np.float32))


def transcribe_measuring_peak(model, path) -> tuple[dict, int]:
    """(the JSON result, peak resident memory in kB) of `asr transcribe --timestamps` with beam
    search in a fresh interpreter, one thread as in run_asr."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, "transcribe", "--model", str(model), "--timestamps",
                           "--decoder", "beam", "--beam-size", "8", str(path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stderr.split("PEAK_KB")[-1])
    return json.loads(done.stdout), peak


@pytest.mark.slow
def test_an_hour_takes_no_more_memory_than_five_minutes(trained, tmp_path):
    """Read whole, an hour at 16 kHz is 230 MB of samples and its first convolution's output
    920 MB (3.2 GB peak against 0.8 GB for 5 minutes, measured); read and heard a window at a
    time, with the beam search and the alignment bounded too, the peak stays within 1.5x."""
    model = trained.exp / "best.pt"
    peaks, results = {}, {}
    for minutes in (5, 60):
        path = tmp_path / f"{minutes}min.flac"
        write_speech(path, minutes, trained)
        results[minutes], peaks[minutes] = transcribe_measuring_peak(model, path)
    print(f"peak RSS: 5 min {peaks[5] / 1024:.0f} MB, 60 min {peaks[60] / 1024:.0f} MB")
    assert peaks[60] <= 1.5 * peaks[5]
    words = results[60]["words"]
    assert len(words) > 10 * len(results[5]["words"]) > 0  # the text runs on to the end
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))
    assert 0 <= words[0]["start"] and 3570 < words[-1]["end"] <= 3600
