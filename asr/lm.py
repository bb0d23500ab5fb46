"""Word n-gram language models: Kneser-Ney estimation, ARPA files, back-off scoring.

The beam-search decoder fuses one of these at word boundaries. A model is the ARPA file's
content as a table per order:

    ngrams[n - 1][(w1, ..., wn)] = (log10 P(wn | w1 .. wn-1), log10 back-off of w1 .. wn)

with the back-off 0.0 where an n-gram has none (always so at the highest order). Words are
what `asr.text.normalize_text` makes of a transcript (upper case), plus the three specials:
`<s>` only ever starts a context, `</s>` ends every sentence and is predicted like a word,
and `<unk>` stands for every word the model has not seen.

`build_lm` estimates interpolated modified Kneser-Ney exactly as KenLM's `lmplz` does
(Heafield et al. 2013, "Scalable Modified Kneser-Ney Language Model Estimation"); the tests
hold it to `lmplz`'s own ARPA output (to float32 precision). It counts with dicts and does
the arithmetic on numpy arrays, quick enough for the ~100k transcripts of a speech corpus; a
web-scale text wants `lmplz` itself.
"""

from __future__ import annotations

import gzip
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from asr.errors import LMError
from asr.text import normalize_text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPECIALS = (UNK, BOS, EOS)  # lmplz's vocabulary ids 0, 1, 2: the unigram table starts with them
# <s> is never predicted; SRILM writes log10 P(<s>) = -99 (lmplz writes 0), either way ignored.
BOS_LOG10 = -99.0
# What a word scores when the model has no <unk> to stand for it (KenLM substitutes the same).
OOV_LOG10 = -100.0
# lmplz --discount_fallback's defaults: D1, D2, D3+ for an order whose closed form fails.
DISCOUNT_FALLBACK = (0.5, 1.0, 1.5)


Table = dict[tuple[str, ...], tuple[float, float]]


@dataclass
class NGramLM:
    """A back-off n-gram model; `ngrams[n - 1]` maps each n-gram to (log10 prob, log10 back-off)."""

    order: int
    ngrams: list[Table]

    def vocabulary(self) -> list[str]:
        """The words of the unigram table, in its order, without <s>, </s> and <unk>."""
        return [g[0] for g in self.ngrams[0] if g[0] not in SPECIALS]

    def log10_prob(self, word: str, context: tuple[str, ...] = ()) -> float:
        """log10 P(word | context) by ARPA back-off; only the last order - 1 context words count.

        A word the model does not list scores as <unk> (in the context too); without an <unk>
        unigram it scores OOV_LOG10 plus the back-offs on the way down, as in KenLM.
        """
        unigrams = self.ngrams[0]
        if (word,) not in unigrams:
            word = UNK
        history = tuple(context[-(self.order - 1):]) if self.order > 1 else ()
        history = tuple(w if (w,) in unigrams else UNK for w in history)
        backoff = 0.0
        for start in range(len(history) + 1):
            h = history[start:]
            hit = self.ngrams[len(h)].get(h + (word,))
            if hit is not None:
                return backoff + hit[0]
            if h:  # not listed: pay h's back-off (0 when h is no context) and drop its oldest word
                listed = self.ngrams[len(h) - 1].get(h)
                if listed is not None:
                    backoff += listed[1]
        return backoff + OOV_LOG10  # only an unknown word in a model without <unk> gets here

    def sentence_log10(self, words: list[str]) -> float:
        """log10 P(<s> w1 .. wn </s>): the sum over w1 .. wn and </s>, each given its history."""
        keep = max(self.order - 1, 1)
        context: tuple[str, ...] = (BOS,)
        total = 0.0
        for word in [*words, EOS]:
            total += self.log10_prob(word, context)
            context = (context + (word,))[-keep:]
        return total


# ---------------------------------------------------------------------------------------------
# Estimation: interpolated modified Kneser-Ney, step for step as lmplz computes it.


