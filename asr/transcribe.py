"""Audio -> text with a trained model: one file, a waveform array, or a whole manifest.

    audio --load_audio--> (N,) float32 @16 kHz --LogMel--> (T, 80) --model--> (T', V) --decoder--> text

Long audio (over `chunk_seconds`) is read a block at a time (audio.stream_audio) and heard in
overlapping windows of `chunk_seconds`; of each window's (T_w, V) log-probs only the middle is
kept, `context_seconds` away from the window's cut edges, where a bidirectional model has heard
enough on both sides. The kept pieces, joined, are the whole file's (T', V) log-probs (small:
25 frames x V floats a second at 40 ms frames, 10 MB an hour), decoded once as for short audio,
so the text runs on across the seams and timestamps come out as usual:

    window k:  |-- context --|------ kept ------|-- context --|      (the first keeps its start,
    window k+1:                 |-- context --|------ kept ------|--   the last its end)

Windows start on whole output frames (subsampling x HOP_LENGTH samples), so frame j of window
k is frame j + k * step of the file, exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asr.audio import SAMPLE_RATE, audio_duration, load_audio, resample, stream_audio, to_mono, windows
from asr.checkpoint import load_model_file
from asr.data import BucketBatchSampler, Utterance
from asr.decode import DEFAULT_BEAM_SIZE, DEFAULT_UNK_LOGP, Decoder, build_decoder
from asr.errors import ASRError, AudioError, ConfigError, ModelFileError
from asr.features import HOP_LENGTH, LogMel
from asr.metrics import ErrorRates, error_rates
from asr.model import BiLSTMCTC, ModelConfig
from asr.text import CharTokenizer


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when there is one, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Failure:
    """An input that could not be used, and why (the message names the file)."""

    id: str
    message: str


# Long audio (see the module docstring). A window of CHUNK_SECONDS is as long as LibriSpeech's
# longest utterances (~35 s), a length the model has trained on, and its activations are a few
# MB. CONTEXT_SECONDS is what each side of a cut needs: a bidirectional RNN's memory fades over
# seconds, not minutes. Together they cost 30 / 22 = 1.36x the model time of one pass.
CHUNK_SECONDS = 30.0
CONTEXT_SECONDS = 4.0


class Transcriber:
    """A model with its features and decoder, ready to turn audio into text.

    Audio longer than `chunk_seconds` is heard in windows of that length, `context_seconds` of
    each cut edge heard but not kept (see the module docstring); memory then stays flat however
    long the file.
    """

    def __init__(self, model: BiLSTMCTC, log_mel: LogMel, tokenizer: CharTokenizer,
                 decoder: Decoder, device: torch.device, chunk_seconds: float = CHUNK_SECONDS,
                 context_seconds: float = CONTEXT_SECONDS):
        self.model, self.log_mel = model.to(device).eval(), log_mel.to(device).eval()
        self.tokenizer, self.decoder, self.device = tokenizer, decoder, device
        self.chunk_seconds, self.context_seconds = float(chunk_seconds), float(context_seconds)
        if not 0 <= 2 * self.context_seconds < self.chunk_seconds < math.inf:
            raise ConfigError(f"chunk_seconds={chunk_seconds:g} must be more than twice context_seconds="
                              f"{context_seconds:g} (a window keeps what lies between its two contexts)")
        # Window and context in output frames, so that windows start on whole frames; a window
        # keeps at least one frame however the seconds round.
        self.context_frames = round(self.context_seconds * SAMPLE_RATE / self.frame_samples)
        self.chunk_frames = max(int(self.chunk_seconds * SAMPLE_RATE // self.frame_samples),
                                2 * self.context_frames + 1)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str = "auto", decoder: str | None = None,
                  chunk_seconds: float = CHUNK_SECONDS, context_seconds: float = CONTEXT_SECONDS,
                  **decoder_options) -> Transcriber:
        """Load a model file. It decodes as its saved settings say (greedy if none); `decoder`
        and any option given (not None) override them, and an `lm` alone implies beam search.
        `chunk_seconds` and `context_seconds`: see the class."""
        payload = load_model_file(path)
        try:
            tokenizer = CharTokenizer(payload["tokens"][1:])
            model = BiLSTMCTC(ModelConfig(**payload["model_config"]), len(tokenizer))
            model.load_state_dict(payload["model"])
            log_mel = LogMel()
            log_mel.set_stats(payload["feature_stats"]["mean"], payload["feature_stats"]["std"])
        except (TypeError, KeyError, RuntimeError, ASRError) as e:
            raise ModelFileError(f"{path}: model file does not match this asr ({e})") from None
        name, options = decoding_settings(payload.get("decoding"), decoder, decoder_options)
        return cls(model, log_mel, tokenizer, build_decoder(name, tokenizer, **options), pick_device(device),
                   chunk_seconds=chunk_seconds, context_seconds=context_seconds)

    @property
    def frame_samples(self) -> int:
        """Audio samples per output frame (the feature hop times the subsampling)."""
        return self.model.config.subsampling * HOP_LENGTH

    @property
    def frame_seconds(self) -> float:
        """Seconds of audio per output frame (the feature hop times the subsampling)."""
        return self.frame_samples / SAMPLE_RATE

    @torch.inference_mode()
    def log_probs(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T', V) log-probs on the CPU, and each one's length, for 16 kHz mono waveforms."""
        tensors = [torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in waves]
        lengths = torch.tensor([len(w) for w in tensors])
        batch = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True).to(self.device)
        feats, frames = self.log_mel(batch, lengths.to(self.device))
        log_probs, out_lengths = self.model(feats, frames.cpu())
        return log_probs.float().cpu(), out_lengths.cpu()

    def transcribe_waves(self, waves: list[np.ndarray]) -> list[str]:
        """Texts of 16 kHz mono float32 waveforms, decoded as one padded batch."""
        return self.decoder(*self.log_probs(waves))

    def transcribe_with_timestamps(self, audio: str | os.PathLike | np.ndarray,
                                   sample_rate: int | None = None) -> tuple[str, list]:
        """(text, words with start/end seconds) of one file or waveform array, the words placed
        by aligning the decoded text to the model's frames."""
        from asr.timestamps import word_timestamps

        heard = self.audio_log_probs(audio, sample_rate)
        if heard is None:
            return "", []
        log_probs, seconds = heard
        text = self._decode(log_probs)
        words = word_timestamps(text, log_probs.numpy(), self.tokenizer, self.frame_seconds, duration=seconds)
        return text, words

    def transcribe(self, audio: str | os.PathLike | np.ndarray, sample_rate: int | None = None) -> str:
        """Text of an audio file, or of a waveform array (samples, or samples x channels)
        recorded at `sample_rate` (required for arrays)."""
        heard = self.audio_log_probs(audio, sample_rate)
        return "" if heard is None else self._decode(heard[0])

    def audio_log_probs(self, audio: str | os.PathLike | np.ndarray,
                        sample_rate: int | None = None) -> tuple[torch.Tensor, float] | None:
        """(T', V) log-probs of one file or waveform array (as for transcribe) and its duration
        in seconds, or None when there is nothing to hear. Audio that fits in one window is heard
        in one pass; a longer file is read a block at a time and heard window by window."""
        if isinstance(audio, (str, os.PathLike)) and self._longer_than_a_chunk(audio):
            return self.long_log_probs(stream_audio(audio, block_seconds=self.chunk_seconds))
        wave = self._wave(audio, sample_rate)
        # No samples, or digital silence (every sample 0): nothing was said. Asked anyway, a
        # model that never heard all-zero features may spell a few letters there.
        if not wave.any():
            return None
        if len(wave) > self.chunk_frames * self.frame_samples:  # an array: held, but not its activations
            return self.long_log_probs([wave])
        log_probs, lengths = self.log_probs([wave])
        return log_probs[0, : int(lengths[0])], len(wave) / SAMPLE_RATE

    def long_log_probs(self, blocks: Iterable[np.ndarray]) -> tuple[torch.Tensor, float] | None:
        """(T', V) log-probs of audio given as consecutive 16 kHz mono blocks, and its duration in
        seconds, heard in windows of chunk_seconds (see the module docstring): the frames one pass
        would give, but for what the model remembers from beyond context_seconds away. None when
        every sample is 0 (see audio_log_probs)."""
        context, step = self.context_frames, self.chunk_frames - 2 * self.context_frames
        kept, sound, end = [], False, 0
        samples = self.frame_samples
        for start, wave, last in windows(blocks, self.chunk_frames * samples, step * samples):
            sound = sound or bool(wave.any())
            log_probs, lengths = self.log_probs([wave])  # (1, T_w, V)
            # Frame j of this window is frame j + start / frame_samples of the file.
            first = context if start > 0 else 0
            stop = int(lengths[0]) if last else context + step
            kept.append(log_probs[0, first:stop])
            end = start + len(wave)
        if not sound:
            return None
        return torch.cat(kept), end / SAMPLE_RATE  # (T', V)

    def _longer_than_a_chunk(self, path: str | os.PathLike) -> bool:
        try:
            return audio_duration(path) > self.chunk_seconds  # from the header: nothing decoded
        except AudioError:
            return False  # load_audio says what is wrong with it

    def _decode(self, log_probs: torch.Tensor) -> str:
        """Text of one utterance's (T', V) log-probs."""
        return self.decoder(log_probs[None], torch.tensor([len(log_probs)]))[0]

    def _wave(self, audio, sample_rate: int | None) -> np.ndarray:
        if isinstance(audio, (str, os.PathLike)):
            return load_audio(audio)
        if sample_rate is None:
            raise ValueError("transcribe(array) needs sample_rate= the rate it was recorded at")
        return resample(to_mono(np.asarray(audio, dtype=np.float32)), sample_rate, SAMPLE_RATE)

    def evaluate(self, rows: list[Utterance], max_batch_seconds: float = 200.0,
                 progress: bool = False) -> tuple[ErrorRates, list[str], list[Failure]]:
        """Decode every row, shortest first in batches; returns (error rates, hypotheses in
        the order of `rows` that decoded, failures). An unreadable file is a Failure, not a stop."""
        from tqdm import tqdm

        hyps: dict[int, str] = {}
        failures: list[Failure] = []
        bar = tqdm(total=len(rows), desc="decode", unit="utt", disable=not progress, leave=False)
        for kept, waves, failed in read_batches(rows, max_batch_seconds):
            failures += failed
            if kept:
                hyps.update(zip(kept, self.transcribe_waves(waves)))
            bar.update(len(kept) + len(failed))
        bar.close()
        done = [j for j in range(len(rows)) if j in hyps]
        rates = error_rates([rows[j].id for j in done], [rows[j].text for j in done], [hyps[j] for j in done])
        return rates, [hyps[j] for j in done], failures


