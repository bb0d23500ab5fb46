"""Word timestamps from the CTC alignment, and one file's result as txt, json, srt or vtt.

    text (decoder output) --tokenizer--> U token ids --ctc_align with (T', V) log-probs-->
        U frame spans --word_timestamps--> words with start/end seconds --format_result--> str

The alignment is a Viterbi forced alignment of the decoded text to the model's frames: the
most probable CTC path that spells exactly that text. It works for any decoder's text (greedy,
beam search with a language model), since the decoder's own path is not needed.

Frame t of the model's output covers [t, t + 1) * frame_seconds of audio, where
frame_seconds = subsampling / FRAMES_PER_SECOND (0.04 s for subsampling 4).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from asr.text import CharTokenizer

# Back-pointers kept in memory at once: above this, the alignment is recomputed in segments
# from saved score columns (checkpointing), so it needs O(S * sqrt(T)) memory instead of the
# O(S * T) of a full table (S = 2U + 1 states, T frames).
MOVES_BUDGET_BYTES = 32 * 2**20
# Above this many frame x state cells (2^24: about 3 minutes of speech), time O(S * T) is the
# trouble: an hour (T = 90k frames, S ~ 100k states) would take minutes. The search then keeps
# only the ALIGN_BAND states either side of each frame's best state (64 tokens, ~4 s of speech:
# a decoder's text follows its frames far closer than that), O(T * ALIGN_BAND) time and bytes.
EXACT_ALIGN_CELLS = 1 << 24
ALIGN_BAND = 128

# Subtitle conventions (BBC, Netflix style guides): one line of at most 42 characters, on
# screen at most 7 seconds, and a new cue after a pause rather than text hanging over silence.
MAX_CUE_CHARS = 42
MAX_CUE_SECONDS = 7.0
MAX_CUE_GAP = 1.5

FORMATS = ("txt", "json", "srt", "vtt")


# ---------------------------------------------------------------------------------------------
# CTC forced alignment


def ctc_align(log_probs: np.ndarray, token_ids: list[int], blank: int) -> list[tuple[int, int]]:
    """Frame span [first, last] (inclusive) of each token in the best CTC path spelling `token_ids`.

    log_probs: (T, V) per-frame log-probabilities of one utterance (no padding frames).
    The path runs over the 2U + 1 states blank, t1, blank, t2, ..., tU, blank; it may skip a
    blank state except between two equal tokens ("LL" needs a blank between its L's), so U
    tokens need at least U + (number of equal neighbours) frames. Raises ValueError when they
    cannot fit, or when every path that fits has probability zero.
    """
    log_probs = np.asarray(log_probs)
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must be (T, V), got shape {log_probs.shape}")
    num_frames, vocab = log_probs.shape
    tokens = np.asarray(token_ids, dtype=np.int64)
    if len(tokens) == 0:
        return []
    bad = (tokens < 0) | (tokens >= vocab) | (tokens == blank)
    if bad.any():
        raise ValueError(f"token ids must lie in [0, {vocab}) and not be the blank {blank}; "
                         f"got {sorted(set(tokens[bad].tolist()))}")
    repeats = int((tokens[1:] == tokens[:-1]).sum())
    if num_frames < len(tokens) + repeats:
        raise ValueError(f"{len(tokens)} tokens ({repeats} of them repeats that need a blank "
                         f"between) need at least {len(tokens) + repeats} frames; got {num_frames}")

    num_states = 2 * len(tokens) + 1
    states = np.full(num_states, blank, dtype=np.int64)  # the token each state emits
    states[1::2] = tokens
    can_skip = np.zeros(num_states, dtype=bool)  # may enter from two states back (over a blank)
    can_skip[3::2] = tokens[1:] != tokens[:-1]

    path = None  # state at each frame
    if num_frames * num_states > EXACT_ALIGN_CELLS:
        path = _banded_path(log_probs, states, can_skip, ALIGN_BAND)
    if path is None:
        path = _exact_path(log_probs, states, can_skip)

    # The path never decreases and visits every token state, so each token's frames are one run.
    token_states = 2 * np.arange(len(tokens)) + 1
    first = np.searchsorted(path, token_states, side="left")
    last = np.searchsorted(path, token_states, side="right") - 1
    return [(int(a), int(b)) for a, b in zip(first, last)]


def _exact_path(log_probs: np.ndarray, states: np.ndarray, can_skip: np.ndarray) -> np.ndarray:
    """The best path's state at each frame, over all S states (checkpointed, see
    MOVES_BUDGET_BYTES); ValueError when every path has probability zero."""
    num_frames, num_states = len(log_probs), len(states)
    # Before frame 0 the path stands on the first blank; frame 0 may stay there or enter t1.
    start = np.full(num_states, -np.inf)
    start[0] = 0.0
    segment = min(num_frames, max(MOVES_BUDGET_BYTES // num_states, math.isqrt(8 * num_frames)))
    segment_starts = list(range(0, num_frames, segment))

    # Forward over all segments but the last, keeping only the score column at each start.
    checkpoints = [start]
    for t0 in segment_starts[:-1]:
        checkpoints.append(_viterbi(log_probs[t0 : t0 + segment], checkpoints[-1], states, can_skip))

    # Backward, last segment first: recompute its moves from its checkpoint, then follow them.
    path = np.empty(num_frames, dtype=np.int64)  # state at each frame
    state = -1
    for t0, scores in zip(reversed(segment_starts), reversed(checkpoints)):
        frames = log_probs[t0 : t0 + segment]
        moves = np.empty((len(frames), num_states), dtype=np.uint8)  # (frames, S): 0, 1 or 2 back
        scores = _viterbi(frames, scores, states, can_skip, moves)
        if state < 0:  # the path ends on the last token or the blank after it
            state = num_states - 1 if scores[-1] >= scores[-2] else num_states - 2
            if not np.isfinite(scores[state]):
                raise ValueError("no CTC path spelling these tokens has non-zero probability")
        for t in range(len(frames) - 1, -1, -1):
            path[t0 + t] = state
            state -= int(moves[t, state])  # int: a uint8 would wrap past state 255
    return path


def _banded_path(log_probs: np.ndarray, states: np.ndarray, can_skip: np.ndarray,
                 band: int) -> np.ndarray | None:
    """The best path's state at each frame among the paths that keep within `band` states of
    each frame's best state: the exact path whenever that one never strays so far. States that
    can no longer reach the end in the frames left are dropped first, so for finite log-probs
    some path always survives; None when none does (a zero probability on the way).

    Each frame's band is a run of states [low, low + width), width <= 2 * band + 1, and its
    moves are stored one after the other: O(T * band) bytes, where the full table is O(T * S).
    """
    num_frames, num_states = len(log_probs), len(states)
    need = _frames_to_finish(can_skip)
    lows = np.empty(num_frames, dtype=np.int64)  # first state of each frame's band
    offsets = np.zeros(num_frames + 1, dtype=np.int64)  # where each frame's moves begin
    moves = np.empty(num_frames * (2 * band + 1), dtype=np.uint8)
    low, scores = 0, np.zeros(1)  # before frame 0 the path stands on the first blank
    for t in range(num_frames):
        high = min(low + len(scores) + 2, num_states)  # a frame moves at most two states on
        before = np.full(high - low + 2, -np.inf)  # before[k + 2]: state low + k at frame t - 1
        before[2 : 2 + len(scores)] = scores
        stay, from_one = before[2:], before[1:-1]
        from_two = np.where(can_skip[low:high], before[:-2], -np.inf)
        best = np.maximum(stay, from_one)
        step = np.where(from_two > best, 2, from_one > stay)  # ties stay put, as in _viterbi
        scores = np.maximum(best, from_two) + log_probs[t, states[low:high]]
        scores[need[low:high] > num_frames - 1 - t] = -np.inf
        top = int(np.argmax(scores))
        if scores[top] == -np.inf:
            return None
        a, b = max(0, top - band), min(len(scores), top + band + 1)
        lows[t], offsets[t + 1] = low + a, offsets[t] + b - a
        moves[offsets[t] : offsets[t + 1]] = step[a:b]
        low, scores = low + a, scores[a:b]

    # The path ends on the last token or the blank after it (the only states left finite).
    end = np.full(2, -np.inf)  # scores of the last token and the last blank
    for k, s in enumerate((num_states - 2, num_states - 1)):
        if low <= s < low + len(scores):
            end[k] = scores[s - low]
    if end.max() == -np.inf:
        return None
    state = num_states - 1 if end[1] >= end[0] else num_states - 2
    path = np.empty(num_frames, dtype=np.int64)
    for t in range(num_frames - 1, -1, -1):
        path[t] = state
        state -= int(moves[offsets[t] + state - lows[t]])
    return path


def _frames_to_finish(can_skip: np.ndarray) -> np.ndarray:
    """(S,) the fewest frames after standing on each state before standing on a final one (the
    last token or the blank after it): a frame a state, skipping blanks where allowed."""
    need = np.zeros(len(can_skip), dtype=np.int64)
    for s in range(len(can_skip) - 3, -1, -1):
        need[s] = 1 + min(need[s + 1], need[s + 2] if can_skip[s + 2] else need[s + 1])
    return need


def _viterbi(log_probs: np.ndarray, scores: np.ndarray, states: np.ndarray, can_skip: np.ndarray,
             moves: np.ndarray | None = None) -> np.ndarray:
    """Advance the (S,) best-path scores over the (T, V) frames; write each frame's best move
    (0 stay, 1 from the previous state, 2 from two back) into `moves` (T, S) when given."""
    from_one = np.full_like(scores, -np.inf)
    from_two = np.full_like(scores, -np.inf)
    for t in range(len(log_probs)):
        from_one[1:] = scores[:-1]
        from_two[2:] = np.where(can_skip[2:], scores[:-2], -np.inf)
        best = np.maximum(scores, from_one)
        if moves is not None:  # a tie stays put: each state is entered as early as it can be
            moves[t] = np.where(from_two > best, 2, from_one > scores)
        # float64 sums: over 100k frames float32 would blur the scores and so the ties.
        scores = np.maximum(best, from_two) + log_probs[t, states]
    return scores


# ---------------------------------------------------------------------------------------------
# Words


@dataclass
class Word:
    """One word of a transcript and where it was spoken.

    start/end: seconds from the start of the audio (end exclusive, start <= end).
    confidence: mean posterior probability of the word's characters over the frames the
    alignment gave them, in [0, 1]; low where the model did not itself hear these letters
    (a language model's correction, a mumbled word).
    """

    word: str
    start: float
    end: float
    confidence: float


def word_timestamps(text: str, log_probs: np.ndarray, tokenizer: CharTokenizer, frame_seconds: float,
                    duration: float | None = None) -> list[Word]:
    """Words of `text` (normalised, as a decoder returns it) with times from `log_probs`.

    log_probs: (T', V) log-probabilities of the utterance that `text` transcribes, padding
    frames cut off; frame_seconds: the duration of one of its frames; duration: the audio's
    length in seconds (default T' * frame_seconds): every time is clamped into [0, duration].
    Times never go backwards: each word starts at or after the previous word's end.
    """
    if frame_seconds <= 0:
        raise ValueError(f"frame_seconds must be positive, got {frame_seconds}")
    log_probs = np.asarray(log_probs)
    text = " ".join(text.split())
    ids = tokenizer.encode(text)
    spans = ctc_align(log_probs, ids, tokenizer.blank_id)
    limit = len(log_probs) * frame_seconds if duration is None else max(0.0, duration)
    space = tokenizer.encode(" ")[0]

    words: list[Word] = []
    letters: list[int] = []  # positions in `ids` of the current word's characters
    for i in range(len(ids) + 1):
        if i < len(ids) and ids[i] != space:
            letters.append(i)
            continue
        if not letters:
            continue
        frames = np.concatenate([np.arange(spans[j][0], spans[j][1] + 1) for j in letters])
        tokens = np.concatenate([np.full(spans[j][1] - spans[j][0] + 1, ids[j]) for j in letters])
        previous_end = words[-1].end if words else 0.0
        end = min(limit, (spans[letters[-1]][1] + 1) * frame_seconds)
        start = min(end, max(previous_end, spans[letters[0]][0] * frame_seconds))
        confidence = float(np.exp(log_probs[frames, tokens].astype(np.float64)).mean())
        words.append(Word(tokenizer.decode([ids[j] for j in letters]), start, end, confidence))
        letters = []
    return words


# ---------------------------------------------------------------------------------------------
# Output formats: one file's result as the text of the file to write


def format_result(fmt: str, path: str | os.PathLike, text: str, words: list[Word]) -> str:
    """`text` and its `words` (from word_timestamps) for the audio file `path`, as `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt in ("srt", "vtt") and text.strip() and not words:
        raise ValueError(f"{fmt} output needs word timestamps for {path}")
    if fmt == "txt":
        return to_txt(text)
    if fmt == "json":
        return to_json(path, text, words)
    return to_srt(words) if fmt == "srt" else to_vtt(words)


def to_txt(text: str) -> str:
    return text + "\n"


def to_json(path: str | os.PathLike, text: str, words: list[Word]) -> str:
    """{"audio": path, "text": ..., "words": [{"word", "start", "end", "confidence"}, ...]} on one
    line (JSON Lines when printed for several files), times in seconds rounded to the millisecond."""
    rows = [{"word": w.word, "start": _ms(w.start) / 1000, "end": _ms(w.end) / 1000,
             "confidence": round(w.confidence, 3)} for w in words]
    return json.dumps({"audio": str(path), "text": text, "words": rows}, ensure_ascii=False) + "\n"


def to_srt(words: list[Word]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line between cues."""
    return "\n".join(f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{line}\n"
                     for i, (a, b, line) in enumerate(subtitle_cues(words), start=1))


def to_vtt(words: list[Word]) -> str:
    """WebVTT: the WEBVTT header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    cues = [f"{_clock(a, '.')} --> {_clock(b, '.')}\n{line}\n" for a, b, line in subtitle_cues(words)]
    return "\n".join(["WEBVTT\n", *cues])


def subtitle_cues(words: list[Word]) -> list[tuple[float, float, str]]:
    """(start, end, line) cues: words in order, a new cue when the line would pass
    MAX_CUE_CHARS, the cue MAX_CUE_SECONDS, or the pause before the word MAX_CUE_GAP."""
    cues: list[tuple[float, float, str]] = []
    for w in words:
        if cues:
            start, end, line = cues[-1]
            if (len(line) + 1 + len(w.word) <= MAX_CUE_CHARS and w.end - start <= MAX_CUE_SECONDS
                    and w.start - end <= MAX_CUE_GAP):
                cues[-1] = (start, w.end, f"{line} {w.word}")
                continue
        cues.append((w.start, w.end, w.word))
    return cues


def _ms(seconds: float) -> int:
    """Whole milliseconds, rounded down: a time never moves past the end of the audio."""
    return math.floor(max(0.0, seconds) * 1000 + 1e-6)


def _clock(seconds: float, decimal_mark: str) -> str:
    """12.3456 -> '00:00:12,345' (SRT, decimal_mark ',') or '00:00:12.345' (VTT, '.')."""
    ms = _ms(seconds)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{ms:03d}"
