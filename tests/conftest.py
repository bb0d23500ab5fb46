"""Shared fixtures: seeding, tiny audio files, the real recordings, and one trained model.

The trained model (`trained`) is built once per session by the real command line: espeak-ng
speaks a handful of short sentences, `asr prepare librispeech` writes the manifest and
`asr train` overfits a tiny BiLSTM-CTC on it. The end-to-end tests in test_cli.py share it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

SR = 16_000
REAL_SAMPLES = Path(os.environ.get(
    "ASR_REAL_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "data" / "real-samples"))


def pytest_configure(config):
    # The tensors here are small: one thread is as fast as two, and it does not collapse when
    # other processes share the cores (two OpenMP threads then spin against each other).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def sine(freq: float, seconds: float, sr: int = SR, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, sr: int = SR, amplitude: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amplitude * rng.standard_normal(int(round(seconds * sr)))).astype(np.float32)


def write_audio(path: Path, wave: np.ndarray, sr: int = SR, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, sr, subtype=subtype)
    return path


@pytest.fixture
def real_samples() -> Path:
    """The folder of real recordings (manifest.jsonl beside them); skipped where absent."""
    if not (REAL_SAMPLES / "manifest.jsonl").is_file():
        pytest.skip(f"real recordings not found at {REAL_SAMPLES} (set ASR_REAL_SAMPLES)")
    return REAL_SAMPLES


def assert_error_names_file(error_type, call, path, *words) -> str:
    """`call(path)` raises `error_type` whose message names `path` and holds every word."""
    with pytest.raises(error_type) as err:
        call(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def run_asr(*args, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh interpreter; returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in pytest_configure, for the same reason
    return subprocess.run([sys.executable, "-m", "asr.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


# ---------------------------------------------------------------------------------------------
# The end-to-end corpus and model, built once per session.

ESPEAK = shutil.which("espeak-ng")

# Short sentences, one voice; together they use most of the alphabet.
E2E_TEXTS = [
    "HELLO WORLD",
    "GOOD MORNING",
    "THE CAT SAT",
    "OPEN THE DOOR",
    "BLUE SKY",
    "QUICK BROWN FOX JUMPS",
    "PLEASE CALL STELLA",
    "SEVEN GREEN APPLES",
]
# One batch of all utterances per epoch, so one optimizer step per epoch. With these settings
# the dev CER (on the training set) reaches 0 after about 120 steps; a BiLSTM of the same size
# was still above 70% after 400, so the GRU variant is the one trained here.
E2E_EPOCHS = 220
E2E_SETTINGS = [
    "model.rnn_type=gru", "model.hidden_size=96", "model.num_layers=2", "model.subsampling=4",
    "model.dropout=0.0",
    "optim.lr=3e-3", "optim.warmup_steps=20", "specaugment.enabled=false",
    "data.max_batch_size=8", "data.num_workers=0", "log_every=20", "save_every=0",
]


@dataclass
class Trained:
    root: Path  # everything of the session's run lives under here
    corpus: Path  # LibriSpeech layout: corpus/train/<speaker>/<chapter>/...
    manifest: Path  # written by `asr prepare librispeech`
    exp: Path  # written by `asr train`
    espeak_wavs: dict  # utterance id -> espeak-ng's own 22.05 kHz WAV
    texts: dict  # utterance id -> reference text
    prepare: subprocess.CompletedProcess
    train: subprocess.CompletedProcess


def speak(text: str, path: Path) -> Path:
    subprocess.run([ESPEAK, "-v", "en-us", "-s", "170", "-w", str(path), text.lower()], check=True,
                   capture_output=True, timeout=60)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed: the end-to-end tests need it to make speech")
    from asr.audio import load_audio

    root = tmp_path_factory.mktemp("e2e")
    chapter = root / "corpus" / "train" / "100" / "7"
    chapter.mkdir(parents=True)
    (root / "espeak").mkdir()
    lines, wavs, texts = [], {}, {}
    for i, text in enumerate(E2E_TEXTS):
        uid = f"100-7-{i:04d}"
        wav = speak(text, root / "espeak" / f"{uid}.wav")  # 22.05 kHz, as espeak-ng writes it
        sf.write(chapter / f"{uid}.flac", load_audio(wav), SR)
        lines.append(f"{uid} {text}")
        wavs[uid], texts[uid] = wav, text
    lines.append("100-7-0099 A LINE WHOSE AUDIO FILE IS MISSING")
    (chapter / "100-7.trans.txt").write_text("\n".join(lines) + "\n")

    prepare = run_asr("prepare", "librispeech", "--corpus-dir", root / "corpus", "--splits", "train",
                      "--out", root / "data")
    assert prepare.returncode == 0, prepare.stderr
    manifest = root / "data" / "train.jsonl"
    exp = root / "exp"
    overrides = [a for s in E2E_SETTINGS + [f"epochs={E2E_EPOCHS}"] for a in ("--set", s)]
    train = run_asr("train", "--train", manifest, "--dev", manifest, "--exp-dir", exp, "--no-progress",
                    *overrides, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    return Trained(root, root / "corpus", manifest, exp, wavs, texts, prepare, train)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
