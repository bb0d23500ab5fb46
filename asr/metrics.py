"""Word and character error rates at corpus level, and the per-utterance evidence behind them.

Errors are summed over the corpus and divided by the reference length summed over the corpus
(never an average of per-utterance rates). Both sides are normalised the same way first.
Each utterance keeps its substitutions, deletions and insertions (words and characters) and its
word alignment, from which asr/report.py builds the error report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import jiwer

from asr.text import normalize_text


# One step of an alignment: (op, reference token, hypothesis token), op as sclite writes it:
# "C" correct, "S" substitution, "D" deletion (hypothesis token ""), "I" insertion (reference "").
Step = tuple[str, str, str]


@dataclass
class UtteranceErrors:
    """One utterance scored; word_errors == substitutions + deletions + insertions, and the
    same for characters (char_errors == char_substitutions + char_deletions + char_insertions)."""

    id: str
    reference: str
    hypothesis: str
    word_errors: int
    words: int
    char_errors: int
    chars: int
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    char_substitutions: int = 0
    char_deletions: int = 0
    char_insertions: int = 0
    alignment: list[Step] = field(default_factory=list)  # words


@dataclass
class ErrorRates:
    wer: float
    cer: float
    words: int
    chars: int
    utterances: list[UtteranceErrors]


def align(ref: list[str], hyp: list[str]) -> list[Step]:
    """A minimum-edit alignment of two token lists, one Step per reference or hypothesis token.

    >>> align(["A", "B", "C"], ["A", "X", "C", "D"])
    [('C', 'A', 'A'), ('S', 'B', 'X'), ('C', 'C', 'C'), ('I', '', 'D')]
    """
    if not ref or not hyp:  # jiwer refuses an empty side: all deletions or all insertions
        return [("D", r, "") for r in ref] + [("I", "", h) for h in hyp]
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    ref, hyp = out.references[0], out.hypotheses[0]
    steps: list[Step] = []
    for c in out.alignments[0]:
        refs, hyps = ref[c.ref_start_idx:c.ref_end_idx], hyp[c.hyp_start_idx:c.hyp_end_idx]
        if c.type == "delete":
            steps += [("D", r, "") for r in refs]
        elif c.type == "insert":
            steps += [("I", "", h) for h in hyps]
        else:  # "equal" or "substitute": the same number of tokens on both sides
            op = "C" if c.type == "equal" else "S"
            steps += [(op, r, h) for r, h in zip(refs, hyps, strict=True)]
    return steps


def _counts(steps: list[Step]) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) in an alignment."""
    ops = [op for op, _, _ in steps]
    return ops.count("S"), ops.count("D"), ops.count("I")


def error_rates(ids: list[str], references: list[str], hypotheses: list[str]) -> ErrorRates:
    """Corpus WER/CER of `hypotheses` against `references` (both normalised here)."""
    utts = []
    for uid, ref, hyp in zip(ids, references, hypotheses, strict=True):
        ref, hyp = normalize_text(ref), normalize_text(hyp)
        rw, hw = ref.split(), hyp.split()
        # CER over characters with word boundaries kept as one space (LibriSpeech convention),
        # written "_" so that a character is never whitespace to jiwer's tokenizer.
        rc, hc = list(ref.replace(" ", "_")), list(hyp.replace(" ", "_"))
        steps = align(rw, hw)
        word_sdi, char_sdi = _counts(steps), _counts(align(rc, hc))
        utts.append(UtteranceErrors(uid, ref, hyp, sum(word_sdi), len(rw), sum(char_sdi), len(rc),
                                    *word_sdi, *char_sdi, alignment=steps))
    words = sum(u.words for u in utts)
    chars = sum(u.chars for u in utts)
    return ErrorRates(
        wer=sum(u.word_errors for u in utts) / max(words, 1),
        cer=sum(u.char_errors for u in utts) / max(chars, 1),
        words=words, chars=chars, utterances=utts,
    )


# errors.jsonl keeps its columns; the full evidence (S/D/I, alignments) is in the error report.
_JSONL_FIELDS = ("id", "reference", "hypothesis", "word_errors", "words", "char_errors", "chars")


def write_report(rates: ErrorRates, path: str | os.PathLike) -> None:
    """One JSON line per utterance (id, reference, hypothesis, error counts), worst first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for u in sorted(rates.utterances, key=lambda u: (-u.word_errors, u.id)):
            f.write(json.dumps({k: getattr(u, k) for k in _JSONL_FIELDS}, ensure_ascii=False) + "\n")