def build_lm(sentences: Iterable[str], order: int = 3,
             discount_fallback: tuple[float, float, float] | None = DISCOUNT_FALLBACK) -> NGramLM:
    """Estimate an interpolated modified Kneser-Ney model of `order` from transcripts.

    Each line is normalised with `normalize_text`; lines left empty are skipped. Where an
    order's counts-of-counts give no valid closed-form discounts (small or artificial text),
    that order takes `discount_fallback` (D1, D2, D3+) as `lmplz --discount_fallback` does;
    None raises LMError instead, as plain `lmplz` does.
    """
    if order < 1:
        raise LMError(f"n-gram order must be at least 1, got {order}")
    raw, words = _count(sentences, order)
    if not words:
        raise LMError("no words to estimate a language model from (every line was empty)")
    adjusted = _adjust_counts(raw, words)
    discounts = [_discounts(counts, n, discount_fallback) for n, counts in enumerate(adjusted, 1)]

    # p(w | h) = (a(h w) - D(a(h w))) / sum_x a(h x) + gamma(h) * p(w | h minus its oldest word)
    # with gamma(h) = sum_x D(a(h x)) / sum_x a(h x), the mass the discounts free. The unigrams
    # interpolate with the uniform distribution over every word but <s> (<unk> and </s>
    # included), so <unk>, seen nowhere, gets gamma / |V|. Each order is held as arrays aligned
    # with its list of n-grams; an n-gram's context and its suffix (h minus its oldest word)
    # are both listed one order down, so they are found by position there.
    grams = [list(counts) for counts in adjusted]
    probs: list[np.ndarray] = []
    gammas: list[np.ndarray] = []  # gammas[n][i]: gamma of grams[n - 1][i] as a context
    for n, (counts, d) in enumerate(zip(adjusted, discounts)):
        a = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        freed = np.array([0.0, *d])[np.minimum(a, 3).astype(np.int64)]  # a zero count frees 0
        if n == 0:
            context = np.zeros(len(a), dtype=np.int64)  # one context, the empty one
            lower = np.full(len(a), 1.0 / (len(a) - 1))
            n_contexts = 1
        else:
            at = dict(zip(grams[n - 1], range(len(grams[n - 1]))))
            context = np.array([at[g[:-1]] for g in grams[n]], dtype=np.int64)
            lower = probs[n - 1][np.array([at[g[1:]] for g in grams[n]], dtype=np.int64)]
            n_contexts = len(grams[n - 1])
        total = np.bincount(context, weights=a, minlength=n_contexts)
        gamma = np.bincount(context, weights=freed, minlength=n_contexts)
        # NaN marks an n-gram that no word follows (one ending in </s> or <unk>): no context.
        gamma = np.divide(gamma, total, out=np.full(n_contexts, np.nan), where=total > 0)
        probs.append((a - freed) / total[context] + gamma[context] * lower)
        gammas.append(gamma)

    ngrams: list[Table] = []
    for n in range(order):
        with np.errstate(divide="ignore"):
            logp = np.minimum(np.log10(probs[n]), 0.0)  # min: rounding can push a log past 0
            # A context backs off by its gamma; the highest order and the non-contexts by 0.
            logb = np.log10(gammas[n + 1]) if n + 1 < order else np.zeros(len(logp))
        logb[np.isnan(logb)] = 0.0
        ngrams.append(dict(zip(grams[n], zip(logp.tolist(), logb.tolist()))))
    ngrams[0][(BOS,)] = (BOS_LOG10, ngrams[0][(BOS,)][1])
    return NGramLM(order, ngrams)


def _count(sentences: Iterable[str], order: int) -> tuple[list[Counter], dict[str, None]]:
    """Raw counts of <s> w1 .. wn </s>, and the words in order of first appearance.

    counts[order - 1] holds the highest-order n-grams; counts[n - 1] below it only the openings
    <s> w1 .. w(n-1), which keep raw counts (nothing precedes <s>, so it has no continuation
    count). lmplz gets the same by padding with order - 1 <s> and moving every n-gram with
    more than one <s> down to the order that holds one; its vocabulary is numbered in order of
    first appearance.
    """
    counts = [Counter() for _ in range(order)]
    top, openings = counts[-1], counts[:-1]
    words: dict[str, None] = {}
    for line in sentences:
        sentence = normalize_text(line).split()
        if not sentence:
            continue
        words.update(dict.fromkeys(sentence))
        tokens = [BOS, *sentence, EOS] if order > 1 else [*sentence, EOS]
        top.update(zip(*(tokens[i:] for i in range(order))))
        for n in range(2, min(order - 1, len(tokens)) + 1):
            openings[n - 1][tuple(tokens[:n])] += 1
    return counts, words


