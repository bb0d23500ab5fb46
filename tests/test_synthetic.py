"""The synthetic corpus: LibriSpeech layout, sane audio, disjoint splits, determinism, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep import synthetic
from data_prep.synthetic import SplitSpec, build_corpus

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (apt-get install espeak-ng)")
needs_dictionary = pytest.mark.skipif(not synthetic.DICTIONARY.exists(),
                                      reason="no word list (apt-get install wamerican)")

TINY = dict(train=SplitSpec(2, 3), dev=SplitSpec(2, 3), test=SplitSpec(2, 3), lm_sentences=50,
            max_words=8, seed=1, progress=False)  # seed 1: train has a flite speaker
FLAC_NAME = re.compile(r"(\d+)-(\d+)-(\d{4})\.flac")
TEXT = re.compile(r"[A-Z']+( [A-Z']+)*")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    build_corpus(out, jobs=2, **TINY)
    return out


def transcripts(split_dir: Path) -> dict[str, str]:
    rows = {}
    for trans in sorted(split_dir.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            uid, text = line.split(" ", 1)
            rows[uid] = text
    return rows


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@needs_espeak
@needs_dictionary
def test_layout_matches_librispeech(corpus):
    for split in synthetic.SPLITS:
        flacs = sorted((corpus / split).rglob("*.flac"))
        assert len(flacs) == 6
        for flac in flacs:
            speaker, chapter, _ = FLAC_NAME.fullmatch(flac.name).groups()
            assert flac.parent == corpus / split / speaker / chapter
            assert (flac.parent / f"{speaker}-{chapter}.trans.txt").is_file()
        rows = transcripts(corpus / split)
        assert sorted(rows) == [f.stem for f in flacs]
        assert all(TEXT.fullmatch(text) for text in rows.values()), rows
        assert not list((corpus / split).rglob("*.tmp"))
    lm = (corpus / "lm" / "text.txt").read_text(encoding="utf-8").splitlines()
    assert len(lm) == 50 and all(TEXT.fullmatch(line) for line in lm)


@needs_espeak
@needs_dictionary
def test_audio_is_16k_mono_speech_of_plausible_length(corpus):
    for split in synthetic.SPLITS:
        for uid, text in transcripts(corpus / split).items():
            path = next((corpus / split).rglob(f"{uid}.flac"))
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.format, info.subtype) == \
                (16000, 1, "FLAC", "PCM_16")
            wave, _ = sf.read(path, dtype="float32")
            assert 0.4 < np.abs(wave).max() <= 0.91  # peak-normalised to 0.9 * [0.5, 1]
            # 6 to 30 characters a second of speech, plus the 0.1 s kept at each end.
            assert 0.2 + len(text) / 30 <= info.duration <= 0.6 + len(text) / 6, (uid, text)


@needs_espeak
@needs_dictionary
def test_splits_are_disjoint(corpus):
    texts = {split: set(transcripts(corpus / split).values()) for split in synthetic.SPLITS}
    voices = {split: json.loads((corpus / split / "speakers.json").read_text())
              for split in synthetic.SPLITS}
    lm = set((corpus / "lm" / "text.txt").read_text(encoding="utf-8").splitlines())
    for a, b in [("train", "dev"), ("train", "test"), ("dev", "test")]:
        assert not texts[a] & texts[b]
        assert not set(voices[a]) & set(voices[b])  # speaker ids
        settings = {json.dumps(v, sort_keys=True) for v in voices[a].values()}
        assert not settings & {json.dumps(v, sort_keys=True) for v in voices[b].values()}
    assert not lm & (texts["dev"] | texts["test"])
    engines = {v["engine"] for split in voices.values() for v in split.values()}
    assert engines == set(synthetic.available_engines())  # both engines are exercised


@needs_dictionary
def test_disjointness_holds_at_scale():
    """Without audio: thousands of sentences and hundreds of voices per split never collide."""
    drawn = {split: set(synthetic.sentences(split, 2000, seed=1, stream=i, max_words=12))
             for i, split in enumerate(synthetic.SPLITS)}
    lm = set(synthetic.sentences("train", 5000, seed=1, stream=3, max_words=12))
    assert all(len(s) == 2000 for s in drawn.values())
    assert not (drawn["train"] & drawn["dev"] or drawn["train"] & drawn["test"]
                or drawn["dev"] & drawn["test"] or lm & (drawn["dev"] | drawn["test"]))
    voices = {split: synthetic.speakers(split, 300, seed=1, engines=("espeak-ng", "flite"))
              for split in synthetic.SPLITS}
    train, dev, test = (set(voices[split]) for split in synthetic.SPLITS)
    assert len(train) == len(dev) == len(test) == 300
    assert not (train & dev or train & test or dev & test)
    flite = sum(v.engine == "flite" for v in voices["train"]) / 300
    assert 0.1 < flite < 0.3


@needs_dictionary
def test_vocabulary_is_large_and_spoken_as_written():
    words, probs = synthetic.vocabulary()
    assert len(words) > 10_000 and np.isclose(probs.sum(), 1.0)
    assert all(synthetic.WORD_RE.fullmatch(w) for w in words)
    assert {"a", "i", "the", "don't", "people"} <= set(words)
    assert not {"mr", "dr", "st", "uk", "tv", "ii", "iv", "etc", "id", "est", "nbsp"} & set(words)
    drawn = synthetic.sentences("train", 2000, seed=0, stream=0, max_words=16)
    lengths = np.array([len(s.split()) for s in drawn])
    assert lengths.min() == 1 and lengths.max() == 16
    assert np.mean(lengths <= 4) > 0.3  # many short utterances, which training sees first
    assert len({w for s in drawn for w in s.split()}) > 3000  # thousands of words, not templates


@needs_espeak
@needs_dictionary
def test_same_seed_same_corpus_for_any_jobs(corpus, tmp_path):
    build_corpus(tmp_path, jobs=1, **TINY)
    for split in synthetic.SPLITS:
        assert transcripts(tmp_path / split) == transcripts(corpus / split)
        for flac in (corpus / split).rglob("*.flac"):
            assert (tmp_path / flac.relative_to(corpus)).read_bytes() == flac.read_bytes()
    assert (tmp_path / "lm" / "text.txt").read_text() == (corpus / "lm" / "text.txt").read_text()


@needs_espeak
@needs_dictionary
def test_finished_splits_are_skipped_and_a_killed_build_resumes(corpus, tmp_path):
    out = tmp_path / "corpus"
    shutil.copytree(corpus, out)
    before = mtimes(out)
    build_corpus(out, jobs=2, **TINY)
    assert mtimes(out) == before

    # A build killed halfway through train: no .done, one utterance missing. Not a speaker's
    # first: espeak-ng's audio depends on the utterances spoken before it by the same engine.
    victim = sorted((out / "train").rglob("*.flac"))[1]
    original = victim.read_bytes()
    victim.unlink()
    (out / "train" / ".done").unlink()
    build_corpus(out, jobs=2, **TINY)
    assert victim.read_bytes() == original
    after = mtimes(out)
    assert {k for k in before if after[k] != before[k]} <= {
        str(p.relative_to(out)) for p in [victim, out / "train" / ".done"]
        + list((out / "train").rglob("*.trans.txt")) + [out / "train" / "speakers.json"]}

    # Other parameters for dev: dev is rebuilt, train and test stay.
    build_corpus(out, jobs=2, **dict(TINY, dev=SplitSpec(1, 2)))
    assert len(transcripts(out / "dev")) == 2
    assert mtimes(out / "test") == {k[5:]: v for k, v in after.items() if k.startswith("test/")}


@needs_espeak
def test_espeak_library_speaks_as_the_program_and_reproducibly():
    voices = synthetic.speakers("train", 6, seed=3, engines=("espeak-ng",))
    texts = ["the quick brown fox", "jumps over the lazy dog", "and runs away"]
    for voice in voices:
        waves, rate = synthetic.speak_espeak(texts, voice)
        first, program_rate = synthetic.synthesize(texts[0], voice)
        assert rate == program_rate and np.array_equal(waves[0], first), voice
        again, _ = synthetic.speak_espeak(texts, voice)
        assert all(np.array_equal(a, b) for a, b in zip(waves, again)), voice
        assert all(len(w) > rate * 0.3 for w in waves)  # each text spoken, not an empty reply
    with pytest.raises(RuntimeError, match="no voice 'en-xx'"):
        synthetic.speak_espeak(["hello"], synthetic.Speaker("espeak-ng", "en-xx", "", 170, 50))


def test_a_crash_while_speaking_is_reported_with_its_speaker(monkeypatch):
    class Crashing:  # what a segfault in the library looks like from outside
        def __init__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(synthetic, "_EspeakLibrary", Crashing)
    speaker = synthetic.Speaker("espeak-ng", "en-us", "f2", 170, 50)
    with pytest.raises(RuntimeError, match=r"voice='en-us'.*died \(signal 9\)"):
        synthetic.speak_espeak(["hello"], speaker)


@needs_dictionary
def test_refuses_to_overwrite_a_foreign_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "available_engines", lambda: ("espeak-ng",))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not written by"):
        build_corpus(tmp_path, jobs=1, **TINY)
    assert (tmp_path / "train" / "notes.txt").read_text() == "mine"


def test_missing_engines(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        synthetic.available_engines()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/espeak-ng" if name == "espeak-ng"
                        else None)
    with pytest.warns(UserWarning, match="flite"):
        assert synthetic.available_engines() == ("espeak-ng",)


def test_trim_keeps_padding_and_finish_normalises():
    sr = 16000
    tone = 0.5 * np.sin(2 * np.pi * 200 * np.arange(sr) / sr).astype(np.float32)
    wave = np.concatenate([np.zeros(sr, np.float32), tone, np.zeros(2 * sr, np.float32)])
    trimmed = synthetic.trim_silence(wave, sr)
    assert abs(len(trimmed) - (sr + 2 * synthetic.PAD_SECONDS * sr)) <= sr // 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = synthetic.finish(trimmed, np.random.default_rng(0))
    assert out.dtype == np.float32 and 0.45 <= np.abs(out).max() <= 0.9


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="at least 1 speaker"):
        SplitSpec(0, 3)
    with pytest.raises(ValueError, match="utterances per speaker"):
        SplitSpec(2, 20_000)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(["--help"])
    assert exit_.value.code == 0
    assert "--train-speakers" in capsys.readouterr().out
