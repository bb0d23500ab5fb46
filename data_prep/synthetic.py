"""An offline speech corpus in LibriSpeech layout, spoken by espeak-ng (and flite).

    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac   16 kHz mono, 16-bit
    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt        "<utt-id> <TEXT>" lines
    <out>/<split>/speakers.json                                            each speaker's voice
    <out>/lm/text.txt                                                      one sentence a line

A speaker is one voice setting (engine, voice, variant, speed, pitch) kept for all its
utterances. Sentences are random strings of real English words, drawn as often as they occur in
running text, so a model must learn to spell rather than recall templates. Speakers and sentences
belong to a split by a hash of their content: the splits are disjoint by construction and each
depends only on its own size and the seed. The LM text shares train's hash bucket, so it never
holds a dev or test sentence.

Everything is drawn from the seed in the parent process and workers only render audio, one
speaker at a time (espeak-ng through its library, one fresh engine per speaker), so the output
does not depend on the number of jobs. A split is finished when `<split>/.done` (its
parameters as JSON) matches; a killed build resumes, as files are renamed into place when whole.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from asr.audio import SAMPLE_RATE, resample, to_mono

FORMAT_VERSION = 6  # bump when a change alters the audio or text for the same parameters
SPLITS = ("train", "dev", "test")
SPEAKER_IDS = {"train": range(1001, 8000), "dev": range(8001, 9000), "test": range(9001, 10000)}
MAX_UTTS_PER_SPEAKER = 10_000  # utterance numbers have four digits

# Each split owns hash buckets of the sentence and the speaker space (the LM shares train's).
SENTENCE_BUCKETS = 20, {"test": {0}, "dev": {1}, "train": set(range(2, 20))}
SPEAKER_BUCKETS = 10, {"test": {0}, "dev": {1}, "train": set(range(2, 10))}

# Words: frequent English words that are also dictionary words and are spoken as written.
VOCAB_TOP_N = 20_000  # wordfreq ranks considered
FREQ_EXPONENT = 1.0  # p ~ freq, as in running text: function words at their natural rates
DICTIONARY = Path("/usr/share/dict/words")  # Debian package wamerican
WORD_RE = re.compile(r"[a-z]+('[a-z]+)?")
TWO_LETTER_WORDS = frozenset("ad ah am an as at aw be by do eh ex go ha he hi ho if in is it me "
                             "my no of oh on or ow ox so to uh um up us we ye yo".split())
# Dictionary words that espeak-ng or flite expand or spell out, found by comparing their phoneme
# output with the spelling: "id" -> "I D", "est" -> "estate", "ii" -> "roman two".
SPOKEN_OTHERWISE = frozenset("adv assn avg calif dept est etc gen govt hwy id ids yd".split())
ROMAN_NUMERAL_RE = re.compile(r"[ivx]+")
SHORT_SHARE, SHORT_MAX = 0.3, 4  # share of sentences drawn with at most SHORT_MAX words

# Voices, mostly espeak-ng; (low, high) ranges exclude high. Variants that whisper, croak, echo,
# clip or sound robotic are left out.
FLITE_SHARE = 0.2
ESPEAK_VOICES = ("en-us", "en-us-nyc", "en", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
                 "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4",
                   "f5", "klatt", "klatt2", "klatt3", "klatt4", "adam", "Alex", "Andy", "Annie",
                   "belinda", "benjamin", "david", "edward", "Gene", "linda", "max", "michel",
                   "miguel", "Mike", "quincy", "robert")
ESPEAK_WPM = (130, 221)  # centred near the default 175: speech faster than any in training is
                         # misheard (CER doubles from 175 to 210 wpm when training stops at 180)
ESPEAK_PITCH = (25, 75)  # espeak's 0-99 scale within the variant's range
ESPEAK_AMPLITUDE = 70  # espeak's default of 100 clips with some variants
FLITE_VOICES = {"kal": (85, 125), "kal16": (85, 125), "awb": (95, 140), "slt": (150, 210),
                "rms": None}  # mean f0 range in Hz; rms ignores int_f0_target_mean
FLITE_STRETCH = (0.85, 1.2)  # duration_stretch: above 1 is slower; the default 1 in the middle

# Audio finishing.
PAD_SECONDS = 0.1  # silence kept around the speech
SILENCE_DB = -40.0  # 10 ms frames this far below the loudest one count as silence
PEAK, GAIN = 0.9, (0.5, 1.0)  # peak level = PEAK * uniform(GAIN)
NOISE_SHARE, NOISE_SNR_DB = 0.3, (30.0, 50.0)  # light white noise on some utterances


@dataclass(frozen=True)
class SplitSpec:
    """How much to speak for one split."""

    n_speakers: int
    utts_per_speaker: int

    def __post_init__(self):
        if self.n_speakers < 1 or not 1 <= self.utts_per_speaker <= MAX_UTTS_PER_SPEAKER:
            raise ValueError(f"{self}: need at least 1 speaker and 1 to "
                             f"{MAX_UTTS_PER_SPEAKER} utterances per speaker")


@dataclass(frozen=True)
class Speaker:
    """One voice setting. `rate`: words/min (espeak-ng) or duration stretch (flite);
    `pitch`: espeak's 0-99 scale or flite's mean f0 in Hz (0: the voice's own)."""

    engine: str
    voice: str
    variant: str
    rate: float
    pitch: int


def _bucket(key: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % buckets


@lru_cache(maxsize=1)
def vocabulary() -> tuple[tuple[str, ...], np.ndarray]:
    """The word list, most frequent first, and each word's sampling probability."""
    import wordfreq

    if not DICTIONARY.exists():
        raise RuntimeError(f"{DICTIONARY} is missing: apt-get install wamerican")
    entries = DICTIONARY.read_text(encoding="utf-8", errors="ignore").split()
    dictionary = {w for w in entries if WORD_RE.fullmatch(w)}  # lower case only: no names
    words = tuple(w for w in wordfreq.top_n_list("en", VOCAB_TOP_N) if _speakable(w, dictionary))
    weights = np.array([wordfreq.word_frequency(w, "en") for w in words]) ** FREQ_EXPONENT
    return words, weights / weights.sum()


def _speakable(word: str, dictionary: set[str]) -> bool:
    if word in ("a", "i"):
        return True
    return (word in dictionary and (len(word) > 2 or word in TWO_LETTER_WORDS)
            and re.search("[aeiouy]", word) is not None and word not in SPOKEN_OTHERWISE
            and not ROMAN_NUMERAL_RE.fullmatch(word))


def sentences(bucket: str, count: int, *, seed: int, stream: int, max_words: int) -> list[str]:
    """`count` distinct lower-case sentences of 1..max_words words from `bucket`'s hash share."""
    words, probs = vocabulary()
    cdf = np.cumsum(probs)
    rng = np.random.default_rng([seed, stream])
    n_buckets, owned = SENTENCE_BUCKETS
    out: dict[str, None] = {}  # an ordered set
    for _ in range(100 * count + 1000):
        if len(out) == count:
            break
        longest = min(SHORT_MAX, max_words) if rng.random() < SHORT_SHARE else max_words
        picks = np.searchsorted(cdf, rng.random(int(rng.integers(1, longest + 1))))
        text = " ".join(words[min(i, len(words) - 1)] for i in picks)
        if _bucket(text, n_buckets) in owned[bucket]:
            out[text] = None
    if len(out) < count:
        raise ValueError(f"cannot draw {count} distinct {bucket} sentences of up to {max_words} "
                         "words: raise max_words or lower the counts")
    return list(out)


def speakers(split: str, count: int, *, seed: int, engines: tuple[str, ...]) -> list[Speaker]:
    """`count` distinct voice settings from `split`'s hash share of the setting space."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    n_buckets, owned = SPEAKER_BUCKETS
    out: dict[Speaker, None] = {}  # an ordered set
    while len(out) < count:
        if "flite" in engines and rng.random() < FLITE_SHARE:
            voice = str(rng.choice(sorted(FLITE_VOICES)))
            f0 = FLITE_VOICES[voice]
            stretch = round(float(rng.uniform(*FLITE_STRETCH)), 2)
            spk = Speaker("flite", voice, "", stretch, int(rng.integers(*f0)) if f0 else 0)
        else:
            spk = Speaker("espeak-ng", str(rng.choice(ESPEAK_VOICES)),
                          str(rng.choice(ESPEAK_VARIANTS)), int(rng.integers(*ESPEAK_WPM)),
                          int(rng.integers(*ESPEAK_PITCH)))
        if _bucket(repr(spk), n_buckets) in owned[split]:
            out[spk] = None
    return list(out)


def synthesize(text: str, speaker: Speaker) -> tuple[np.ndarray, int]:
    """Speak `text` (plain lower-case words) with the engine's program: (samples,) float32 and
    its sample rate. The corpus speaks espeak-ng voices through `speak_espeak` instead."""
    with tempfile.TemporaryDirectory(prefix="synthetic-") as tmp:
        wav = os.path.join(tmp, "out.wav")
        if speaker.engine == "espeak-ng":
            voice = f"{speaker.voice}+{speaker.variant}" if speaker.variant else speaker.voice
            cmd = ["espeak-ng", "-v", voice, "-s", str(speaker.rate), "-p", str(speaker.pitch),
                   "-a", str(ESPEAK_AMPLITUDE), "-w", wav, text]
        else:
            cmd = ["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={speaker.rate}"]
            if speaker.pitch:
                cmd += ["--setf", f"int_f0_target_mean={speaker.pitch}"]
            cmd += ["-t", text, "-o", wav]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(wav):
            raise RuntimeError(f"{' '.join(cmd)!r} failed: {done.stderr.strip()}")
        wave, rate = sf.read(wav, dtype="float32", always_2d=True)
    return to_mono(wave), rate


def trim_silence(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cut leading and trailing silence, keeping PAD_SECONDS of it on each side."""
    hop = sample_rate // 100
    frames = wave[: len(wave) // hop * hop].reshape(-1, hop)  # (N,) -> (N / hop, hop)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    if len(rms) == 0 or rms.max() == 0:
        return wave
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (SILENCE_DB / 20))
    pad = int(PAD_SECONDS * sample_rate)
    return wave[max(0, loud[0] * hop - pad): (loud[-1] + 1) * hop + pad]


def finish(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light white noise on some utterances, then peak-normalise to a random level."""
    if rng.random() < NOISE_SHARE:
        snr_db = rng.uniform(*NOISE_SNR_DB)
        level = np.sqrt(np.mean(wave.astype(np.float64) ** 2)) / 10 ** (snr_db / 20)
        wave = wave + rng.standard_normal(len(wave)) * level
    peak = PEAK * rng.uniform(*GAIN)
    return (wave * (peak / max(np.abs(wave).max(), 1e-9))).astype(np.float32)


class _EspeakLibrary:
    """espeak-ng's C library in this process: no program start per utterance, which is ~3/4 of
    the time the `espeak-ng` program takes to speak a sentence."""

    AUDIO_OUTPUT_SYNCHRONOUS, RATE, VOLUME, PITCH = 2, 1, 2, 3
    POS_CHARACTER, FLAGS = 1, 0x1100  # espeakCHARS_AUTO | espeakPHONEMES | espeakENDPAUSE, as the program
    Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                ctypes.c_void_p)

    def __init__(self):
        try:
            lib = self.lib = ctypes.CDLL(ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1")
        except OSError as error:
            raise RuntimeError(f"libespeak-ng not found ({error}): apt-get install espeak-ng") from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng's library failed to start (its data missing?)")
        self.chunks: list[np.ndarray] = []
        self.callback = self.Callback(self._collect)  # kept alive as long as the library uses it
        lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, samples, count: int, events) -> int:
        if count > 0:
            self.chunks.append(np.ctypeslib.as_array(samples, (count,)).copy())
        return 0  # go on

    def speak(self, text: str, speaker: Speaker) -> np.ndarray:
        """(samples,) int16 at `sample_rate`."""
        voice = f"{speaker.voice}+{speaker.variant}" if speaker.variant else speaker.voice
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        for parameter, value in ((self.RATE, speaker.rate), (self.VOLUME, ESPEAK_AMPLITUDE),
                                 (self.PITCH, speaker.pitch)):
            self.lib.espeak_SetParameter(parameter, int(value), 0)
        self.chunks.clear()
        data = text.encode()
        if self.lib.espeak_Synth(data, len(data) + 1, 0, self.POS_CHARACTER, 0, self.FLAGS,
                                 None, None) != 0:
            raise RuntimeError(f"espeak-ng failed to speak {text!r} with {speaker}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def speak_espeak(texts: list[str], speaker: Speaker) -> tuple[list[np.ndarray], int]:
    """Speak `texts` in order with one espeak-ng voice, in a fresh process: float32 waves and
    their sample rate.

    The library's wave generator keeps state from one utterance to the next (the phase of the
    pitch flutter, for one), so a sentence sounds slightly different when it follows another.
    A fresh engine for each speaker, speaking its sentences in order, keeps the audio a
    function of the seed alone, whatever the number of jobs or an interrupted build; its first
    sentence is the `espeak-ng` program's to the sample.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: speak, send, exit without running the parent's clean-up
        os.close(read)
        try:
            engine = _EspeakLibrary()
            reply = ("ok", [engine.speak(text, speaker) for text in texts], engine.sample_rate)
        except BaseException as error:  # noqa: BLE001 - sent to the parent, which raises it
            reply = ("error", f"{type(error).__name__}: {error}", 0)
        with os.fdopen(write, "wb") as pipe:
            pickle.dump(reply, pipe, protocol=pickle.HIGHEST_PROTOCOL)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        try:
            status, waves, rate = pickle.load(pipe)
        except EOFError:
            status, waves, rate = "error", "", 0
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status == "error" and not waves:  # it died before it could reply (a crash in the library)
        waves = f"the speaking process died ({f'signal {-code}' if code < 0 else f'exit status {code}'})"
    if status != "ok":
        raise RuntimeError(f"espeak-ng, {speaker}: {waves}")
    return [w.astype(np.float32) / 32768 for w in waves], rate


def render(job: tuple[Speaker, list[tuple[str, str, list[int], bool]]]) -> int:
    """Worker: speak one speaker's utterances and write the missing ones as 16 kHz 16-bit FLAC,
    atomically; returns how many were written."""
    speaker, utterances = job
    if speaker.engine == "espeak-ng":  # every utterance, in order: each one's audio depends on those before
        waves, rate = speak_espeak([text for _, text, _, _ in utterances], speaker)
        spoken = [(wave, rate) for wave in waves]
    else:
        spoken = [synthesize(text, speaker) if missing else None for _, text, _, missing in utterances]
    written = 0
    for (path, text, key, missing), said in zip(utterances, spoken):
        if not missing:
            continue
        wave, rate = said
        wave = trim_silence(resample(wave, rate, SAMPLE_RATE), SAMPLE_RATE)
        if len(wave) == 0 or np.abs(wave).max() < 1e-4:
            raise RuntimeError(f"{speaker} produced silence for {text!r}")
        wave = finish(wave, np.random.default_rng(key))
        sf.write(path + ".tmp", wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        os.replace(path + ".tmp", path)
        written += 1
    return written


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _start(folder: Path, params: dict) -> bool:
    """True when `folder` is finished with `params`; else make it ready to build or resume."""
    marks = {name: (folder / name).read_text() if (folder / name).is_file() else None
             for name in (".done", ".params")}
    if marks[".done"] == json.dumps(params):
        return True
    if marks[".params"] != json.dumps(params):  # other parameters, or never started
        if folder.exists() and any(folder.iterdir()) and marks[".params"] is None:
            raise RuntimeError(f"{folder} exists and was not written by data_prep.synthetic: "
                               "choose another output folder")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _atomic_write(folder / ".params", json.dumps(params))
    (folder / ".done").unlink(missing_ok=True)
    return False


def build_split(out_dir: Path, split: str, spec: SplitSpec, *, common: dict,
                engines: tuple[str, ...], jobs: int, progress: bool) -> Path:
    """Speak one split; skipped when already finished with the same parameters."""
    folder, seed = out_dir / split, common["seed"]
    params = dict(common, split=split, n_speakers=spec.n_speakers,
                  utts_per_speaker=spec.utts_per_speaker, engines=list(engines))
    if _start(folder, params):
        return folder
    voices = speakers(split, spec.n_speakers, seed=seed, engines=engines)
    texts = sentences(split, spec.n_speakers * spec.utts_per_speaker, seed=seed,
                      stream=SPLITS.index(split), max_words=common["max_words"])
    work, transcripts = [], []
    for s, (speaker_id, voice) in enumerate(zip(SPEAKER_IDS[split], voices)):
        chapter = 100 * speaker_id + 1
        chapter_dir = folder / str(speaker_id) / str(chapter)
        chapter_dir.mkdir(parents=True, exist_ok=True)
        lines, utterances = [], []
        for u in range(spec.utts_per_speaker):
            uid, text = f"{speaker_id}-{chapter}-{u:04d}", texts[s * spec.utts_per_speaker + u]
            lines.append(f"{uid} {text.upper()}\n")
            path = chapter_dir / f"{uid}.flac"  # present: written whole before an interruption
            utterances.append((str(path), text, [seed, SPLITS.index(split), speaker_id, u],
                               not path.exists()))
        if any(missing for *_, missing in utterances):
            work.append((voice, utterances))
        transcripts.append((chapter_dir / f"{speaker_id}-{chapter}.trans.txt", "".join(lines)))
    # Worker processes even for jobs=1: each resamples with one torch thread (many threads on
    # short signals are 20x slower) and the caller's settings stay untouched. The pool forks
    # before the bar starts its monitor thread.
    with Pool(jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        bar = tqdm(total=sum(missing for _, utts in work for *_, missing in utts),
                   desc=f"speaking {split}", unit="utt", disable=not progress)
        with bar:
            for written in pool.imap_unordered(render, work):
                bar.update(written)
    for path, text in transcripts:
        _atomic_write(path, text)
    settings = {speaker_id: vars(voice) for speaker_id, voice in zip(SPEAKER_IDS[split], voices)}
    _atomic_write(folder / "speakers.json", json.dumps(settings, indent=1))
    _atomic_write(folder / ".done", json.dumps(params))
    return folder


def build_lm_text(out_dir: Path, count: int, *, common: dict) -> Path:
    """Sentences for language-model training, from train's share (none from dev or test)."""
    folder = out_dir / "lm"
    params = dict(common, lm_sentences=count)
    if not _start(folder, params):
        texts = sentences("train", count, seed=common["seed"], stream=len(SPLITS),
                          max_words=common["max_words"])
        _atomic_write(folder / "text.txt", "".join(t.upper() + "\n" for t in texts))
        _atomic_write(folder / ".done", json.dumps(params))
    return folder / "text.txt"


def available_engines() -> tuple[str, ...]:
    """The installed TTS engines; espeak-ng is required, flite optional."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng not found: apt-get install espeak-ng (flite optional)")
    if shutil.which("flite") is None:
        warnings.warn("flite not found: every speaker uses espeak-ng (apt-get install flite)")
        return ("espeak-ng",)
    return ("espeak-ng", "flite")


def build_corpus(out_dir: str | Path, *, train: SplitSpec, dev: SplitSpec, test: SplitSpec,
                 lm_sentences: int = 20000, max_words: int = 16, seed: int = 0,
                 jobs: int | None = None, progress: bool = True) -> dict[str, Path]:
    """Build, finish or keep the corpus under `out_dir`.

    Returns {"train": folder, "dev": folder, "test": folder, "lm": text file}. Splits already
    finished with the same parameters are left untouched; `jobs` defaults to all cores.
    """
    if max_words < 1 or lm_sentences < 0 or seed < 0:
        raise ValueError(f"need max_words >= 1, lm_sentences >= 0 and seed >= 0, not "
                         f"{max_words}, {lm_sentences}, {seed}")
    for split, spec in zip(SPLITS, (train, dev, test)):
        if spec.n_speakers > len(SPEAKER_IDS[split]):
            raise ValueError(f"{split}: at most {len(SPEAKER_IDS[split])} speakers")
    engines = available_engines()
    words, _ = vocabulary()
    common = {"version": FORMAT_VERSION, "seed": seed, "max_words": max_words,
              "vocabulary": hashlib.blake2b(" ".join(words).encode(), digest_size=8).hexdigest()}
    out_dir, jobs = Path(out_dir), max(1, jobs or os.cpu_count() or 1)
    paths = {split: build_split(out_dir, split, spec, common=common, engines=engines, jobs=jobs,
                                progress=progress)
             for split, spec in zip(SPLITS, (train, dev, test))}
    paths["lm"] = build_lm_text(out_dir, lm_sentences, common=common)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic",
        description="Speak a corpus in LibriSpeech layout with espeak-ng/flite, plus LM text. "
                    "Finished splits are skipped and an interrupted build resumes.",
        epilog="The defaults give about an hour of training audio (1250 utterances), built in "
               "about 15 s on 2 cores. Needs espeak-ng, optionally flite, and a word list: "
               "apt-get install espeak-ng flite wamerican.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        default=argparse.SUPPRESS, help="output folder")
    for split, n_speakers, utts in (("train", 50, 25), ("dev", 5, 20), ("test", 5, 20)):
        parser.add_argument(f"--{split}-speakers", type=int, default=n_speakers, metavar="N",
                            help=f"voices in {split}, disjoint from the other splits")
        parser.add_argument(f"--{split}-utts", type=int, default=utts, metavar="N",
                            help="utterances per speaker")
    parser.add_argument("--lm-sentences", type=int, default=20000, metavar="N",
                        help="lines of LM text")
    parser.add_argument("--max-words", type=int, default=16, metavar="N",
                        help="longest sentence in words")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same corpus")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), metavar="N",
                        help="worker processes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        paths = build_corpus(
            args.out, train=SplitSpec(args.train_speakers, args.train_utts),
            dev=SplitSpec(args.dev_speakers, args.dev_utts),
            test=SplitSpec(args.test_speakers, args.test_utts), lm_sentences=args.lm_sentences,
            max_words=args.max_words, seed=args.seed, jobs=args.jobs,
            progress=not args.no_progress)
    except (RuntimeError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
