"""The training loop in-process, on a few tiny utterances: schedule, data checks, logging, resume."""

import csv
import logging
import math
import random
import shutil

import pytest
import torch

from asr.checkpoint import load_model_file
from asr.config import load_config
from asr.data import Utterance
from asr.errors import AudioError, ConfigError
from asr.text import CharTokenizer
from asr.train import OptimConfig, TrainConfig, bf16_supported, lr_factor, train, usable_rows
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


def test_usable_rows_leaves_out_what_ctc_cannot_learn(caplog):
    config = load_config(TrainConfig, None, ["model.subsampling=4", "data.max_duration=10"])
    tok = CharTokenizer()
    rows = [
        Utterance("ok", "a.flac", 2.0, "HELLO"),
        Utterance("lower", "b.flac", 2.0, "hello"),  # outside the alphabet
        Utterance("long", "c.flac", 11.0, "HELLO"),
        Utterance("empty", "d.flac", 1.0, ""),
        # 0.2 s at 40 ms per output frame is 5 frames: too few for 6 characters.
        Utterance("short", "e.flac", 0.2, "ABCDEF"),
        Utterance("fits", "f.flac", 0.25, "ABCDE"),
    ]
    with caplog.at_level(logging.WARNING, logger="asr.train"):
        kept = usable_rows(rows, tok, config, "train")
    assert [r.id for r in kept] == ["ok", "fits"]
    log = caplog.text
    for uid in ("lower", "long", "empty", "short"):
        assert uid in log
    with pytest.raises(ConfigError, match="no usable utterances"):
        usable_rows(rows[1:5], tok, config, "train")
    # Played 1.3 times faster, "fits" lasts 0.19 s: under the 5 frames its letters need.
    faster = load_config(TrainConfig, None, ["model.subsampling=4", "data.max_duration=10",
                                             "data.speeds=[1.0,1.3]"])
    assert [r.id for r in usable_rows(rows, tok, faster, "train")] == ["ok"]


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


def test_resume_mid_epoch_is_exact(tiny_rows, tmp_path):
    """A run stopped mid-epoch and resumed ends with the weights of a run never stopped."""
    overrides = ["epochs=2", "data.max_batch_size=1", "save_every=1", "model.dropout=0.2",
                 "specaugment_from_epoch=1", "data.stats_utterances=1", "data.speeds=[0.9,1.0,1.1]"]
    straight = tmp_path / "straight"
    train(tiny_config(*overrides), tiny_rows, tiny_rows, straight, progress=False)

    # Stop the second run at the 3rd step of epoch 0 (sorted: the 3rd shortest utterance) by
    # taking its file away. data.stats_utterances=1 reads only one other utterance beforehand.
    interrupted = tmp_path / "interrupted"
    victim = tiny_rows[2].audio
    assert random.Random(0).sample(tiny_rows, 1)[0].audio != victim
    shutil.move(victim, victim + ".away")
    with pytest.raises(AudioError, match="u2.wav"):
        train(tiny_config(*overrides), tiny_rows, tiny_rows, interrupted, progress=False)
    state = load_model_file(interrupted / "last.pt")["train_state"]
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (0, 2, 2)
    shutil.move(victim + ".away", victim)
    train(tiny_config(*overrides), tiny_rows, tiny_rows, interrupted, progress=False)

    a, b = load_model_file(straight / "last.pt"), load_model_file(interrupted / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    columns = ("step", "epoch", "loss", "lr", "dev_wer", "dev_cer")  # not the clock's columns
    keep = lambda rows: [tuple(r[c] for c in columns) for r in rows]  # noqa: E731
    assert keep(read_log(interrupted / "log.csv")) == keep(read_log(straight / "log.csv"))


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
