"""Training: CTC over a duration-bucketed stream of batches, with exact resume.

Each step: waves (B, N) -> LogMel (B, T, 80) -> SpecAugment -> BiLSTMCTC (B, T', V)
-> CTC loss (fp32, zero_infinity) -> AdamW step with warm-up and late decay, gradients clipped.
Training ends after `epochs` or `max_minutes`, whichever comes first; the LR decay follows
whichever is nearer, so a time-boxed run still ends on a low learning rate.
Each epoch ends with greedy WER/CER on the dev set; `last.pt` (with the full training state)
is written every `save_every` steps and at each epoch's end, `best.pt` whenever dev CER improves.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from asr.audio import SAMPLE_RATE, load_audio
from asr.checkpoint import load_feature_stats, load_model_file, save_feature_stats, save_model_file
from asr.config import from_dict, to_dict
from asr.data import BucketBatchSampler, SpeechDataset, Utterance, collate
from asr.decode import GreedyDecoder
from asr.errors import ConfigError, TextError
from asr.features import FRAMES_PER_SECOND, LogMel, SpecAugment, SpecAugmentConfig, compute_stats
from asr.model import BiLSTMCTC, ModelConfig
from asr.text import CharTokenizer
from asr.transcribe import Transcriber, pick_device

log = logging.getLogger("asr.train")


STATS_FILE = "feature_stats.pt"  # in the experiment folder, written before training starts


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak; 2e-3 stalled small models on a constant output
    weight_decay: float = 1e-2
    warmup_steps: int = 200
    decay_start: float = 0.7  # fraction of training after which the LR decays (cosine)
    final_lr: float = 0.05  # as a fraction of the peak
    grad_clip: float = 5.0


@dataclass
class DataConfig:
    max_batch_seconds: float = 200.0  # audio per batch, padding included
    max_batch_size: int = 128
    sorted_first_epoch: bool = True  # shortest utterances first in epoch 0 (SortaGrad)
    max_duration: float = 30.0  # longer utterances are left out of training
    num_workers: int = 1
    speeds: tuple[float, ...] = (1.0,)  # speed perturbation: each utterance, each epoch, at one
                                        # of these speeds (Kaldi and ESPnet use 0.9, 1.0, 1.1)
    stats_utterances: int = 500  # utterances sampled for the global mean/std

    def __post_init__(self):
        if not self.speeds or min(self.speeds) <= 0:
            raise ConfigError(f"data.speeds={list(self.speeds)}: need one or more positive speeds")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    specaugment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    specaugment_from_epoch: int = 1  # augmentation only once CTC has left its blank plateau
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 10
    max_minutes: float = 0.0  # wall-clock budget for training (0: none); the LR decay follows it
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = False  # bf16 autocast for the model on CUDA and on CPUs with native bf16
                        # (AVX512-BF16/AMX); features and the CTC loss stay fp32
    log_every: int = 25
    save_every: int = 500  # steps between mid-epoch `last.pt` files


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on `device`: a CUDA GPU with bf16 support, or a CPU whose
    oneDNN kernels have native bf16 (AVX512-BF16 or AMX; elsewhere it is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
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


def usable_rows(rows: list[Utterance], tokenizer: CharTokenizer, config: TrainConfig,
                name: str) -> list[Utterance]:
    """Rows fit for CTC training; the others are logged with the reason and left out."""
    keep, skipped = [], {}
    frames_per_label = config.model.subsampling / FRAMES_PER_SECOND
    fastest = max(config.data.speeds)  # speed perturbation shortens utterances by up to this
    for r in rows:
        try:
            labels = len(tokenizer.encode(r.text))
        except TextError as e:
            skipped.setdefault("unknown characters", []).append(f"{r.id} ({e})")
            continue
        if r.duration > config.data.max_duration:
            skipped.setdefault(f"longer than {config.data.max_duration} s", []).append(r.id)
        elif labels == 0:
            skipped.setdefault("empty transcript", []).append(r.id)
        elif r.duration / fastest < labels * frames_per_label:
            skipped.setdefault("too short for its transcript", []).append(r.id)
        else:
            keep.append(r)
    for reason, ids in skipped.items():
        log.warning("%s: left out %d utterance(s), %s: %s%s", name, len(ids), reason,
                    ", ".join(ids[:3]), " ..." if len(ids) > 3 else "")
    if not keep:
        raise ConfigError(f"{name}: no usable utterances")
    return keep


def feature_stats(rows: list[Utterance], config: TrainConfig, log_mel: LogMel) -> dict:
    """Global log-mel mean/std over `config.data.stats_utterances` utterances drawn by the seed."""
    sample = random.Random(config.seed).sample(rows, min(len(rows), config.data.stats_utterances))
    device = log_mel.mean.device
    mean, std = compute_stats((torch.from_numpy(load_audio(r.audio)).to(device) for r in sample), log_mel)
    return {"mean": mean.cpu(), "std": std.cpu()}


def train(config: TrainConfig, train_rows: list[Utterance], dev_rows: list[Utterance],
          exp_dir: str | Path, resume: bool = True, progress: bool = True, stats_only: bool = False) -> dict:
    """Train a model into `exp_dir`; resumes from `exp_dir/last.pt` when it exists.

    The feature statistics come from `exp_dir/feature_stats.pt` when it exists, else they are
    computed and written there first; `stats_only` stops after that (a recipe stage of its own).

    Returns the best dev metrics ({"wer", "cer", "epoch"}). Writes last.pt, best.pt and log.csv.
    """
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    last = exp_dir / "last.pt"
    resumed = load_model_file(last) if resume and last.exists() else None
    if resumed is not None:
        if "train_state" not in resumed:
            raise ConfigError(f"{last}: holds no training state to resume from")
        config = _resumed_config(config, from_dict(TrainConfig, resumed["train_state"]["config"]))
    device = pick_device(config.device)
    bf16 = config.bf16 and bf16_supported(device)
    if config.bf16 and not bf16:
        log.warning("bf16: %s has no native bf16 arithmetic; training in fp32", device)
    tokenizer = CharTokenizer()
    train_rows = usable_rows(train_rows, tokenizer, config, "train")
    dev_rows = [r for r in dev_rows if all(c in tokenizer.tokens for c in r.text)]
    _seed_everything(config.seed)

    log_mel = LogMel().to(device)
    stats_file = exp_dir / STATS_FILE
    if resumed is not None:
        stats = resumed["feature_stats"]
    elif resume and stats_file.exists():
        stats = load_feature_stats(stats_file)
        log.info("feature statistics from %s", stats_file)
    else:
        stats = feature_stats(train_rows, config, log_mel)
        save_feature_stats(stats, stats_file)
    log_mel.set_stats(stats["mean"].to(device), stats["std"].to(device))
    if stats_only:
        return {}
    specaug = SpecAugment(config.specaugment).to(device)
    model = BiLSTMCTC(config.model, len(tokenizer)).to(device)
    # The fused kernel updates all tensors in one pass: 2 ms a step on 2 CPU cores against 29 ms.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    sampler = BucketBatchSampler([r.duration for r in train_rows], config.data.max_batch_seconds,
                                 max_batch_size=config.data.max_batch_size, seed=config.seed,
                                 sorted_first_epoch=config.data.sorted_first_epoch)
    total_steps = len(sampler) * config.epochs
    budget = config.max_minutes * 60

    # Where training stands; all of it goes into last.pt.
    epoch, step, batch_in_epoch, elapsed, best = 0, 0, 0, 0.0, {"wer": 1.0, "cer": float("inf"), "epoch": 0}
    if resumed is not None:
        ts = resumed["train_state"]
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(ts["optimizer"])
        epoch, step, batch_in_epoch, elapsed, best = (ts["epoch"], ts["step"], ts["batch_in_epoch"],
                                                      ts["elapsed"], ts["best"])
        _set_rng_state(ts["rng"])
        log.info("resuming from %s: epoch %d, step %d, %.1f min trained", last, epoch + 1, step, elapsed / 60)
    del resumed

    def fraction_done() -> float:
        return max(step / total_steps, elapsed / budget if budget else 0.0)

    def payload(with_state: bool) -> dict:
        out = {
            "model_config": to_dict(config.model),
            "tokens": tokenizer.tokens,
            "feature_stats": {"mean": log_mel.mean.cpu(), "std": log_mel.std.cpu()},
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "decoding": {"decoder": "greedy"},
            "train_config": to_dict(config),  # what made these weights, for RESULTS.md
        }
        if with_state:
            out["train_state"] = {
                "config": to_dict(config), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "elapsed": elapsed,
                "best": best,
            }
        return out

    dataset = SpeechDataset(train_rows, tokenizer, speeds=config.data.speeds, seed=config.seed)
    ctc = torch.nn.CTCLoss(blank=tokenizer.blank_id, reduction="sum", zero_infinity=True)
    log_csv = _CsvLog(exp_dir / "log.csv", append=step > 0)
    log.info("model: %.2f M parameters; %d training utterances (%.1f h), %d batches per epoch "
             "(padding efficiency %.1f%%), %d epochs%s, device %s", model.num_parameters() / 1e6,
             len(train_rows), sum(r.duration for r in train_rows) / 3600, sampler.batches_per_epoch,
             100 * sampler.padding_efficiency, config.epochs,
             f" or {config.max_minutes:g} min" if budget else "", f"{device}{' (bf16)' if bf16 else ''}")

    skipped_nonfinite = 0
    window = {"loss": 0.0, "losses": 0, "audio": 0.0, "seconds": 0.0}  # since the last log line
    while epoch < config.epochs and fraction_done() < 1.0:
        model.train()
        sampler.set_epoch(epoch, batch_in_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                            num_workers=config.data.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(config.seed + epoch))  # leaves the global RNG alone
        bar = tqdm(loader, total=len(sampler), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, dynamic_ncols=True)
        tick = time.perf_counter()
        for batch in bar:
            for group in optimizer.param_groups:
                group["lr"] = config.optim.lr * lr_factor(step, fraction_done(), config.optim)
            waves = batch["waves"].to(device, non_blocking=True)
            feats, frames = log_mel(waves, batch["wave_lengths"].to(device))
            if epoch >= config.specaugment_from_epoch:
                feats = specaug(feats, frames)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                log_probs, out_lengths = model(feats, frames.cpu())
            loss = ctc(log_probs.float().transpose(0, 1),  # (B, T', V) -> (T', B, V)
                       batch["targets"], out_lengths, batch["target_lengths"]) / len(batch["ids"])
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip, foreach=True)
                optimizer.step()
                window["loss"] += loss.item()
                window["losses"] += 1
            else:
                skipped_nonfinite += 1
            step += 1
            batch_in_epoch += 1
            now = time.perf_counter()
            elapsed += now - tick
            window["seconds"] += now - tick
            tick = now
            window["audio"] += batch["wave_lengths"].sum().item() / SAMPLE_RATE
            if step % config.log_every == 0:
                speed = window["audio"] / max(window["seconds"], 1e-9)
                loss_mean = window["loss"] / max(window["losses"], 1)
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{lr:.2e}", audio_s_per_s=f"{speed:.0f}")
                log_csv.write(step=step, epoch=epoch + 1, loss=loss_mean, lr=lr,
                              audio_sec_per_sec=speed, minutes=elapsed / 60)
                window = dict.fromkeys(window, 0)
            if config.save_every and step % config.save_every == 0:
                save_model_file(payload(with_state=True), last)
            if fraction_done() >= 1.0:
                if budget and elapsed >= budget:
                    log.info("time budget of %g min reached at step %d", config.max_minutes, step)
                break
        bar.close()
        if skipped_nonfinite:
            log.warning("skipped %d batch(es) with a non-finite loss so far", skipped_nonfinite)
        if batch_in_epoch >= sampler.batches_per_epoch:  # the epoch ran to its end
            epoch, batch_in_epoch = epoch + 1, 0

        rates = evaluate_dev(model, log_mel, tokenizer, dev_rows, device, progress)
        log_csv.write(step=step, epoch=epoch, dev_wer=rates.wer, dev_cer=rates.cer, minutes=elapsed / 60)
        log.info("epoch %d: dev WER %.2f%%  CER %.2f%%  (%d utterances, %.1f min trained)", epoch,
                 100 * rates.wer, 100 * rates.cer, len(rates.utterances), elapsed / 60)
        if rates.cer < best["cer"]:
            best = {"wer": rates.wer, "cer": rates.cer, "epoch": epoch}
            save_model_file(payload(with_state=False), exp_dir / "best.pt")
        save_model_file(payload(with_state=True), last)
    log_csv.close()
    return best


def _resumed_config(given: TrainConfig, saved: TrainConfig) -> TrainConfig:
    """A resumed run goes on with the config it started with; only its length may change."""
    saved.epochs, saved.max_minutes = given.epochs, given.max_minutes
    differ = [k for k, v in to_dict(given).items() if to_dict(saved)[k] != v]
    if differ:
        log.warning("resuming with the saved config; ignoring new values of: %s", ", ".join(differ))
    return saved


def evaluate_dev(model: BiLSTMCTC, log_mel: LogMel, tokenizer: CharTokenizer, rows: list[Utterance],
                 device: torch.device, progress: bool):
    """Greedy WER/CER of the model being trained; leaves it in training mode."""
    rates, _, failures = Transcriber(model, log_mel, tokenizer, GreedyDecoder(tokenizer), device).evaluate(
        rows, progress=progress)
    for f in failures:
        log.warning("dev: %s", f.message)
    model.train()
    return rates


class _CsvLog:
    """log.csv: one row per logged step or dev evaluation, blank where a column does not apply."""

    COLUMNS = ["step", "epoch", "minutes", "loss", "lr", "audio_sec_per_sec", "dev_wer", "dev_cer"]

    def __init__(self, path: Path, append: bool):
        fresh = not (append and path.exists())
        self.file = open(path, "w" if fresh else "a", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)
        if fresh:
            self.writer.writeheader()

    def write(self, **values) -> None:
        self.writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


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
