"""Log-mel features, global mean/variance normalisation, and two augmentations for training:
vocal tract length perturbation (on the power spectrum) and SpecAugment (on the log-mel).

Shapes: a batch of waveforms (B, N) -> log-mel (B, T, N_MELS), with T = 1 + N // HOP_LENGTH
(frames are centred, as in librosa).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio
from torch import nn

from asr.audio import SAMPLE_RATE

N_MELS = 80
WIN_LENGTH = SAMPLE_RATE * 25 // 1000  # 25 ms = 400 samples
HOP_LENGTH = SAMPLE_RATE * 10 // 1000  # 10 ms = 160 samples
N_FFT = 512
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
LOG_FLOOR = 1e-6  # keeps log() finite in digital silence
VTLP_KNEE_HZ = 4800.0  # VTLP scales frequencies up to here, then maps the rest onto what is left


def num_frames(num_samples: torch.Tensor | int) -> torch.Tensor | int:
    """Frames LogMel makes of `num_samples` samples (centred STFT)."""
    return 1 + num_samples // HOP_LENGTH


class LogMel(nn.Module):
    """Waveforms -> normalised log-mel frames.

    The mel filters are librosa's defaults (Slaney scale and area normalisation), so
    `librosa.feature.melspectrogram` gives the same numbers. `mean`/`std` (N_MELS,) are the
    global statistics of the training set; identity until `set_stats` is called.
    """

    def __init__(self):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN_LENGTH, hop_length=HOP_LENGTH,
            n_mels=N_MELS, power=2.0, center=True, pad_mode="constant", norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("mean", torch.zeros(N_MELS))
        self.register_buffer("std", torch.ones(N_MELS))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def log_mel(self, waves: torch.Tensor, warp: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) float waveforms -> (B, T, N_MELS) un-normalised log-mel, in fp32; with (B,)
        `warp` factors, each utterance's spectrum is first warped by its factor (`warp_spectrum`)."""
        with torch.autocast(waves.device.type, enabled=False):
            power = self.mel.spectrogram(waves.float())  # (B, N_FFT // 2 + 1, T)
            if warp is not None:
                power = warp_spectrum(power, warp)
            spec = self.mel.mel_scale(power)  # (B, N_MELS, T)
        return torch.log(spec + LOG_FLOOR).transpose(1, 2)  # (B, N_MELS, T) -> (B, T, N_MELS)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor,
                warp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) waveforms with (B,) sample counts (and optional (B,) VTLP `warp` factors) ->
        ((B, T, N_MELS) features, (B,) frame counts). Frames past an utterance's end are zero.
        """
        feats = (self.log_mel(waves, warp) - self.mean) / self.std
        frames = num_frames(lengths)
        valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < frames[:, None]
        return feats * valid[:, :, None], frames


def vtlp_factors(count: int, vtlp: float, device: torch.device) -> torch.Tensor | None:
    """(count,) VTLP warp factors drawn uniformly from [1 - vtlp, 1 + vtlp]; None when vtlp is 0."""
    return 1 + vtlp * (2 * torch.rand(count, device=device) - 1) if vtlp else None


def warp_spectrum(power: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Vocal tract length perturbation (Jaitly and Hinton, 2013): (B, F, T) power spectra
    (F bins from 0 Hz to Nyquist) with (B,) factors -> (B, F, T), each utterance's frequency axis
    stretched by its factor. A factor above 1 moves formants up, as a shorter vocal tract would:
    what was at f Hz is heard at factor * f, up to VTLP_KNEE_HZ; above it the map is linear, so
    0 Hz and Nyquist stay where they are. Bins in between are interpolated linearly."""
    n_bins = power.shape[1]
    top = n_bins - 1  # Nyquist, in bins; the map is worked out in bins
    factor = factors.to(device=power.device, dtype=torch.float64)[:, None]  # (B, 1)
    heard = torch.arange(n_bins, device=power.device, dtype=torch.float64)  # (F,) warped bins
    knee = VTLP_KNEE_HZ / (SAMPLE_RATE / 2) * top * factor.clamp(max=1.0)  # where the map bends
    position = torch.where(heard <= knee, heard / factor,  # (B, F): the bin each warped bin reads
                           knee / factor + (heard - knee) * (top - knee / factor) / (top - knee))
    below = position.floor().long().clamp(0, n_bins - 2)
    frac = (position - below).clamp(0, 1).to(power.dtype)[:, :, None]
    index = below[:, :, None].expand(-1, -1, power.shape[2])
    lower, upper = power.gather(1, index), power.gather(1, index + 1)
    return lower + (upper - lower) * frac


@torch.no_grad()
def compute_stats(waves, log_mel: LogMel) -> tuple[torch.Tensor, torch.Tensor]:
    """Global per-bin mean and std of log-mel over an iterable of 1-D waveform tensors."""
    total = torch.zeros(N_MELS, dtype=torch.float64)
    total_sq = torch.zeros(N_MELS, dtype=torch.float64)
    count = 0
    for wave in waves:
        feats = log_mel.log_mel(wave[None])[0].double()  # (T, N_MELS), on the wave's device
        total += feats.sum(0).cpu()
        total_sq += (feats**2).sum(0).cpu()
        count += feats.shape[0]
    if count == 0:
        raise ValueError("no audio to compute feature statistics from")
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-8).sqrt()
    return mean.float(), std.float()


@dataclass
class SpecAugmentConfig:
    """SpecAugment (Park et al., 2019) without time warping: masks in frequency and time."""

    freq_masks: int = 2
    freq_width: int = 27  # widest frequency mask, in mel bins (LibriSpeech "LD" policy)
    time_masks: int = 2
    time_width: float = 0.05  # widest time mask, as a fraction of the utterance
    enabled: bool = True


class SpecAugment(nn.Module):
    """Zeroes random frequency bands and time spans of each utterance in a batch (training only)."""

    def __init__(self, config: SpecAugmentConfig):
        super().__init__()
        self.config = config

    def forward(self, feats: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, F) features with (B,) frame counts -> (B, T, F), masked where the masks fall."""
        c = self.config
        if not (self.training and c.enabled):
            return feats
        batch, time, n_bins = feats.shape
        keep = torch.ones_like(feats, dtype=torch.bool)
        bins = torch.arange(n_bins, device=feats.device)
        steps = torch.arange(time, device=feats.device)
        for _ in range(c.freq_masks):
            width = torch.randint(0, c.freq_width + 1, (batch, 1), device=feats.device)
            start = (torch.rand(batch, 1, device=feats.device) * (n_bins - width)).long()
            keep &= ~((bins >= start) & (bins < start + width))[:, None, :]
        for _ in range(c.time_masks):
            widest = (frames.to(feats.device)[:, None] * c.time_width).long()
            width = (torch.rand(batch, 1, device=feats.device) * (widest + 1)).long()
            start = (torch.rand(batch, 1, device=feats.device) * (frames.to(feats.device)[:, None] - width)).long()
            keep &= ((steps < start) | (steps >= start + width))[:, :, None]
        return feats * keep
