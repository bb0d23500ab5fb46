"""Training: CTC over a duration-bucketed stream of batches, with exact resume.

Each step: waves (B, N) -> LogMel (B, T, 80; VTLP inside) -> SpecAugment -> BiLSTMCTC (B, T', V)
-> CTC loss (fp32, zero_infinity) -> AdamW step with warm-up and late decay, gradients clipped.
With `data.cache_features` the LogMel of every utterance is computed once before training and
batches start from those features (for corpora that fit in memory and fixed features).
Training ends after `epochs` or `max_minutes`, whichever comes first; the LR decay follows
whichever is nearer, so a time-boxed run still ends on a low learning rate.
Each epoch ends with greedy WER/CER on the dev set; `last.pt` (with the full training state)
is written every `save_every` steps and at each epoch's end, `best.pt` whenever dev CER improves.
With `optim.ema` a moving average of the weights is what dev scoring and both files use.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from asr.audio import SAMPLE_RATE, load_audio
from asr.checkpoint import load_feature_stats, load_model_file, save_feature_stats, save_model_file
from asr.config import from_dict, to_dict
from asr.data import (BucketBatchSampler, FeatureDataset, Problem, SpeechDataset, Utterance, check_rows, collate,
                      collate_features)
from asr.decode import GreedyDecoder
from asr.errors import AudioError, ConfigError, ManifestError
from asr.features import (FRAMES_PER_SECOND, N_MELS, LogMel, SpecAugment, SpecAugmentConfig, compute_stats,
                          num_frames, vtlp_factors)
from asr.model import BiLSTMCTC, ModelConfig
from asr.text import CharTokenizer
from asr.transcribe import Transcriber, pick_device

log = logging.getLogger("asr.train")


STATS_FILE = "feature_stats.pt"  # in the experiment folder, written before training starts
PROBLEMS_FILE = "problems.txt"  # the manifest rows training left out, and why


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak; 2e-3 stalled small models on a constant output
    weight_decay: float = 1e-2
    warmup_steps: int = 200
    decay_start: float = 0.7  # fraction of training after which the LR decays (cosine)
    final_lr: float = 0.05  # as a fraction of the peak
    grad_clip: float = 5.0
    grad_accum: int = 1  # batches whose gradients make one step: the same step on a smaller GPU
    ema: float = 0.0  # decay of an exponential moving average of the weights, which dev scoring
                      # and the model files use (0: off; 0.999 averages over ~1000 steps)

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum={self.grad_accum}: need 1 or more")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"optim.ema={self.ema}: need 0 (off) to below 1; 0.999 is usual")


@dataclass
class DataConfig:
    max_batch_seconds: float = 200.0  # audio per batch, padding included
    max_batch_size: int = 128
    sorted_first_epoch: bool = True  # shortest utterances first in epoch 0 (SortaGrad)
    max_duration: float = 30.0  # longer utterances are left out of training
    bad_rows: str = "skip"  # rows training cannot use (missing audio, unknown characters, ...):
                            # skip them, listed in EXP_DIR/problems.txt, or fail before training
    num_workers: int = 1
    speeds: tuple[float, ...] = (1.0,)  # speed perturbation: each utterance, each epoch, at one
                                        # of these speeds (Kaldi and ESPnet use 0.9, 1.0, 1.1)
    stats_utterances: int = 500  # utterances sampled for the global mean/std
    cache_features: bool = False  # compute each training utterance's features once and keep them
                                  # in memory (~58 MB per hour of audio) instead of decoding the
                                  # audio every epoch: ~20% more steps on 2 CPU cores

    def __post_init__(self):
        if not self.speeds or min(self.speeds) <= 0:
            raise ConfigError(f"data.speeds={list(self.speeds)}: need one or more positive speeds")
        if self.bad_rows not in ("skip", "fail"):
            raise ConfigError(f"data.bad_rows={self.bad_rows!r}: expected skip or fail")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    specaugment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    vtlp: float = 0.0  # vocal tract length perturbation: each utterance's spectrum stretched by a
                       # factor from 1 - vtlp to 1 + vtlp, as new voices would (0: off; 0.1 is usual)
    specaugment_from_epoch: int = 1  # augmentation (VTLP, SpecAugment) only once CTC has left
                                     # its blank plateau
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 10
    max_minutes: float = 0.0  # wall-clock budget for training (0: none); the LR decay follows it
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = False  # bf16 autocast for the model on CUDA and on CPUs with native bf16
                        # (AVX512-BF16/AMX); features and the CTC loss stay fp32
    log_every: int = 25
    tensorboard: bool = True  # also log to EXP_DIR/tensorboard/ (tensorboard --logdir EXP_DIR)
    save_every: int = 500  # steps between mid-epoch `last.pt` files

    def __post_init__(self):
        if not 0 <= self.vtlp < 1:
            raise ConfigError(f"vtlp={self.vtlp}: need 0 (off) to below 1; 0.1 is usual")
        if self.data.cache_features and (self.vtlp or tuple(self.data.speeds) != (1.0,)):
            raise ConfigError("data.cache_features keeps each utterance's features fixed, so it cannot "
                              "go with vtlp or data.speeds, which change them every epoch: turn one off")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on `device`: a CUDA GPU with bf16 support, or a CPU whose
    oneDNN kernels have native bf16 (AVX512-BF16 or AMX; elsewhere it is emulated and slower)."""
    if device.type == "cuda":  # emulated bf16 (T4, V100) would train slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def lr_factor(step: int, progress: float, c: OptimConfig) -> float:
    """Linear warm-up over `warmup_steps`, flat, then cosine decay to `final_lr` once
    `progress` (the fraction of training done, 0..1) passes `decay_start`."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    if progress <= c.decay_start:
        return 1.0
    decay = min(1.0, (progress - c.decay_start) / (1 - c.decay_start))
    return c.final_lr + (1 - c.final_lr) * 0.5 * (1 + math.cos(math.pi * decay))


class WeightAverage:
    """An exponential moving average of a model's weights, updated after each optimizer step.
    Its decay ramps up as (1 + step) / (10 + step) until it reaches `decay`, so the random
    initial weights are soon forgotten."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards `model`'s weights after optimizer step `step` (0-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)


