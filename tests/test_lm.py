"""The word n-gram LM: estimation held to KenLM's lmplz, ARPA files, back-off scoring.

The reference models in tests/data/lm/ were written by lmplz itself (commands in the README
there); build_lm must reproduce every n-gram, probability and back-off of them.
"""

import gzip
import math
from pathlib import Path

import pytest

from asr.errors import ASRError
from asr.lm import BOS_LOG10, OOV_LOG10, LMError, NGramLM, build_lm, read_arpa, write_arpa

DATA = Path(__file__).parent / "data" / "lm"


def lines(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


# ---------------------------------------------------------------------------------------------
# Estimation against lmplz


@pytest.mark.parametrize("text, order, arpa, fallback", [
    # 80 sentences whose counts-of-counts give valid discounts at every order: no fallback.
    ("train.txt", 1, "train.o1.arpa.gz", None),
    ("train.txt", 2, "train.o2.arpa.gz", None),
    ("train.txt", 3, "train.o3.arpa.gz", None),
    ("train.txt", 4, "train.o4.arpa.gz", None),
    # 4 sentences: orders 1 and 2 are valid, the 3-grams take the fallback discounts.
    ("tiny.txt", 3, "tiny.o3.fallback.arpa", (0.5, 1.0, 1.5)),
    ("tiny.txt", 3, "tiny.o3.fallback-0.3-0.8-1.2.arpa", (0.3, 0.8, 1.2)),
    # Counts-of-counts n1=2, n2=1, n3=5: the closed form gives D2 = -5.5, out of range.
    ("skewed.txt", 1, "skewed.o1.fallback.arpa", (0.5, 1.0, 1.5)),
    # Sentences of 1 to 4 words under a 5-gram model: most never fill a highest-order window.
    ("short.txt", 5, "short.o5.fallback.arpa", (0.5, 1.0, 1.5)),
])
def test_build_lm_reproduces_lmplz(text, order, arpa, fallback):
    reference = read_arpa(DATA / arpa)
    lm = build_lm(lines(text), order=order, discount_fallback=fallback)
    assert lm.order == reference.order == order
    for n in range(order):
        assert lm.ngrams[n].keys() == reference.ngrams[n].keys(), f"{n + 1}-grams differ"
        for g, (prob, backoff) in reference.ngrams[n].items():
            ours, our_backoff = lm.ngrams[n][g]
            if g == ("<s>",):  # lmplz writes log10 P(<s>) = 0, SRILM and we -99: never used
                assert (prob, ours) == (0.0, BOS_LOG10)
            else:  # lmplz computes in float32: its numbers agree with ours to ~4e-7
                assert ours == pytest.approx(prob, abs=1e-5), g
            assert our_backoff == pytest.approx(backoff, abs=1e-5), g
    # Same unigram order too: <unk>, <s>, </s>, then the words as first seen.
    assert list(lm.ngrams[0]) == list(reference.ngrams[0])


def test_without_fallback_invalid_discounts_are_rejected_as_lmplz_rejects_them():
    # lmplz -o 3 < tiny.txt: "Could not calculate Kneser-Ney discounts for 3-grams with
    # adjusted count 4 because we didn't observe any 3-grams with adjusted count 3".
    with pytest.raises(LMError, match=r"3-grams: no 3-gram has adjusted count 3"):
        build_lm(lines("tiny.txt"), order=3, discount_fallback=None)
    build_lm(lines("tiny.txt"), order=2, discount_fallback=None)  # orders 1 and 2 are valid
    # lmplz -o 1 < skewed.txt: "1-gram discount out of range for adjusted count 2: -5.5".
    with pytest.raises(LMError, match=r"1-grams: D2 comes out -5.5, outside \[0, 2\]"):
        build_lm(lines("skewed.txt"), order=1, discount_fallback=None)


def test_build_lm_normalises_text_and_skips_empty_lines():
    raw = build_lm(["The cat sat.", "", "  ", "2024", "the DOG -- sat!", "Don\u2019t stop"],
                   order=2)
    clean = build_lm(["THE CAT SAT", "THE DOG SAT", "DON'T STOP"], order=2)
    assert raw == clean
    assert clean.vocabulary() == ["THE", "CAT", "SAT", "DOG", "DON'T", "STOP"]


def test_build_lm_rejects_what_it_cannot_estimate():
    with pytest.raises(LMError, match="no words"):
        build_lm(["", "123", "?!"])
    with pytest.raises(LMError, match="order"):
        build_lm(["A B"], order=0)
    assert issubclass(LMError, ASRError)  # the command line reports it as one line


@pytest.mark.parametrize("source", ["build_lm", "lmplz"])
def test_every_context_is_a_distribution(source):
    # Interpolated Kneser-Ney spreads exactly the discounted mass over the lower order, so for
    # any history P(w | h) sums to 1 over the words, </s> and <unk> (which gets the uniform
    # share of the interpolation mass). Back-off scoring must preserve that.
    if source == "build_lm":
        lm = build_lm(lines("train.txt"), order=3)
        tolerance = 1e-9
    else:
        lm = read_arpa(DATA / "train.o3.arpa.gz")
        tolerance = 1e-5  # float32 and 8 printed digits
    outcomes = lm.vocabulary() + ["</s>", "<unk>"]
    histories = [(), ("NEVER", "SEEN")] + list(lm.ngrams[0]) + list(lm.ngrams[1])
    histories = [h for h in histories if h[-1:] not in (("</s>",), ("<unk>",))]
    for h in histories:
        total = sum(10 ** lm.log10_prob(w, h) for w in outcomes)
        assert total == pytest.approx(1.0, abs=tolerance), h
    assert len(histories) > 500


def test_unknown_words_get_the_unk_unigram_share():
    lm = build_lm(lines("train.txt"), order=3)
    unk = lm.ngrams[0][("<unk>",)][0]
    assert -4 < unk < -2  # the interpolation mass over |V|: small, not -99
    assert lm.log10_prob("ZEBRA") == unk
    assert lm.log10_prob("ZEBRA", ("THE", "CAT")) == lm.log10_prob("<unk>", ("THE", "CAT"))


# ---------------------------------------------------------------------------------------------
# ARPA files


@pytest.mark.parametrize("name", ["lm.arpa", "lm.arpa.gz"])
def test_arpa_round_trip(tmp_path, name):
    lm = build_lm(lines("train.txt"), order=3)
    path = tmp_path / name
    write_arpa(lm, path)
    magic = b"\x1f\x8b" if name.endswith(".gz") else b"\\data\\"
    assert path.read_bytes().startswith(magic)
    again = read_arpa(path)
    assert again.order == 3
    assert again.ngrams == lm.ngrams  # exactly: the numbers are written with repr
    assert [list(t) for t in again.ngrams] == [list(t) for t in lm.ngrams]  # and in order


def test_read_arpa_skips_text_before_the_header(tmp_path):
    path = tmp_path / "lm.arpa"
    path.write_text("written by a tool that signs its work\n\n" + HAND_ARPA)
    assert read_arpa(path).ngrams == read_arpa(_write(tmp_path, "plain.arpa", HAND_ARPA)).ngrams


# A back-off model small enough to score by hand. <s> A B is the only trigram.
HAND_ARPA = """\\data\\
ngram 1=5
ngram 2=3
ngram 3=1

\\1-grams:
-1.0\t<unk>
-99\t<s>\t-0.5
-0.7\t</s>
-0.6\tA\t-0.3
-0.8\tB\t-0.2

\\2-grams:
-0.4\t<s> A\t-0.1
-0.3\tA B\t-0.25
-0.2\tB </s>

\\3-grams:
-0.05\t<s> A B

\\end\\
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("word, context, expected", [
    ("B", ("<s>", "A"), -0.05),                 # the trigram itself
    ("A", ("<s>", "A"), -0.1 + -0.3 + -0.6),    # bo(<s> A) + bo(A) + P(A)
    ("</s>", ("A", "B"), -0.25 + -0.2),         # bo(A B) + P(</s> | B)
    ("B", ("B", "B"), -0.2 + -0.8),             # B B is no context (bo 0); bo(B) + P(B)
    ("B", ("X", "Y", "<s>", "A"), -0.05),       # only the last order - 1 words count
    ("B", (), -0.8),
    ("A", ("<s>",), -0.4),
    ("ZEBRA", ("<s>",), -0.5 + -1.0),           # unknown: scored as <unk>, bo(<s>) + P(<unk>)
    ("B", ("ZEBRA", "A"), -0.3),                # <unk> A is no context; P(B | A)
])
def test_log10_prob_backs_off(tmp_path, word, context, expected):
    lm = read_arpa(_write(tmp_path, "hand.arpa", HAND_ARPA))
    assert lm.log10_prob(word, context) == pytest.approx(expected, abs=1e-12)


def test_sentence_log10_sums_from_s_to_end(tmp_path):
    lm = read_arpa(_write(tmp_path, "hand.arpa", HAND_ARPA))
    # P(A | <s>) + P(B | <s> A) + P(</s> | A B)
    assert lm.sentence_log10(["A", "B"]) == pytest.approx(-0.4 + -0.05 + (-0.25 + -0.2))
    # P(</s> | <s>) backs off: bo(<s>) + P(</s>)
    assert lm.sentence_log10([]) == pytest.approx(-0.5 + -0.7)
    # P(B | <s>) = bo(<s>) + P(B); P(A | <s> B) = bo(B) + P(A); P(</s> | B A) = bo(A) + P(</s>)
    expected = (-0.5 - 0.8) + (-0.2 - 0.6) + (-0.3 - 0.7)
    assert lm.sentence_log10(["B", "A"]) == pytest.approx(expected)
    assert lm.vocabulary() == ["A", "B"]
    assert lm.order == 3 and [len(t) for t in lm.ngrams] == [5, 3, 1]


def test_sentence_log10_of_a_built_model_is_the_sum_of_its_words():
    lm = build_lm(lines("train.txt"), order=3)
    words = "THE CAT SAT BY THE ZEBRA".split()
    history = ["<s>", *words]
    expected = sum(lm.log10_prob(w, tuple(history[max(0, i - 1):i + 1]))
                   for i, w in enumerate(words + ["</s>"]))
    assert lm.sentence_log10(words) == pytest.approx(expected, abs=1e-12)
    # A sentence of the training text is likelier than the same words shuffled.
    assert lm.sentence_log10("THE CAT SAT ON THE MAT".split()) > \
        lm.sentence_log10("MAT THE ON SAT CAT THE".split()) + 2


def test_a_model_without_unk_scores_unknown_words_minus_100(tmp_path):
    text = HAND_ARPA.replace("ngram 1=5", "ngram 1=4").replace("-1.0\t<unk>\n", "")
    lm = read_arpa(_write(tmp_path, "no-unk.arpa", text))
    assert lm.log10_prob("ZEBRA") == OOV_LOG10
    assert lm.log10_prob("ZEBRA", ("<s>",)) == pytest.approx(-0.5 + OOV_LOG10)  # as in KenLM


def _cut(text: str, marker: str) -> str:
    return text[:text.index(marker)]


@pytest.mark.parametrize("text, line, problem", [
    (_cut(HAND_ARPA, "-0.2\tB </s>"), 15, r"ends with no \\end\\"),                # truncated
    (HAND_ARPA.replace("-0.3\tA B\t-0.25", "-0.3\tA B C D"), 15, "log10prob"),     # word count
    (HAND_ARPA.replace("-0.8\tB\t-0.2", "-0.8\tB\tlots"), 11, "numbers"),
    (HAND_ARPA.replace("ngram 2=3", "ngram 2=4"), 18, "header says ngram 2=4"),
    (HAND_ARPA.replace("-0.2\tB </s>", "-0.2\tB C"), 16, "no unigram"),
    (HAND_ARPA.replace("-0.05\t<s> A B", "-0.05\t<s> A B\t-0.1"), 19, "log10prob"),  # top order
    (HAND_ARPA.replace("\\2-grams:", "\\3-grams:"), 13, r"expected the section \\2-grams:"),
    (HAND_ARPA.replace("ngram 2=3", "ngram 3=3"), 3, "expected 'ngram 2=<count>'"),
    (HAND_ARPA.replace("\\end\\", "\\end"), 21, r"expected \\end\\"),
    ("just some words\n", 1, r"no \\data\\ header"),
])
def test_read_arpa_names_the_file_and_line_of_a_malformed_file(tmp_path, text, line, problem):
    path = _write(tmp_path, "bad.arpa", text)
    with pytest.raises(LMError, match=problem) as err:
        read_arpa(path)
    assert str(err.value).startswith(f"{path}: line {line}: ")


def test_read_arpa_rejects_a_truncated_gzip_file(tmp_path):
    data = (DATA / "train.o3.arpa.gz").read_bytes()
    path = tmp_path / "cut.arpa.gz"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(LMError, match=r"line \d+: cannot read on from here") as err:
        read_arpa(path)
    assert str(path) in str(err.value)


def test_read_arpa_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(LMError, match="cannot read") as err:
        read_arpa(tmp_path / "absent.arpa")
    assert str(tmp_path / "absent.arpa") in str(err.value)
    not_gzip = _write(tmp_path, "plain-text.arpa.gz", HAND_ARPA)
    with pytest.raises(LMError, match="plain-text.arpa.gz"):
        read_arpa(not_gzip)
    latin1 = tmp_path / "latin1.arpa"
    latin1.write_bytes(HAND_ARPA.replace("<unk>", "caf\xe9").encode("latin-1"))
    with pytest.raises(LMError, match="UTF-8"):
        read_arpa(latin1)


def test_write_arpa_reports_an_unwritable_path(tmp_path):
    lm = NGramLM(1, [{("<unk>",): (-1.0, 0.0), ("</s>",): (-0.1, 0.0)}])
    with pytest.raises(LMError, match="cannot write"):
        write_arpa(lm, tmp_path / "no" / "such" / "dir" / "lm.arpa")
    write_arpa(lm, tmp_path / "lm.arpa.gz")
    with gzip.open(tmp_path / "lm.arpa.gz", "rt") as f:
        assert f.read().splitlines()[:4] == ["\\data\\", "ngram 1=2", "", "\\1-grams:"]
    assert math.isclose(read_arpa(tmp_path / "lm.arpa.gz").log10_prob("</s>"), -0.1)
