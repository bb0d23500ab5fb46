"""The `asr` command end to end: prepare -> train -> evaluate / transcribe -> resume.

The session's `trained` fixture (conftest.py) runs `asr prepare librispeech` and `asr train` once
on a few sentences spoken by espeak-ng; the tests here check what those runs wrote and drive
the trained model through the other commands, each in a fresh interpreter as a user would.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import asr
from asr.checkpoint import load_model_file
from asr.cli import main
from conftest import E2E_EPOCHS, E2E_SETTINGS, read_jsonl, run_asr, sine, write_audio

# ---------------------------------------------------------------------------------------------
# Help and usage: in-process (fast), plus the installed console script once.


@pytest.mark.parametrize("argv, expected", [
    ([], ["prepare", "train", "transcribe", "evaluate"]),
    (["prepare"], ["librispeech", "synthetic"]),
    (["prepare", "librispeech"], ["--corpus-dir", "--splits", "--out"]),
    (["prepare", "synthetic"], ["--out", "--train-speakers", "--seed"]),
    (["train"], ["--config", "--train", "--dev", "--exp-dir", "--set", "--no-resume", "KEY=VALUE"]),
    (["transcribe"], ["--model", "--device", "audio", "--decoder", "--lm", "--timestamps", "--format"]),
    (["lm", "build"], ["--order", "--out"]),
    (["tune-lm"], ["--lm-weights", "--word-bonuses", "--save"]),
    (["evaluate"], ["--model", "--manifest", "--report-dir", "--device"]),
    (["validate"], ["manifest", "--config", "--set", "--decode-audio", "data.bad_rows"]),
])
def test_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out


def test_console_script_help():
    script = shutil.which("asr", path=str(Path(sys.executable).parent))
    assert script, "the `asr` console script is not installed beside this Python"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "usage: asr" in done.stdout and "transcribe" in done.stdout


@pytest.mark.parametrize("argv", [[], ["train"], ["transcribe", "--model", "m.pt"], ["frobnicate"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage:" in capsys.readouterr().err


def error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"asr {command}: error:")]


def test_bad_config_is_one_line_and_exit_1(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    code = main(["train", "--train", str(manifest), "--dev", str(manifest), "--exp-dir", str(tmp_path / "exp"),
                 "--set", "model.hiden_size=8"])
    assert code == 1
    (line,) = error_lines(capsys.readouterr().err, "train")
    assert "unknown config key model.hiden_size" in line


def test_missing_model_file(tmp_path, capsys):
    audio = write_audio(tmp_path / "a.wav", sine(440, 0.2))
    assert main(["transcribe", "--model", str(tmp_path / "none.pt"), str(audio)]) == 1
    (line,) = error_lines(capsys.readouterr().err, "transcribe")
    assert "none.pt" in line and "no such model file" in line


@pytest.fixture
def restore_logging():
    """`asr train` adds a file handler for EXP_DIR/train.log to the root logger: take it off again."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()


def test_bad_manifest_line(tmp_path, capsys, restore_logging):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav", "duration": 1.0, "text": "A"}\n{oops\n')
    args = ["train", "--train", str(manifest), "--dev", str(manifest), "--exp-dir", str(tmp_path / "exp")]
    assert main(args + ["--set", "data.bad_rows=fail"]) == 1
    (line,) = error_lines(capsys.readouterr().err, "train")
    assert f"{manifest}:2: not valid JSON" in line and "1 audio file missing" in line
    # Skipping, both rows go (the only audio file is missing): nothing is left to train on.
    assert main(args) == 1
    (line,) = error_lines(capsys.readouterr().err, "train")
    assert "no usable utterances" in line
    assert f"train: {manifest}:2: not valid JSON" in (tmp_path / "exp" / "problems.txt").read_text()


