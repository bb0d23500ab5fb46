import pytest
import torch

from asr.decode import GreedyDecoder, build_decoder
from asr.text import CharTokenizer

TOK = CharTokenizer()
BLANK = "_"  # in the frame strings below, "_" is the CTC blank


def log_probs(*frame_strings: str, pad_to: int | None = None) -> torch.Tensor:
    """(B, T, V) log-probs whose best token at each frame is the character written there."""
    length = pad_to or max(len(s) for s in frame_strings)
    out = torch.full((len(frame_strings), length, len(TOK)), -10.0)
    for b, frames in enumerate(frame_strings):
        for t in range(length):
            c = frames[t] if t < len(frames) else BLANK
            out[b, t, 0 if c == BLANK else TOK.encode(c)[0]] = -0.01
    return out.log_softmax(-1)


def greedy(*frame_strings: str, lengths: list[int] | None = None) -> list[str]:
    lp = log_probs(*frame_strings)
    n = torch.tensor(lengths if lengths is not None else [len(s) for s in frame_strings])
    return GreedyDecoder(TOK)(lp, n)


@pytest.mark.parametrize("frames, text", [
    ("HHHEEELLL_LLOOO", "HELLO"),  # a blank separates the real double L
    ("HHHEEELLLLLOOO", "HELO"),  # without it the repeats merge
    ("H_E_L_L_O", "HELLO"),
    ("__HH__", "H"),
    ("________", ""),
    ("", ""),
    ("DDOONN''TT", "DON'T"),
    ("A_A", "AA"),
])
def test_greedy_collapses_repeats_and_drops_blanks(frames, text):
    assert greedy(frames) == [text]


def test_greedy_spaces_are_trimmed_and_collapsed():
    assert greedy("  HI   _  THERE  ") == ["HI THERE"]
    assert greedy(" _ _ ") == [""]
    assert greedy("A _ B") == ["A B"]


def test_greedy_respects_lengths():
    # Frames past each utterance's length hold letters that must not be read.
    out = greedy("CAT__DOG", "OK__XYZW", "NNO", lengths=[3, 2, 3])
    assert out == ["CAT", "OK", "NO"]
    assert greedy("ABCD", lengths=[0]) == [""]


def test_greedy_batch_matches_one_by_one():
    utterances = ["HHEE_LLO  WWOR_LD", "T_HE CAT", "__SAT__"]
    lp = log_probs(*utterances)
    lengths = torch.tensor([len(s) for s in utterances])
    batch = GreedyDecoder(TOK)(lp, lengths)
    single = [GreedyDecoder(TOK)(log_probs(s), torch.tensor([len(s)]))[0] for s in utterances]
    assert batch == single == ["HELO WORLD", "THE CAT", "SAT"]


def test_greedy_takes_the_argmax_not_the_first_token():
    lp = torch.log(torch.tensor([[[0.2, 0.1, 0.1] + [0.6 / 26] * 26,
                                  [0.1, 0.1, 0.1, 0.7] + [0.0] * 25]]) + 1e-9)
    # Frame 0: blank wins (0.2 > 0.6/26); frame 1: "A" (id 3) wins.
    assert GreedyDecoder(TOK)(lp, torch.tensor([2])) == ["A"]


def test_build_decoder():
    decoder = build_decoder("greedy", TOK)
    assert isinstance(decoder, GreedyDecoder)
    assert decoder(log_probs("HHI"), torch.tensor([3])) == ["HI"]
    with pytest.raises(ValueError, match="nope"):
        build_decoder("nope", TOK)


# ----------------------------------------------------------------------------------------------
# Beam search

import itertools  # noqa: E402

import numpy as np  # noqa: E402

from asr.decode import BeamSearchDecoder  # noqa: E402
from asr.lm import read_arpa  # noqa: E402

# No pruning at all, and no word bonus: the search ranks by CTC probability alone.
EXACT = dict(token_min_logp=-np.inf, beam_prune_logp=-np.inf, num_workers=1, word_bonus=0.0)


def beam(lp: torch.Tensor, **options) -> str:
    return BeamSearchDecoder(TOK, **{**EXACT, **options})(lp, torch.tensor([lp.shape[1]]))[0]


def sparse_log_probs(rng: np.random.Generator, frames: int, symbols: str) -> torch.Tensor:
    """(1, T, V) log-probs with random mass on `symbols` ("_" = blank) and none elsewhere."""
    ids = [0 if c == BLANK else TOK.encode(c)[0] for c in symbols]
    out = np.full((frames, len(TOK)), -np.inf)
    out[:, ids] = np.log(rng.dirichlet(np.ones(len(ids)) * 0.7, size=frames))
    return torch.tensor(out[None], dtype=torch.float32)


