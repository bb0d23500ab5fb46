"""The training loop in-process, on a few tiny utterances: schedule, data checks, logging, resume."""

import csv
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asr.checkpoint import load_model_file, save_feature_stats
from asr.config import load_config
from asr.audio import load_audio
from asr.data import Problem, Utterance, collate_features, write_manifest
from asr.errors import ConfigError, ManifestError
from asr.features import N_MELS, LogMel
from asr.model import BiLSTMCTC
from asr.text import CharTokenizer
from asr import train as train_module
from asr.train import (OptimConfig, TrainConfig, TrainingInterrupted, WeightAverage, bf16_supported, lr_factor,
                       refuse_unusable, train, usable_rows)
from conftest import noise, sine, write_audio


def test_lr_schedule_by_hand():
    c = OptimConfig(warmup_steps=10, decay_start=0.5, final_lr=0.1)
    assert lr_factor(0, 0.0, c) == pytest.approx(0.1)  # linear warm-up from 1/10
    assert lr_factor(4, 0.04, c) == pytest.approx(0.5)
    assert lr_factor(9, 0.09, c) == pytest.approx(1.0)
    assert lr_factor(10, 0.1, c) == 1.0 and lr_factor(49, 0.49, c) == 1.0  # flat
    assert lr_factor(50, 0.5, c) == 1.0  # the cosine starts here
    assert lr_factor(75, 0.75, c) == pytest.approx(0.55)  # half way down: 0.1 + 0.9 * 0.5
    assert lr_factor(100, 1.0, c) == pytest.approx(0.1)
    assert lr_factor(150, 1.5, c) == pytest.approx(0.1)  # never below the floor
    assert lr_factor(4, 0.9, c) == pytest.approx(0.5)  # warm-up comes first, whatever the progress
    factors = [lr_factor(s, s / 100, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_weight_average_by_hand():
    """The average's decay ramps up as (1 + step) / (10 + step) towards `decay`."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(2.0)
    average.update(model, 0)  # decay 1/10: 0.1 * 0 + 0.9 * 2
    assert average.model.weight.item() == pytest.approx(1.8)
    with torch.no_grad():
        model.weight.fill_(4.0)
    average.update(model, 1000)  # decay capped at 0.5: 0.5 * 1.8 + 0.5 * 4
    assert average.model.weight.item() == pytest.approx(2.9)
    assert model.weight.item() == 4.0 and not average.model.weight.requires_grad
    with pytest.raises(ConfigError, match="optim.ema=1"):
        OptimConfig(ema=1.0)


def test_training_with_a_weight_average_scores_and_saves_the_average(tiny_rows, tmp_path):
    exp = tmp_path / "exp"
    train(tiny_config("epochs=2", "data.max_batch_size=2", "optim.ema=0.9"), tiny_rows, tiny_rows, exp, progress=False)
    last = load_model_file(exp / "last.pt")
    weights, average = last["train_state"]["weights"], last["model"]
    assert weights.keys() == average.keys()
    assert not all(torch.equal(weights[k], average[k]) for k in weights)  # the file holds the average
    assert "weights" not in load_model_file(exp / "best.pt").get("train_state", {})


def test_usable_rows_leaves_out_what_ctc_cannot_learn(tmp_path, caplog):
    config = load_config(TrainConfig, None, ["model.subsampling=4", "data.max_duration=10"])
    tok = CharTokenizer()
    audio = {name: str(write_audio(tmp_path / f"{name}.flac", sine(440, 0.3))) for name in "abcdef"}
    (tmp_path / "empty.flac").touch()
    rows = [
        Utterance("ok", audio["a"], 2.0, "HELLO"),
        Utterance("lower", audio["b"], 2.0, "hello"),  # outside the alphabet
        Utterance("long", audio["c"], 11.0, "HELLO"),
        Utterance("empty", audio["d"], 1.0, ""),
        # 0.2 s at 40 ms per output frame is 5 frames: too few for 6 characters.
        Utterance("short", audio["e"], 0.2, "ABCDEF"),
        Utterance("fits", audio["f"], 0.25, "ABCDE"),
        Utterance("gone", str(tmp_path / "gone.flac"), 1.0, "HELLO"),
        Utterance("zero", str(tmp_path / "empty.flac"), 1.0, "HELLO"),
    ]
    earlier = [Problem("train.jsonl:9", "", "not valid JSON", "Expecting value")]
    with caplog.at_level(logging.WARNING, logger="asr.train"):
        kept, problems = usable_rows(rows, tok, config, "train", earlier)
    assert [r.id for r in kept] == ["ok", "fits"]
    assert [(p.id, p.reason) for p in problems] == [
        ("", "not valid JSON"), ("lower", "characters outside the vocabulary"), ("long", "too long"),
        ("empty", "empty transcript"), ("short", "too short for its transcript"),
        ("gone", "audio file missing"), ("zero", "audio file empty (0 bytes)")]
    assert str(tmp_path / "gone.flac") in str(problems[5])
    for words in ("lower", "long", "empty", "short", "gone", "zero", "train.jsonl:9"):
        assert words in caplog.text
    with pytest.raises(ConfigError, match="no usable utterances"):
        refuse_unusable("train", *usable_rows(rows[1:5], tok, config, "train"), config)
    refuse_unusable("train", kept, problems, config)  # data.bad_rows=skip: the rest will do
    # Played 1.3 times faster, "fits" lasts 0.19 s: under the 5 frames its letters need.
    faster = load_config(TrainConfig, None, ["model.subsampling=4", "data.max_duration=10",
                                             "data.speeds=[1.0,1.3]"])
    assert [r.id for r in usable_rows(rows, tok, faster, "train")[0]] == ["ok"]
    # data.bad_rows=fail stops before training, with a count per reason.
    strict = load_config(TrainConfig, None, ["model.subsampling=4", "data.max_duration=10", "data.bad_rows=fail"])
    with pytest.raises(ManifestError, match=r"train: 6 unusable row\(s\) .*1 audio file missing.*data.bad_rows=skip"):
        refuse_unusable("train", *usable_rows(rows, tok, strict, "train"), strict)
    refuse_unusable("train", *usable_rows(rows[:1], tok, strict, "train"), strict)
    # For scoring, any length will do.
    assert [r.id for r in usable_rows(rows, tok, config, "dev", training=False)[0]] == ["ok", "long", "short", "fits"]
    with pytest.raises(ConfigError, match="data.bad_rows='maybe'"):
        load_config(TrainConfig, None, ["data.bad_rows=maybe"])


# ---------------------------------------------------------------------------------------------

TEXTS = ["AB", "BA", "ABBA", "BAAB"]


@pytest.fixture
def tiny_rows(tmp_path):
    rows = []
    for i, text in enumerate(TEXTS):
        seconds = 0.3 + 0.1 * i  # distinct durations: epoch 0 runs them in this order
        wave = sine(300 + 200 * i, seconds) + noise(seconds, amplitude=0.02, seed=i)
        path = write_audio(tmp_path / "audio" / f"u{i}.wav", wave)
        rows.append(Utterance(f"u{i}", str(path), seconds, text))
    return rows


def tiny_config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        "model.hidden_size=16", "model.num_layers=1", "model.conv_channels=4", "model.subsampling=2",
        "device=cpu", "data.num_workers=0", "optim.warmup_steps=3", "log_every=1", *overrides])


def read_log(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_writes_models_and_log(tiny_rows, tmp_path):
    exp = tmp_path / "exp"
    best = train(tiny_config("epochs=2", "data.max_batch_size=2"), tiny_rows, tiny_rows, exp, progress=False)
    assert set(best) == {"wer", "cer", "epoch"} and best["epoch"] in (1, 2)
    assert {p.name for p in exp.iterdir()} >= {"best.pt", "last.pt", "log.csv"}
    model = load_model_file(exp / "best.pt")
    assert "train_state" not in model  # the shipped model is weights, config and vocabulary only
    assert model["model_config"]["hidden_size"] == 16
    state = load_model_file(exp / "last.pt")["train_state"]
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (2, 4, 0)
    rows = read_log(exp / "log.csv")
    assert [r["step"] for r in rows if r["loss"]] == ["1", "2", "3", "4"]
    assert [(r["step"], r["epoch"]) for r in rows if r["dev_cer"]] == [("2", "1"), ("4", "2")]


def test_training_logs_to_tensorboard_csv_and_a_picture(tiny_rows, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tmp_path / "exp"
    train(tiny_config("epochs=3", "data.max_batch_size=2"), tiny_rows, tiny_rows, exp, progress=False)
    rows = read_log(exp / "log.csv")
    steps = [r for r in rows if r["loss"]]
    assert all(float(r["grad_norm"]) > 0 for r in steps) and len(steps) == 6
    events = EventAccumulator(str(exp / "tensorboard")).Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "train/grad_norm", "train/audio_sec_per_sec",
                                             "dev/wer_percent", "dev/cer_percent"}
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in steps]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in steps], rel=1e-3)
    cer = events.Scalars("dev/cer_percent")
    assert [e.value for e in cer] == pytest.approx([100 * float(r["dev_cer"]) for r in rows if r["dev_cer"]], rel=1e-3)
    with Image.open(exp / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 800 and image.size[1] > 500
    # Without TensorBoard, the CSV and the picture are still there.
    train(tiny_config("epochs=1", "tensorboard=false"), tiny_rows, tiny_rows, tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain" / "tensorboard").exists() and (tmp_path / "plain" / "curves.png").is_file()


def test_unusable_rows_are_listed_in_the_experiment_folder(tiny_rows, tmp_path):
    exp = tmp_path / "exp"
    rows = tiny_rows + [Utterance("gone", str(tmp_path / "gone.wav"), 0.5, "AB"),
                        Utterance("accent", tiny_rows[0].audio, 0.5, "CAF\u00c9")]
    found = {"train": [Problem("t.jsonl:3", "", "not valid JSON")], "dev": []}
    train(tiny_config("epochs=1", "data.max_batch_size=4"), rows, rows, exp, progress=False, found=found)
    lines = (exp / "problems.txt").read_text().splitlines()
    assert lines == ["train: t.jsonl:3: not valid JSON",
                     f"train: gone: audio file missing: {tmp_path / 'gone.wav'}",
                     "train: accent: characters outside the vocabulary: '\u00c9' in 'CAF\u00c9'",
                     f"dev: gone: audio file missing: {tmp_path / 'gone.wav'}",
                     "dev: accent: characters outside the vocabulary: '\u00c9' in 'CAF\u00c9'"]
    train(tiny_config("epochs=1", "data.max_batch_size=4"), tiny_rows, tiny_rows, exp, progress=False,
          resume=False)
    assert not (exp / "problems.txt").exists()  # a clean run leaves no stale list behind


@pytest.mark.parametrize("cache", ["false", "true"])
def test_audio_that_breaks_mid_training_costs_its_utterance_not_the_run(tiny_rows, tmp_path, caplog, cache):
    """A file that passed the checks but cannot be decoded when its batch comes (or when the
    features are cached) is left out with one warning naming it; the run goes on and every
    other utterance is trained on."""
    Path(tiny_rows[2].audio).write_bytes(b"RIFF\x00\x00garbage")
    exp = tmp_path / "exp"
    with caplog.at_level(logging.WARNING, logger="asr"):
        train(tiny_config("epochs=2", "data.max_batch_size=1", "save_every=0", f"data.cache_features={cache}"),
              tiny_rows, tiny_rows[:2], exp, progress=False)
    warned = [r.getMessage() for r in caplog.records if "left out of training" in r.getMessage()]
    assert len(warned) == 1 and "u2.wav" in warned[0] and "cannot decode" in warned[0]
    state = load_model_file(exp / "last.pt")["train_state"]
    # 4 steps an epoch: the one whose only utterance is gone updates nothing (it has no gradient).
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (2, 8, 0)


def test_cached_features_are_the_log_mel_of_each_utterance_and_train_alike(tiny_rows, tmp_path):
    """The cache holds each utterance's normalised log-mel as the training step would compute
    it (to float16 precision), and a run on it logs the losses of a run on the audio."""
    config = tiny_config("data.cache_features=true")
    log_mel = LogMel()
    log_mel.set_stats(torch.full((N_MELS,), -5.0), torch.full((N_MELS,), 3.0))
    cached = train_module.cached_features(tiny_rows, CharTokenizer(), log_mel, config, progress=False)
    for i, row in enumerate(tiny_rows):
        wave = torch.from_numpy(load_audio(row.audio))
        feats, frames = log_mel(wave[None], torch.tensor([len(wave)]))
        uid, got, target, text, samples = cached[i]
        assert (uid, text, samples) == (row.id, row.text, len(wave)) and got.dtype == torch.float16
        assert got.shape == (frames.item(), N_MELS)
        torch.testing.assert_close(got.float(), feats[0], atol=4e-3, rtol=1e-3)
        assert CharTokenizer().decode(target.tolist()) == row.text
    batch = collate_features([cached[1], cached[3]])
    assert batch["feats"].shape == (2, max(len(cached[i][1]) for i in (1, 3)), N_MELS)
    assert batch["frames"].tolist() == [len(cached[1][1]), len(cached[3][1])]

    # From a loader worker, as training runs it: more utterances than the process may open files.
    many = [Utterance(f"{r.id}-{k}", r.audio, r.duration, r.text) for k in range(150) for r in tiny_rows]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        cached = train_module.cached_features(many, CharTokenizer(), log_mel, tiny_config("data.num_workers=1"),
                                              progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(cached) == 600 and torch.equal(cached[599][1], cached[3][1])

    settings = ("epochs=2", "data.max_batch_size=2", "model.dropout=0")
    train(tiny_config(*settings), tiny_rows, tiny_rows, tmp_path / "audio", progress=False)
    train(tiny_config(*settings, "data.cache_features=true"), tiny_rows, tiny_rows, tmp_path / "cached",
          progress=False)
    losses = [[float(r["loss"]) for r in read_log(tmp_path / name / "log.csv") if r["loss"]]
              for name in ("audio", "cached")]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-2)


def test_resume_with_more_epochs_goes_on_with_the_saved_config(tiny_rows, tmp_path, caplog):
    exp = tmp_path / "exp"
    train(tiny_config("epochs=1", "data.max_batch_size=4"), tiny_rows, tiny_rows, exp, progress=False)
    assert load_model_file(exp / "last.pt")["train_state"]["step"] == 1
    # More epochs are honoured; a different model size is not (the weights are the saved ones).
    with caplog.at_level(logging.INFO, logger="asr.train"):
        train(tiny_config("epochs=3", "data.max_batch_size=4", "model.hidden_size=32"), tiny_rows, tiny_rows,
              exp, progress=False)
    assert "resuming from" in caplog.text
    assert "ignoring new values of: model" in caplog.text
    after = load_model_file(exp / "last.pt")
    assert after["model_config"]["hidden_size"] == 16
    assert (after["train_state"]["epoch"], after["train_state"]["step"]) == (3, 3)
    rows = read_log(exp / "log.csv")
    assert [r["step"] for r in rows if r["loss"]] == ["1", "2", "3"]  # appended, not restarted
    assert [r["epoch"] for r in rows if r["dev_cer"]] == ["1", "2", "3"]


def test_no_resume_starts_afresh(tiny_rows, tmp_path):
    exp = tmp_path / "exp"
    train(tiny_config("epochs=1", "data.max_batch_size=4"), tiny_rows, tiny_rows, exp, progress=False)
    train(tiny_config("epochs=2", "data.max_batch_size=4"), tiny_rows, tiny_rows, exp, resume=False,
          progress=False)
    assert load_model_file(exp / "last.pt")["train_state"]["step"] == 2
    assert [r["step"] for r in read_log(exp / "log.csv") if r["loss"]] == ["1", "2"]


def test_logged_loss_is_the_mean_over_the_window(tiny_rows, tmp_path):
    # With a learning rate of 0 nothing changes, so every step has the same loss.
    common = ["epochs=4", "data.max_batch_size=4", "optim.lr=0", "specaugment.enabled=false",
              "model.dropout=0"]
    train(tiny_config(*common, "log_every=1"), tiny_rows, tiny_rows, tmp_path / "every", progress=False)
    train(tiny_config(*common, "log_every=2"), tiny_rows, tiny_rows, tmp_path / "pairs", progress=False)
    every = [float(r["loss"]) for r in read_log(tmp_path / "every" / "log.csv") if r["loss"]]
    pairs = [float(r["loss"]) for r in read_log(tmp_path / "pairs" / "log.csv") if r["loss"]]
    assert len(every) == 4 and len(pairs) == 2
    assert every == pytest.approx([every[0]] * 4, rel=1e-4)  # the premise: a constant loss
    assert pairs == pytest.approx([every[0]] * 2, rel=1e-4)


def test_bf16_trains_where_the_cpu_has_it_and_falls_back_where_not(tiny_rows, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="asr.train"):
        train(tiny_config("epochs=2", "data.max_batch_size=4", "bf16=true"), tiny_rows, tiny_rows,
              tmp_path / "exp", progress=False)
    if bf16_supported(torch.device("cpu")):
        assert "device cpu (bf16)" in caplog.text
    else:
        assert "no native bf16" in caplog.text and "(bf16)" not in caplog.text
    losses = [float(r["loss"]) for r in read_log(tmp_path / "exp" / "log.csv") if r["loss"]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    model = load_model_file(tmp_path / "exp" / "best.pt")["model"]
    assert all(v.dtype == torch.float32 for v in model.values() if v.is_floating_point())  # fp32 weights


def test_stats_only_writes_the_statistics_that_training_then_reads(tiny_rows, tmp_path, caplog):
    from asr.checkpoint import load_feature_stats

    exp = tmp_path / "exp"
    assert train(tiny_config("epochs=1"), tiny_rows, tiny_rows, exp, progress=False, stats_only=True) == {}
    assert sorted(p.name for p in exp.iterdir()) == ["feature_stats.pt"]  # and nothing else
    stats = load_feature_stats(exp / "feature_stats.pt")
    assert stats["mean"].shape == stats["std"].shape == (80,) and (stats["std"] > 0).all()
    # Training takes them from the file: doctored statistics end up in the model file as they are.
    from asr.checkpoint import save_feature_stats

    save_feature_stats({"mean": torch.full((80,), 3.0), "std": torch.full((80,), 2.0)}, exp / "feature_stats.pt")
    with caplog.at_level(logging.INFO, logger="asr.train"):
        train(tiny_config("epochs=1", "data.max_batch_size=4"), tiny_rows, tiny_rows, exp, progress=False)
    assert "feature statistics from" in caplog.text
    model = load_model_file(exp / "best.pt")
    assert torch.equal(model["feature_stats"]["mean"], torch.full((80,), 3.0))
    assert model["train_config"]["epochs"] == 1


def test_a_file_without_statistics_is_refused(tmp_path):
    from asr.checkpoint import load_feature_stats, save_feature_stats
    from asr.errors import ModelFileError

    path = tmp_path / "stats.pt"
    save_feature_stats({"mean": [0.0]}, path)
    with pytest.raises(ModelFileError, match="stats.pt: holds no feature statistics"):
        load_feature_stats(path)
    with pytest.raises(ModelFileError, match="gone.pt: no such feature statistics file"):
        load_feature_stats(tmp_path / "gone.pt")


@pytest.mark.parametrize("setting", ["data.cache_features=false", "data.cache_features=true", "optim.ema=0.9"])
def test_a_signal_on_an_epochs_last_step_leaves_its_dev_scores_to_the_resumed_run(tiny_rows, tmp_path, monkeypatch,
                                                                                   setting):
    """Stopped right after the last step of epoch 2 (of 3, two steps each), the run saves before
    scoring dev; resuming scores that epoch first, so log, best model and weights are the
    straight run's (with cached features too: the resumed run computes the same ones; with a
    weight average, both the average and the weights being trained come back)."""
    config = ("epochs=3", "data.max_batch_size=2", setting)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny_config(*config), tiny_rows, tiny_rows, straight, progress=False)

    calls, step = [], train_module.optimizer_step

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # caught: the step finishes, then training stops
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", step_then_signal)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(*config), tiny_rows, tiny_rows, stopped, progress=False)
    state = load_model_file(stopped / "last.pt")["train_state"]
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (1, 4, 2)  # epoch 2 not yet scored
    assert [r["epoch"] for r in read_log(stopped / "log.csv") if r["dev_cer"]] == ["1"]

    monkeypatch.setattr(train_module, "optimizer_step", step)
    train(tiny_config(*config), tiny_rows, tiny_rows, stopped, progress=False)
    assert comparable(stopped) == comparable(straight)
    assert [r["epoch"] for r in read_log(stopped / "log.csv") if r["dev_cer"]] == ["1", "2", "3"]
    for name in ("last.pt", "best.pt"):
        ours, theirs = load_model_file(stopped / name)["model"], load_model_file(straight / name)["model"]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ours, theirs = (load_model_file(exp / "last.pt")["train_state"].get("weights", {}) for exp in (stopped, straight))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --------------------------------------------------------------------------------------------
# Stopping a real `asr train` process: SIGTERM (as a batch scheduler sends) and kill -9.

KILL_SETTINGS = ["model.hidden_size=16", "model.num_layers=1", "model.conv_channels=4", "model.subsampling=2",
                 "data.num_workers=1", "optim.warmup_steps=3", "log_every=1", "save_every=1",
                 "data.max_batch_size=1", "data.stats_utterances=1", "data.speeds=[0.9,1.0,1.1]",
                 "model.dropout=0.2", "epochs=30"]


def start_training(manifest: Path, exp: Path) -> subprocess.Popen:
    args = [a for s in KILL_SETTINGS for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "asr.cli", "train", "--train", manifest, "--dev", manifest,
                             "--exp-dir", exp, "--no-progress", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_steps(exp: Path, steps: int, process: subprocess.Popen) -> None:
    """Until log.csv shows `steps` logged steps (one a step here) or the process ends."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (exp / "log.csv").exists() and sum(1 for r in read_log(exp / "log.csv") if r["loss"]) >= steps:
            return
        time.sleep(0.01)
    raise AssertionError(f"training ended or stalled before step {steps}: {process.communicate()[1][-2000:]}")


def comparable(exp: Path) -> list[tuple]:
    return [tuple(r[c] for c in ("step", "epoch", "loss", "lr", "dev_wer", "dev_cer")) for r in read_log(exp / "log.csv")]


def test_stopped_and_killed_runs_resume_exactly(tiny_rows, tmp_path):
    """SIGTERM saves and exits with 143; kill -9 loses only what came after the last save. Both
    resume to the losses, log and weights of a run never stopped (speed perturbation, dropout,
    SpecAugment and a data-loader worker all draw random numbers along the way)."""
    manifest = tmp_path / "train.jsonl"
    write_manifest(tiny_rows, manifest)
    straight = tmp_path / "straight"
    done = start_training(manifest, straight)
    assert done.wait(timeout=300) == 0, done.stderr.read()[-2000:]
    total = load_model_file(straight / "last.pt")["train_state"]["step"]
    assert total == 120

    termed = tmp_path / "termed"
    process = start_training(manifest, termed)
    wait_for_steps(termed, 10, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    state = load_model_file(termed / "last.pt")["train_state"]
    assert f"stopped by SIGTERM at step {state['step']}" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert 10 <= state["step"] < total, stderr[-3000:]
    assert [r["step"] for r in read_log(termed / "log.csv") if r["loss"]][-1] == str(state["step"])

    killed = tmp_path / "killed"
    process = start_training(manifest, killed)
    wait_for_steps(killed, 30, process)
    process.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    process.communicate(timeout=60)
    assert load_model_file(killed / "last.pt")["train_state"]["step"] < total

    for exp in (termed, killed):
        resumed = start_training(manifest, exp)
        _, stderr = resumed.communicate(timeout=300)
        assert resumed.returncode == 0 and "resuming from" in stderr, stderr[-2000:]
        assert comparable(exp) == comparable(straight), (exp.name, stderr[-3000:])
        a, b = load_model_file(straight / "last.pt"), load_model_file(exp / "last.pt")
        for key, value in a["model"].items():
            assert torch.equal(b["model"][key], value), key


# --------------------------------------------------------------------------------------------
# Gradient accumulation and torchrun DDP: the same steps, however the batches are spread.

EQUAL_SETTINGS = ["epochs=2", "data.max_batch_size=1", "model.dropout=0", "specaugment.enabled=false",
                  "data.sorted_first_epoch=true", "save_every=0"]


def test_accumulating_two_batches_is_one_step_on_both(tiny_rows, tmp_path):
    """Batches of 1 accumulated in pairs make the steps that batches of 2 make (the model's
    output does not depend on padding, and the loss is a mean over utterances either way)."""
    train(tiny_config(*EQUAL_SETTINGS, "epochs=1", "optim.grad_accum=2"), tiny_rows, tiny_rows,
          tmp_path / "accum", progress=False)
    train(tiny_config(*EQUAL_SETTINGS, "epochs=1", "data.max_batch_size=2"), tiny_rows, tiny_rows,
          tmp_path / "pairs", progress=False)
    a, b = read_log(tmp_path / "accum" / "log.csv"), read_log(tmp_path / "pairs" / "log.csv")
    assert [r["step"] for r in a if r["loss"]] == ["1", "2"]
    for column in ("loss", "grad_norm"):
        assert [float(r[column]) for r in a if r["loss"]] == pytest.approx(
            [float(r[column]) for r in b if r["loss"]], rel=1e-4)
    wa, wb = load_model_file(tmp_path / "accum" / "last.pt")["model"], load_model_file(tmp_path / "pairs" / "last.pt")["model"]
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5), key
    state = load_model_file(tmp_path / "accum" / "last.pt")["train_state"]
    assert (state["step"], state["batch_in_epoch"], state["epoch"]) == (2, 0, 1)
    with pytest.raises(ConfigError, match="grad_accum"):
        tiny_config("optim.grad_accum=0")


def test_non_finite_gradients_skip_their_steps_and_leave_the_weights_alone(tiny_rows, tmp_path, caplog):
    """Feature statistics with a NaN make every gradient NaN: each step is skipped on the device
    (the fused optimizer's found_inf, no host sync), counted and warned; the weights, the Adam
    moments and its step count stay as initialised, where an unguarded step would fill them with NaN."""
    exp = tmp_path / "exp"
    save_feature_stats({"mean": torch.zeros(N_MELS), "std": torch.full((N_MELS,), float("nan"))},
                       exp / "feature_stats.pt")
    config = tiny_config("epochs=1", "data.max_batch_size=2")
    with caplog.at_level(logging.WARNING, logger="asr.train"):
        train(config, tiny_rows, tiny_rows, exp, progress=False)
    assert "2 step(s) with a non-finite gradient" in caplog.text
    saved = load_model_file(exp / "last.pt")
    assert saved["train_state"]["step"] == 2
    torch.manual_seed(config.seed)
    initial = BiLSTMCTC(config.model, len(CharTokenizer())).state_dict()
    for key, value in initial.items():
        assert torch.equal(saved["model"][key], value), key
    assert all(float(s["step"]) == 0 for s in saved["train_state"]["optimizer"]["state"].values())
    assert [r["grad_norm"] for r in read_log(exp / "log.csv") if r["loss"]] == ["0", "0"]  # no finite norm to average


def test_torchrun_two_processes_make_the_steps_of_one_accumulating_two(tiny_rows, tmp_path):
    """2 gloo processes (each a batch a step, gradients averaged by DDP) log the losses of one
    process stepping on pairs of batches; rank 0 alone writes the files."""
    manifest = tmp_path / "train.jsonl"
    write_manifest(tiny_rows, manifest)
    settings = [*EQUAL_SETTINGS, "model.hidden_size=16", "model.num_layers=1", "model.conv_channels=4",
                "model.subsampling=2", "data.num_workers=0", "optim.warmup_steps=3", "log_every=1", "device=cpu"]
    args = [a for s in settings for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train", "--train", manifest, "--dev", manifest, "--no-progress"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29500 + os.getpid() % 1000), "-m", "asr.cli", *common,
                          "--exp-dir", tmp_path / "ddp", *args], capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "asr.cli", *common, "--exp-dir", tmp_path / "one", *args,
                          "--set", "optim.grad_accum=2"], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = read_log(tmp_path / "ddp" / "log.csv"), read_log(tmp_path / "one" / "log.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len([r for r in a if r["loss"]]) == 4
    for column in ("loss", "grad_norm", "lr", "dev_wer", "dev_cer"):
        assert [float(r[column]) for r in a if r[column]] == pytest.approx(
            [float(r[column]) for r in b if r[column]], rel=1e-4, abs=1e-6), column
    assert ddp.stderr.count("model: ") == 1  # rank 0 alone logs
    state = load_model_file(tmp_path / "ddp" / "last.pt")["train_state"]
    assert state["step"] == 4 and len(state["rng_by_rank"]) == 2
