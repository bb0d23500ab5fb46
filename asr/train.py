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
import signal
import threading
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
from asr.data import BucketBatchSampler, Problem, SpeechDataset, Utterance, check_rows, collate
from asr.decode import GreedyDecoder
from asr.errors import AudioError, ConfigError, ManifestError
from asr.features import FRAMES_PER_SECOND, LogMel, SpecAugment, SpecAugmentConfig, compute_stats
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

    def __post_init__(self):
        if not self.speeds or min(self.speeds) <= 0:
            raise ConfigError(f"data.speeds={list(self.speeds)}: need one or more positive speeds")
        if self.bad_rows not in ("skip", "fail"):
            raise ConfigError(f"data.bad_rows={self.bad_rows!r}: expected skip or fail")


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
    tensorboard: bool = True  # also log to EXP_DIR/tensorboard/ (tensorboard --logdir EXP_DIR)
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


def train(config: TrainConfig, train_rows: list[Utterance], dev_rows: list[Utterance],
          exp_dir: str | Path, resume: bool = True, progress: bool = True, stats_only: bool = False,
          found: dict[str, list[Problem]] | None = None) -> dict:
    """Train a model into `exp_dir`; resumes from `exp_dir/last.pt` when it exists.

    Rows training cannot use are checked for first and listed in `exp_dir/problems.txt`, with
    any problems `found` earlier ({"train": [...], "dev": [...]}, e.g. malformed manifest lines).

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
    found = found or {}
    train_rows, train_problems = usable_rows(train_rows, tokenizer, config, "train", found.get("train", []))
    dev_rows, dev_problems = usable_rows(dev_rows, tokenizer, config, "dev", found.get("dev", []), training=False)
    write_problems(exp_dir / PROBLEMS_FILE, {"train": train_problems, "dev": dev_problems})
    refuse_unusable("train", train_rows, train_problems, config)
    refuse_unusable("dev", dev_rows, dev_problems, config)
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
    log_rows = 0  # rows of log.csv written by then: a run killed later wrote more, dropped on resume
    if resumed is not None:
        ts = resumed["train_state"]
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(ts["optimizer"])
        epoch, step, batch_in_epoch, elapsed, best = (ts["epoch"], ts["step"], ts["batch_in_epoch"],
                                                      ts["elapsed"], ts["best"])
        log_rows = ts.get("log_rows")
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
                "best": best, "log_rows": run_log.rows,
            }
        return out

    dataset = SpeechDataset(train_rows, tokenizer, speeds=config.data.speeds, seed=config.seed)
    ctc = torch.nn.CTCLoss(blank=tokenizer.blank_id, reduction="sum", zero_infinity=True)
    run_log = _RunLog(exp_dir, keep_rows=log_rows, tensorboard=config.tensorboard)
    log.info("model: %.2f M parameters; %d training utterances (%.1f h), %d batches per epoch "
             "(padding efficiency %.1f%%), %d epochs%s, device %s", model.num_parameters() / 1e6,
             len(train_rows), sum(r.duration for r in train_rows) / 3600, sampler.batches_per_epoch,
             100 * sampler.padding_efficiency, config.epochs,
             f" or {config.max_minutes:g} min" if budget else "", f"{device}{' (bf16)' if bf16 else ''}")

    skipped = {"non-finite loss": 0, "out of memory": 0}  # batches left out, by reason
    unreadable: set[str] = set()  # audio files that failed to load mid-training (warned once each)

    def train_step(batch: dict) -> tuple[float, float] | None:
        """One optimizer step on `batch`: (loss, gradient norm before clipping), or None when the
        loss is not finite. Its tensors die with this frame, so an out-of-memory error leaves
        nothing behind."""
        waves = batch["waves"].to(device, non_blocking=True)
        feats, frames = log_mel(waves, batch["wave_lengths"].to(device))
        if epoch >= config.specaugment_from_epoch:
            feats = specaug(feats, frames)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            log_probs, out_lengths = model(feats, frames.cpu())
        loss = ctc(log_probs.float().transpose(0, 1),  # (B, T', V) -> (T', B, V)
                   batch["targets"], out_lengths, batch["target_lengths"]) / len(batch["ids"])
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return None
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip, foreach=True)
        optimizer.step()
        return loss.item(), grad_norm.item()

    window = {"loss": 0.0, "grad_norm": 0.0, "losses": 0, "audio": 0.0, "seconds": 0.0}  # since the last log line
    with _StopOnSignal() as stop:
        while epoch < config.epochs and fraction_done() < 1.0:
            model.train()
            sampler.set_epoch(epoch, batch_in_epoch)
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                num_workers=config.data.num_workers, pin_memory=device.type == "cuda",
                                worker_init_fn=_ignore_sigint,
                                generator=torch.Generator().manual_seed(config.seed + epoch))  # leaves the global RNG alone
            bar = tqdm(loader, total=len(sampler), desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=not progress, dynamic_ncols=True)
            tick = time.perf_counter()
            for batch in bar:
                for message in batch["failed"]:
                    if message not in unreadable:
                        unreadable.add(message)
                        log.warning("left out of training: %s", message)
                batch_in_epoch += 1
                if batch["ids"]:
                    for group in optimizer.param_groups:
                        group["lr"] = config.optim.lr * lr_factor(step, fraction_done(), config.optim)
                    try:
                        result, out_of_memory = train_step(batch), False
                    except torch.OutOfMemoryError:
                        result, out_of_memory = None, True
                    if out_of_memory:  # handled out here, once the step's tensors are freed
                        optimizer.zero_grad(set_to_none=True)
                        torch.cuda.empty_cache()
                        skipped["out of memory"] += 1
                        log.warning("step %d: out of memory on %d utterances (%.0f s of audio); batch "
                                    "skipped (lower data.max_batch_seconds if this repeats)", step + 1,
                                    len(batch["ids"]), batch["wave_lengths"].sum().item() / SAMPLE_RATE)
                    elif result is None:
                        skipped["non-finite loss"] += 1
                    else:
                        window["loss"] += result[0]
                        window["grad_norm"] += result[1]
                        window["losses"] += 1
                    step += 1
                now = time.perf_counter()
                elapsed += now - tick
                window["seconds"] += now - tick
                tick = now
                window["audio"] += batch["wave_lengths"].sum().item() / SAMPLE_RATE
                if batch["ids"] and step % config.log_every == 0:
                    speed = window["audio"] / max(window["seconds"], 1e-9)
                    trained = max(window["losses"], 1)
                    loss_mean, grad_mean = window["loss"] / trained, window["grad_norm"] / trained
                    lr = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{lr:.2e}", audio_s_per_s=f"{speed:.0f}")
                    run_log.write(step=step, epoch=epoch + 1, loss=loss_mean, lr=lr, grad_norm=grad_mean,
                                  audio_sec_per_sec=speed, minutes=elapsed / 60)
                    window = dict.fromkeys(window, 0)
                if stop.signal is not None:
                    break
                if config.save_every and batch["ids"] and step % config.save_every == 0:
                    save_model_file(payload(with_state=True), last)
                if fraction_done() >= 1.0:
                    if budget and elapsed >= budget:
                        log.info("time budget of %g min reached at step %d", config.max_minutes, step)
                    break
            bar.close()
            for reason, count in skipped.items():
                if count:
                    log.warning("skipped %d batch(es) so far: %s", count, reason)
            if batch_in_epoch >= sampler.batches_per_epoch:  # the epoch ran to its end
                epoch, batch_in_epoch = epoch + 1, 0
            if stop.signal is not None:  # saved where it stands; the same command resumes from here
                save_model_file(payload(with_state=True), last)
                run_log.close()
                raise TrainingInterrupted(stop.signal, step, last)

            rates = evaluate_dev(model, log_mel, tokenizer, dev_rows, device, progress)
            run_log.write(step=step, epoch=epoch, dev_wer=rates.wer, dev_cer=rates.cer, minutes=elapsed / 60)
            run_log.plot()
            log.info("epoch %d: dev WER %.2f%%  CER %.2f%%  (%d utterances, %.1f min trained)", epoch,
                     100 * rates.wer, 100 * rates.cer, len(rates.utterances), elapsed / 60)
            if rates.cer < best["cer"]:
                best = {"wer": rates.wer, "cer": rates.cer, "epoch": epoch}
                save_model_file(payload(with_state=False), exp_dir / "best.pt")
            save_model_file(payload(with_state=True), last)
            if stop.signal is not None:
                run_log.close()
                raise TrainingInterrupted(stop.signal, step, last)
    run_log.close()
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
