import numpy as np
import pytest

from asr.data import read_manifest
from asr.errors import ASRError
from conftest import noise, sine, write_audio
from data_prep.librispeech import prepare_split, scan_split


@pytest.fixture
def corpus(tmp_path):
    """A tiny LibriSpeech-layout split, with the kinds of damage real corpora have."""
    split = tmp_path / "LibriSpeech" / "dev-tiny"
    ch1, ch2 = split / "19" / "198", split / "26" / "495"
    write_audio(ch1 / "19-198-0000.flac", sine(440, 1.0))
    write_audio(ch1 / "19-198-0001.flac", noise(0.5))
    # 19-198-0002 has a transcript line and no audio file.
    bad = ch1 / "19-198-0003.flac"
    bad.write_bytes(b"fLaC" + np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    write_audio(ch1 / "19-198-0004.flac", sine(300, 0.3))  # its text normalises to nothing
    (ch1 / "19-198.trans.txt").write_text(
        "19-198-0000 Hello, world!\n"
        "19-198-0001 It's 2 o'clock\u2014the \"farmers'\" market.\n"
        "19-198-0002 NOBODY RECORDED THIS LINE\n"
        "\n"
        "19-198-0003 A CORRUPT FILE\n"
        "19-198-0004 1984 !!!\n"
    )
    write_audio(ch2 / "26-495-0000.wav", sine(500, 0.25, 22050), 22050)  # a WAV at another rate
    (ch2 / "26-495.trans.txt").write_text("26-495-0000 CAF\u00c9-AU-LAIT\n")
    write_audio(ch2 / "26-495-0009.flac", sine(500, 0.25))  # audio with no transcript: not listed
    return split


def test_prepare_split_writes_the_manifest(corpus, tmp_path):
    manifest = tmp_path / "data" / "dev-tiny.jsonl"
    report = prepare_split(corpus, manifest)
    rows = read_manifest(manifest)
    assert [(r.id, r.duration, r.text) for r in rows] == [
        ("19-198-0000", 1.0, "HELLO WORLD"),
        ("19-198-0001", 0.5, "IT'S O'CLOCK THE FARMERS' MARKET"),
        ("26-495-0000", 0.25, "CAFE AU LAIT"),
    ]
    assert rows[0].audio == str(corpus / "19" / "198" / "19-198-0000.flac")
    assert rows[2].audio == str(corpus / "26" / "495" / "26-495-0000.wav")
    assert report.manifest == manifest
    assert report.utterances == 3
    assert report.hours == pytest.approx((1.0 + 0.5 + 5512 / 22050) / 3600)  # from the headers, unrounded


def test_prepare_split_reports_each_skipped_utterance(corpus, tmp_path):
    report = prepare_split(corpus, tmp_path / "m.jsonl")
    reasons = dict(report.skipped)
    assert sorted(reasons) == ["19-198-0002", "19-198-0003", "19-198-0004"]
    assert "no audio file" in reasons["19-198-0002"] and "19-198.trans.txt:3" in reasons["19-198-0002"]
    assert "19-198-0003.flac" in reasons["19-198-0003"] and "cannot read audio" in reasons["19-198-0003"]
    assert reasons["19-198-0004"] == "empty transcript"


def test_scan_split_is_the_manifest_without_writing(corpus):
    rows, skipped = scan_split(corpus)
    assert [r.id for r in rows] == ["19-198-0000", "19-198-0001", "26-495-0000"]
    assert len(skipped) == 3
    assert not list(corpus.parent.rglob("*.jsonl"))


def test_prepare_is_repeatable(corpus, tmp_path):
    manifest = tmp_path / "m.jsonl"
    prepare_split(corpus, manifest)
    first = manifest.read_text()
    prepare_split(corpus, manifest)
    assert manifest.read_text() == first


def test_truncated_flac_is_skipped(corpus, tmp_path):
    good = corpus / "19" / "198" / "19-198-0001.flac"
    write_audio(good, noise(2.0))
    good.write_bytes(good.read_bytes()[:20000])
    report = prepare_split(corpus, tmp_path / "m.jsonl")
    assert "19-198-0001" in dict(report.skipped)


def test_missing_split_folder(tmp_path):
    with pytest.raises(ASRError, match="no such folder"):
        prepare_split(tmp_path / "nope", tmp_path / "m.jsonl")


def test_folder_without_transcripts(tmp_path):
    write_audio(tmp_path / "split" / "1" / "2" / "1-2-0000.flac", sine(440, 0.1))
    with pytest.raises(ASRError, match="trans.txt"):
        prepare_split(tmp_path / "split", tmp_path / "m.jsonl")


def test_nothing_usable(tmp_path):
    chapter = tmp_path / "split" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2.trans.txt").write_text("1-2-0000 NO AUDIO\n1-2-0001 NONE HERE EITHER\n")
    with pytest.raises(ASRError, match="no usable utterances"):
        prepare_split(tmp_path / "split", tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()
