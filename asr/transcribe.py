"""Audio -> text with a trained model: one file, a waveform array, or a whole manifest.

    audio --load_audio--> (N,) float32 @16 kHz --LogMel--> (T, 80) --model--> (T', V) --decoder--> text
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asr.audio import SAMPLE_RATE, load_audio, resample, to_mono
from asr.checkpoint import load_model_file
from asr.data import BucketBatchSampler, Utterance
from asr.decode import Decoder, build_decoder
from asr.errors import ASRError, AudioError, ModelFileError
from asr.features import LogMel
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


class Transcriber:
    """A model with its features and decoder, ready to turn audio into text."""

    def __init__(self, model: BiLSTMCTC, log_mel: LogMel, tokenizer: CharTokenizer,
                 decoder: Decoder, device: torch.device):
        self.model, self.log_mel = model.to(device).eval(), log_mel.to(device).eval()
        self.tokenizer, self.decoder, self.device = tokenizer, decoder, device

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str = "auto", decoder: str | None = None,
                  **decoder_options) -> Transcriber:
        """Load a model file; `decoder` overrides the decoding settings saved in it."""
        payload = load_model_file(path)
        try:
            tokenizer = CharTokenizer(payload["tokens"][1:])
            model = BiLSTMCTC(ModelConfig(**payload["model_config"]), len(tokenizer))
            model.load_state_dict(payload["model"])
            log_mel = LogMel()
            log_mel.set_stats(payload["feature_stats"]["mean"], payload["feature_stats"]["std"])
        except (TypeError, KeyError, RuntimeError, ASRError) as e:
            raise ModelFileError(f"{path}: model file does not match this asr ({e})") from None
        saved = dict(payload.get("decoding") or {"decoder": "greedy"})
        name = decoder or saved.pop("decoder", "greedy")
        options = {**(saved if decoder is None else {}), **decoder_options}
        return cls(model, log_mel, tokenizer, build_decoder(name, tokenizer, **options), pick_device(device))

    @torch.inference_mode()
    def transcribe_waves(self, waves: list[np.ndarray]) -> list[str]:
        """Texts of 16 kHz mono float32 waveforms, decoded as one padded batch."""
        tensors = [torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in waves]
        lengths = torch.tensor([len(w) for w in tensors])
        batch = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True).to(self.device)
        feats, frames = self.log_mel(batch, lengths.to(self.device))
        log_probs, out_lengths = self.model(feats, frames.cpu())
        return self.decoder(log_probs, out_lengths)

    def transcribe(self, audio: str | os.PathLike | np.ndarray, sample_rate: int | None = None) -> str:
        """Text of an audio file, or of a waveform array (samples, or samples x channels)
        recorded at `sample_rate` (required for arrays)."""
        if isinstance(audio, (str, os.PathLike)):
            wave = load_audio(audio)
        else:
            if sample_rate is None:
                raise ValueError("transcribe(array) needs sample_rate= the rate it was recorded at")
            wave = resample(to_mono(np.asarray(audio, dtype=np.float32)), sample_rate, SAMPLE_RATE)
        if len(wave) == 0:
            return ""
        return self.transcribe_waves([wave])[0]

    def evaluate(self, rows: list[Utterance], max_batch_seconds: float = 200.0,
                 progress: bool = False) -> tuple[ErrorRates, list[str], list[Failure]]:
        """Decode every row, shortest first in batches; returns (error rates, hypotheses in
        the order of `rows` that decoded, failures). An unreadable file is a Failure, not a stop."""
        from tqdm import tqdm

        hyps: dict[int, str] = {}
        failures: list[Failure] = []
        bar = tqdm(total=len(rows), desc="decode", unit="utt", disable=not progress, leave=False)
        # Epoch 0 of the training sampler: shortest first, little padding.
        for batch in BucketBatchSampler([r.duration for r in rows], max_batch_seconds):
            waves, kept = [], []
            for j in batch:
                try:
                    waves.append(load_audio(rows[j].audio))
                    kept.append(j)
                except AudioError as e:
                    failures.append(Failure(rows[j].id, str(e)))
            if kept:
                hyps.update(zip(kept, self.transcribe_waves(waves)))
            bar.update(len(batch))
        bar.close()
        done = [j for j in range(len(rows)) if j in hyps]
        rates = error_rates([rows[j].id for j in done], [rows[j].text for j in done], [hyps[j] for j in done])
        return rates, [hyps[j] for j in done], failures


def load_model(path: str | os.PathLike, device: str = "auto") -> Transcriber:
    """Load a model file for transcription: `asr.load_model("exp/demo/best.pt").transcribe("a.flac")`."""
    return Transcriber.from_file(Path(path), device=device)