def usable_rows(rows: list[Utterance], tokenizer: CharTokenizer, config: TrainConfig, name: str,
                found: list[Problem] = (), training: bool = True) -> tuple[list[Utterance], list[Problem]]:
    """Rows fit for CTC training (for scoring only, with `training=False`: any length will do),
    and the problems of the others, with those `found` earlier (e.g. malformed manifest lines).
    Each reason is logged with a count and a few ids; `refuse_unusable` then judges."""
    fastest = max(config.data.speeds)  # speed perturbation shortens utterances by up to this
    limits = dict(max_duration=config.data.max_duration,
                  seconds_per_label=fastest * config.model.subsampling / FRAMES_PER_SECOND) if training else {}
    keep, problems = check_rows(rows, tokenizer, **limits)
    problems = [*found, *problems]
    for reason, group in _by_reason(problems).items():
        log.warning("%s: %d row(s) %s: %s%s", name, len(group), reason,
                    ", ".join(p.id or p.where for p in group[:3]), " ..." if len(group) > 3 else "")
    return keep, problems


def refuse_unusable(name: str, keep: list[Utterance], problems: list[Problem], config: TrainConfig) -> None:
    """Stop before training when rows are unusable and data.bad_rows=fail, or when none is left."""
    if problems and config.data.bad_rows == "fail":
        counts = ", ".join(f"{len(g)} {reason}" for reason, g in _by_reason(problems).items())
        raise ManifestError(f"{name}: {len(problems)} unusable row(s) ({counts}); first: {problems[0]}. "
                            "Fix them, or set data.bad_rows=skip to train without them")
    if not keep:
        raise ConfigError(f"{name}: no usable utterances")


def _by_reason(problems: list[Problem]) -> dict[str, list[Problem]]:
    groups: dict[str, list[Problem]] = {}
    for p in problems:
        groups.setdefault(p.reason, []).append(p)
    return groups


def write_problems(path: Path, problems: dict[str, list[Problem]]) -> None:
    """One line per unusable row, "<set>: <where>: <id>: <reason>: <detail>"; no file when all is well."""
    lines = [f"{name}: {p}" for name, group in problems.items() for p in group]
    if lines:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        log.warning("%d unusable row(s) listed in %s", len(lines), path)
    else:
        path.unlink(missing_ok=True)


def feature_stats(rows: list[Utterance], config: TrainConfig, log_mel: LogMel) -> dict:
    """Global log-mel mean/std over `config.data.stats_utterances` utterances drawn by the seed."""
    sample = random.Random(config.seed).sample(rows, min(len(rows), config.data.stats_utterances))
    device = log_mel.mean.device

    def waves():
        for r in sample:
            try:
                yield torch.from_numpy(load_audio(r.audio)).to(device)
            except AudioError as e:  # the training loop will leave it out too
                log.warning("feature statistics without %s", e)

    try:
        mean, std = compute_stats(waves(), log_mel)
    except ValueError:
        raise ConfigError(f"train: none of the {len(sample)} utterances sampled for the feature "
                          "statistics could be read") from None
    return {"mean": mean.cpu(), "std": std.cpu()}