def most_probable_text(lp: torch.Tensor) -> tuple[str, float]:
    """Brute force: sum every frame path into its text (spaces normalised), take the best."""
    lp = lp[0].double().numpy()
    live = [i for i in range(lp.shape[1]) if np.isfinite(lp[0, i])]
    totals: dict[str, float] = {}
    for path in itertools.product(live, repeat=lp.shape[0]):
        ids = [k for j, k in enumerate(path) if k != 0 and (j == 0 or path[j - 1] != k)]
        text = " ".join(TOK.decode(ids).split())
        totals[text] = totals.get(text, 0.0) + np.exp(sum(lp[t, k] for t, k in enumerate(path)))
    best = max(totals, key=totals.get)
    return best, totals[best]


def test_beam_finds_the_text_that_greedy_misses():
    # Two frames of blank 0.6 / A 0.4: greedy says "" (0.36), but "A" has 0.4*0.6 + 0.6*0.4 + 0.4*0.4 = 0.64.
    lp = torch.full((1, 2, len(TOK)), -np.inf)
    lp[0, :, 0], lp[0, :, TOK.encode("A")[0]] = np.log(0.6), np.log(0.4)
    assert GreedyDecoder(TOK)(lp, torch.tensor([2])) == [""]
    assert beam(lp, beam_size=4) == "A"


@pytest.mark.parametrize("seed", range(8))
def test_beam_without_pruning_is_exact(seed):
    # With a beam wider than the number of prefixes, prefix search sums every path: it must
    # agree with brute force over all 4**6 frame paths, spaces included.
    lp = sparse_log_probs(np.random.default_rng(seed), 6, "_ AB")
    best, _ = most_probable_text(lp)
    assert beam(lp, beam_size=500) == best


def test_beam_matches_greedy_on_confident_frames_and_in_batches():
    utterances = ["HHEE_LLO  WWOR_LD", "T_HE CAT", "__SAT__", ""]
    lp = log_probs(*utterances, pad_to=20)
    lengths = torch.tensor([len(s) for s in utterances])
    decoder = BeamSearchDecoder(TOK, beam_size=8, num_workers=2)
    assert decoder(lp, lengths) == GreedyDecoder(TOK)(lp, lengths) == ["HELO WORLD", "THE CAT", "SAT", ""]


# A hand-written LM: log10 probabilities, and back-off weights after the word.
ARPA = """\\data\\
ngram 1=6
ngram 2=3

\\1-grams:
-1.0\t</s>
-99\t<s>\t-0.5
-1.0\tTHE\t-0.3
-1.5\tCAT\t-0.2
-3.0\tCAB\t-0.2
-2.0\t<unk>

\\2-grams:
-0.2\t<s> THE
-0.3\tTHE CAT
-0.5\tCAT </s>

\\end\\
"""


@pytest.fixture
def arpa(tmp_path):
    path = tmp_path / "lm.arpa"
    path.write_text(ARPA)
    return path


def test_lm_tables_back_off_like_the_arpa_says(arpa):
    from asr.decode import _LMTables, _lm_score

    t = _LMTables(read_arpa(arpa))

    def ln_p(word: str, context: tuple[str, ...]) -> float:
        state = 0
        for w in context:  # walk the history through the tables
            _, state = _lm_score(t.word_id[w], state, t.n_words, t.keys, t.logp, t.next, t.backoff, t.suffix, -50.0)
        return _lm_score(t.word_id.get(word, -1), state, t.n_words, t.keys, t.logp, t.next, t.backoff,
                         t.suffix, -50.0)[0]

    ln10 = np.log(10)
    assert ln_p("CAT", ("THE",)) == pytest.approx(-0.3 * ln10)          # listed
    assert ln_p("CAB", ("THE",)) == pytest.approx((-0.3 - 3.0) * ln10)  # back-off(THE) + p(CAB)
    assert ln_p("THE", ("<s>",)) == pytest.approx(-0.2 * ln10)
    assert ln_p("</s>", ("THE", "CAT")) == pytest.approx(-0.5 * ln10)   # a bigram LM keeps one word
    assert ln_p("THE", ("CAT",)) == pytest.approx((-0.2 - 1.0) * ln10)
    assert ln_p("DOG", ("THE",)) == pytest.approx(-0.3 * ln10 - 50.0)   # unknown: back off, then unk_logp


