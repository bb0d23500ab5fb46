"""Training throughput: how many seconds of audio a training step gets through per wall second,
how much of the device that is, and whether the input pipeline keeps up.

For each config (the demo's, LibriSpeech clean100's) and each device (CPU always, CUDA when
present), five measurements of the same code path asr.train runs:

    model step   precomputed (B, T, 80) features on the device -> BiLSTMCTC (bf16 autocast when
                 the config asks and the device has it) -> CTC loss -> backward -> clip -> fused
                 AdamW: forward_backward + optimizer_step of asr/train.py, nothing else
    pipeline     DataLoader(SpeechDataset, BucketBatchSampler, collate) with the config's workers
                 (decode, speed perturbation) -> to the device -> LogMel (+ SpecAugment): no model
    full step    both, as training runs them: the workers load the next batches while the model steps
    cached step  the full step with data.cache_features: log-mel computed once for (up to
                 CACHED_ROWS of) the rows by asr.train.cached_features, then batches padded from
                 memory in the main process, as training does with the option on
    librosa      the pipeline many recipes use instead: per-utterance librosa.feature.melspectrogram
                 in the DataLoader workers (the same 80 Slaney mels, 25 ms / 10 ms at 16 kHz), the
                 padded features then moved to the device and normalised (+ SpecAugment)

Each is warmed up (at least one batch, for the model step each of its batches once, and
--warmup seconds), then timed over at least --min-steps batches and --seconds; the device is
synchronised only at the two ends of the timed region. Every figure is audio seconds (after speed
perturbation, padding excluded) per wall second.

FLOPs are counted from the config (see forward_flops; checked against FlopCounterMode and written
beside the table), per second of audio, training = 3 x forward; achieved FLOP/s = FLOPs per audio
second x model-step audio-s/s, the useful work only (padding is not counted: divide by the padding
efficiency for what the device actually did). Utilisation = achieved / the device's peak: on CPU
cores x clock x FLOPs per cycle of its widest FMA (or bf16 dot-product) unit, on CUDA the dense
datasheet peak of the GPU (bf16 tensor cores under bf16 autocast, else TF32 or fp32).

Audio: real files through the real loader. --manifest gives them (e.g. data/synthetic/train.jsonl);
without it each config gets noise-and-tone FLAC files with its corpus's durations (1-5 s for the
demo, LibriSpeech-like 2-16 s, mostly long, for clean100), written to a temporary folder; manifest
rows repeat the files so that an epoch outlasts the measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from asr.audio import SAMPLE_RATE, load_audio
from asr.config import load_config
from asr.data import BucketBatchSampler, SpeechDataset, Utterance, collate, collate_features, scan_manifest
from asr.errors import ConfigError, ManifestError
from asr.features import (FRAMES_PER_SECOND, HOP_LENGTH, LOG_FLOOR, N_FFT, N_MELS, WIN_LENGTH, LogMel, SpecAugment,
                          compute_stats, vtlp_factors)
from asr.model import TIME_STRIDES, BiLSTMCTC, ModelConfig
from asr.text import CharTokenizer
from asr.train import TrainConfig, batch_loss, bf16_supported, cached_features, optimizer_step, usable_rows

CONFIGS = {"demo": "recipes/demo/conf.yaml", "clean100": "recipes/librispeech/conf/clean100.yaml"}
# Generated audio, by config name: durations in seconds (uniform, or skewed to the long end as
# LibriSpeech's are: train-clean-100 averages 12.7 s), and distinct files written.
SYNTHETIC = {"demo": {"low": 1.0, "high": 5.0, "long_skew": False, "files": 160},
             "clean100": {"low": 2.0, "high": 16.0, "long_skew": True, "files": 120}}
CHARS_PER_SECOND = 14  # LibriSpeech reads ~15 characters/s; the demo corpus speaks <= ~17
BATCHES_PER_EPOCH = 500  # generated manifests: an epoch (and its worker start-up) outlasts the measurement
MODEL_STEP_BATCHES = 3  # distinct precomputed batches the model step cycles through
CACHED_ROWS = 1000  # rows whose features the cached step computes first (seconds, not minutes)
STARVED_BELOW = 5.0  # the pipeline must be this many times faster than the model step
COLUMNS = (
    "Audio-s/s: seconds of audio (as the model hears it: after speed perturbation, padding excluded) per "
    "wall-clock second. model step: forward, CTC loss, backward, gradient clipping and the fused AdamW "
    "step on features already on the device, as asr.train runs them. pipeline: the training DataLoader "
    "(decoding, speed perturbation, padding; the config's workers; pinned memory on CUDA), the copy to the "
    "device, LogMel and SpecAugment when enabled; no model. pipeline ÷ model: ✓ when the pipeline is at "
    f"least {STARVED_BELOW:g}× faster than the model step, so that feature extraction is not what training "
    "waits for. full step: both together as in training (workers prepare the next batches while the model "
    "steps). cached step: the full step with data.cache_features, features computed once beforehand and "
    "batches padded from memory, no loader workers; cached ÷ full: what the option gains. GFLOP / audio-s: training FLOPs (3 × forward, counted from the config) per second of audio. "
    "achieved: GFLOP/audio-s × model-step audio-s/s, in TFLOP/s (useful work; padding not counted). "
    "peak: the device's dense peak for the arithmetic used (see each row's note); utilisation: achieved ÷ peak. "
    "librosa pipeline: the same loader with per-utterance librosa.feature.melspectrogram in the workers "
    "instead of our batched torchaudio LogMel on the device; ours ÷ librosa: our pipeline's speed over it.")

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: (name pattern, label, fp32, tf32, bf16).
# None: no tensor-core path for that type (bf16 then runs emulated, TF32 as fp32). Boost clocks.
CUDA_PEAKS = [
    (r"H100.*NVL", "H100 NVL", 60.0, 417.5, 835.5),
    (r"H100.*PCIe", "H100 PCIe", 51.0, 378.0, 756.0),
    (r"H100|GH200", "H100 SXM", 67.0, 494.5, 989.5),
    (r"H200.*NVL", "H200 NVL", 60.0, 417.5, 835.5),
    (r"H200", "H200 SXM", 67.0, 494.5, 989.5),
    (r"A100", "A100", 19.5, 156.0, 312.0),
    (r"\bA10\b", "A10", 31.2, 62.5, 125.0),
    (r"\bL4\b", "L4", 30.3, 60.0, 121.0),
    (r"L40S", "L40S", 91.6, 183.0, 362.0),
    (r"\bL40\b", "L40", 90.5, 90.5, 181.0),
    (r"RTX 4090", "GeForce RTX 4090", 82.6, 82.6, 165.2),  # GeForce: bf16 with fp32 accumulation
    (r"RTX 3090(?! Ti)", "GeForce RTX 3090", 35.6, 35.6, 71.0),
    (r"\bT4\b", "T4", 8.1, None, None),
    (r"V100", "V100 SXM2", 15.7, None, None),
]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=textwrap.fill("The table's columns. " + COLUMNS, 100),
                                formatter_class=_HelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS),
                   help=f"configs to measure: {', '.join(f'{k} ({v})' for k, v in CONFIGS.items())}, or any "
                        "TrainConfig YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every config, as `asr train --set` does (repeatable), "
                        "e.g. --set bf16=false --set data.num_workers=8")
    p.add_argument("--device", default="auto",
                   help="auto: CPU, and CUDA too when there is one; or cpu, cuda, cuda:N")
    p.add_argument("--manifest", default=None,
                   help="utterances to train on (JSON Lines), for every config; default: generated audio "
                        "with each config's corpus durations (see the top of bench.py)")
    p.add_argument("--seconds", type=float, default=8.0, help="time each measurement for at least this long")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="seconds of untimed steps first (at least one step): allocator, kernels, worker start-up")
    p.add_argument("--min-steps", type=int, default=2, help="time at least this many batches")
    p.add_argument("--no-librosa", action="store_true", help="leave out the librosa pipeline")
    p.add_argument("--out", default="recipes/benchmarks/train_throughput/RESULTS.md", help="markdown report")
    return p.parse_args()


# --- FLOPs ------------------------------------------------------------------------------------

def forward_flops(c: ModelConfig, vocab: int, frames: int) -> dict[str, int]:
    """Forward FLOPs of BiLSTMCTC on one utterance of `frames` log-mel frames, by part: each
    multiply-add is 2 FLOPs; biases, activations, masks and the log-softmax are left out (a few %)."""
    s1, s2 = TIME_STRIDES[c.subsampling]
    ch, h = c.conv_channels, c.hidden_size
    f1 = (N_MELS + 1) // 2  # kernel 3, padding 1, stride 2 in frequency: ceil(F / 2)
    f2 = (f1 + 1) // 2
    t1 = -(-frames // s1)  # ceil(T / s1)
    t2 = -(-t1 // s2)
    gates = 4 if c.rnn_type == "lstm" else 3
    inputs = [h] + [2 * h] * (c.num_layers - 1)
    return {
        "conv": 2 * 9 * (1 * ch * t1 * f1 + ch * ch * t2 * f2),  # 3x3 kernels: 2 * Cin * Cout * 9 per output point
        "conv -> linear": 2 * ch * f2 * h * t2,
        # Per layer, direction and output frame: gates x H units, each a dot product over input and state.
        "rnn": sum(2 * 2 * gates * h * (n + h) * t2 for n in inputs),
        "output linear": 2 * 2 * h * vocab * t2,
    }


def training_flops_per_audio_second(c: ModelConfig, vocab: int) -> float:
    """Forward + backward FLOPs per second of audio: backward computes the gradients of both the
    inputs and the weights, twice the forward's multiply-adds, so training = 3 x forward."""
    hour = 3600 * FRAMES_PER_SECOND  # divisible by every subsampling factor: no rounding
    return 3 * sum(forward_flops(c, vocab, hour).values()) / 3600