CACHE_BATCH_SECONDS = 100.0  # audio per batch while features are cached


@torch.no_grad()
def cached_features(rows: list[Utterance], tokenizer: CharTokenizer, log_mel: LogMel, config: TrainConfig,
                    progress: bool) -> FeatureDataset:
    """Every training utterance's normalised log-mel, computed once and kept as float16. The
    batches are fixed by the rows alone (by duration), so a resumed run computes the very same
    numbers; unreadable files keep their message and are left out of training as uncached."""
    batches = BucketBatchSampler([r.duration for r in rows], CACHE_BATCH_SECONDS,
                                 max_batch_size=config.data.max_batch_size)  # epoch 0: sorted, not shuffled
    loader = DataLoader(_IndexedWaves(rows), batch_sampler=batches, collate_fn=_pad_waves,
                        num_workers=config.data.num_workers, worker_init_fn=_ignore_sigint,
                        generator=torch.Generator())  # leaves the global RNG alone
    device = log_mel.mean.device
    features: list[torch.Tensor | str] = [""] * len(rows)
    samples = [0] * len(rows)
    with tqdm(total=len(rows), desc="features", unit="utt", disable=not progress, dynamic_ncols=True) as bar:
        for index, waves, lengths, failed in loader:
            for i, message in failed:
                features[i] = message
            if index:
                feats, frames = log_mel(waves.to(device), lengths.to(device))
                for j, i in enumerate(index):
                    features[i] = feats[j, : frames[j]].to(torch.float16).cpu()  # a copy, not a view
                    samples[i] = int(lengths[j])
            bar.update(len(index) + len(failed))
    size = sum(f.numel() * f.element_size() for f in features if not isinstance(f, str))
    log.info("features of %d training utterances cached in memory (%.0f MB)", len(rows), size / 2**20)
    return FeatureDataset(rows, tokenizer, features, samples)


class _IndexedWaves(Dataset):
    """(index, wave, "") for each row, or (index, None, why it cannot be read)."""

    def __init__(self, rows: list[Utterance]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        try:
            return i, torch.from_numpy(load_audio(self.rows[i].audio)), ""
        except AudioError as e:
            return i, None, str(e)


def _pad_waves(items: list[tuple]) -> tuple:
    """(indices, (B, N) zero-padded waves, (B,) lengths, [(index, message)] of the unreadable)."""
    kept = [(i, wave) for i, wave, _ in items if wave is not None]
    failed = [(i, message) for i, wave, message in items if wave is None]
    waves = [wave for _, wave in kept]
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True) if waves else torch.zeros(0, 0)
    return [i for i, _ in kept], padded, torch.tensor([len(w) for w in waves], dtype=torch.long), failed


def train(config: TrainConfig, train_rows: list[Utterance], dev_rows: list[Utterance],
          exp_dir: str | Path, resume: bool = True, progress: bool = True, stats_only: bool = False,
          found: dict[str, list[Problem]] | None = None) -> dict:
    """Train a model into `exp_dir`; resumes from `exp_dir/last.pt` when it exists.

    Rows training cannot use are checked for first and listed in `exp_dir/problems.txt`, with
    any problems `found` earlier ({"train": [...], "dev": [...]}, e.g. malformed manifest lines).

    The feature statistics come from `exp_dir/feature_stats.pt` when it exists, else they are
    computed and written there first; `stats_only` stops after that (a recipe stage of its own).

    Under `torchrun` (WORLD_SIZE > 1) every process trains on its share of each epoch's batches
    and their gradients are averaged (DDP: NCCL on GPUs, gloo on CPUs); only rank 0 logs and
    writes files. Returns the best dev metrics ({"wer", "cer", "epoch"}).
    """
    dist = _Distributed.start(config.device)
    try:
        return _train(config, train_rows, dev_rows, Path(exp_dir), resume, progress and dist.main,
                      stats_only, found or {}, dist)
    finally:
        dist.stop()


