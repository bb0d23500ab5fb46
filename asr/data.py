"""Manifests, the training dataset, duration-bucketed batching and collation.

Manifest (JSON Lines, one utterance a line; paths relative to the manifest's folder or absolute):
    {"id": "1272-128104-0000", "audio": "dev/1272/128104/1272-128104-0000.flac",
     "duration": 5.86, "text": "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES"}

Batch (from `collate`), B utterances, N samples, L target characters:
    waves (B, N) float32 zero-padded, wave_lengths (B,), targets (B, L) int64 zero-padded,
    target_lengths (B,), ids: list[str], texts: list[str], failed: list[str] (why each item
    left out of the batch could not be read; a batch of none has only ids, texts, failed and
    an empty wave_lengths)

Batch of cached features (from `collate_features`, see `FeatureDataset`): feats (B, T, N_MELS)
    float16 zero-padded and frames (B,) in place of waves; the rest as above.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from asr.audio import change_speed, load_audio
from asr.errors import AudioError, ManifestError, TextError
from asr.text import CharTokenizer


@dataclass(frozen=True)
class Utterance:
    """One manifest row; `audio` is resolved to an absolute path when read."""

    id: str
    audio: str
    duration: float
    text: str


@dataclass(frozen=True)
class Problem:
    """Why one manifest row cannot be used: where it is ("file:line"), its id when known,
    a short reason shared by rows with the same fault, and the details."""

    where: str
    id: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return ": ".join(part for part in (self.where, self.id, self.reason, self.detail) if part)


def scan_manifest(path: str | os.PathLike) -> tuple[list[Utterance], list[Problem]]:
    """The well-formed rows of a manifest and a Problem for every malformed line (not JSON,
    not an object, a field missing, a duration that is not a positive number), so that one
    bad line is reported with all the others instead of stopping at the first."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    rows, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read manifest ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(where, "", "not valid JSON", e.msg))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(where, "", "not a JSON object", type(row).__name__))
            continue
        uid = str(row.get("id", ""))
        missing = [k for k in ("id", "audio", "duration", "text") if k not in row]
        if missing:
            problems.append(Problem(where, uid, "missing field(s)", ", ".join(missing)))
            continue
        try:
            duration = float(row["duration"])
        except (TypeError, ValueError):
            duration = math.nan
        if not duration > 0 or math.isinf(duration):
            problems.append(Problem(where, uid, "duration is not a positive number", repr(row["duration"])))
            continue
        audio = Path(str(row["audio"]))
        if not audio.is_absolute():
            audio = path.parent / audio
        rows.append(Utterance(uid, str(audio), duration, str(row["text"])))
    return rows, problems


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """Rows of a manifest; ManifestError names the file, line and problem of the first bad row."""
    rows, problems = scan_manifest(path)
    if problems:
        more = f" (and {len(problems) - 1} more bad line(s))" if len(problems) > 1 else ""
        raise ManifestError(f"{problems[0]}{more}")
    return rows


def check_rows(rows: list[Utterance], tokenizer: CharTokenizer, *, max_duration: float = math.inf,
               seconds_per_label: float = 0.0, check_audio: bool = True) -> tuple[list[Utterance], list[Problem]]:
    """Split rows into those fit for CTC training and a Problem for each of the others: audio
    missing or empty, text empty or holding characters outside the vocabulary, longer than
    `max_duration`, or too short for its text (CTC needs one output frame per label, and a frame
    lasts `seconds_per_label`). Only the file system is asked about audio (no decoding), so a
    960-hour manifest is checked in seconds."""
    keep, problems = [], []
    for r in rows:
        def bad(reason: str, detail: str = "") -> None:
            problems.append(Problem("", r.id, reason, detail))

        try:
            labels = len(tokenizer.encode(r.text))
        except TextError as e:
            bad("characters outside the vocabulary", str(e).split(": ", 1)[-1])
            continue
        if labels == 0:
            bad("empty transcript")
        elif r.duration > max_duration:
            bad("too long", f"{r.duration:g} s > {max_duration:g} s")
        elif r.duration < labels * seconds_per_label:
            bad("too short for its transcript",
                f"{r.duration:g} s gives {int(r.duration / seconds_per_label)} frames for {labels} characters")
        elif check_audio and not os.path.isfile(r.audio):
            bad("audio file missing", r.audio)
        elif check_audio and os.path.getsize(r.audio) == 0:
            bad("audio file empty (0 bytes)", r.audio)
        else:
            keep.append(r)
    return keep, problems