def test_validate_lists_every_unusable_row(tmp_path, capsys):
    write_audio(tmp_path / "good.flac", sine(440, 1.0))
    cut = tmp_path / "cut.flac"
    cut.write_bytes(write_audio(tmp_path / "whole.flac", sine(440, 3.0) + 0.01 * np.random.randn(48000).astype("float32"))
                    .read_bytes()[:3000])
    (tmp_path / "empty.wav").touch()
    rows = [("ok", "good.flac", 1.0, "HELLO"), ("lower", "good.flac", 1.0, "h\u00e9llo"),
            ("gone", "gone.flac", 1.0, "HI"), ("empty", "empty.wav", 1.0, "HI"), ("blank", "good.flac", 1.0, ""),
            ("long", "good.flac", 40.0, "HI"), ("short", "good.flac", 0.05, "HELLO THERE"),
            ("cut", "cut.flac", 3.0, "HI"), ("wrong", "good.flac", 2.5, "HI")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "audio": a, "duration": d, "text": t}) + "\n"
                                for i, a, d, t in rows) + "{oops\n")
    assert main(["validate", str(manifest)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 7
    for words in ("lower: characters outside the vocabulary", f"gone: audio file missing: {tmp_path / 'gone.flac'}",
                  "empty: audio file empty", "blank: empty transcript", "long: too long: 40 s > 30 s",
                  "short: too short for its transcript", f"{manifest}:10: not valid JSON"):
        assert sum(words in line for line in lines) == 1, words
    assert "cut" not in out and "wrong" not in out  # only opening the audio finds those
    assert f"{manifest}: 10 rows, 7 unusable" in err
    # Opening every file also finds the truncated one and the duration that disagrees with its file.
    assert main(["validate", str(manifest), "--decode-audio", "--set", "data.max_duration=50"]) == 1
    out = capsys.readouterr().out
    assert "long: too long" not in out  # the limit comes from the training config
    assert sum("cut: audio unreadable" in line and "cut.flac: truncated" in line for line in out.splitlines()) == 1
    assert sum("wrong: duration differs from the audio file's: 2.5 s in the manifest, 1.000 s" in line
               for line in out.splitlines()) == 1
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"id": "ok", "audio": "good.flac", "duration": 1.0, "text": "HELLO"}) + "\n")
    assert main(["validate", str(clean), "--decode-audio"]) == 0
    assert f"{clean}: 1 rows, 0 unusable (all usable)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# End to end on the session's trained model.

def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def transcribed(stdout: str) -> dict[str, str]:
    """{file: text} from `asr transcribe` output lines '<file>\\t<text>'."""
    return dict(line.split("\t", 1) for line in stdout.splitlines() if "\t" in line)


@pytest.mark.slow
def test_prepare_wrote_the_manifest(trained):
    rows = read_jsonl(trained.manifest)
    assert [r["text"] for r in rows] == list(trained.texts.values())
    assert [r["id"] for r in rows] == list(trained.texts)
    for r in rows:
        audio = trained.manifest.parent / r["audio"]
        assert audio.is_file()
        assert r["duration"] == pytest.approx(sf.info(audio).duration, abs=1e-3)
    assert "train: 8 utterances" in trained.prepare.stdout
    assert "skipped 100-7-0099" in trained.prepare.stderr and "no audio file" in trained.prepare.stderr


@pytest.mark.slow
def test_training_learned(trained):
    exp = trained.exp
    assert (exp / "best.pt").is_file() and (exp / "last.pt").is_file() and (exp / "train.log").is_file()
    log = read_log(exp / "log.csv")
    losses = [float(r["loss"]) for r in log if r["loss"]]
    assert len(losses) >= 10
    assert losses[-1] < 0.1 * losses[0], losses
    dev_cer = [float(r["dev_cer"]) for r in log if r["dev_cer"]]
    assert len(dev_cer) == E2E_EPOCHS
    assert min(dev_cer) <= 0.05
    best = load_model_file(exp / "best.pt")
    assert "train_state" not in best
    assert best["model_config"]["hidden_size"] == 96
    assert re.search(r"best dev: WER [\d.]+%  CER [\d.]+%", trained.train.stdout)


def score_table(stdout: str) -> dict[str, dict]:
    """{set: {column: cell}} from the markdown table `asr evaluate` prints."""
    lines = [line.strip().strip("|").split("|") for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in lines[2:]}


