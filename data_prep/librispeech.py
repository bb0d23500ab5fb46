"""LibriSpeech (or any tree in its layout) -> manifest.

Layout: <split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac, with the transcripts of a
chapter in <speaker>-<chapter>.trans.txt, one "<utt-id> <TEXT>" a line. The synthetic corpus
is written in the same layout, so this one reader serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from asr.audio import audio_duration
from asr.data import Utterance, write_manifest
from asr.errors import ASRError
from asr.text import CharTokenizer, normalize_text

AUDIO_EXTENSIONS = (".flac", ".wav")


@dataclass
class PrepareReport:
    """What went into a manifest and what was left out, with the reason for each."""

    manifest: Path
    utterances: int = 0
    hours: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (utterance id or file, reason)


def scan_split(split_dir: str | os.PathLike) -> tuple[list[Utterance], list[tuple[str, str]]]:
    """Rows of every transcribed utterance under `split_dir`, and (id, reason) of the rest."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise ASRError(f"{split_dir}: no such folder")
    tokenizer = CharTokenizer()
    rows, skipped = [], []
    transcripts = sorted(split_dir.rglob("*.trans.txt"))
    if not transcripts:
        raise ASRError(f"{split_dir}: no *.trans.txt transcripts (expected LibriSpeech layout "
                       "<speaker>/<chapter>/<speaker>-<chapter>.trans.txt)")
    for trans in transcripts:
        for number, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = next((trans.parent / (uid + ext) for ext in AUDIO_EXTENSIONS
                          if (trans.parent / (uid + ext)).exists()), None)
            if audio is None:
                skipped.append((uid, f"no audio file {trans.parent / uid}.flac ({trans.name}:{number})"))
                continue
            text = normalize_text(text)
            if not text:
                skipped.append((uid, "empty transcript"))
                continue
            try:
                tokenizer.encode(text)
                duration = audio_duration(audio)
            except ASRError as e:
                skipped.append((uid, str(e)))
                continue
            rows.append(Utterance(uid, str(audio.resolve()), duration, text))
    return rows, skipped


def prepare_split(split_dir: str | os.PathLike, manifest: str | os.PathLike) -> PrepareReport:
    """Write the manifest of one split folder; returns what was written and what was skipped."""
    rows, skipped = scan_split(split_dir)
    if not rows:
        raise ASRError(f"{split_dir}: no usable utterances ({len(skipped)} skipped)")
    write_manifest(rows, manifest)
    return PrepareReport(Path(manifest), len(rows), sum(r.duration for r in rows) / 3600, skipped)