def spoken(words: str, confusions: dict[int, dict[str, float]] | None = None) -> torch.Tensor:
    """Two frames a letter (letter, blank); at letter index i, `confusions[i]` shares the mass."""
    rows = []
    for i, c in enumerate(words):
        row = np.full(len(TOK), 1e-4)
        for alt, p in (confusions or {}).get(i, {c: 0.9}).items():
            row[0 if alt == BLANK else TOK.encode(alt)[0]] = p
        rows += [row, np.eye(len(TOK))[0] * 0.9 + 1e-4]
    lp = np.log(np.array(rows) / np.array(rows).sum(1, keepdims=True))
    return torch.tensor(lp[None], dtype=torch.float32)


def test_lm_corrects_what_the_acoustics_get_wrong(arpa):
    # The acoustics lean to CAB (0.5 against 0.4); the LM knows THE CAT is far likelier.
    lp = spoken("THE CAT", {6: {"B": 0.5, "T": 0.4}})
    assert beam(lp, beam_size=16) == "THE CAB"
    assert beam(lp, beam_size=16, lm=arpa, lm_weight=0.5) == "THE CAT"
    assert beam(lp, beam_size=16, lm=arpa, lm_weight=0.0) == "THE CAB"  # weight 0: the LM is off


def test_lexicon_keeps_words_in_the_vocabulary(arpa, tmp_path):
    lp = spoken("THE CAX", {6: {"X": 0.6, "T": 0.3}})
    assert beam(lp, beam_size=16) == "THE CAX"
    assert beam(lp, beam_size=16, lm=arpa, lexicon="lm", lm_weight=0.0) == "THE CAT"
    words = tmp_path / "words.txt"
    words.write_text("THE\nCAB\n")
    assert beam(lp, beam_size=16, lexicon=words) == "THE CAB"
    # A listed word the LM lacks is still a word: it ends, scored as unknown.
    words.write_text("THE\nDOG\n")
    assert beam(spoken("THE DOG"), beam_size=16, lm=arpa, lexicon=words) == "THE DOG"


def test_word_bonus_trades_insertions_for_deletions():
    # "AB" or "A B": the space is a coin flip; a word bonus tips it to two words.
    lp = spoken("A B", {1: {" ": 0.45, BLANK: 0.55}})
    assert beam(lp, beam_size=16, word_bonus=0.0) == "AB"
    assert beam(lp, beam_size=16, word_bonus=2.0) == "A B"


def test_beam_settings_and_errors(arpa):
    decoder = build_decoder("beam", TOK, beam_size=7, lm=arpa, lm_weight=0.3, word_bonus=1.0)
    assert decoder.settings() == {"decoder": "beam", "beam_size": 7, "lm": str(arpa), "lm_weight": 0.3,
                                  "word_bonus": 1.0, "lexicon": "free", "unk_logp": -30.0}
    assert BeamSearchDecoder(TOK).word_bonus == 0.0  # no LM: no bonus to balance it
    with pytest.raises(ValueError, match="beam_size"):
        BeamSearchDecoder(TOK, beam_size=0)
    with pytest.raises(ValueError, match="needs an LM"):
        BeamSearchDecoder(TOK, lexicon="lm")


def test_free_spelling_keeps_a_clearly_spoken_word_the_lm_lacks(arpa):
    lp = spoken("THE DOG")  # every letter at 0.9: DOG is certain, but not in the LM
    assert beam(lp, beam_size=16, lm=arpa) == "THE DOG"  # lexicon "free", the default
    assert beam(lp, beam_size=16, lm=arpa, lexicon="lm") != "THE DOG"
    # A mumbled OOV word loses to an LM word: G and T share the last letter's mass.
    lp = spoken("THE CAG", {6: {"G": 0.5, "T": 0.4}})
    assert beam(lp, beam_size=16, lm=arpa) == "THE CAT"


def test_dropping_dead_prefixes_changes_nothing(arpa, monkeypatch):
    """Over long audio the search drops the prefix nodes no hypothesis descends from (once
    COMPACT_NODES exist): it must find the same text with the same score as keeping them all."""
    from asr import decode

    lp = sparse_log_probs(np.random.default_rng(0), 3000, "_ THECAB")[0].numpy()
    for options in ({}, {"lm": arpa, "lm_weight": 0.5, "word_bonus": 1.0}):
        decoder = BeamSearchDecoder(TOK, beam_size=8, num_workers=1, **options)
        found = {}
        for every in (1, 64, 1 << 62):  # each frame, now and then, never
            monkeypatch.setattr(decode, "COMPACT_NODES", every)
            found[every] = decoder.search(lp)
        assert found[1] == found[64] == found[1 << 62] and len(found[1][0]) > 500