@pytest.mark.slow
def test_evaluate_scores_and_writes_the_report(trained, tmp_path):
    results = tmp_path / "exp" / "RESULTS.md"
    done = run_asr("evaluate", "--model", trained.exp / "best.pt", "--manifest", trained.manifest,
                   "--report-dir", tmp_path / "reports", "--results", results)
    assert done.returncode == 0, done.stderr
    table = score_table(done.stdout)
    written = results.read_text()
    assert score_table(written) == table  # the printed table, and with it what reproduces it
    assert re.search(r"^- commit: ([0-9a-f]{7,}( \+changes)?|unknown .*)$", written, re.M), written
    assert re.search(r"^- model: \d+\.\d\d M parameters; .*hidden_size=", written, re.M), written
    assert "- decoding: greedy" in written
    assert "rnn_type: gru" in written and "epochs: " in written  # the training configuration
    assert list(table) == ["train"]
    cer = float(table["train"]["CER %"])
    assert cer <= 5.0, done.stdout
    assert table["train"]["utterances"] == "8" and table["train"]["words"] == "22"
    report = tmp_path / "reports" / "train.errors.jsonl"
    assert table["train"]["per-utterance errors"] == str(report)
    rows = read_jsonl(report)
    assert sorted(r["id"] for r in rows) == sorted(trained.texts)
    for r in rows:
        assert r["reference"] == trained.texts[r["id"]]
        assert {"hypothesis", "word_errors", "words", "char_errors", "chars"} <= set(r)
    errors = [r["word_errors"] for r in rows]
    assert errors == sorted(errors, reverse=True)  # worst first
    chars = sum(r["chars"] for r in rows)
    assert 100 * sum(r["char_errors"] for r in rows) / chars == pytest.approx(cer, abs=0.01)
    # The error report beside it: its totals are the printed table's.
    error_report = json.loads((tmp_path / "reports" / "train.report.json").read_text())
    summary = error_report["summary"]
    assert summary["utterances"] == 8 and summary["words"]["reference"] == 22
    assert f"{100 * summary['words']['rate']:.2f}" == table["train"]["WER %"]
    assert f"{100 * summary['characters']['rate']:.2f}" == table["train"]["CER %"]
    assert summary["characters"]["reference"] == chars
    assert sorted(u["id"] for u in error_report["utterances"]) == sorted(trained.texts)
    assert all(u["duration"] > 0 for u in error_report["utterances"])  # from the manifest
    assert [b["utterances"] for b in error_report["by_speaker"]] == [8]  # ids "100-7-...": speaker 100
    markdown = (tmp_path / "reports" / "train.report.md").read_text()
    assert markdown.startswith("# Error report: train\n")
    assert f"| words | 8 | 22 | {summary['words']['correct']} |" in markdown


