"""The LibriSpeech recipe end to end: a local HTTP mirror serves a small archive in OpenSLR's
layout, and `recipes/librispeech/run.sh` runs every stage on it, then again to skip them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from asr.data import read_manifest
from conftest import run_asr
from test_download import ARCHIVE, SUBSET, TEXTS, librispeech_archive, mirror, serve, sums_file  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "recipes" / "librispeech" / "run.sh"
TINY = ["model.subsampling=1", "model.hidden_size=16", "model.num_layers=1", "model.conv_channels=4",
        "epochs=2", "data.num_workers=0", "bf16=false", "data.speeds=[1.0]", "log_every=1"]


def run_recipe(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(RUN), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def test_help_lists_the_stages_and_options():
    done = run_recipe("--help")
    assert done.returncode == 0
    for word in ("1  download", "2  manifests", "3  feature statistics", "4  train", "5  decode",
                 "--mirror", "--checksums",
                 "--corpus-dir", "--train-set", "--test-sets", "--conf", "--set"):
        assert word in done.stdout, word
    assert run_recipe("--bogus").returncode == 2


def test_every_stage_on_a_served_archive_then_nothing_twice(mirror, tmp_path):  # noqa: F811
    data = librispeech_archive()
    path = serve(mirror, data)
    sums = sums_file(tmp_path, data)
    common = ["--data-dir", tmp_path / "data", "--exp-dir", tmp_path / "exp", "--mirror", mirror.url,
              "--checksums", sums, "--conf", ROOT / "recipes/librispeech/conf/mini.yaml",
              "--train-set", SUBSET, "--dev-set", SUBSET, "--test-sets", SUBSET,
              *[a for s in TINY for a in ("--set", s)]]
    done = run_recipe(*common)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for stage in ("stage 1", "stage 2", "stage 3", "stage 4", "stage 5"):
        assert f"== {stage}" in done.stdout
    rows = read_manifest(tmp_path / "data" / "manifests" / f"{SUBSET}.jsonl")
    assert {r.id: r.text for r in rows} == TEXTS
    assert {p.name for p in (tmp_path / "exp").iterdir()} >= {"feature_stats.pt", "best.pt", "last.pt", "log.csv",
                                                               "RESULTS.md"}
    results = (tmp_path / "exp" / "RESULTS.md").read_text()
    assert f"| {SUBSET} | 3 | 6 |" in results  # the set, its utterances and words
    assert "- commit: " in results and "hidden_size: 16" in results
    assert mirror.gets(path) == [None]

    # Again: the archive is extracted and the manifest written, so neither is redone; training
    # resumes from last.pt at its end and the score is written again.
    again = run_recipe(*common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert mirror.gets(path) == [None]
    assert "already extracted" in again.stderr and "all manifests present" in again.stdout
    assert "already computed" in again.stdout
    assert "resuming from" in again.stderr


def test_download_alone_without_manifests(mirror, tmp_path):  # noqa: F811
    data = librispeech_archive()
    serve(mirror, data)
    done = run_asr("prepare", "librispeech", "--download", "--data-dir", tmp_path / "corpora",
                   "--splits", SUBSET, "--mirror", mirror.url, "--checksums", sums_file(tmp_path, data))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "corpora" / "LibriSpeech" / SUBSET / ".complete").is_file()
    assert f"extracted: {tmp_path / 'corpora' / 'LibriSpeech'}" in done.stdout
    assert not list(tmp_path.rglob("*.jsonl"))
    missing_out = run_asr("prepare", "librispeech", "--corpus-dir", tmp_path, "--splits", SUBSET)
    assert missing_out.returncode == 1 and "--out" in missing_out.stderr
