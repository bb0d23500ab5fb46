import json

import jiwer
import pytest

from asr.metrics import error_rates, write_report
from asr.text import normalize_text


def rates(refs, hyps):
    return error_rates([f"u{i}" for i in range(len(refs))], refs, hyps)


def test_one_substitution():
    r = rates(["the cat sat"], ["the cat sit"])
    assert r.wer == pytest.approx(1 / 3)
    assert r.words == 3
    # Characters with the word breaks: "THE CAT SAT" is 11, one of them wrong.
    assert r.chars == 11
    assert r.cer == pytest.approx(1 / 11)
    u = r.utterances[0]
    assert (u.id, u.reference, u.hypothesis) == ("u0", "THE CAT SAT", "THE CAT SIT")
    assert (u.word_errors, u.words, u.char_errors, u.chars) == (1, 3, 1, 11)


def test_insertions_and_deletions_count():
    r = rates(["a b c"], ["a x b"])  # one insertion (x), one deletion (c)
    assert r.utterances[0].word_errors == 2
    assert r.wer == pytest.approx(2 / 3)
    r = rates(["hello world"], ["hello big world again"])
    assert r.wer == pytest.approx(2 / 2)  # WER can exceed what a fraction of words suggests


def test_corpus_level_not_averaged():
    r = rates(["a b c d", "e"], ["a b c d", "f"])
    # 1 error over 5 reference words; averaging per utterance would give (0 + 1) / 2.
    assert r.wer == pytest.approx(1 / 5)
    assert r.wer != pytest.approx((0 / 4 + 1 / 1) / 2)
    # Characters: "A B C D" (7) and "E" (1): one wrong of 8.
    assert r.cer == pytest.approx(1 / 8)


def test_both_sides_are_normalised():
    r = rates(["Hello, World!", "It\u2019s the farmers' market."], ["hello world", "IT'S THE FARMERS' MARKET"])
    assert r.wer == 0 and r.cer == 0
    assert r.utterances[0].reference == "HELLO WORLD"


PAIRS = [
    ("the cat sat on the mat", "the cat sat on mat"),
    ("hello world", "hello word"),
    ("a quick brown fox", "quick brown box jumps"),
    ("it's a test", "its a test"),
    ("one two three four five", "one too three for five six"),
    ("same words here", "same words here"),
]


def test_agrees_with_jiwer_per_pair():
    for ref, hyp in PAIRS:
        nref, nhyp = normalize_text(ref), normalize_text(hyp)
        r = rates([ref], [hyp])
        assert r.wer == pytest.approx(jiwer.wer(nref, nhyp)), (ref, hyp)
        # CER counts the spaces between words as characters, like jiwer.cer on the same text.
        assert r.cer == pytest.approx(jiwer.cer(nref, nhyp)), (ref, hyp)


def test_agrees_with_jiwer_over_a_corpus():
    refs, hyps = zip(*PAIRS)
    nrefs, nhyps = [normalize_text(x) for x in refs], [normalize_text(x) for x in hyps]
    r = rates(list(refs), list(hyps))
    assert r.wer == pytest.approx(jiwer.wer(nrefs, nhyps))
    assert r.cer == pytest.approx(jiwer.cer(nrefs, nhyps))
    assert r.words == sum(len(x.split()) for x in nrefs)
    assert r.chars == sum(len(x) for x in nrefs)


def test_empty_hypothesis_is_all_deletions():
    r = rates(["a bc"], [""])
    assert r.wer == 1.0 and r.utterances[0].word_errors == 2
    assert r.cer == 1.0 and r.utterances[0].char_errors == 4  # "A BC"


def test_empty_reference_is_all_insertions():
    r = rates(["", "a b"], ["x y", "a b"])
    assert r.utterances[0].word_errors == 2 and r.utterances[0].words == 0
    assert r.wer == pytest.approx(2 / 2)
    only = rates([""], ["x yz"])
    assert only.words == 0 and only.wer == 2.0  # errors over at least one word, never a division by 0
    assert only.chars == 0 and only.cer == 4.0
    assert rates([""], [""]).wer == 0.0
    assert rates(["..."], ["!"]).cer == 0.0  # both normalise to nothing


def test_no_utterances():
    r = error_rates([], [], [])
    assert (r.wer, r.cer, r.words, r.chars, r.utterances) == (0.0, 0.0, 0, 0, [])


def test_mismatched_lists_are_an_error():
    with pytest.raises(ValueError):
        error_rates(["a", "b"], ["x"], ["x", "y"])


def test_write_report(tmp_path):
    r = error_rates(["good", "bad", "worse"], ["the cat sat", "a b", "x y z"],
                    ["the cat sat", "a c", "p q z"])
    path = tmp_path / "deep" / "er" / "report.jsonl"
    write_report(r, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["id"] for row in rows] == ["worse", "bad", "good"]  # worst first
    assert rows[0] == {"id": "worse", "reference": "X Y Z", "hypothesis": "P Q Z", "word_errors": 2,
                       "words": 3, "char_errors": 2, "chars": 5}
    assert rows[2]["word_errors"] == 0 and rows[2]["hypothesis"] == "THE CAT SAT"