def _train(config: TrainConfig, train_rows: list[Utterance], dev_rows: list[Utterance], exp_dir: Path,
           resume: bool, progress: bool, stats_only: bool, found: dict[str, list[Problem]],
           dist: _Distributed) -> dict:
    exp_dir.mkdir(parents=True, exist_ok=True)
    last = exp_dir / "last.pt"
    resumed = load_model_file(last) if resume and last.exists() else None
    if resumed is not None:
        if "train_state" not in resumed:
            raise ConfigError(f"{last}: holds no training state to resume from")
        config = _resumed_config(config, from_dict(TrainConfig, resumed["train_state"]["config"]))
    device = dist.device(pick_device(config.device))
    bf16 = config.bf16 and bf16_supported(device)
    if config.bf16 and not bf16:
        log.warning("bf16: %s has no native bf16 arithmetic; training in fp32", device)
    tokenizer = CharTokenizer()
    train_rows, train_problems = usable_rows(train_rows, tokenizer, config, "train", found.get("train", []))
    dev_rows, dev_problems = usable_rows(dev_rows, tokenizer, config, "dev", found.get("dev", []), training=False)
    if dist.main:
        write_problems(exp_dir / PROBLEMS_FILE, {"train": train_problems, "dev": dev_problems})
    refuse_unusable("train", train_rows, train_problems, config)
    refuse_unusable("dev", dev_rows, dev_problems, config)
    _seed_everything(config.seed + dist.rank)  # dropout and SpecAugment differ by rank; weights come from rank 0

    log_mel = LogMel().to(device)
    stats_file = exp_dir / STATS_FILE
    if resumed is not None:
        stats = resumed["feature_stats"]
    elif resume and stats_file.exists():
        stats = load_feature_stats(stats_file)
        log.info("feature statistics from %s", stats_file)
    else:  # every rank computes them (the same sample, so the same numbers); rank 0 writes them
        stats = feature_stats(train_rows, config, log_mel)
        if dist.main:
            save_feature_stats(stats, stats_file)
    log_mel.set_stats(stats["mean"].to(device), stats["std"].to(device))
    if stats_only:
        return {}
    specaug = SpecAugment(config.specaugment).to(device)
    model = BiLSTMCTC(config.model, len(tokenizer)).to(device)
    if resumed is not None:  # with a weight average, the file's "model" is the average
        model.load_state_dict(resumed["train_state"].get("weights", resumed["model"]))
    average = WeightAverage(model, config.optim.ema) if config.optim.ema else None
    if average and resumed is not None:
        average.model.load_state_dict(resumed["model"])
    scored = average.model if average else model  # what dev scoring and the model files use
    net = dist.wrap(model)  # what the step runs: the model, or DDP around it
    # The fused kernel updates all tensors in one pass (2 ms a step on 2 CPU cores against 29 ms)
    # and can skip an update on the device when told to, without a host-device sync.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    sampler = BucketBatchSampler([r.duration for r in train_rows], config.data.max_batch_seconds,
                                 max_batch_size=config.data.max_batch_size, seed=config.seed,
                                 sorted_first_epoch=config.data.sorted_first_epoch,
                                 rank=dist.rank, world_size=dist.world_size)
    accum = config.optim.grad_accum
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / accum)
    total_steps = steps_per_epoch * config.epochs
    budget = config.max_minutes * 60

    # Where training stands; all of it goes into last.pt.
    epoch, step, batch_in_epoch, elapsed, best = 0, 0, 0, 0.0, {"wer": 1.0, "cer": float("inf"), "epoch": 0}
    log_rows = 0  # rows of log.csv written by then: a run killed later wrote more, dropped on resume
    if resumed is not None:
        ts = resumed["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        epoch, step, batch_in_epoch, elapsed, best = (ts["epoch"], ts["step"], ts["batch_in_epoch"],
                                                      ts["elapsed"], ts["best"])
        log_rows = ts.get("log_rows")
        rngs = ts.get("rng_by_rank", [ts["rng"]])
        if len(rngs) == dist.world_size:
            _set_rng_state(rngs[dist.rank])
        else:
            log.warning("resuming with %d processes where %d saved their random state: the random "
                        "draws (dropout, SpecAugment) from here differ from the run's", dist.world_size, len(rngs))
        log.info("resuming from %s: epoch %d, step %d, %.1f min trained", last, epoch + 1, step, elapsed / 60)
    del resumed

    clock = elapsed  # the training time every rank agrees on (under DDP: as of the last log step)

    def fraction_done() -> float:
        return max(step / total_steps, clock / budget if budget else 0.0)

    def payload(with_state: bool) -> dict:
        """The model file; collective under DDP (every rank's random state is gathered)."""
        rng_by_rank = dist.gather_objects(_rng_state()) if with_state else None
        out = {
            "model_config": to_dict(config.model),
            "tokens": tokenizer.tokens,
            "feature_stats": {"mean": log_mel.mean.cpu(), "std": log_mel.std.cpu()},
            "model": {k: v.cpu() for k, v in scored.state_dict().items()},
            "decoding": {"decoder": "greedy"},
            "train_config": to_dict(config),  # what made these weights, for RESULTS.md
        }
        if with_state:
            out["train_state"] = {
                "config": to_dict(config), "optimizer": optimizer.state_dict(), "rng": rng_by_rank[0],
                "rng_by_rank": rng_by_rank, "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
                "elapsed": elapsed, "best": best, "log_rows": run_log.rows if run_log else 0,
            }
            if average:  # the weights being trained, to resume from
                out["train_state"]["weights"] = {k: v.cpu() for k, v in model.state_dict().items()}
        return out

    def save(path: Path, with_state: bool = True) -> None:
        out = payload(with_state)  # on every rank: gathering the random states is collective
        if dist.main:
            save_model_file(out, path)

    if config.data.cache_features:
        dataset, collate_batch, workers = (cached_features(train_rows, tokenizer, log_mel, config, progress),
                                           collate_features, 0)
    else:
        dataset = SpeechDataset(train_rows, tokenizer, speeds=config.data.speeds, seed=config.seed)
        collate_batch, workers = collate, config.data.num_workers
    ctc = torch.nn.CTCLoss(blank=tokenizer.blank_id, reduction="sum", zero_infinity=True)
    run_log = _RunLog(exp_dir, keep_rows=log_rows, tensorboard=config.tensorboard) if dist.main else None
    log.info("model: %.2f M parameters; %d training utterances (%.1f h), %d batches per epoch%s "
             "(padding efficiency %.1f%%), %d epochs%s, device %s%s", model.num_parameters() / 1e6,
             len(train_rows), sum(r.duration for r in train_rows) / 3600, sampler.batches_per_epoch,
             f" on each of {dist.world_size} processes" if dist.world_size > 1 else "",
             100 * sampler.padding_efficiency, config.epochs,
             f" or {config.max_minutes:g} min" if budget else "", f"{device}{' (bf16)' if bf16 else ''}",
             f", {accum} batches a step" if accum > 1 else "")

    unreadable: set[str] = set()  # audio files that failed to load mid-training (warned once each)
    out_of_memory = 0

    def forward_backward(batch: dict, scale: float, last_of_group: bool) -> torch.Tensor:
        """Loss of one batch (a 0-d tensor on the device), its gradients times `scale` added to
        the parameters' (averaged over the ranks at a group's last batch). Its tensors die with
        this frame, so an out-of-memory error leaves nothing behind."""
        with dist.accumulating(net, not last_of_group):
            augment = epoch >= config.specaugment_from_epoch
            if "feats" in batch:  # cached: normalised already
                feats = batch["feats"].to(device, non_blocking=True).float()
                frames = batch["frames"].to(device, non_blocking=True)
            else:
                waves = batch["waves"].to(device, non_blocking=True)
                warp = vtlp_factors(len(waves), config.vtlp, device) if augment else None
                feats, frames = log_mel(waves, batch["wave_lengths"].to(device, non_blocking=True), warp)
            if augment:
                feats = specaug(feats, frames)
            loss = batch_loss(net, model, ctc, feats, frames, batch["wave_lengths"],
                              batch["targets"].to(device, non_blocking=True), batch["target_lengths"], bf16)
            (loss * scale).backward()
        return loss.detach()

    def step_optimizer() -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = config.optim.lr * lr_factor(step, fraction_done(), config.optim)
        return optimizer_step(model, optimizer, config.optim.grad_clip)

    # Since the last log line; device tensors, read (one sync) only when logged.
    window = _Window(device)
    with _StopOnSignal() as stop, contextlib.ExitStack() as closing:
        if run_log:
            closing.callback(run_log.close)
        # (An epoch stopped by a signal after its last step still owes its dev scores.)
        while (epoch < config.epochs and fraction_done() < 1.0) or batch_in_epoch >= sampler.batches_per_epoch:
            net.train()
            sampler.set_epoch(epoch, batch_in_epoch)
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                                num_workers=workers, pin_memory=device.type == "cuda",
                                worker_init_fn=_ignore_sigint,
                                generator=torch.Generator().manual_seed(config.seed + epoch))  # leaves the global RNG alone
            bar = tqdm(loader, total=len(sampler), desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=not progress, dynamic_ncols=True)
            tick = time.perf_counter()
            group, in_group = 0, 0  # batches in this optimizer step, and done so far
            stopping = False  # every rank agrees on it (single process: at once; DDP: at log steps)
            for batch in bar:
                for message in batch["failed"]:
                    if message not in unreadable:
                        unreadable.add(message)
                        log.warning("left out of training: %s", message)
                if in_group == 0:  # the last step of an epoch may have fewer batches
                    group = min(accum, sampler.batches_per_epoch - batch_in_epoch)
                batch_in_epoch += 1
                in_group += 1
                last_of_group = in_group == group
                if batch["ids"]:
                    try:
                        window.add_loss(forward_backward(batch, 1 / group, last_of_group))
                    except torch.OutOfMemoryError:
                        if dist.world_size > 1:
                            raise  # the other ranks are waiting for this one's gradients
                        out_of_memory += 1
                        log.warning("step %d: out of memory on %d utterances (%.0f s of audio); batch "
                                    "skipped (lower data.max_batch_seconds if this repeats)", step + 1,
                                    len(batch["ids"]), batch["wave_lengths"].sum().item() / SAMPLE_RATE)
                        optimizer.zero_grad(set_to_none=True)  # this group's step is lost with it
                        torch.cuda.empty_cache()
                elif dist.world_size > 1:  # no audio, but DDP needs this rank's (zero) gradients
                    with dist.accumulating(net, not last_of_group):
                        silence = torch.zeros(1, 8, N_MELS, device=device)
                        net(silence, torch.tensor([8], device=device))[0].sum().mul(0).backward()
                window.audio += batch["wave_lengths"].sum().item() / SAMPLE_RATE  # host tensor
                if not last_of_group:
                    continue
                window.add_grad_norm(step_optimizer())
                if average:
                    average.update(model, step)
                step += 1
                in_group = 0
                now = time.perf_counter()
                elapsed, window.seconds, tick = elapsed + now - tick, window.seconds + now - tick, now
                stopping = stop.signal is not None
                if dist.world_size == 1:
                    clock = elapsed
                if step % config.log_every == 0:
                    numbers = window.read(dist)  # the one sync, every log_every steps
                    elapsed = clock = dist.max(elapsed)  # one clock for every rank's LR and budget
                    stopping = bool(dist.max(float(stopping)))
                    lr = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{numbers['loss']:.3f}", lr=f"{lr:.2e}",
                                    audio_s_per_s=f"{numbers['audio_sec_per_sec']:.0f}")
                    if run_log:
                        run_log.write(step=step, epoch=epoch + 1, lr=lr, minutes=elapsed / 60, **numbers)
                elif dist.world_size > 1:
                    stopping = False  # ranks agree only at log steps: a signal waits until the next
                if stopping:
                    break
                if config.save_every and step % config.save_every == 0:
                    save(last)
                if fraction_done() >= 1.0:
                    if budget and elapsed >= budget:
                        log.info("time budget of %g min reached at step %d", config.max_minutes, step)
                    break
            bar.close()
            if window.skipped or out_of_memory:
                log.warning("skipped so far: %d step(s) with a non-finite gradient, %d batch(es) out of "
                            "memory", window.skipped, out_of_memory)
            if stopping:  # saved where it stands, the same command resumes from here; an epoch
                # that ran to its end is closed (dev scores, best.pt) first thing on resuming
                save(last)
                raise TrainingInterrupted(stop.signal or signal.SIGTERM, step, last)
            if batch_in_epoch >= sampler.batches_per_epoch:  # the epoch ran to its end
                epoch, batch_in_epoch = epoch + 1, 0

            rates = evaluate_dev(scored, log_mel, tokenizer, dev_rows, device, progress, dist)
            net.train()
            log.info("epoch %d: dev WER %.2f%%  CER %.2f%%  (%d utterances, %.1f min trained)", epoch,
                     100 * rates["wer"], 100 * rates["cer"], rates["utterances"], elapsed / 60)
            if run_log:
                run_log.write(step=step, epoch=epoch, dev_wer=rates["wer"], dev_cer=rates["cer"], minutes=elapsed / 60)
                run_log.plot()
            if rates["cer"] < best["cer"]:
                best = {"wer": rates["wer"], "cer": rates["cer"], "epoch": epoch}
                save(exp_dir / "best.pt", with_state=False)
            save(last)
            if bool(dist.max(float(stop.signal is not None))):
                raise TrainingInterrupted(stop.signal or signal.SIGTERM, step, last)
    return best