def read_batches(rows: list[Utterance], max_batch_seconds: float = 200.0):
    """(row indices, waveforms, failures) per batch of similar durations, shortest first (epoch 0
    of the training sampler: little padding). A file that cannot be read is a Failure, not a stop."""
    for batch in BucketBatchSampler([r.duration for r in rows], max_batch_seconds):
        kept, waves, failed = [], [], []
        for j in batch:
            try:
                waves.append(load_audio(rows[j].audio))
                kept.append(j)
            except AudioError as e:
                failed.append(Failure(rows[j].id, str(e)))
        yield kept, waves, failed


@dataclass
class TuningResult:
    lm_weight: float
    word_bonus: float
    rates: ErrorRates


# The grid asr tune-lm searches by default: around the untuned defaults, wide enough for LMs
# far stronger or weaker than the one they were measured with.
TUNE_LM_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
TUNE_WORD_BONUSES = (-1.0, 0.0, 1.0, 2.0, 3.0, 4.0)


def tune_lm(transcriber: Transcriber, rows: list[Utterance], lm, *, lexicon="free",
            unk_logp: float = DEFAULT_UNK_LOGP, beam_size: int = DEFAULT_BEAM_SIZE,
            lm_weights=TUNE_LM_WEIGHTS, word_bonuses=TUNE_WORD_BONUSES, progress: bool = False) -> tuple[list[TuningResult], dict, list[Failure]]:
    """Grid-search the LM weight and word bonus on `rows`: the model runs once, every pair
    decodes the same log-probs. Returns every pair's rates, the best pair's decoding settings
    (lowest WER, then CER, then the smaller weight), and the files that could not be read."""
    from tqdm import tqdm

    from asr.decode import BeamSearchDecoder

    decoder = BeamSearchDecoder(transcriber.tokenizer, beam_size=beam_size, lm=lm, lexicon=lexicon,
                                unk_logp=unk_logp)
    kept, log_probs, failures = [], [], []
    for batch, waves, failed in read_batches(rows):
        failures += failed
        if waves:
            lp, lengths = transcriber.log_probs(waves)
            log_probs += [lp[b, :n].numpy() for b, n in enumerate(lengths.tolist())]
            kept += batch
    ids, refs = [rows[j].id for j in kept], [rows[j].text for j in kept]
    results = []
    grid = [(a, b) for a in lm_weights for b in word_bonuses]
    for a, b in tqdm(grid, desc="tune", unit="pair", disable=not progress, leave=False):
        decoder.lm_weight, decoder.word_bonus = float(a), float(b)
        results.append(TuningResult(float(a), float(b), error_rates(ids, refs, decoder.decode_each(log_probs))))
    best = min(results, key=lambda r: (round(r.rates.wer, 6), round(r.rates.cer, 6), r.lm_weight))
    decoder.lm_weight, decoder.word_bonus = best.lm_weight, best.word_bonus
    return results, decoder.settings(), failures