def write_manifest(rows: list[Utterance], path: str | os.PathLike) -> None:
    """Write rows atomically, with audio paths relative to the manifest's folder where possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            record = asdict(row)
            audio = Path(row.audio)
            if audio.is_absolute():
                rel = os.path.relpath(audio, path.parent.resolve())
                record["audio"] = rel if not rel.startswith("..") else str(audio)
            record["duration"] = round(row.duration, 3)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class SpeechDataset(Dataset):
    """Utterances as (id, waveform (N,) float32 tensor, token ids (L,) int64 tensor, text).

    With several `speeds` each item is played at one of them, drawn from (seed, epoch, item)
    alone, so an epoch reads the same audio however it is batched, split or resumed; call
    `set_epoch` before iterating an epoch.
    """

    def __init__(self, rows: list[Utterance], tokenizer: CharTokenizer, *,
                 speeds: tuple[float, ...] = (1.0,), seed: int = 0):
        self.rows = rows
        self.targets = [torch.tensor(tokenizer.encode(r.text), dtype=torch.long) for r in rows]
        self.speeds = tuple(speeds)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def speed(self, i: int) -> float:
        if len(self.speeds) == 1:
            return self.speeds[0]
        return self.speeds[np.random.default_rng([self.seed, self.epoch, i]).integers(len(self.speeds))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        """(id, wave, target ids, text); (id, None, None, message) when the audio cannot be read,
        so that one bad file costs its utterance, not the training run."""
        row = self.rows[i]
        try:
            wave = load_audio(row.audio)
        except AudioError as e:
            return row.id, None, None, str(e)
        speed = self.speed(i)
        if speed != 1.0:
            wave = change_speed(wave, speed)
        return row.id, torch.from_numpy(wave), self.targets[i], row.text


class FeatureDataset(Dataset):
    """Training items from log-mel features computed once and held in memory (`features[i]`:
    (T, N_MELS) float16, or the message saying why utterance i could not be read), as
    (id, feats, target ids, text, samples); (id, None, None, message, 0) for an unreadable one.
    About 58 MB per hour of audio; only for fixed features (no speed perturbation, no VTLP)."""

    def __init__(self, rows: list[Utterance], tokenizer: CharTokenizer, features: list[torch.Tensor | str],
                 samples: list[int]):
        self.rows, self.features, self.samples = rows, features, samples
        self.targets = [torch.tensor(tokenizer.encode(r.text), dtype=torch.long) for r in rows]

    def set_epoch(self, epoch: int) -> None:
        pass  # the features are fixed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        feats = self.features[i]
        if isinstance(feats, str):
            return self.rows[i].id, None, None, feats, 0
        return self.rows[i].id, feats, self.targets[i], self.rows[i].text, self.samples[i]


def collate_features(items) -> dict:
    """Pad a list of `FeatureDataset` items into one batch, as `collate` does with waves."""
    failed = [text for _, feats, _, text, _ in items if feats is None]
    items = [item for item in items if item[1] is not None]
    if not items:
        return {"ids": [], "texts": [], "failed": failed, "wave_lengths": torch.zeros(0, dtype=torch.long)}
    ids, feats, targets, texts, samples = zip(*items)
    return {
        "ids": list(ids),
        "texts": list(texts),
        "feats": torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
        "frames": torch.tensor([len(f) for f in feats]),
        "wave_lengths": torch.tensor(samples),
        "targets": torch.nn.utils.rnn.pad_sequence(targets, batch_first=True),
        "target_lengths": torch.tensor([len(t) for t in targets]),
        "failed": failed,
    }


def collate(items) -> dict:
    """Pad a list of dataset items into one batch (see the module docstring); items whose audio
    could not be read are left out, their messages listed under "failed"."""
    failed = [text for _, wave, _, text in items if wave is None]
    items = [item for item in items if item[1] is not None]
    if not items:
        return {"ids": [], "texts": [], "failed": failed, "wave_lengths": torch.zeros(0, dtype=torch.long)}
    ids, waves, targets, texts = zip(*items)
    return {
        "ids": list(ids),
        "texts": list(texts),
        "waves": torch.nn.utils.rnn.pad_sequence(waves, batch_first=True),
        "wave_lengths": torch.tensor([len(w) for w in waves]),
        "targets": torch.nn.utils.rnn.pad_sequence(targets, batch_first=True),
        "target_lengths": torch.tensor([len(t) for t in targets]),
        "failed": failed,
    }


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of utterances of similar duration, at most `max_seconds` of audio each.

    Utterances are sorted by duration and cut into batches; each epoch shuffles the order of
    the batches (seeded by `seed + epoch`). With `sorted_first_epoch`, epoch 0 runs shortest
    first (SortaGrad, Amodei et al. 2016), which gets CTC off its blank-only plateau sooner.
    `start_batch` skips the first batches of the epoch, to resume mid-epoch exactly. With
    `world_size > 1` every rank gets the same number of batches, a disjoint slice of them.
    """

    def __init__(self, durations: list[float], max_seconds: float, *, max_batch_size: int = 512,
                 seed: int = 0, sorted_first_epoch: bool = True, rank: int = 0, world_size: int = 1):
        order = sorted(range(len(durations)), key=lambda i: durations[i])
        self.batches: list[list[int]] = []
        batch: list[int] = []
        for i in order:
            # Padded cost: every utterance in the batch is as long as the longest (the last).
            if batch and (len(batch) + 1) * durations[i] > max_seconds or len(batch) >= max_batch_size:
                self.batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            self.batches.append(batch)
        padded = sum(len(b) * max(durations[i] for i in b) for b in self.batches)
        # Real audio / padded audio over an epoch: the share of computed frames that are speech.
        self.padding_efficiency = sum(durations) / padded if padded else 1.0
        self.seed, self.sorted_first_epoch = seed, sorted_first_epoch
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch, in order, before `start_batch` is applied."""
        batches = list(self.batches)
        if not (self.epoch == 0 and self.sorted_first_epoch):
            random.Random(self.seed + self.epoch).shuffle(batches)
        per_rank = math.ceil(len(batches) / self.world_size)
        batches += batches[: per_rank * self.world_size - len(batches)]  # equal count on every rank
        return batches[self.rank :: self.world_size]

    def __iter__(self):
        yield from self.epoch_batches()[self.start_batch :]

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank runs in a whole epoch."""
        return math.ceil(len(self.batches) / self.world_size)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch
