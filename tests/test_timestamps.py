import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asr import timestamps
from asr.errors import TextError
from asr.text import CharTokenizer
from asr.timestamps import (FORMATS, MAX_CUE_CHARS, MAX_CUE_SECONDS, Word, ctc_align, format_result,
                            subtitle_cues, to_json, to_srt, to_vtt, word_timestamps)

TOK = CharTokenizer()
BLANK = "_"  # in the frame strings below, "_" is the CTC blank
MODEL = Path(__file__).resolve().parents[1] / "exp" / "demo" / "best.pt"
TEST_MANIFEST = Path(__file__).resolve().parents[1] / "data" / "synthetic" / "test.jsonl"


def log_probs(frames: str, overrides: dict[int, dict[str, float]] | None = None) -> np.ndarray:
    """(T, V) log-probs whose best token at frame t is frames[t] (prob ~0.999); `overrides`
    gives chosen frames explicit probabilities {char: p} (the rest share what is left)."""
    out = np.full((len(frames), len(TOK)), -10.0)
    for t, c in enumerate(frames):
        out[t, token_id(c)] = -0.01
    for t, probs in (overrides or {}).items():
        rest = (1 - sum(probs.values())) / (len(TOK) - len(probs))
        out[t] = np.log(max(rest, 1e-9))  # probs summing to 1 leave the rest ~0
        for c, p in probs.items():
            out[t, token_id(c)] = np.log(p)
    return torch.from_numpy(out).log_softmax(-1).numpy()


def token_id(c: str) -> int:
    return TOK.blank_id if c == BLANK else TOK.encode(c)[0]


def path_score(lp: np.ndarray, spans: list[tuple[int, int]], tokens: list[int]) -> float:
    """Log-prob of the CTC path that `spans` describe: tokens on their frames, blank elsewhere."""
    labels = np.zeros(len(lp), dtype=int)
    for (a, b), tok in zip(spans, tokens):
        labels[a : b + 1] = tok
    return float(lp[np.arange(len(lp)), labels].sum())


# ---------------------------------------------------------------------------------------------
# ctc_align


def test_align_follows_the_frames_when_they_spell_the_text():
    # The blank at frame 11 separates the two L's of HELLO.
    spans = ctc_align(log_probs("__HHHEEELLL_LLOOO__"), TOK.encode("HELLO"), TOK.blank_id)
    assert spans == [(2, 4), (5, 7), (8, 10), (12, 13), (14, 16)]


def test_align_forces_a_blank_between_double_letters():
    # The frames say "HELO" (L on 4-6, no blank); HELLO needs L, blank, L. The cheapest place
    # for the blank is frame 5, the one frame where the model gives the blank some probability.
    lp = log_probs("HHEELLLOO", {5: {"L": 0.6, BLANK: 0.4}})
    assert ctc_align(lp, TOK.encode("HELLO"), TOK.blank_id) == [(0, 1), (2, 3), (4, 4), (6, 6), (7, 8)]
    # Three frames of L hold "LL" only as L, blank, L.
    assert ctc_align(log_probs("LLL"), TOK.encode("LL"), TOK.blank_id) == [(0, 0), (2, 2)]


def test_align_places_a_letter_the_frames_miss():
    # The frames say "CT"; forced to "CAT", the A goes to the blank frame that gives A the most.
    lp = log_probs("_C______T_", {3: {"A": 0.1, BLANK: 0.9}, 4: {"A": 0.3, BLANK: 0.7}})
    assert ctc_align(lp, TOK.encode("CAT"), TOK.blank_id) == [(1, 1), (4, 4), (8, 8)]


@pytest.mark.parametrize("seed", range(6))
def test_align_matches_brute_force(seed):
    # Every labelling of 6 frames over {blank, A, B}: the best one that collapses to the
    # tokens must score what the aligner's path scores.
    rng = np.random.default_rng(seed)
    lp = torch.from_numpy(rng.normal(size=(6, 3)) * 2).log_softmax(-1).numpy()
    tokens = [[1, 2], [1, 1], [2, 1, 2], [1, 1, 1], [2], [1, 2, 2]][seed]
    best = max(
        float(lp[np.arange(6), labels].sum()) for labels in itertools.product(range(3), repeat=6)
        if [k for k, _ in itertools.groupby(labels) if k != 0] == tokens)
    spans = ctc_align(lp, tokens, blank=0)
    assert path_score(lp, spans, tokens) == pytest.approx(best, abs=1e-9)
    assert all(a <= b for a, b in spans) and all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