def decoding_settings(saved: dict | None, decoder: str | None, options: dict) -> tuple[str, dict]:
    """The decoder name and options to use: a model file's saved settings, overridden by those
    given (None means not given). Saved options carry over only to the decoder they were saved for."""
    saved = dict(saved or {})
    saved_name = saved.pop("decoder", "greedy")
    given = {k: v for k, v in options.items() if v is not None}
    name = decoder or ("beam" if given.get("lm") else saved_name)
    if name == "greedy":
        if given:
            raise ConfigError(f"{', '.join(sorted(given))}: only used by the beam decoder (--decoder beam)")
        return name, {}
    return name, {**(saved if name == saved_name else {}), **given}


def load_model(path: str | os.PathLike, device: str = "auto", decoder: str | None = None,
               chunk_seconds: float = CHUNK_SECONDS, context_seconds: float = CONTEXT_SECONDS,
               **decoder_options) -> Transcriber:
    """Load a model file for transcription: `asr.load_model("exp/demo/best.pt").transcribe("a.flac")`.
    It decodes as the model file's saved settings say; `decoder="beam"`, `lm=...`, `lm_weight=...`
    and the other BeamSearchDecoder options override them. Audio longer than `chunk_seconds` is
    heard in overlapping windows (see Transcriber)."""
    return Transcriber.from_file(Path(path), device=device, decoder=decoder, chunk_seconds=chunk_seconds,
                                 context_seconds=context_seconds, **decoder_options)