@pytest.mark.slow
def test_evaluate_goes_on_past_bad_inputs(trained, tmp_path):
    rows = read_jsonl(trained.manifest)
    for r in rows:
        r["audio"] = str(trained.manifest.parent / r["audio"])
    rows.append({"id": "gone", "audio": str(tmp_path / "gone.flac"), "duration": 1.0, "text": "GONE"})
    with_missing = tmp_path / "with-missing.jsonl"
    with_missing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{oops\n")
    done = run_asr("evaluate", "--model", trained.exp / "best.pt", "--manifest", broken, with_missing,
                   trained.manifest)
    assert done.returncode == 1
    errors = error_lines(done.stderr, "evaluate")
    assert len(errors) == 2
    assert f"{broken}:2" in errors[0] and "not valid JSON" in errors[0]
    assert "gone.flac" in errors[1] and "no such file" in errors[1]
    table = score_table(done.stdout)
    assert list(table) == ["broken", "with-missing", "train"]  # each scored on the rows it could use
    assert table["broken"]["utterances"] == "1"
    assert table["with-missing"]["utterances"] == "8"
    assert table["with-missing"]["CER %"] == table["train"]["CER %"]
    assert (trained.exp / "with-missing.errors.jsonl").is_file()  # default: beside the model
    assert (trained.exp / "with-missing.report.md").is_file() and (trained.exp / "with-missing.report.json").is_file()


@pytest.fixture(scope="module")
def copies(trained, tmp_path_factory):
    """Training utterances in other containers: the espeak WAV (22.05 kHz) and a stereo 44.1 kHz WAV."""
    from asr.audio import load_audio

    folder = tmp_path_factory.mktemp("copies")
    ids = list(trained.texts)
    flac = next(trained.corpus.rglob(f"{ids[0]}.flac"))
    wav = Path(shutil.copy(trained.espeak_wavs[ids[1]], folder / "b.wav"))
    mono = load_audio(trained.espeak_wavs[ids[2]], sample_rate=44100)
    stereo = write_audio(folder / "stereo.wav", np.stack([mono, 0.5 * mono], axis=1), 44100)
    assert sf.info(stereo).channels == 2 and sf.info(stereo).samplerate == 44100
    return {flac: trained.texts[ids[0]], wav: trained.texts[ids[1]], stereo: trained.texts[ids[2]]}


@pytest.mark.slow
def test_transcribe_files(trained, copies):
    done = run_asr("transcribe", "--model", trained.exp / "best.pt", *copies)
    assert done.returncode == 0, done.stderr
    assert transcribed(done.stdout) == {str(path): text for path, text in copies.items()}
    assert len(done.stdout.splitlines()) == len(copies)


@pytest.mark.slow
def test_transcribe_reports_bad_files_and_goes_on(trained, copies, tmp_path):
    missing = tmp_path / "missing.wav"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    good = list(copies)
    done = run_asr("transcribe", "--model", trained.exp / "best.pt", good[0], missing, good[1], empty)
    assert done.returncode == 1
    assert transcribed(done.stdout) == {str(good[0]): copies[good[0]], str(good[1]): copies[good[1]]}
    errors = error_lines(done.stderr, "transcribe")
    assert len(errors) == 2
    assert str(missing) in errors[0] and "no such file" in errors[0]
    assert str(empty) in errors[1] and "empty" in errors[1]


@pytest.mark.slow
def test_python_api(trained, copies):
    model = asr.load_model(trained.exp / "best.pt", device="cpu")
    uid = list(trained.texts)[3]
    from asr.audio import load_audio

    samples = load_audio(trained.espeak_wavs[uid], sample_rate=44100)
    assert model.transcribe(samples, sample_rate=44100) == trained.texts[uid]
    stereo = np.stack([samples, samples], axis=1)  # (samples, channels)
    assert model.transcribe(stereo, sample_rate=44100) == trained.texts[uid]
    path, text = next(iter(copies.items()))
    assert model.transcribe(str(path)) == text
    read, rate = sf.read(trained.espeak_wavs[uid])  # float64 at 22.05 kHz, as the README shows
    assert model.transcribe(read, sample_rate=rate) == trained.texts[uid]
    assert model.transcribe(np.zeros(0, np.float32), sample_rate=16000) == ""
    with pytest.raises(ValueError, match="sample_rate"):
        model.transcribe(samples)
    with pytest.raises(asr.AudioError, match="nope.wav"):
        model.transcribe(Path("nope.wav"))


@pytest.mark.slow
def test_resume_with_more_epochs(trained, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(trained.exp, exp)
    before = load_model_file(exp / "last.pt")["train_state"]
    assert (before["epoch"], before["step"]) == (E2E_EPOCHS, E2E_EPOCHS)
    more = E2E_EPOCHS + 3
    overrides = [a for s in E2E_SETTINGS + [f"epochs={more}"] for a in ("--set", s)]
    done = run_asr("train", "--train", trained.manifest, "--dev", trained.manifest, "--exp-dir", exp,
                   "--no-progress", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    assert "resuming from" in (exp / "train.log").read_text()
    after = load_model_file(exp / "last.pt")["train_state"]
    assert (after["epoch"], after["step"]) == (more, more)
    log = read_log(exp / "log.csv")
    dev_epochs = [int(r["epoch"]) for r in log if r["dev_cer"]]
    assert dev_epochs == list(range(1, more + 1))  # the same log, continued


def test_evaluate_names_sets_so_reports_never_collide():
    from asr.cli import _set_names

    assert _set_names([Path("a/dev.jsonl"), Path("a/test.jsonl")]) == ["dev", "test"]
    assert _set_names([Path("ho/manifest.jsonl"), Path("lj/manifest.jsonl"), Path("a/dev.jsonl")]) == [
        "ho_manifest", "lj_manifest", "dev"]
    assert _set_names([Path("x/dev.jsonl"), Path("x/dev.jsonl")]) == ["x_dev_1", "x_dev_2"]


# ---------------------------------------------------------------------------------------------
# Beam search, language models and timestamps through the command line.


@pytest.fixture(scope="module")
def lm_file(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    text = folder / "text.txt"
    text.write_text("".join(t.lower() + ".\n" for t in trained.texts.values()))  # normalised on reading
    done = run_asr("lm", "build", text, "-o", folder / "3gram.arpa", "--order", "3")
    assert done.returncode == 0, done.stderr
    assert "order 3" in done.stdout and "3-grams" in done.stdout
    return folder / "3gram.arpa"


@pytest.mark.slow
def test_lm_build_writes_a_model_of_the_text(trained, lm_file):
    from asr.lm import read_arpa

    lm = read_arpa(lm_file)
    assert lm.order == 3
    assert set(lm.vocabulary()) == {w for t in trained.texts.values() for w in t.split()}
    assert ("HELLO", "WORLD", "</s>") in lm.ngrams[2]


@pytest.mark.slow
def test_evaluate_with_beam_and_lm(trained, lm_file, tmp_path):
    results = tmp_path / "RESULTS.md"
    done = run_asr("evaluate", "--model", trained.exp / "best.pt", "--manifest", trained.manifest,
                   "--report-dir", tmp_path, "--lm", lm_file, "--beam-size", "8", "--results", results)
    assert done.returncode == 0, done.stderr
    assert score_table(done.stdout)["train"]["WER %"] == "0.00"
    assert (f"decoder=beam, beam_size=8, lm={lm_file}, lm_weight=0.8, word_bonus=1.0, lexicon=free, "
            "unk_logp=-30.0") in results.read_text()


@pytest.mark.slow
def test_tune_lm_saves_settings_that_transcribe_then_uses(trained, lm_file, copies, tmp_path):
    model = Path(shutil.copy(trained.exp / "best.pt", tmp_path / "model.pt"))
    done = run_asr("tune-lm", "--model", model, "--manifest", trained.manifest, "--lm", lm_file,
                   "--beam-size", "8", "--lm-weights", "0", "0.5", "--word-bonuses", "0", "1", "--save")
    assert done.returncode == 0, done.stderr
    grid = [line for line in done.stdout.splitlines() if re.match(r"\| [\d.]+ \| -?[\d.]+ \|", line)]
    assert len(grid) == 4 and sum("**best**" in line for line in grid) == 1
    saved = load_model_file(model)["decoding"]
    assert saved["decoder"] == "beam" and saved["beam_size"] == 8 and saved["lm"] == str(lm_file.resolve())
    assert (saved["lm_weight"], saved["word_bonus"]) in {(0.0, 0.0), (0.0, 1.0), (0.5, 0.0), (0.5, 1.0)}
    assert type(asr.load_model(model).decoder).__name__ == "BeamSearchDecoder"  # the saved settings apply
    assert type(asr.load_model(model, decoder="greedy").decoder).__name__ == "GreedyDecoder"
    done = run_asr("transcribe", "--model", model, *copies)
    assert done.returncode == 0, done.stderr
    assert transcribed(done.stdout) == {str(path): text for path, text in copies.items()}


@pytest.mark.slow
def test_transcribe_timestamps_json_and_subtitles(trained, copies, tmp_path):
    done = run_asr("transcribe", "--model", trained.exp / "best.pt", "--timestamps", *copies)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in results] == list(copies.values())
    for r, path in zip(results, copies):
        words = r["words"]
        assert [w["word"] for w in words] == r["text"].split()
        ends = [0.0] + [w["end"] for w in words]
        assert all(w["start"] >= previous for w, previous in zip(words, ends))  # in order, no overlap
        assert all(w["start"] < w["end"] for w in words)
        assert words[-1]["end"] <= sf.info(path).duration + 1e-6
    out = tmp_path / "subs"
    done = run_asr("transcribe", "--model", trained.exp / "best.pt", "--format", "srt", "--output-dir", out, *copies)
    assert done.returncode == 0, done.stderr
    srt = (out / f"{next(iter(copies)).stem}.srt").read_text()
    assert srt.startswith("1\n00:00:0") and " --> " in srt and next(iter(copies.values())) in srt


@pytest.mark.slow
def test_decoding_errors_are_one_line(trained, tmp_path):
    wav = next(trained.corpus.rglob("*.flac"))
    done = run_asr("transcribe", "--model", trained.exp / "best.pt", "--lm", tmp_path / "missing.arpa", wav)
    assert done.returncode == 1 and error_lines(done.stderr, "transcribe")[0].count("missing.arpa") == 1
    done = run_asr("transcribe", "--model", trained.exp / "best.pt", "--decoder", "greedy", "--beam-size", "5", wav)
    assert done.returncode == 1 and "beam_size: only used by the beam decoder" in done.stderr
    done = run_asr("transcribe", "--model", trained.exp / "best.pt", "--format", "vtt", wav, wav)
    assert done.returncode == 1 and "--output-dir" in done.stderr


def test_lm_build_names_a_text_it_cannot_read(tmp_path, capsys):
    good = tmp_path / "a.txt"
    good.write_text("one line\n")
    assert main(["lm", "build", str(good), str(tmp_path / "gone.txt"), "-o", str(tmp_path / "lm.arpa")]) == 1
    errors = error_lines(capsys.readouterr().err, "lm")
    assert len(errors) == 1 and "gone.txt: cannot read the text" in errors[0]
    assert not (tmp_path / "lm.arpa").exists()  # nothing half-built is left behind