def batch_loss(net: nn.Module, model: BiLSTMCTC, ctc: nn.CTCLoss, feats: torch.Tensor, frames: torch.Tensor,
               wave_lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor,
               bf16: bool) -> torch.Tensor:
    """Mean CTC loss per utterance of one batch, a 0-d tensor on the device, as a training step
    computes it: `net` (the model, or DDP around it) under bf16 autocast when asked, the loss in
    fp32. feats (B, T, N_MELS), frames (B,) and targets (B, L) are on the device; wave_lengths and
    target_lengths (B,) on the host, so the output lengths CTC needs come from host arithmetic
    and nothing waits for the device."""
    with torch.autocast(feats.device.type, dtype=torch.bfloat16, enabled=bf16):
        log_probs, _ = net(feats, frames)
    out_lengths = model.output_lengths(num_frames(wave_lengths))
    return ctc(log_probs.float().transpose(0, 1),  # (B, T', V) -> (T', B, V)
               targets, out_lengths, target_lengths) / len(wave_lengths)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Clip, then step, unless a gradient is not finite: the fused AdamW skips the update on the
    device (as under a gradient scaler), so no host-device sync is needed to decide it. Clears
    the gradients; returns their norm before clipping (inf or NaN for a skipped step)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        optimizer.step()
    elif torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach()


