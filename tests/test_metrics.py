import json
import random

import jiwer
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asr.metrics import align, error_rates, write_report
from asr.report import alignment_lines, duration_bucket, error_report, render_markdown, write_error_report
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


# --- substitutions, deletions, insertions and the alignment behind them ---------------------------


def test_substitutions_deletions_insertions_by_hand():
    u = rates(["the cat sat on the mat"], ["oh the bat sat on mat"]).utterances[0]
    # "oh" extra, cat -> bat, "the" before mat missing (5 substitutions if aligned word by word).
    assert (u.substitutions, u.deletions, u.insertions, u.word_errors) == (1, 1, 1, 3)
    for ref, hyp, sdi in [("cat", "cut", (1, 0, 0)), ("cats", "cat", (0, 1, 0)), ("cat", "cart", (0, 0, 1)),
                          ("the cat", "the cat s", (0, 0, 2))]:  # " S": a space and an S
        u = rates([ref], [hyp]).utterances[0]
        assert (u.char_substitutions, u.char_deletions, u.char_insertions) == sdi, (ref, hyp)
        assert u.char_errors == sum(sdi)


def test_alignment_of_a_known_pair():
    u = rates(["the cat sat on the mat"], ["oh the bat sat on mat"]).utterances[0]
    assert u.alignment == [("I", "", "OH"), ("C", "THE", "THE"), ("S", "CAT", "BAT"), ("C", "SAT", "SAT"),
                           ("C", "ON", "ON"), ("D", "THE", ""), ("C", "MAT", "MAT")]
    assert align(["A", "B", "C"], ["A", "X", "C", "D"]) == [("C", "A", "A"), ("S", "B", "X"), ("C", "C", "C"),
                                                             ("I", "", "D")]


def test_alignment_with_an_empty_side():
    assert align(["A", "B"], []) == [("D", "A", ""), ("D", "B", "")]
    assert align([], ["X"]) == [("I", "", "X")]
    assert align([], []) == []
    u = rates(["a bc"], [""]).utterances[0]
    assert (u.substitutions, u.deletions, u.insertions) == (0, 2, 0)
    assert (u.char_substitutions, u.char_deletions, u.char_insertions) == (0, 4, 0)
    u = rates([""], ["x yz"]).utterances[0]
    assert (u.substitutions, u.deletions, u.insertions) == (0, 0, 2)
    assert (u.char_substitutions, u.char_deletions, u.char_insertions) == (0, 0, 4)
    assert u.alignment == [("I", "", "X"), ("I", "", "YZ")]