def _adjust_counts(counts: list[Counter], words: dict[str, None]) -> list[dict]:
    """Kneser-Ney adjusted counts per order (Heafield et al. 2013, section 3.1; Chen & Goodman).

    The highest order and the <s> openings keep their raw counts; any other n-gram counts the
    distinct words seen before it (its continuation count): the listed n-grams one order up
    that end in it. (None of those starts with <s>, so no raw count is touched.)
    """
    adjusted: list[dict] = [counts[-1]]
    for n in range(len(counts) - 1, 0, -1):
        lower = Counter(g[1:] for g in adjusted[0])
        lower.update(counts[n - 1])
        adjusted.insert(0, lower)
    # The unigram table in lmplz's order: <unk>, <s> (both count 0), </s>, the words as first seen.
    unigrams = adjusted[0]
    adjusted[0] = {(UNK,): 0, (BOS,): 0, (EOS,): unigrams[(EOS,)],
                   **{(w,): unigrams[(w,)] for w in words}}
    return adjusted


def _discounts(counts: dict, n: int,
               fallback: tuple[float, float, float] | None) -> tuple[float, float, float]:
    """D1, D2, D3+ of order n from its counts-of-adjusted-counts (Chen & Goodman, eq. 26).

    Y = n1 / (n1 + 2 n2) and Dk = k - (k + 1) Y n(k+1) / nk. lmplz rejects an order where some
    of n1, n2, n3 is zero or some Dk leaves [0, k], and then uses the fallback for all three.
    """
    have = Counter(counts.values())
    missing = next((k for k in (1, 2, 3) if have[k] == 0), None)
    if missing is None:
        y = have[1] / (have[1] + 2.0 * have[2])
        d = tuple(k - (k + 1) * y * have[k + 1] / have[k] for k in (1, 2, 3))
        bad = next((k for k in (1, 2, 3) if not 0.0 <= d[k - 1] <= k), None)
        if bad is None:
            return d
        problem = f"D{bad} comes out {d[bad - 1]:.4g}, outside [0, {bad}]"
    else:
        problem = f"no {n}-gram has adjusted count {missing}"
    if fallback is None:
        raise LMError(f"cannot estimate Kneser-Ney discounts for {n}-grams: {problem} (too little "
                      f"or repetitive text?); pass discount_fallback to use fixed discounts")
    return tuple(float(x) for x in fallback)


# ---------------------------------------------------------------------------------------------
# ARPA files: plain text or gzip (by the .gz suffix).


def write_arpa(lm: NGramLM, path: str | Path) -> None:
    """Write `lm` as an ARPA file, gzip-compressed when `path` ends in .gz.

    Numbers are written with repr, so reading the file back gives exactly the same floats.
    Every n-gram below the highest order carries its back-off column, 0 included.
    """
    path = Path(path)
    try:
        with _open(path, "wt") as f:
            f.write("\\data\\\n")
            for n, table in enumerate(lm.ngrams, 1):
                f.write(f"ngram {n}={len(table)}\n")
            for n, table in enumerate(lm.ngrams, 1):
                f.write(f"\n\\{n}-grams:\n")
                if n == lm.order:
                    f.writelines(f"{p!r}\t{' '.join(g)}\n" for g, (p, _) in table.items())
                else:
                    f.writelines(f"{p!r}\t{' '.join(g)}\t{b!r}\n" for g, (p, b) in table.items())
            f.write("\n\\end\\\n")
    except OSError as e:
        raise LMError(f"{path}: cannot write the ARPA file: {e.strerror or e}") from e


def read_arpa(path: str | Path) -> NGramLM:
    """Read an ARPA file (plain, or gzip when the name ends in .gz).

    LMError names the file, and the line where there is one, when the file is missing,
    unreadable, truncated or malformed: a missing header or section, a count that disagrees
    with the header, a line that is not `log10prob<TAB>w1 .. wn[<TAB>backoff]`, or a word
    that has no unigram.
    """
    path = Path(path)
    at = [0]  # the number of the last line read, for a message about what follows it
    try:
        with _open(path, "rt") as f:
            return _parse_arpa(_numbered(f, at), path)
    except (OSError, EOFError, zlib.error) as e:  # missing, unreadable, a gzip stream cut short
        where = f"line {at[0]}: cannot read on from here" if at[0] else "cannot read it"
        raise LMError(f"{path}: {where}: {getattr(e, 'strerror', None) or e}") from e
    except UnicodeDecodeError as e:
        # Text is decoded a block at a time, so the bad byte lies somewhere past the last line.
        raise LMError(f"{path}: not UTF-8 text after line {at[0]} ({e.reason})") from e


