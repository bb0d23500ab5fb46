"""Pictures of what training and the model do: learning curves, and one file's alignment.

    log.csv ──plot_curves──▶ curves.png        loss, dev WER/CER, learning rate, gradient norm
    audio ──plot_alignment──▶ <file>.png       log-mel | CTC posteriors | words, one time axis

matplotlib is imported inside the functions with its file-only backend (Agg), so the library
loads without it and plots are drawn on machines without a display.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no window pops up
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | os.PathLike, title: str | None, dpi: int) -> Path:
    """Title, lay out and write `fig` as a PNG (its folder made if needed), then free it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def read_log(path: str | os.PathLike) -> list[dict[str, float]]:
    """log.csv rows with their numbers as floats; blank cells are left out of each row."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in rows if x in r and y in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(log_csv: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> Path:
    """Four panels over training steps: training loss (log scale), dev WER and CER (%),
    learning rate, and gradient norm before clipping. Returns the PNG's path."""
    plt = _pyplot()
    rows = read_log(log_csv)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (loss_ax, dev_ax), (lr_ax, grad_ax) = axes

    steps, loss = _series(rows, "step", "loss")
    loss_ax.plot(steps, loss, color="tab:blue", linewidth=1)
    if any(v > 0 for v in loss):
        loss_ax.set_yscale("log")
    loss_ax.set_title("training loss (CTC, per utterance)")
    loss_ax.set_ylabel("loss")

    for column, label, color in (("dev_wer", "WER", "tab:red"), ("dev_cer", "CER", "tab:orange")):
        steps, rate = _series(rows, "step", column)
        dev_ax.plot(steps, [100 * r for r in rate], marker="o", markersize=3, label=label, color=color)
        if rate:
            best = int(np.argmin(rate))
            dev_ax.annotate(f"{100 * rate[best]:.1f}", (steps[best], 100 * rate[best]),
                            textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8, color=color)
    dev_ax.set_title("dev error rates (greedy), after each epoch")
    dev_ax.set_ylabel("%")
    dev_ax.set_ylim(bottom=0)
    dev_ax.legend()

    steps, lr = _series(rows, "step", "lr")
    lr_ax.plot(steps, lr, color="tab:green", linewidth=1)
    lr_ax.set_title("learning rate")
    lr_ax.set_ylabel("lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))

    steps, grad = _series(rows, "step", "grad_norm")
    grad_ax.plot(steps, grad, color="tab:purple", linewidth=1)
    grad_ax.set_title("gradient norm (before clipping)")
    grad_ax.set_ylabel("L2 norm")
    if any(v > 0 for v in grad):
        grad_ax.set_yscale("log")
    for ax, y in ((loss_ax, "loss"), (dev_ax, "dev_cer"), (lr_ax, "lr"), (grad_ax, "grad_norm")):
        if not any(y in r for r in rows):
            ax.text(0.5, 0.5, "not logged yet", transform=ax.transAxes, ha="center", color="gray")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("training step")
    return _save(plt, fig, out, title, dpi=110)


def plot_alignment(features: np.ndarray, log_probs: np.ndarray, tokens: list[str], words: list,
                   frame_seconds: float, feature_seconds: float, out: str | os.PathLike,
                   title: str | None = None, min_probability: float = 0.05) -> Path:
    """One file on one time axis: its log-mel spectrogram (T, n_mels), the model's CTC posteriors
    (T', V) as a posteriorgram of the tokens that reach `min_probability` somewhere (rows in
    vocabulary order), and the word segments (timestamps.Word) with their confidences.
    Returns the PNG's path."""
    plt = _pyplot()
    probs = np.exp(log_probs)  # (T', V)
    shown = np.flatnonzero(probs.max(axis=0) >= min_probability)  # in vocabulary order
    labels = ["blank" if i == 0 else "space" if tokens[i] == " " else tokens[i] for i in shown]
    end = max(features.shape[0] * feature_seconds, log_probs.shape[0] * frame_seconds)

    fig, (spec_ax, post_ax, word_ax) = plt.subplots(
        3, 1, figsize=(min(4 + 2.2 * end, 40), 9), sharex=True, gridspec_kw={"height_ratios": [3, 4, 1]})
    spec_ax.imshow(features.T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                   extent=(0, features.shape[0] * feature_seconds, 0, features.shape[1]))
    spec_ax.set_ylabel("mel bin")
    spec_ax.set_title("log-mel spectrogram (normalised)")

    post_ax.imshow(probs[:, shown].T, origin="lower", aspect="auto", cmap="Blues", vmin=0, vmax=1,
                   interpolation="nearest", extent=(0, log_probs.shape[0] * frame_seconds, -0.5, len(shown) - 0.5))
    post_ax.set_yticks(range(len(shown)), labels)
    post_ax.set_ylabel("token")
    post_ax.set_title(f"CTC posteriors ({frame_seconds * 1000:.0f} ms frames; tokens reaching p = {min_probability:g})")

    for w in words:
        word_ax.axvspan(w.start, w.end, color="tab:green", alpha=0.15 + 0.5 * w.confidence)
        word_ax.text((w.start + w.end) / 2, 0.5, w.word.lower(), ha="center", va="center", fontsize=9,
                     rotation=90 if len(w.word) * 0.07 > w.end - w.start else 0)
    word_ax.set_yticks([])
    word_ax.set_ylim(0, 1)
    word_ax.set_xlim(0, end)
    word_ax.set_xlabel("time (s)")
    word_ax.set_title("words (shade: confidence)")
    return _save(plt, fig, out, title, dpi=100)


def draw_alignment(transcriber, audio: str | os.PathLike, out: str | os.PathLike,
                   text: str | None = None) -> tuple[str, list, Path]:
    """Run `transcriber` (transcribe.Transcriber) on one file and draw `plot_alignment` of it to
    `out`. With `text` (a reference transcript) the words are placed by forcing the model's
    posteriors onto that text instead of the decoded one, which shows where the model hears, or
    fails to hear, each reference word. Returns (text, words, PNG path).
    """
    import torch

    from asr.audio import SAMPLE_RATE, load_audio
    from asr.errors import AudioError, TextError
    from asr.features import HOP_LENGTH
    from asr.text import normalize_text
    from asr.timestamps import word_timestamps

    wave = load_audio(audio)
    log_probs, lengths = transcriber.log_probs([wave])
    if lengths[0] == 0:
        raise AudioError(f"{audio}: too short to give the model one frame")
    text = normalize_text(text) if text is not None else transcriber.decoder(log_probs, lengths)[0]
    log_probs = log_probs[0, : int(lengths[0])].numpy()
    try:
        words = word_timestamps(text, log_probs, transcriber.tokenizer, transcriber.frame_seconds,
                                duration=len(wave) / SAMPLE_RATE)
    except ValueError as e:  # a reference longer than the audio can spell
        raise TextError(f"{audio}: cannot align {text!r} to it ({e})") from None
    with torch.inference_mode():
        wave_t = torch.from_numpy(wave)[None].to(transcriber.device)
        features, _ = transcriber.log_mel(wave_t, torch.tensor([len(wave)], device=transcriber.device))
    heard = text.lower() or "(nothing heard)"
    title = f"{Path(audio).name}: {heard if len(heard) <= 120 else heard[:117] + '...'}"
    png = plot_alignment(features[0].cpu().numpy(), log_probs, transcriber.tokenizer.tokens, words,
                         transcriber.frame_seconds, HOP_LENGTH / SAMPLE_RATE, out, title=title)
    return text, words, png
