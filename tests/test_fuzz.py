"""Properties that hold for any input, checked on many generated ones (hypothesis).

- Text: `normalize_text` is idempotent and yields single-spaced words of the tokenizer's alphabet,
  which the tokenizer round-trips; any other character is a TextError that names it.
- Decoders: on any (T, V) scores (finite, -inf, ties, T from 0 to 40) greedy and beam search,
  with and without an LM, return single-spaced text of the alphabet; greedy is the per-frame
  argmax collapsed; on confident frames beam search says what greedy says; a batch decodes as
  its utterances one by one.
- Audio: small real files with bytes flipped, overwritten, inserted, deleted or cut off either
  load as a finite mono float32 array or raise AudioError naming the file, in bounded time.

Hypothesis runs derandomized (the same examples every run, no example database), so a failure
reproduces; `@example`s pin the inputs that once broke.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from asr.audio import audio_duration, load_audio
from asr.decode import BeamSearchDecoder, GreedyDecoder
from asr.errors import AudioError, TextError
from asr.features import LogMel
from asr.text import CHARACTERS, CharTokenizer, normalize_text
from conftest import noise, sine

TOK = CharTokenizer()
V = len(TOK)
LOG_MEL = LogMel()
ALPHABET = set(CHARACTERS)


def fuzz(max_examples: int, deadline_s: float | None = None):
    """Deterministic hypothesis settings: the same examples every run, none stored on disk.
    No deadline unless asked: the first beam search compiles (seconds, when numba's cache is cold)."""
    return settings(max_examples=max_examples, derandomize=True, database=None, print_blob=False,
                    deadline=None if deadline_s is None else timedelta(seconds=deadline_s))


def assert_clean_text(text: str) -> None:
    """Words of the tokenizer's alphabet, one space between them, none at either end."""
    assert isinstance(text, str)
    assert set(text) <= ALPHABET, text
    assert text == text.strip() and "  " not in text, repr(text)


# ---------------------------------------------------------------------------------------------
# Text normalisation and the tokenizer.

# What transcripts hold beyond plain letters: apostrophes of every kind, dashes, underscores,
# slashes, odd spaces, accents, ligatures, digits, punctuation, letters no fold reaches.
TRICKY = list("aZq'\u2019\u2018`\u00b4-\u2014\u2013_/ \t\n\u00a0\u2009\u00e9\u00c9\u00e7\u00df\ufb01\u0152\u00e6"
              "0123456789.,!?\";:()\u01c5\u212a\u0131\u00f8\u4e2d\U0001f600")
TEXTS = st.text() | st.text(alphabet=st.sampled_from(TRICKY), max_size=60)


@fuzz(400)
@given(TEXTS)
def test_normalize_text_is_idempotent(raw):
    once = normalize_text(raw)
    assert normalize_text(once) == once


@fuzz(400)
@given(TEXTS)
def test_normalized_text_is_what_the_tokenizer_round_trips(raw):
    text = normalize_text(raw)
    assert_clean_text(text)
    ids = TOK.encode(text)
    assert all(0 < i < V for i in ids)  # never the blank
    assert TOK.decode(ids) == text


@fuzz(300)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_normalize_text_keeps_every_ascii_letter_in_order(raw):
    assert [c for c in normalize_text(raw) if c != " " and c != "'"] == [c.upper() for c in raw if c.isalpha()]


@fuzz(300)
@given(st.text(alphabet=st.sampled_from(CHARACTERS + ["a", "\u00e9", "-", "\t", "1", "<", "\x00"]),
               max_size=30))
def test_tokenizer_encodes_its_alphabet_and_names_anything_else(text):
    bad = sorted(set(text) - ALPHABET)
    if not bad:
        assert TOK.decode(TOK.encode(text)) == text
        return
    with pytest.raises(TextError) as err:
        TOK.encode(text)
    assert repr("".join(bad)) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Decoders.


@st.composite
def scores(draw, max_frames: int = 40) -> np.ndarray:
    """(T, V) float32 scores: raw or log-softmaxed, some or all -inf, ties when rounded."""
    frames = draw(st.integers(0, max_frames))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((frames, V)) * draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    if draw(st.booleans()):
        x = x - np.logaddexp.reduce(x, axis=1, keepdims=True)  # log-probs
    if draw(st.booleans()):
        x = np.round(x)  # ties between tokens
    x[rng.random(x.shape) < draw(st.sampled_from([0.0, 0.2, 0.9, 1.0]))] = -np.inf
    return x.astype(np.float32)


def greedy_by_hand(x: np.ndarray) -> str:
    """Per-frame argmax (the first on ties), repeats merged, blanks dropped, spaces normalised."""
    best = [int(k) for k in np.argmax(x, axis=1)] if len(x) else []
    ids = [k for j, k in enumerate(best) if k != TOK.blank_id and (j == 0 or best[j - 1] != k)]
    return " ".join(TOK.decode(ids).split())


def decode_one(decoder, x: np.ndarray) -> str:
    return decoder(torch.from_numpy(x)[None], torch.tensor([len(x)]))[0]


@fuzz(300)
@given(scores())
def test_greedy_is_the_argmax_path_collapsed(x):
    text = decode_one(GreedyDecoder(TOK), x)
    assert_clean_text(text)
    assert text == greedy_by_hand(x)


@fuzz(150)
@given(scores(), st.sampled_from([1, 2, 5]))
def test_beam_search_returns_clean_text_on_any_scores(x, beam_size):
    text = decode_one(BeamSearchDecoder(TOK, beam_size=beam_size, num_workers=1), x)
    assert_clean_text(text)


@st.composite
def confident(draw, max_frames: int = 40) -> np.ndarray:
    """(T, V) log-probs with one token near 0 per frame (any token: blank, space, apostrophe)
    and every other at most -12, below the beam's token_min_logp."""
    tokens = draw(st.lists(st.integers(0, V - 1), max_size=max_frames))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.uniform(-40.0, -12.0, (len(tokens), V))
    x[np.arange(len(tokens)), tokens] = rng.uniform(-0.01, 0.0, len(tokens))
    return x.astype(np.float32)


@fuzz(200)
@given(confident())
@example(np.full((3, V), -20.0, np.float32))  # nothing near 0: every token equally unlikely
def test_beam_says_what_greedy_says_on_confident_frames(x):
    greedy = decode_one(GreedyDecoder(TOK), x)
    assert decode_one(BeamSearchDecoder(TOK, beam_size=16, num_workers=1), x) == greedy


@fuzz(100)
@given(st.lists(scores(max_frames=20), min_size=1, max_size=4), st.integers(0, 2**32 - 1))
def test_a_padded_batch_decodes_as_its_utterances_one_by_one(utterances, seed):
    # Padding frames hold confident letters: a decoder that reads past a length spells them.
    longest = max(len(u) for u in utterances) + 2
    batch = np.full((len(utterances), longest, V), -30.0, np.float32)
    batch[:, :, np.random.default_rng(seed).integers(1, V)] = 0.0
    for b, u in enumerate(utterances):
        batch[b, : len(u)] = u
    lengths = torch.tensor([len(u) for u in utterances])
    for decoder in (GreedyDecoder(TOK), BeamSearchDecoder(TOK, beam_size=4, num_workers=2)):
        one_by_one = [decode_one(decoder, u) for u in utterances]
        assert decoder(torch.from_numpy(batch), lengths) == one_by_one


# A tiny bigram LM, log10 probabilities and back-offs as an ARPA file writes them.
LM_WORDS = ("THE", "CAT", "CAB", "A")
ARPA = """\\data\\
ngram 1=7
ngram 2=4

\\1-grams:
-1.0\t</s>
-99\t<s>\t-0.5
-1.0\tTHE\t-0.3
-1.5\tCAT\t-0.2
-3.0\tCAB\t-0.2
-1.2\tA\t-0.1
-2.0\t<unk>

\\2-grams:
-0.2\t<s> THE
-0.3\tTHE CAT
-0.5\tCAT </s>
-0.4\tA CAB

\\end\\
"""


@pytest.fixture(scope="module")
def lm_decoders(tmp_path_factory) -> dict[str, BeamSearchDecoder]:
    arpa = tmp_path_factory.mktemp("lm") / "tiny.arpa"
    arpa.write_text(ARPA)
    return {lexicon: BeamSearchDecoder(TOK, beam_size=6, lm=arpa, lexicon=lexicon, num_workers=1)
            for lexicon in ("free", "lm")}


@fuzz(150)
@given(scores() | confident())
def test_beam_with_an_lm_returns_clean_text(lm_decoders, x):
    assert_clean_text(decode_one(lm_decoders["free"], x))
    # Within the LM's words a space only ever follows a whole word; the last may be unfinished.
    text = decode_one(lm_decoders["lm"], x)
    assert_clean_text(text)
    *done, last = text.split(" ")
    assert all(w in LM_WORDS for w in done), text
    assert any(w.startswith(last) for w in LM_WORDS), text


# ---------------------------------------------------------------------------------------------
# Damaged audio files.

# name -> (samples (N,) or (N, C), rate, subtype): a few tenths of a second each, so a mutation
# costs milliseconds, in each container load_audio is documented to read (WAV, FLAC, OGG, MP3).
BASES = {
    "pcm16.wav": (lambda: sine(440, 0.2) + noise(0.2), 16000, "PCM_16"),
    "float_stereo.wav": (lambda: np.stack([sine(300, 0.2, 22050), noise(0.2, 22050)], 1), 22050, "FLOAT"),
    "u8_8k.wav": (lambda: sine(200, 0.25, 8000), 8000, "PCM_U8"),
    "pcm16.flac": (lambda: sine(440, 0.2) + noise(0.2, seed=1), 16000, "PCM_16"),
    "pcm24_44k_stereo.flac": (lambda: np.stack([sine(500, 0.1, 44100)] * 2, 1), 44100, "PCM_24"),
    "vorbis.ogg": (lambda: sine(440, 0.3) + noise(0.3, seed=2), 16000, "VORBIS"),
    "layer3.mp3": (lambda: sine(440, 0.3, 22050) + noise(0.3, 22050, seed=3), 22050, "MPEG_LAYER_III"),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """Each base file, checked to load before it is damaged."""
    folder = tmp_path_factory.mktemp("fuzz_audio")
    out = {}
    for name, (make, rate, subtype) in BASES.items():
        out[name] = path = folder / name
        sf.write(path, make(), rate, subtype=subtype)
        wave = load_audio(path)
        assert wave.ndim == 1 and len(wave) > 1000 and np.abs(wave).max() > 0.05, name
    return out


# Positions: the header (the first 64 bytes hold a WAV's format, rate, sizes) or anywhere,
# taken modulo the file's length.
POSITION = st.integers(0, 63) | st.integers(0, 2**20)
FIELDS = st.sampled_from([0, 1, 2, 0xFFFF, 16001, 44101, 0x7FFFFFFF, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),  # one bit
    st.tuples(st.just("set"), POSITION, st.binary(min_size=1, max_size=16)),  # overwrite bytes
    st.tuples(st.just("int"), POSITION, FIELDS),  # a little-endian 32-bit field
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 256)),
    st.tuples(st.just("cut"), POSITION, st.just(0)),  # truncate there
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, pos, arg in mutations:
        pos %= len(out) + 1
        if kind == "flip" and pos < len(out):
            out[pos] ^= 1 << arg
        elif kind == "set":
            out[pos:pos + len(arg)] = arg
        elif kind == "int":
            out[pos:pos + 4] = arg.to_bytes(4, "little")
        elif kind == "insert":
            out[pos:pos] = arg
        elif kind == "delete":
            del out[pos:pos + arg]
        elif kind == "cut":
            del out[pos:]
    return bytes(out)


@pytest.mark.parametrize("name", list(BASES))
@fuzz(200, deadline_s=5.0)  # an example is milliseconds; an odd rate once took 15-40 s
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
# A WAV's sample rate (bytes 24-27) at an odd value once took 15-40 s and gigabytes to
# resample; at 1 Hz it made 16000 samples of each one.
@example(mutations=[("int", 24, 16001)])
@example(mutations=[("int", 24, 44101)])
@example(mutations=[("int", 24, 1)])
@example(mutations=[("int", 24, 0xFFFFFFFF)])
@example(mutations=[("int", 40, 0xFFFFFFFF)])  # the data chunk's size
@example(mutations=[("int", 22, 0x0000FFFF)])  # channels (and the rate's low bytes)
@example(mutations=[("cut", 44, 0)])  # a header and nothing else
@example(mutations=[("cut", 7, 0)])
# An MP3's Xing header (frames, big-endian, at 21) claiming 2**31 frames: sf.read sized its array
# by it and raised MemoryError.
@example(mutations=[("set", 21, b"\x7f\xff\xff\xff")])
# Float samples of 3.4e38 (in float_stereo.wav's data): finite, but their log-mel is not.
@example(mutations=[("set", 1000, b"\xff\xff\x7f\x7f")])
def test_damaged_audio_loads_or_raises_audio_error(originals, tmp_path_factory, name, mutations):
    path = _damaged(tmp_path_factory, name, mutate(originals[name].read_bytes(), mutations))
    try:
        wave = load_audio(path)
    except AudioError as e:
        event("load_audio: AudioError")
        assert str(path) in str(e) and "\n" not in str(e), str(e)
    else:
        event("load_audio: loads")
        assert isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.ndim == 1
        assert len(wave) > 0 and np.isfinite(wave).all()
        # What loads must make features: a finite sample can still overflow the power spectrum.
        assert torch.isfinite(LOG_MEL.log_mel(torch.from_numpy(wave)[None])).all()
    try:
        seconds = audio_duration(path)
    except AudioError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
    else:
        assert isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0


def _damaged(tmp_path_factory, name: str, data: bytes) -> Path:
    """`data` written under `name` in a folder of this module's (rewritten for each example)."""
    folder = tmp_path_factory.getbasetemp() / "fuzz_damaged"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path