def read_sentences(paths: Iterable[str | Path]) -> Iterator[str]:
    """The lines of text files (plain or .gz), one after the other, for `build_lm`; LMError
    names a file that cannot be read."""
    for path in map(Path, paths):
        try:
            with _open(path, "rt") as f:
                yield from f
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
            raise LMError(f"{path}: cannot read the text ({getattr(e, 'strerror', None) or e})") from None


def _open(path: Path, mode: str):
    if path.name.endswith(".gz"):
        # Level 6 (zlib's default) writes several times faster than gzip's 9, a few % larger.
        return gzip.open(path, mode, compresslevel=6, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _numbered(f, at: list[int]) -> Iterator[tuple[int, str]]:
    """The file's non-blank lines, stripped, with their numbers; at[0] follows along."""
    for i, line in enumerate(f, 1):
        at[0] = i
        line = line.strip()
        if line:
            yield i, line


def _parse_arpa(lines: Iterator[tuple[int, str]], path: Path) -> NGramLM:
    i = 0

    def fail(line_no: int, problem: str) -> LMError:
        return LMError(f"{path}: line {line_no}: {problem}" if line_no else f"{path}: {problem}")

    def next_line(missing: str = "\\end\\ (truncated?)") -> str:
        nonlocal i
        got = next(lines, None)
        if got is None:
            raise fail(i, f"the file ends with no {missing}")
        i, line = got
        return line

    # Anything before \data\ is commentary (SRILM and KenLM skip it too).
    line = next_line("\\data\\ header: not an ARPA file?")
    while line != "\\data\\":
        line = next_line("\\data\\ header: not an ARPA file?")
    expected: list[int] = []
    line = next_line()
    while line.startswith("ngram "):
        n, _, count = line[len("ngram "):].partition("=")
        if not (n.strip().isdigit() and count.strip().isdigit()) or int(n) != len(expected) + 1:
            raise fail(i, f"expected 'ngram {len(expected) + 1}=<count>' in the header, "
                          f"got {line!r}")
        expected.append(int(count))
        line = next_line()
    if not expected:
        raise fail(i, f"the \\data\\ header lists no 'ngram 1=<count>', got {line!r}")

    order = len(expected)
    ngrams: list[Table] = []
    words: set[str] = set()  # the unigrams', which every longer n-gram must be made of
    for n in range(1, order + 1):
        if line != f"\\{n}-grams:":
            raise fail(i, f"expected the section \\{n}-grams:, got {line!r}")
        table: Table = {}
        for i, line in lines:
            if line.startswith("\\"):
                break
            fields = line.split()
            if len(fields) == n + 1:
                backoff = "0"
            elif len(fields) == n + 2 and n < order:
                backoff = fields[-1]
            else:
                raise fail(i, f"expected 'log10prob<TAB>{n} word(s)"
                              f"{'' if n == order else '[<TAB>backoff]'}', got {line!r}")
            g = tuple(fields[1:n + 1])
            try:
                table[g] = (float(fields[0]), float(backoff))
            except ValueError:
                raise fail(i, f"expected numbers for log10prob and backoff, got {line!r}") from None
            if n > 1 and not words.issuperset(g):
                raise fail(i, f"{' '.join(g)!r} holds a word that has no unigram")
        else:
            raise fail(i, "the file ends with no \\end\\ (truncated?)")
        if len(table) != expected[n - 1]:
            raise fail(i, f"\\{n}-grams: holds {len(table)} distinct entries but the header "
                          f"says ngram {n}={expected[n - 1]}")
        if n == 1:
            words = {g[0] for g in table}
        ngrams.append(table)
    if line != "\\end\\":
        raise fail(i, f"expected \\end\\ after the last section, got {line!r}")
    return NGramLM(order, ngrams)