def test_align_in_segments_equals_one_table(monkeypatch):
    # Long audio is aligned in segments recomputed from saved columns; the answer must not change.
    # 150 tokens make 301 states, more than a uint8 move can count.
    rng = np.random.default_rng(0)
    lp = torch.from_numpy(rng.normal(size=(400, 6)) * 3).log_softmax(-1).numpy()
    tokens = rng.integers(1, 6, size=150).tolist()
    whole = ctc_align(lp, tokens, blank=0)
    monkeypatch.setattr(timestamps, "MOVES_BUDGET_BYTES", 1)  # segments of isqrt(8 * 400) = 56 frames
    assert ctc_align(lp, tokens, blank=0) == whole


def test_align_empty_and_impossible():
    assert ctc_align(log_probs("___"), [], TOK.blank_id) == []
    assert ctc_align(np.zeros((0, len(TOK))), [], TOK.blank_id) == []
    with pytest.raises(ValueError, match="need at least 3 frames; got 2"):
        ctc_align(log_probs("LL"), TOK.encode("LL"), TOK.blank_id)  # L, blank, L
    with pytest.raises(ValueError, match="need at least 5 frames; got 4"):
        ctc_align(log_probs("ABCD"), TOK.encode("ABCDE"), TOK.blank_id)
    with pytest.raises(ValueError, match=r"not be the blank 0; got \[0, 29\]"):
        ctc_align(log_probs("AB"), [1, TOK.blank_id, 29], TOK.blank_id)
    with np.errstate(divide="ignore"):
        surely_blank = np.log(np.eye(3)[[0, 0, 0]])  # no path with probability > 0 spells token 1
    with pytest.raises(ValueError, match="non-zero probability"):
        ctc_align(surely_blank, [1], blank=0)


# ---------------------------------------------------------------------------------------------
# word_timestamps

FRAMES = "_HHI__  THERE__"  # HI on frames 1-3, THERE on 8-12; 40 ms frames


def test_word_times_from_the_alignment():
    words = word_timestamps("HI THERE", log_probs(FRAMES), TOK, frame_seconds=0.04)
    assert [w.word for w in words] == ["HI", "THERE"]
    assert [(w.start, w.end) for w in words] == [pytest.approx((0.04, 0.16)), pytest.approx((0.32, 0.52))]
    assert all(w.confidence > 0.99 for w in words)


def test_confidence_is_low_where_the_model_heard_other_letters():
    # The frames say THEPE; the text says THERE: one of five letters has probability ~0.
    heard, other = word_timestamps("HI THERE", log_probs("_HHI__  THEPE__"), TOK, 0.04)
    assert heard.confidence > 0.99
    assert 0.75 < other.confidence < 0.85


def test_word_times_are_clamped_to_the_duration_and_monotonic():
    words = word_timestamps("HI THERE", log_probs(FRAMES), TOK, 0.04, duration=0.45)
    assert (words[1].start, words[1].end) == pytest.approx((0.32, 0.45))
    words = word_timestamps("HI THERE", log_probs(FRAMES), TOK, 0.04, duration=0.1)
    assert [(w.start, w.end) for w in words] == [pytest.approx((0.04, 0.1)), pytest.approx((0.1, 0.1))]
    for w, after in zip(words, words[1:] + [None]):
        assert 0 <= w.start <= w.end <= 0.1
        assert after is None or after.start >= w.end


