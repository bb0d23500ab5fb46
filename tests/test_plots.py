"""Learning curves and alignment pictures: readable PNGs of the right things.

A picture cannot be checked by eye in a test, so these check what can be: the file is a PNG of
a sensible size, the numbers drawn are the numbers logged, and `asr align` places the words
where the model's alignment says, for decoded and for reference text.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from asr.plots import plot_alignment, plot_curves, read_log
from asr.text import CharTokenizer
from asr.timestamps import Word
from conftest import run_asr, sine, write_audio


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        return image.size


def write_log(path, rows: list[dict]) -> None:
    columns = ["step", "epoch", "minutes", "loss", "lr", "grad_norm", "audio_sec_per_sec", "dev_wer", "dev_cer"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def test_read_log_keeps_only_the_cells_that_were_written(tmp_path):
    write_log(tmp_path / "log.csv", [{"step": 1, "epoch": 1, "loss": 3.5, "lr": 1e-4},
                                     {"step": 2, "epoch": 1, "dev_wer": 0.5, "dev_cer": 0.25}])
    assert read_log(tmp_path / "log.csv") == [{"step": 1.0, "epoch": 1.0, "loss": 3.5, "lr": 1e-4},
                                              {"step": 2.0, "epoch": 1.0, "dev_wer": 0.5, "dev_cer": 0.25}]


def test_curves_png(tmp_path):
    rows = []
    for step in range(1, 201):
        rows.append({"step": step, "epoch": 1 + step // 50, "loss": 100 / step, "lr": 1e-3 * min(1, step / 20),
                     "grad_norm": 5 / step ** 0.5})
        if step % 50 == 0:
            rows.append({"step": step, "epoch": step // 50, "dev_wer": 1 / step, "dev_cer": 0.3 / step})
    write_log(tmp_path / "log.csv", rows)
    width, height = png_size(plot_curves(tmp_path / "log.csv", tmp_path / "out" / "curves.png", title="run"))
    assert width >= 1000 and height >= 700
    # A log with no dev rows yet (training still in its first epoch) draws too.
    write_log(tmp_path / "early.csv", rows[:10])
    png_size(plot_curves(tmp_path / "early.csv", tmp_path / "early.png"))


def test_alignment_png_grows_with_the_audio(tmp_path):
    tokens = CharTokenizer().tokens
    rng = np.random.default_rng(0)
    sizes = []
    for seconds in (2, 8):
        frames = 25 * seconds
        log_probs = np.log(rng.dirichlet(np.full(len(tokens), 0.1), size=frames))
        words = [Word("HELLO", 0.1, 0.6, 0.9), Word("WORLD", 0.7, 1.5, 0.4)]
        png = plot_alignment(rng.standard_normal((100 * seconds, 80)), log_probs, tokens, words,
                             frame_seconds=0.04, feature_seconds=0.01, out=tmp_path / f"{seconds}.png", title="t")
        sizes.append(png_size(png))
    assert sizes[1][0] > sizes[0][0] and sizes[0][1] == sizes[1][1]  # wider for longer audio, same height


@pytest.mark.slow
def test_asr_align_draws_decoded_and_reference_text(trained, tmp_path):
    uid, text = next(iter(trained.texts.items()))
    audio = next(trained.corpus.rglob(f"{uid}.flac"))
    done = run_asr("align", "--model", trained.exp / "best.pt", audio, "-o", tmp_path / "decoded.png")
    assert done.returncode == 0, done.stderr
    head, *word_lines = done.stdout.splitlines()
    assert head == f"{audio}\t{text}\t-> {tmp_path / 'decoded.png'}"  # the tiny model knows this one
    words = [line.split() for line in word_lines]
    assert [w[3] for w in words] == text.split()
    starts, ends = [float(w[0]) for w in words], [float(w[1]) for w in words]
    assert all(s < e for s, e in zip(starts, ends)) and all(e <= s for e, s in zip(ends, starts[1:]))
    png_size(tmp_path / "decoded.png")

    # Forced onto other words of the same length, the alignment still places each one; the
    # confidences say the model did not hear them.
    other = " ".join("X" * len(w) for w in text.split())
    done = run_asr("align", "--model", trained.exp / "best.pt", audio, "--text", other, "-o", tmp_path / "forced.png")
    assert done.returncode == 0, done.stderr
    forced = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [w[3] for w in forced] == other.split()
    assert max(float(w[2]) for w in forced) < 0.1 < min(float(w[2]) for w in words)
    png_size(tmp_path / "forced.png")

    # A reference longer than the audio can spell, and a file that is not audio: one line each.
    short = write_audio(tmp_path / "short.wav", sine(300, 0.2))
    done = run_asr("align", "--model", trained.exp / "best.pt", short, "--text", "A" * 40, "-o", tmp_path / "x.png")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "short.wav" in done.stderr and "cannot align" in done.stderr
    (tmp_path / "text.wav").write_text("not audio")
    done = run_asr("align", "--model", trained.exp / "best.pt", tmp_path / "text.wav")
    assert done.returncode == 1 and "text.wav" in done.stderr and "Traceback" not in done.stderr
