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