def _resumed_config(given: TrainConfig, saved: TrainConfig) -> TrainConfig:
    """A resumed run goes on with the config it started with; only its length may change."""
    saved.epochs, saved.max_minutes = given.epochs, given.max_minutes
    differ = [k for k, v in to_dict(given).items() if to_dict(saved)[k] != v]
    if differ:
        log.warning("resuming with the saved config; ignoring new values of: %s", ", ".join(differ))
    return saved


def evaluate_dev(model: BiLSTMCTC, log_mel: LogMel, tokenizer: CharTokenizer, rows: list[Utterance],
                 device: torch.device, progress: bool, dist: _Distributed | None = None) -> dict:
    """Greedy {"wer", "cer", "utterances"} of the model being trained on `rows` (under DDP each
    rank decodes its share and the error counts are summed). Leaves the model in eval mode."""
    dist = dist or _Distributed()
    share = rows[dist.rank :: dist.world_size]
    rates, _, failures = Transcriber(model, log_mel, tokenizer, GreedyDecoder(tokenizer), device).evaluate(
        share, progress=progress)
    for f in failures:
        log.warning("dev: %s", f.message)
    word_errors, words, char_errors, chars, utterances = dist.sum([
        sum(u.word_errors for u in rates.utterances), rates.words,
        sum(u.char_errors for u in rates.utterances), rates.chars, len(rates.utterances)])
    return {"wer": word_errors / max(words, 1), "cer": char_errors / max(chars, 1), "utterances": int(utterances)}