def test_word_timestamps_edge_cases():
    assert word_timestamps("", log_probs("____"), TOK, 0.04) == []
    # Extra spaces (as raw text might hold) make no empty words.
    assert [w.word for w in word_timestamps("  HI   THERE ", log_probs(FRAMES), TOK, 0.04)] == ["HI", "THERE"]
    with pytest.raises(ValueError, match="frame_seconds"):
        word_timestamps("HI", log_probs(FRAMES), TOK, 0.0)
    with pytest.raises(TextError):
        word_timestamps("hi", log_probs(FRAMES), TOK, 0.04)


# ---------------------------------------------------------------------------------------------
# Output formats

WORDS = [Word("HELLO", 0.5, 0.9, 0.91234), Word("WORLD", 1.0, 1.42, 0.8), Word("AGAIN", 3.5, 3.9, 0.95)]
TEXT = "HELLO WORLD AGAIN"


def test_srt_exact():
    # The pause of 2.08 s before AGAIN starts a second cue.
    assert to_srt(WORDS) == ("1\n00:00:00,500 --> 00:00:01,420\nHELLO WORLD\n\n"
                             "2\n00:00:03,500 --> 00:00:03,900\nAGAIN\n")
    # Milliseconds round down, so no time passes the end of the audio.
    assert to_srt([Word("LATE", 3723.4567, 3723.9, 1.0)]) == "1\n01:02:03,456 --> 01:02:03,900\nLATE\n"


def test_vtt_exact():
    assert to_vtt(WORDS) == ("WEBVTT\n\n00:00:00.500 --> 00:00:01.420\nHELLO WORLD\n\n"
                             "00:00:03.500 --> 00:00:03.900\nAGAIN\n")


def test_json_exact():
    # One line per file, so several files print as JSON Lines.
    assert to_json("a/b.flac", TEXT, WORDS[:2]) == (
        '{"audio": "a/b.flac", "text": "HELLO WORLD AGAIN", "words": ['
        '{"word": "HELLO", "start": 0.5, "end": 0.9, "confidence": 0.912}, '
        '{"word": "WORLD", "start": 1.0, "end": 1.42, "confidence": 0.8}]}\n')


def test_cues_keep_to_subtitle_limits():
    # 40 words of 9 letters, 0.3 s apart, no pauses: lines of 4 words (39 characters).
    words = [Word(f"WORD{i:05d}", 0.3 * i, 0.3 * i + 0.25, 1.0) for i in range(40)]
    cues = subtitle_cues(words)
    assert [len(line.split()) for _, _, line in cues] == [4] * 10
    # 60 one-letter words, 0.5 s apart: 14 fit in 7 s (the 15th would end at 7.4 s).
    words = [Word("A", 0.5 * i, 0.5 * i + 0.4, 1.0) for i in range(60)]
    cues = subtitle_cues(words)
    assert len(cues[0][2].split()) == 14
    for start, end, line in cues:
        assert len(line) <= MAX_CUE_CHARS and end - start <= MAX_CUE_SECONDS
    assert " ".join(line for _, _, line in cues) == " ".join(w.word for w in words)


def test_format_result():
    assert FORMATS == ("txt", "json", "srt", "vtt")
    assert format_result("txt", "a.wav", TEXT, WORDS) == TEXT + "\n"
    assert json.loads(format_result("json", "a.wav", TEXT, WORDS))["words"][2] == {"word": "AGAIN", "start": 3.5, "end": 3.9, "confidence": 0.95}
    assert format_result("srt", "a.wav", TEXT, WORDS) == to_srt(WORDS)
    assert format_result("vtt", "a.wav", TEXT, WORDS) == to_vtt(WORDS)
    assert format_result("srt", "a.wav", "", []) == ""
    assert format_result("vtt", "a.wav", "", []) == "WEBVTT\n"
    with pytest.raises(ValueError, match="txt, json, srt, vtt"):
        format_result("docx", "a.wav", TEXT, WORDS)
    with pytest.raises(ValueError, match="a.wav"):
        format_result("srt", "a.wav", TEXT, [])


# ---------------------------------------------------------------------------------------------
# End to end, with the demo model where it has been trained (not in CI)