def check_flop_formula(c: ModelConfig, vocab: int) -> list[str]:
    """forward_flops against torch.utils.flop_counter.FlopCounterMode on one CPU batch, by part.
    oneDNN's fused LSTM kernel is an op FlopCounterMode does not know (it would count 0), so the
    count runs with oneDNN off, where the LSTM is the matmuls it is made of."""
    from torch.utils.flop_counter import FlopCounterMode

    frames, batch = 300, 2
    model = BiLSTMCTC(dataclasses.replace(c, dropout=0.0), vocab)
    feats = torch.randn(batch, frames, N_MELS)
    lengths = torch.full((batch,), frames)
    parts = {"conv": ["BiLSTMCTC.subsampling.convs.0", "BiLSTMCTC.subsampling.convs.1"],
             "conv -> linear": ["BiLSTMCTC.subsampling.out"], "rnn": ["BiLSTMCTC.rnn"],
             "output linear": ["BiLSTMCTC.output"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flags() warns of TF32 on Intel GPUs, beside the point here
        with torch.backends.mkldnn.flags(enabled=False):
            with FlopCounterMode(display=False) as forward:
                model(feats, lengths)
            with FlopCounterMode(display=False) as training:
                model(feats, lengths)[0].sum().backward()
    by_module = forward.get_flop_counts()
    counted = {k: sum(sum(by_module.get(name, {}).values()) for name in names) for k, names in parts.items()}
    ours = {k: batch * v for k, v in forward_flops(c, vocab, frames).items()}
    lines = [f"{part}: formula {ours[part] / 1e6:.1f} M, FlopCounterMode {counted[part] / 1e6:.1f} M"
             + (f" ({ours[part] / counted[part] - 1:+.2%})" if counted[part] else "") for part in parts]
    total, total_counted = sum(ours.values()), forward.get_total_flops()
    lines.append(f"forward total: formula {total / 1e6:.1f} M, FlopCounterMode {total_counted / 1e6:.1f} M "
                 f"({total / total_counted - 1:+.2%})")
    lines.append(f"training (forward + backward): formula 3 x forward = {3 * total / 1e6:.1f} M, FlopCounterMode "
                 f"{training.get_total_flops() / 1e6:.1f} M ({3 * total / training.get_total_flops() - 1:+.2%}; "
                 "the first convolution needs no input gradient)")
    return lines


# --- peak FLOP/s ------------------------------------------------------------------------------

def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _cpu_mhz(info: dict[str, str]) -> tuple[float | None, str]:
    """The CPU's highest clock, and where it came from."""
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"^CPU max MHz:\s*([\d.]+)", out, re.MULTILINE)
        if found and float(found.group(1)) > 0:
            return float(found.group(1)), "max MHz (lscpu)"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        return int(khz) / 1000, "max MHz (cpufreq)"
    except (OSError, ValueError):
        pass
    if "cpu MHz" in info:  # a VM often shows only this: the nominal clock, not the boost
        return float(info["cpu MHz"]), "current MHz (/proc/cpuinfo; no max given: boost not counted)"
    return None, "clock unknown"


def cpu_peak(bf16: bool) -> tuple[float | None, str]:
    """Peak FLOP/s of the CPU cores this process may use, and the assumption behind it."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    mhz, clock = _cpu_mhz(info)
    zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    if "avx512f" in flags:
        # Two 512-bit FMA pipes; AMD's Zen 4 runs AVX-512 on its two 256-bit pipes (Zen 5 has 512).
        fp32, unit = (32, "AVX-512 on 2x256-bit FMA (Zen 4)") if zen4 else (64, "AVX-512, 2 FMA units")
    elif "avx2" in flags and "fma" in flags:
        fp32, unit = 32, "AVX2 + FMA, 2 FMA units"
    elif "avx" in flags:
        fp32, unit = 16, "AVX, no FMA"
    else:
        fp32, unit = 8, "SSE"
    per_cycle, kind = fp32, "fp32"
    if bf16 and "amx_bf16" in flags:
        per_cycle, kind, unit = 1024, "bf16", "AMX-BF16 tiles (Intel: 1,024 bf16 FLOPs/cycle/core)"
    elif bf16 and "avx512_bf16" in flags:
        per_cycle, kind, unit = 2 * fp32, "bf16", f"AVX512-BF16 dot products, 2x the fp32 rate of {unit}"
    if mhz is None:
        return None, f"{cores} cores x unknown clock x {per_cycle} {kind} FLOPs/cycle ({unit})"
    return (cores * mhz * 1e6 * per_cycle,
            f"{cores} cores x {mhz:.0f} MHz ({clock}) x {per_cycle} {kind} FLOPs/cycle ({unit})")


def cuda_peak(device: torch.device, bf16: bool) -> tuple[float | None, str]:
    """Dense datasheet peak FLOP/s of the GPU for the arithmetic the step runs, and which it is.
    The LSTMs dominate and run in cuDNN, which uses TF32 for fp32 when cudnn.allow_tf32 is on."""
    name = torch.cuda.get_device_name(device)
    for pattern, label, fp32, tf32, bf16_peak in CUDA_PEAKS:
        if re.search(pattern, name):
            if bf16 and bf16_peak:
                return bf16_peak * 1e12, f"{label}: {bf16_peak:g} TFLOP/s dense bf16 tensor cores (datasheet)"
            if not bf16 and tf32 and torch.backends.cudnn.allow_tf32:
                return tf32 * 1e12, f"{label}: {tf32:g} TFLOP/s dense TF32 tensor cores (datasheet; cudnn.allow_tf32)"
            note = " (no bf16 tensor cores: bf16 is emulated)" if bf16 else ""
            return fp32 * 1e12, f"{label}: {fp32:g} TFLOP/s fp32 (datasheet){note}"
    return None, f"{name}: peak unknown (add it to CUDA_PEAKS in bench.py)"


# --- audio ------------------------------------------------------------------------------------

def generated_rows(folder: Path, name: str, config: TrainConfig, tokenizer: CharTokenizer) -> list[Utterance]:
    """Noise-and-tone FLAC files with the durations of the config's corpus, and manifest rows that
    use each file many times over, so that an epoch has BATCHES_PER_EPOCH batches."""
    spec = SYNTHETIC.get(name, SYNTHETIC["clean100"])
    rng = np.random.default_rng(0)
    letters = [t for t in tokenizer.tokens[1:] if t.isalpha()]
    files = []
    for i in range(spec["files"]):
        # LibriSpeech's segments pile up near its 16 s cut: Beta(3, 1) puts the mean at 12.5 s.
        share = rng.beta(3, 1) if spec["long_skew"] else rng.random()
        duration = round(spec["low"] + (spec["high"] - spec["low"]) * share, 2)
        n = int(duration * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        # Speech-ish: a few tones that come and go at syllable rate over low-passed noise; it
        # compresses about as little as speech does, so decoding costs what a real file's would.
        noise = np.convolve(rng.standard_normal(n), np.ones(4) / 4, mode="same")
        tones = sum(np.sin(2 * np.pi * rng.uniform(100, 3000) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + k))
                    for k in range(3))
        wave = 0.1 * noise + 0.1 * tones
        path = folder / f"{name}-{i:04d}.flac"
        sf.write(path, (wave / max(1.0, np.abs(wave).max())).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        words = []
        while sum(len(w) + 1 for w in words) < duration * CHARS_PER_SECOND:
            words.append("".join(rng.choice(letters, size=int(rng.integers(2, 9)))))
        files.append((str(path), duration, " ".join(words)[: int(duration * CHARS_PER_SECOND)].strip()))
    rows, audio = [], 0.0
    while audio < BATCHES_PER_EPOCH * config.data.max_batch_seconds:
        path, duration, text = files[len(rows) % len(files)]
        rows.append(Utterance(f"{name}-{len(rows):06d}", path, duration, text))
        audio += duration
    return rows


# --- the training step, as asr.train runs it --------------------------------------------------

class TrainStep:
    """One training step for one batch (one process, grad_accum 1) through asr.train's own
    batch_loss and optimizer_step, with the loss and gradient-norm sums kept on the device as
    training keeps them."""

    def __init__(self, config: TrainConfig, vocab: int, device: torch.device):
        self.config, self.device = config, device
        self.bf16 = config.bf16 and bf16_supported(device)
        self.model = BiLSTMCTC(config.model, vocab).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr,
                                           weight_decay=config.optim.weight_decay,
                                           fused=device.type in ("cpu", "cuda"))
        self.ctc = torch.nn.CTCLoss(blank=CharTokenizer.blank_id, reduction="sum", zero_infinity=True)
        self.sums = torch.zeros(4, device=device)  # loss, finite losses, grad norm, finite norms

    def __call__(self, feats: torch.Tensor, frames: torch.Tensor, wave_lengths: torch.Tensor,
                 targets: torch.Tensor, target_lengths: torch.Tensor) -> None:
        """(B, T, N_MELS) features and (B,) frame counts on the device; (B,) sample counts on the
        host; (B, L) targets on the device, (B,) target lengths on the host."""
        loss = batch_loss(self.model, self.model, self.ctc, feats, frames, wave_lengths, targets,
                          target_lengths, self.bf16)
        loss.backward()
        grad_norm = optimizer_step(self.model, self.optimizer, self.config.optim.grad_clip)
        for i, value in ((0, loss.detach()), (2, grad_norm)):
            finite = torch.isfinite(value)
            self.sums[i] += torch.where(finite, value, 0.0)
            self.sums[i + 1] += finite


class Features:
    """What the training step does to a loader batch before the model: waves to the device,
    LogMel (with VTLP when the config sets `vtlp`), SpecAugment when the config enables it
    (asr.train: both from specaugment_from_epoch on, which is every epoch but the first few; their
    steady state is what is timed here)."""

    def __init__(self, config: TrainConfig, device: torch.device):
        self.device = device
        self.log_mel = LogMel().to(device)
        self.specaug = SpecAugment(config.specaugment).to(device).train()
        self.augment = config.specaugment.enabled
        self.vtlp = config.vtlp

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        waves = batch["waves"].to(self.device, non_blocking=True)
        warp = vtlp_factors(len(waves), self.vtlp, self.device)
        feats, frames = self.log_mel(waves, batch["wave_lengths"].to(self.device, non_blocking=True), warp)
        if self.augment:
            feats = self.specaug(feats, frames)
        return feats, frames


class LibrosaDataset(Dataset):
    """The other way: SpeechDataset's items with log-mel computed per utterance in the worker by
    librosa, as many recipes do. Items as FeatureDataset's (asr.data.collate_features pads them):
    (id, (T, N_MELS) un-normalised log-mel, targets, text, samples)."""

    def __init__(self, dataset: SpeechDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, i: int):
        uid, wave, target, text = self.dataset[i]
        if wave is None:
            return uid, None, None, text, 0
        return uid, torch.from_numpy(librosa_log_mel(wave.numpy())), target, text, len(wave)


def librosa_log_mel(wave: np.ndarray) -> np.ndarray:
    """(N,) float32 -> (T, N_MELS) float32 log-mel, LogMel's settings in librosa's terms."""
    import librosa

    mel = librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN_LENGTH,
                                         hop_length=HOP_LENGTH, n_mels=N_MELS, power=2.0, center=True,
                                         pad_mode="constant")  # (N_MELS, T), Slaney mels as LogMel's
    return np.ascontiguousarray(np.log(mel + LOG_FLOOR).T, dtype=np.float32)  # (N_MELS, T) -> (T, N_MELS)


class LibrosaFeatures(Features):
    """The device side of the librosa pipeline: normalise, zero past each end, SpecAugment."""

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        feats = batch["feats"].to(self.device, non_blocking=True)
        frames = batch["frames"].to(self.device, non_blocking=True)
        feats = (feats - self.log_mel.mean) / self.log_mel.std
        valid = torch.arange(feats.shape[1], device=self.device)[None, :] < frames[:, None]
        feats = feats * valid[:, :, None]
        if self.augment:
            feats = self.specaug(feats, frames)
        return feats, frames


def loader_batches(dataset, sampler: BucketBatchSampler, config: TrainConfig, device: torch.device,
                   collate_fn=collate, workers: int | None = None) -> Iterator[dict]:
    """Batches as asr.train's DataLoader makes them, epoch after epoch from epoch 1 (shuffled
    batches: the mix of durations of every epoch but a SortaGrad first one)."""
    for epoch in itertools.count(1):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        yield from DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                              num_workers=config.data.num_workers if workers is None else workers,
                              pin_memory=device.type == "cuda",
                              generator=torch.Generator().manual_seed(config.seed + epoch))


# --- timing -----------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    audio: float  # seconds of audio in the timed batches
    wall: float  # seconds
    steps: int

    @property
    def rate(self) -> float:
        return self.audio / self.wall


def timed(batches: Iterator[dict], work: Callable[[dict], None], device: torch.device, args,
          warm_batches: int = 1) -> Timing:
    """Warm up (at least `warm_batches` batches and args.warmup seconds), then time at least
    args.min_steps batches and args.seconds; the device is synchronised at the start and the end only."""
    start = time.perf_counter()
    for warm, batch in enumerate(batches, 1):
        if batch["ids"]:
            work(batch)
        if warm >= warm_batches and time.perf_counter() - start >= args.warmup:
            break
    synchronize(device)
    audio, steps, start = 0.0, 0, time.perf_counter()
    for batch in batches:
        if batch["ids"]:
            work(batch)
        audio += batch["wave_lengths"].sum().item() / SAMPLE_RATE  # a host tensor: no sync
        steps += 1
        if steps >= args.min_steps and time.perf_counter() - start >= args.seconds:
            break
    synchronize(device)
    return Timing(audio, time.perf_counter() - start, steps)


def host_device_syncs(work: Callable[[dict], None], batch: dict) -> list[str]:
    """Where one step makes the host wait for the GPU (torch's sync debug mode), "file:line" each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


# --- one config on one device ------------------------------------------------------------------

@dataclass
class Row:
    config: str
    device: str
    params: float
    batch: str
    flops: float  # training FLOPs per audio second
    model: Timing
    pipeline: Timing
    full: Timing
    cached: Timing
    librosa: Timing | None
    peak: float | None
    peak_note: str
    notes: list[str]


def measure(name: str, config: TrainConfig, rows: list[Utterance], device: torch.device, args) -> Row:
    tokenizer = CharTokenizer()
    torch.manual_seed(config.seed)
    step = TrainStep(config, len(tokenizer), device)
    features = Features(config, device)
    dataset = SpeechDataset(rows, tokenizer, speeds=config.data.speeds, seed=config.seed)
    sampler = BucketBatchSampler([r.duration for r in rows], config.data.max_batch_seconds,
                                 max_batch_size=config.data.max_batch_size, seed=config.seed,
                                 sorted_first_epoch=config.data.sorted_first_epoch)
    tag = f"{name} on {device}"

    # Model step alone: a few real batches, their features computed once, on the device.
    sampler.set_epoch(1)
    dataset.set_epoch(1)
    loaded = [collate([dataset[i] for i in idx]) for idx in sampler.epoch_batches()[:MODEL_STEP_BATCHES]]
    # On the host: asr.features.compute_stats sums into host tensors, which a CUDA LogMel's output cannot add to.
    stats = compute_stats((w[:n] for b in loaded for w, n in zip(b["waves"], b["wave_lengths"])), LogMel())
    features.log_mel.set_stats(*stats)
    ready = []
    with torch.no_grad():
        for b in loaded:
            feats, frames = features(b)
            ready.append({"ids": b["ids"], "feats": feats, "frames": frames, "wave_lengths": b["wave_lengths"],
                          "targets": b["targets"].to(device), "target_lengths": b["target_lengths"]})
    del loaded

    def model_step(b: dict) -> None:
        step(b["feats"], b["frames"], b["wave_lengths"], b["targets"], b["target_lengths"])

    # Warmed up on each batch once: the timed passes see no shape for the first time.
    model = timed(itertools.cycle(ready), model_step, device, args, warm_batches=len(ready))
    print(f"{tag}: model step {model.rate:.1f} audio-s/s ({model.steps} batches in {model.wall:.1f} s)", flush=True)
    del ready

    # Input pipeline alone: loader -> device -> LogMel (+ SpecAugment), no model.
    def pipeline_step(b: dict) -> None:
        with torch.no_grad():
            features(b)

    batches = loader_batches(dataset, sampler, config, device)
    pipeline = timed(batches, pipeline_step, device, args)
    batches.close()  # its workers stop before the next measurement starts
    print(f"{tag}: input pipeline {pipeline.rate:.1f} audio-s/s ({pipeline.steps} batches in {pipeline.wall:.1f} s)",
          flush=True)

    # Both, as training runs them.
    def full_step(b: dict) -> None:
        feats, frames = features(b)
        step(feats, frames, b["wave_lengths"], b["targets"].to(device, non_blocking=True), b["target_lengths"])

    batches = loader_batches(dataset, sampler, config, device)
    full = timed(batches, full_step, device, args)
    print(f"{tag}: full step {full.rate:.1f} audio-s/s ({full.steps} batches in {full.wall:.1f} s)", flush=True)
    notes = []
    if device.type == "cuda":
        syncs = host_device_syncs(full_step, next(batches))
        notes.append(f"host-device syncs in one full step: {len(syncs)}"
                     + (f" ({', '.join(sorted(set(syncs)))})" if syncs else ""))
    batches.close()

    # The full step from features cached once (data.cache_features): no loader workers, as in training.
    cached_rows = rows[:CACHED_ROWS]
    start = time.perf_counter()
    cache = cached_features(cached_rows, tokenizer, features.log_mel, config, progress=False)
    caching = time.perf_counter() - start
    cached_sampler = BucketBatchSampler([r.duration for r in cached_rows], config.data.max_batch_seconds,
                                        max_batch_size=config.data.max_batch_size, seed=config.seed)

    def cached_step(b: dict) -> None:
        feats = b["feats"].to(device, non_blocking=True).float()
        frames = b["frames"].to(device, non_blocking=True)
        if features.augment:
            feats = features.specaug(feats, frames)
        step(feats, frames, b["wave_lengths"], b["targets"].to(device, non_blocking=True), b["target_lengths"])

    batches = loader_batches(cache, cached_sampler, config, device, collate_features, workers=0)
    cached = timed(batches, cached_step, device, args)
    batches.close()
    del cache
    print(f"{tag}: cached step {cached.rate:.1f} audio-s/s ({cached.steps} batches in {cached.wall:.1f} s)",
          flush=True)

    librosa = None
    if not args.no_librosa:
        theirs = LibrosaFeatures(config, device)
        theirs.log_mel.set_stats(*stats)

        def librosa_step(b: dict) -> None:
            with torch.no_grad():
                theirs(b)

        batches = loader_batches(LibrosaDataset(dataset), sampler, config, device, collate_features)
        librosa = timed(batches, librosa_step, device, args)
        batches.close()
        print(f"{tag}: librosa pipeline {librosa.rate:.1f} audio-s/s ({librosa.steps} batches in "
              f"{librosa.wall:.1f} s)", flush=True)

    peak, peak_note = cpu_peak(step.bf16) if device.type == "cpu" else cuda_peak(device, step.bf16)
    sizes = [len(b) for b in sampler.batches]
    notes[:0] = [
        f"{'bf16 autocast' if step.bf16 else 'fp32'}{' (bf16 asked, not native here)' if config.bf16 and not step.bf16 else ''}, "
        f"{config.data.num_workers} loader worker(s), speeds {list(config.data.speeds)}, "
        f"SpecAugment {'on' if config.specaugment.enabled else 'off'}",
        f"batches of <= {config.data.max_batch_seconds:g} s padded, <= {config.data.max_batch_size} utterances: "
        f"{sum(sizes) / len(sizes):.1f} utterances on average, padding efficiency "
        f"{100 * sampler.padding_efficiency:.1f}% (the device computes {1 / sampler.padding_efficiency:.2f}x the "
        "useful FLOPs counted here)",
        f"timed: model step {model.steps} batches / {model.wall:.1f} s, pipeline {pipeline.steps} / "
        f"{pipeline.wall:.1f} s, full step {full.steps} / {full.wall:.1f} s, cached step {cached.steps} / "
        f"{cached.wall:.1f} s"
        + (f", librosa {librosa.steps} / {librosa.wall:.1f} s" if librosa else ""),
        f"cached step: features of {len(cached_rows)} rows ({sum(r.duration for r in cached_rows) / 3600:.1f} h) "
        f"computed in {caching:.1f} s first, {sum(r.duration for r in cached_rows) / caching:.0f} audio-s/s"
        + ("; this config's speed perturbation or VTLP rules the option out (it is timed here without them)"
           if config.vtlp or tuple(config.data.speeds) != (1.0,) else ""),
        f"peak: {peak_note}",
    ]
    return Row(name, str(device), step.model.num_parameters() / 1e6,
               f"{config.data.max_batch_seconds:g} s", training_flops_per_audio_second(config.model, len(tokenizer)),
               model, pipeline, full, cached, librosa, peak, peak_note, notes)


# --- the report -------------------------------------------------------------------------------

def machine(devices: list[torch.device]) -> str:
    model = _cpuinfo().get("model name") or platform.processor() or "unknown CPU"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpus = [torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"]
    return (f"{model}, {usable} of {os.cpu_count()} cores usable, load average {load} at start"
            + (f"; GPU: {', '.join(gpus)}" if gpus else "; no GPU"))


def table(rows: list[Row]) -> list[str]:
    lines = ["| config | device | params | batch | GFLOP / audio-s | model step | pipeline | pipeline ÷ model "
             "| full step | cached step | cached ÷ full | achieved TFLOP/s | peak TFLOP/s | utilisation "
             "| librosa pipeline | ours ÷ librosa |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        achieved = r.flops * r.model.rate
        ratio = r.pipeline.rate / r.model.rate
        verdict = "✓" if ratio >= STARVED_BELOW else "✗ starves"
        lines.append(
            f"| {r.config} | {r.device} | {r.params:.1f} M | {r.batch} | {r.flops / 1e9:.2f} | {r.model.rate:.3g} "
            f"| {r.pipeline.rate:.3g} | {ratio:.1f}× {verdict} | {r.full.rate:.3g} | {r.cached.rate:.3g} "
            f"| {r.cached.rate / r.full.rate:.2f}× | {achieved / 1e12:.3g} "
            f"| {f'{r.peak / 1e12:.3g}' if r.peak else 'unknown'} "
            f"| {f'{100 * achieved / r.peak:.1f}%' if r.peak else '—'} "
            f"| {f'{r.librosa.rate:.3g}' if r.librosa else '—'} "
            f"| {f'{r.pipeline.rate / r.librosa.rate:.1f}×' if r.librosa else '—'} |")
    return lines


def main() -> None:
    args = parse_args()
    started, clock = dt.datetime.now().astimezone(), time.perf_counter()
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
        if devices[0].type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (try --device cpu)")
    where = machine(devices)  # the load average before this run adds to it
    configs, paths = {}, {}
    for choice in args.configs:
        path = Path(CONFIGS.get(choice, choice))
        name = choice if choice in CONFIGS else path.stem
        try:
            configs[name], paths[name] = load_config(TrainConfig, path, args.overrides), path
        except ConfigError as e:
            raise SystemExit(f"bench.py: {e}") from None
    tokenizer = CharTokenizer()

    rows, formula_checks, agreement = [], {}, None
    with tempfile.TemporaryDirectory(prefix="train_throughput.") as tmp:
        for name, config in configs.items():
            if args.manifest:
                try:
                    found, problems = scan_manifest(args.manifest)
                except ManifestError as e:
                    raise SystemExit(f"bench.py: {e}") from None
                utterances, _ = usable_rows(found, tokenizer, config, args.manifest, problems)
                source = f"`{args.manifest}`"
            else:
                start = time.perf_counter()
                utterances = generated_rows(Path(tmp), name, config, tokenizer)
                distinct = {u.audio: u.duration for u in utterances}
                source = (f"generated: {len(distinct)} noise-and-tone FLAC files, {min(distinct.values()):.1f}-"
                          f"{max(distinct.values()):.1f} s, mean {np.mean(list(distinct.values())):.1f} s "
                          f"(written in {time.perf_counter() - start:.1f} s)")
            if not utterances:
                raise SystemExit(f"{name}: no usable utterances")
            formula_checks[name] = check_flop_formula(config.model, len(tokenizer))
            if agreement is None:  # librosa and LogMel give the same features: the comparison is fair
                wave = load_audio(utterances[0].audio)
                ours = LogMel().log_mel(torch.from_numpy(wave)[None])[0].numpy()
                agreement = float(np.abs(ours - librosa_log_mel(wave)).max())
            for device in devices:
                row = measure(name, config, utterances, device, args)
                row.notes.insert(0, f"audio: {source}, {len(utterances)} manifest rows")
                rows.append(row)

    lines = table(rows)
    minutes = (time.perf_counter() - clock) / 60
    report = "\n".join([
        "# Training throughput benchmark", "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- machine: {where}",
        f"- torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if torch.cuda.is_available() else ""),
        f"- configs: {', '.join(f'{k} (`{p}`)' for k, p in paths.items())}"
        + (f"; overrides {' '.join(args.overrides)}" if args.overrides else ""),
        f"- each figure: warm-up >= 1 batch and {args.warmup:g} s, then >= {args.min_steps} batches and "
        f"{args.seconds:g} s timed; the whole run took {minutes:.1f} min", "",
        *lines, "",
        COLUMNS, "",
        f"Same features: on one file librosa's log-mel and LogMel's differ by at most {agreement:.1e} (log units).", "",
        *[line for r in rows for line in [f"**{r.config} on {r.device}**", "", *[f"- {n}" for n in r.notes], ""]],
        "FLOPs per audio second: for T' = 100 / subsampling output frames a second, conv 2·9·(C·T₁·40 + C²·T'·20), "
        "the conv's output linear 2·20C·H·T', each LSTM layer and direction 8H(I+H)·T' (I = H for the first "
        "layer, 2H after; 6H(I+H) for a GRU), the output linear 2·2H·V·T'; training 3× that. Checked against "
        "torch.utils.flop_counter.FlopCounterMode on a CPU forward of 2 × 3 s (oneDNN off, so that the LSTM "
        "runs as matmuls it can count):", "",
        *[line for name, check in formula_checks.items() for line in [f"- {name}: " + "; ".join(check)]], "",
        f"Reproduce: `{shlex.join(['bash', 'recipes/benchmarks/train_throughput/run.sh', *sys.argv[1:]])}`",
        ""])
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