@dataclass
class _Distributed:
    """This process's place in a `torchrun` job; rank 0 of 1 when run alone, where every
    collective below is the identity and nothing is imported or started."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # started the process group here, so ends it

    @classmethod
    def start(cls, device_name: str) -> _Distributed:
        """Join the job torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
        MASTER_ADDR, MASTER_PORT): NCCL between GPUs, gloo between CPU processes."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        local = int(os.environ.get("LOCAL_RANK", "0"))
        owns = not td.is_initialized()
        if owns:
            cuda = pick_device(device_name).type == "cuda"
            if cuda:
                torch.cuda.set_device(local)
            td.init_process_group("nccl" if cuda else "gloo")
        return cls(td.get_rank(), td.get_world_size(), local, owns)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each process on a machine takes the GPU of its local rank."""
        if self.world_size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around `model` (its weights broadcast from rank 0), or the model itself alone."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def accumulating(self, net: nn.Module, active: bool):
        """While `active`, gradients stay on this rank (they are averaged at the group's last batch)."""
        return net.no_sync() if active and self.world_size > 1 else contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, "SUM")

    def max(self, value: float) -> float:
        return self._reduce([value], "MAX")[0]

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if self.world_size == 1:
            return list(values)
        import torch.distributed as td

        on = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=on)
        td.all_reduce(tensor, op=getattr(td.ReduceOp, op))
        return tensor.tolist()

    def gather_objects(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def stop(self) -> None:
        if self.owns_group:
            import torch.distributed as td

            td.destroy_process_group()


class _Window:
    """What happened since the last log line. The step's numbers stay on the device as running
    sums, so training never waits for them; `read` fetches them in one copy (and sums them over
    the ranks) every log_every steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.skipped_total = torch.zeros((), device=device)  # steps with a non-finite gradient
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, device=self.device)  # loss, finite losses, grad norm, finite norms
        self.audio, self.seconds = 0.0, 0.0  # host numbers: seconds of audio, of wall clock

    def add_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.sums[0] += torch.where(finite, loss, 0.0)
        self.sums[1] += finite

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        finite = torch.isfinite(norm)
        self.sums[2] += torch.where(finite, norm, 0.0)
        self.sums[3] += finite
        self.skipped_total += ~finite

    def read(self, dist: _Distributed) -> dict:
        """Mean loss and gradient norm, and audio seconds per second (all ranks together); resets."""
        loss, losses, grad, grads, audio = dist.sum([*self.sums.tolist(), self.audio])
        out = {"loss": loss / max(losses, 1), "grad_norm": grad / max(grads, 1),
               "audio_sec_per_sec": audio / max(self.seconds, 1e-9)}
        self.reset()
        return out

    @property
    def skipped(self) -> int:
        return int(self.skipped_total.item())


class _RunLog:
    """What training reports, in three views of the same numbers:

    - log.csv: one row per logged step or dev evaluation, blank where a column does not apply;
    - tensorboard/: the same scalars as TensorBoard events (train/*, dev/* in %);
    - curves.png: the learning curves, redrawn after every dev evaluation.

    Opened with `keep_rows` (the count saved with the model file resumed from), it keeps that
    many rows and drops any written after (by a run killed before its next save), so a resumed
    run's log reads as if it had never stopped; TensorBoard hides the dropped steps the same way.
    """

    COLUMNS = ["step", "epoch", "minutes", "loss", "lr", "grad_norm", "audio_sec_per_sec", "dev_wer", "dev_cer"]
    PLOT_EVERY = 120.0  # seconds: a tiny model's epochs take less than drawing the picture
    TENSORBOARD = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                   "audio_sec_per_sec": "train/audio_sec_per_sec", "dev_wer": "dev/wer_percent",
                   "dev_cer": "dev/cer_percent"}

    def __init__(self, exp_dir: Path, keep_rows: int, tensorboard: bool = True):
        self.path, self.png = exp_dir / "log.csv", exp_dir / "curves.png"
        kept = []
        if keep_rows and self.path.exists():
            with open(self.path, newline="") as f:
                kept = [{k: v for k, v in row.items() if k in self.COLUMNS} for row in csv.DictReader(f)][:keep_rows]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()
        self.rows = len(kept)
        self.plotted = -math.inf
        self.events = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            last_step = int(kept[-1]["step"]) if kept else 0
            self.events = SummaryWriter(exp_dir / "tensorboard", purge_step=last_step + 1 if kept else None)

    def write(self, **values) -> None:
        self.writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()})
        self.file.flush()
        self.rows += 1
        if self.events is not None:
            for key, tag in self.TENSORBOARD.items():
                if key in values:
                    self.events.add_scalar(tag, 100 * values[key] if key.startswith("dev_") else values[key],
                                           values["step"])
            self.events.flush()

    def plot(self, now: bool = False) -> None:
        """Redraw curves.png, at most every PLOT_EVERY seconds unless `now`; a drawing failure
        (a missing font, a full disk) is only a warning."""
        from asr.plots import plot_curves

        if not now and time.monotonic() - self.plotted < self.PLOT_EVERY:
            return
        try:
            plot_curves(self.path, self.png, title=self.path.parent.name)
        except Exception as e:  # noqa: BLE001 - the picture must never stop training
            log.warning("could not draw %s: %s", self.png, e)
        self.plotted = time.monotonic()

    def close(self) -> None:
        self.file.close()
        self.plot(now=True)
        if self.events is not None:
            self.events.close()


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM, after saving where it stood in `path`."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {path} holds "
                         "the training state: run the same command again to resume")


def _ignore_sigint(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process, which finishes its step and saves;
    a worker that died of it could take the batch the main process is waiting for with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopOnSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM (what batch schedulers send before a kill) ask
    the loop to stop after the current step, save and exit; a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s: stopping after this step (Ctrl-C again to stop at once, unsaved)",
                    signal.Signals(signum).name)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    # Python's Mersenne Twister state: (version, 625 ints, gauss_next)
    words = [int(x) for x in state["python"]]
    random.setstate((3, tuple(words[:625]), None))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
