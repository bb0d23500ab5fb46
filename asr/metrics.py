"""Word and character error rates at corpus level, and the per-utterance evidence behind them.

Errors are summed over the corpus and divided by the reference length summed over the corpus
(never an average of per-utterance rates). Both sides are normalised the same way first.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer

from asr.text import normalize_text


@dataclass
class UtteranceErrors:
    id: str
    reference: str
    hypothesis: str
    word_errors: int
    words: int
    char_errors: int
    chars: int


@dataclass
class ErrorRates:
    wer: float
    cer: float
    words: int
    chars: int
    utterances: list[UtteranceErrors]


def _edits(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between two token lists (jiwer refuses empty sides)."""
    if not ref or not hyp:
        return len(ref) + len(hyp)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return out.substitutions + out.deletions + out.insertions


def error_rates(ids: list[str], references: list[str], hypotheses: list[str]) -> ErrorRates:
    """Corpus WER/CER of `hypotheses` against `references` (both normalised here)."""
    utts = []
    for uid, ref, hyp in zip(ids, references, hypotheses, strict=True):
        ref, hyp = normalize_text(ref), normalize_text(hyp)
        rw, hw = ref.split(), hyp.split()
        # CER over characters with word boundaries kept as one space (LibriSpeech convention).
        rc, hc = list(ref.replace(" ", "_")), list(hyp.replace(" ", "_"))
        utts.append(UtteranceErrors(uid, ref, hyp, _edits(rw, hw), len(rw), _edits(rc, hc), len(rc)))
    words = sum(u.words for u in utts)
    chars = sum(u.chars for u in utts)
    return ErrorRates(
        wer=sum(u.word_errors for u in utts) / max(words, 1),
        cer=sum(u.char_errors for u in utts) / max(chars, 1),
        words=words, chars=chars, utterances=utts,
    )


def write_report(rates: ErrorRates, path: str | os.PathLike) -> None:
    """One JSON line per utterance (id, reference, hypothesis, error counts), worst first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for u in sorted(rates.utterances, key=lambda u: (-u.word_errors, u.id)):
            f.write(json.dumps(asdict(u), ensure_ascii=False) + "\n")