def levenshtein(a: list, b: list) -> int:
    """Edit distance by the textbook dynamic programme, to check jiwer's alignments against."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


WORDS = st.lists(st.sampled_from(["a", "b", "c", "it's", "dd"]), max_size=8).map(" ".join)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(WORDS, WORDS)
def test_counts_and_alignment_agree_with_the_edit_distance(ref, hyp):
    u = rates([ref], [hyp]).utterances[0]
    rw, hw = u.reference.split(), u.hypothesis.split()
    assert u.substitutions + u.deletions + u.insertions == u.word_errors == levenshtein(rw, hw)
    rc, hc = list(u.reference), list(u.hypothesis)
    assert u.char_substitutions + u.char_deletions + u.char_insertions == u.char_errors == levenshtein(rc, hc)
    # The alignment spells out both sides, in order; correct pairs match, substitutions do not.
    assert [r for op, r, _ in u.alignment if op != "I"] == rw
    assert [h for op, _, h in u.alignment if op != "D"] == hw
    assert all((r == h) == (op == "C") for op, r, h in u.alignment if op in "CS")
    assert [op for op, _, _ in u.alignment].count("S") == u.substitutions


# --- the error report ----------------------------------------------------------------------------


def corpus_report(pairs, durations=None, **kw):
    ids = [uid for uid, _, _ in pairs]
    r = error_rates(ids, [ref for _, ref, _ in pairs], [hyp for _, _, hyp in pairs])
    return r, error_report(r, durations, "test", **kw)


def test_report_totals_equal_jiwer_corpus_figures():
    rng = random.Random(0)  # many short sentences over few words: many ties in the alignments
    vocab = ["a", "b", "c", "dd", "eee"]
    refs = [" ".join(rng.choices(vocab, k=rng.randint(1, 8))) for _ in range(200)] + [r for r, _ in PAIRS]
    hyps = [" ".join(rng.choices(vocab, k=rng.randint(1, 8))) for _ in range(200)] + [h for _, h in PAIRS]
    r, report = corpus_report([(f"s{i}-0-{i}", ref, hyp) for i, (ref, hyp) in enumerate(zip(refs, hyps))])
    nrefs, nhyps = [normalize_text(x) for x in refs], [normalize_text(x) for x in hyps]
    words, chars = report["summary"]["words"], report["summary"]["characters"]
    out = jiwer.process_words(nrefs, nhyps)
    assert (words["correct"], words["substitutions"], words["deletions"], words["insertions"]) == \
        (out.hits, out.substitutions, out.deletions, out.insertions)
    assert words["rate"] == pytest.approx(out.wer) and words["rate"] == pytest.approx(r.wer)
    # Our characters write the space between words as "_" (so that jiwer, which splits on
    # whitespace, sees it as a token); jiwer.process_characters keeps the space itself as a
    # character. Renaming one symbol that is nowhere else changes no alignment, so on the same
    # normalised text the counts must be the same, hits included.
    out = jiwer.process_characters(nrefs, nhyps)
    assert (chars["correct"], chars["substitutions"], chars["deletions"], chars["insertions"]) == \
        (out.hits, out.substitutions, out.deletions, out.insertions)
    assert chars["rate"] == pytest.approx(out.cer) and chars["rate"] == pytest.approx(r.cer)
    assert report["summary"]["utterances"] == len(refs)


def test_report_summary_with_empty_sides():
    # jiwer refuses empty strings, so these are counted by hand: 2 deletions, 2 insertions.
    r, report = corpus_report([("u-1", "a bc", ""), ("u-2", "", "x y"), ("u-3", "", ""), ("u-4", "a", "a")])
    w, c = report["summary"]["words"], report["summary"]["characters"]
    assert w == {"reference": 3, "correct": 1, "substitutions": 0, "deletions": 2, "insertions": 2,
                 "errors": 4, "rate": 4 / 3}
    assert (c["reference"], c["correct"], c["deletions"], c["insertions"]) == (5, 1, 4, 3)  # "A BC", "X Y"
    assert report["summary"]["utterances_with_errors"] == 2
    assert w["rate"] == pytest.approx(r.wer) and c["rate"] == pytest.approx(r.cer)
    empty = report["utterances"][-1]
    assert (empty["id"], empty["alignment"], empty["wer"]) == ("u-4", [["C", "A", "A"]], 0.0)


def test_report_counts_confusions():
    _, report = corpus_report([("u-1", "a b c", "a x c"), ("u-2", "b b", "x y"), ("u-3", "b", "x"),
                               ("u-4", "d e", "e"), ("u-5", "f", "f g g"), ("u-6", "d", "")])
    conf = report["confusions"]
    assert conf["substitutions"] == [{"reference": "B", "hypothesis": "X", "count": 3},
                                     {"reference": "B", "hypothesis": "Y", "count": 1}]
    assert conf["deletions"] == [{"word": "D", "count": 2}]
    assert conf["insertions"] == [{"word": "G", "count": 2}]
    _, top1 = corpus_report([("u-1", "a b c", "a x c"), ("u-2", "b b", "x y"), ("u-3", "b", "x")], top=1)
    assert top1["confusions"]["substitutions"] == [{"reference": "B", "hypothesis": "X", "count": 3}]


def test_report_by_speaker_and_duration():
    pairs = [("84-121-0001", "a b c d", "a b c d"),  # speaker 84: 1 error in 6 words
             ("84-121-0002", "a b", "a x"),
             ("174-50-0001", "a b", "x"),  # speaker 174: 2 errors in 2 words
             ("solo", "a b c", "a b c x")]  # no "-": its own speaker, 1 in 3
    durations = {"84-121-0001": 1.5, "84-121-0002": 2.0, "174-50-0001": 12.0}
    _, report = corpus_report(pairs, durations)
    speakers = [(r["speaker"], r["utterances"], r["words"], r["errors"], r["wer"]) for r in report["by_speaker"]]
    assert speakers == [("174", 1, 2, 2, 1.0), ("solo", 1, 3, 1, 1 / 3), ("84", 2, 6, 1, 1 / 6)]  # worst first
    buckets = [(r["duration"], r["utterances"], r["words"], r["wer"]) for r in report["by_duration"]]
    assert buckets == [("< 2 s", 1, 4, 0.0), ("2-5 s", 1, 2, 0.5), ("10-20 s", 1, 2, 1.0), ("unknown", 1, 3, 1 / 3)]
    assert [duration_bucket(s) for s in (0.1, 4.99, 5.0, 19.9, 20.0, 600)] == \
        ["< 2 s", "2-5 s", "5-10 s", "10-20 s", ">= 20 s", ">= 20 s"]
    assert [u["id"] for u in report["utterances"]] == ["174-50-0001", "84-121-0002", "solo", "84-121-0001"]
    assert report["utterances"][0]["duration"] == 12.0 and report["utterances"][2]["duration"] is None


def test_alignment_lines_line_up():
    lines = alignment_lines([("C", "THE", "THE"), ("S", "CAT", "BATS"), ("D", "A", ""), ("I", "", "TODAY")])
    assert lines == ["REF:  the CAT  A   *****",
                     "HYP:  the BATS *** TODAY",
                     "EVAL:     S    D   I"]
    long = alignment_lines([("C", "WORD", "WORD")] * 40, width=30)
    assert len(long) == 3 * 8 and all(len(line) <= 30 for line in long)  # 5 words of 5 a line
    assert long[0:3] == ["REF:  word word word word word", "HYP:  word word word word word", "EVAL:"]


def test_write_error_report(tmp_path):
    _, report = corpus_report([("1-2-3", "the cat sat", "the bat sat today"), ("1-2-4", "a", "a")],
                              {"1-2-3": 2.5, "1-2-4": 1.0})
    md, js = tmp_path / "out" / "test.report.md", tmp_path / "out" / "test.report.json"
    write_error_report(report, md, js)
    assert json.loads(js.read_text(encoding="utf-8")) == report
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Error report: test\n")
    assert "| words | 2 | 4 | 3 | 1 | 0 | 1 | 2 | 50.00 |" in text  # the summary row
    assert "| CAT -> BAT | 1 |" in text and "| TODAY | 1 |" in text
    block = text[text.index("```\n") + 4:text.rindex("```")]
    assert block.splitlines()[:4] == ["1-2-3  2.50 s  3 words, WER 66.67 %: S=1 D=0 I=1",
                                      "REF:  the CAT sat *****",
                                      "HYP:  the BAT sat TODAY",
                                      "EVAL:     S       I"]


def test_report_of_nothing():
    _, report = corpus_report([])
    assert report["summary"]["words"]["rate"] == 0.0 and report["utterances"] == []
    assert "None." in render_markdown(report)