def test_word_times_of_real_speech_after_added_silence():
    if not MODEL.is_file() or not TEST_MANIFEST.is_file():
        pytest.skip(f"needs the trained demo model {MODEL} and {TEST_MANIFEST}")
    from asr.audio import SAMPLE_RATE, load_audio
    from asr.features import HOP_LENGTH
    from asr.transcribe import Transcriber

    rows = [json.loads(line) for line in TEST_MANIFEST.read_text().splitlines()]
    row = next(r for r in rows if len(r["text"].split()) >= 3)
    speech = load_audio(TEST_MANIFEST.parent / row["audio"])
    # 1 s of silence before the speech and 0.5 s after: the words must sit on the speech.
    wave = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), speech, np.zeros(SAMPLE_RATE // 2, np.float32)])
    duration = len(wave) / SAMPLE_RATE
    frames = wave[: len(wave) // HOP_LENGTH * HOP_LENGTH].reshape(-1, HOP_LENGTH)  # (T, 160) 10 ms
    loud = np.flatnonzero(np.sqrt((frames**2).mean(1)) > 0.01 * np.abs(wave).max())  # -40 dB
    onset, offset = loud[0] * HOP_LENGTH / SAMPLE_RATE, (loud[-1] + 1) * HOP_LENGTH / SAMPLE_RATE
    assert onset >= 1.0

    # What Transcriber.transcribe_waves does, keeping the log-probs.
    transcriber = Transcriber.from_file(MODEL, device="cpu")
    with torch.inference_mode():
        feats, n = transcriber.log_mel(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
        lp, n = transcriber.model(feats, n)
        text = transcriber.decoder(lp, n)[0]
    frame_seconds = transcriber.model.config.subsampling * HOP_LENGTH / SAMPLE_RATE
    words = word_timestamps(text, lp[0, : n[0]].numpy(), transcriber.tokenizer, frame_seconds, duration)

    assert len(words) >= 3 and " ".join(w.word for w in words) == text
    for w, after in zip(words, words[1:] + [None]):
        assert 0 <= w.start <= w.end <= duration
        assert after is None or after.start >= w.end
    assert onset - 0.05 <= words[0].start <= onset + 0.3
    # CTC may emit a last letter a few frames after its sound ends (the silent E of GAVE): 0.2 s.
    assert offset - 0.3 <= words[-1].end <= offset + 0.2


def test_banded_alignment_of_long_audio_equals_the_full_one(monkeypatch):
    """Past EXACT_ALIGN_CELLS only a band of states around each frame's best is searched. On
    frames like a model's, and a text with letters the frames never favour (as an LM adds),
    a band far narrower than the text must find the same path."""
    rng = np.random.default_rng(0)
    words = rng.choice(["THE", "CAT", "SAT", "ON", "A", "MAT", "HELLO"], size=300)
    frames = "_".join(c * int(rng.integers(1, 3)) + BLANK * int(rng.integers(0, 4)) for c in " ".join(words))
    noisy = log_probs(frames) + rng.normal(scale=2.0, size=(len(frames), len(TOK)))
    lp = torch.from_numpy(noisy).log_softmax(-1).numpy()
    spoken = " ".join("CART" if w == "CAT" and k % 5 == 0 else w for k, w in enumerate(words))  # R never heard
    tokens = TOK.encode(spoken)
    assert len(lp) * (2 * len(tokens) + 1) > timestamps.EXACT_ALIGN_CELLS // 8
    monkeypatch.setattr(timestamps, "EXACT_ALIGN_CELLS", 1 << 62)
    exact = ctc_align(lp, tokens, TOK.blank_id)
    monkeypatch.setattr(timestamps, "EXACT_ALIGN_CELLS", 0)
    for band in (8, timestamps.ALIGN_BAND):
        monkeypatch.setattr(timestamps, "ALIGN_BAND", band)
        assert ctc_align(lp, tokens, TOK.blank_id) == exact
    # Where the band finds no path (a zero probability on the way), the full search decides.
    with np.errstate(divide="ignore"):
        surely_blank = np.log(np.eye(3)[[0, 0, 0]])
    with pytest.raises(ValueError, match="non-zero probability"):
        ctc_align(surely_blank, [1], blank=0)
