import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asr.data import BucketBatchSampler, SpeechDataset, Utterance, collate, read_manifest, scan_manifest, write_manifest
from asr.errors import ManifestError, TextError
from asr.text import CharTokenizer
from conftest import sine, write_audio


def write_lines(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(uid="a", audio="a.flac", duration=1.0, text="HELLO") -> str:
    return json.dumps({"id": uid, "audio": audio, "duration": duration, "text": text})


# ----------------------------------------------------------------------------- manifests

def test_read_manifest_resolves_relative_paths(tmp_path):
    path = write_lines(tmp_path / "data" / "m.jsonl",
                       row("1", "audio/x.flac", 1.5, "HELLO WORLD"),
                       "",  # blank lines are allowed
                       row("2", "/elsewhere/y.wav", 2, "IT'S"),
                       json.dumps({"id": 3, "audio": "../z.flac", "duration": "0.25", "text": "Z"}))
    rows = read_manifest(path)
    assert rows == [
        Utterance("1", str(tmp_path / "data" / "audio" / "x.flac"), 1.5, "HELLO WORLD"),
        Utterance("2", "/elsewhere/y.wav", 2.0, "IT'S"),
        Utterance("3", str(tmp_path / "data" / ".." / "z.flac"), 0.25, "Z"),
    ]
    assert isinstance(rows[1].duration, float)


@pytest.mark.parametrize("bad, words", [
    ("{not json", ["not valid JSON"]),
    (json.dumps({"id": "b", "audio": "b.flac", "text": "B"}), ["missing field", "duration"]),
    (json.dumps({"id": "b", "duration": 1.0}), ["missing field", "audio, text"]),
    (row(duration="long"), ["duration", "'long'", "not a positive number"]),
    (row(duration=None), ["duration", "None", "not a positive number"]),
    (row(duration=0), ["duration", "0", "not a positive number"]),
    (row(duration=-1.5), ["duration", "-1.5", "not a positive number"]),
    ('{"id": "a", "audio": "a.flac", "duration": Infinity, "text": "A"}', ["duration", "inf"]),
])
def test_bad_manifest_lines_name_file_and_line(tmp_path, bad, words):
    path = write_lines(tmp_path / "m.jsonl", row("ok"), "", bad, row("after"))
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    message = str(err.value)
    assert f"{path}:3" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("bad", ["42", "null"])
def test_manifest_line_that_is_not_an_object(tmp_path, bad):
    path = write_lines(tmp_path / "m.jsonl", row("ok"), bad)
    with pytest.raises(ManifestError, match=f"{path}:2"):
        read_manifest(path)


def test_manifest_line_that_is_a_list(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '["a", "b"]')
    with pytest.raises(ManifestError, match=f"{path}:1"):
        read_manifest(path)


def test_scan_reports_every_bad_line_and_keeps_the_good_ones(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", row("ok"), "{oops", row("b", duration="x"), "[1]",
                       json.dumps({"id": "c"}), row("after"))
    rows, problems = scan_manifest(path)
    assert [r.id for r in rows] == ["ok", "after"]
    assert [(p.where, p.id, p.reason) for p in problems] == [
        (f"{path}:2", "", "not valid JSON"), (f"{path}:3", "b", "duration is not a positive number"),
        (f"{path}:4", "", "not a JSON object"), (f"{path}:5", "c", "missing field(s)")]
    with pytest.raises(ManifestError, match=rf"{path}:2: not valid JSON.*\(and 3 more bad line\(s\)\)"):
        read_manifest(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "none.jsonl")


def test_write_manifest_round_trip(tmp_path):
    folder = tmp_path / "data"
    rows = [
        Utterance("u1", str(folder / "train" / "u1.flac"), 1.23456, "HELLO WORLD"),
        Utterance("u2", str(tmp_path / "outside" / "u2.wav"), 2.0, "IT'S"),  # not under the folder
        Utterance("u3", "relative/u3.flac", 0.5, "CAF\u00c9"),  # written as given
    ]
    path = folder / "m.jsonl"
    write_manifest(rows, path)
    assert sorted(p.name for p in folder.iterdir()) == ["m.jsonl"]  # written atomically
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["audio"] for r in records] == ["train/u1.flac", str(tmp_path / "outside" / "u2.wav"),
                                             "relative/u3.flac"]
    assert records[0]["duration"] == 1.235  # milliseconds are enough
    assert "CAF\u00c9" in path.read_text(encoding="utf-8")
    back = read_manifest(path)
    assert back == [
        Utterance("u1", str(folder / "train" / "u1.flac"), 1.235, "HELLO WORLD"),
        rows[1],
        Utterance("u3", str(folder / "relative" / "u3.flac"), 0.5, "CAF\u00c9"),
    ]
    write_manifest(back, path)
    assert read_manifest(path) == back


# ----------------------------------------------------------------------------- dataset and batches

def test_dataset_items(tmp_path):
    wave = sine(440, 0.3, 22050)
    audio = write_audio(tmp_path / "a.wav", wave, 22050)
    tok = CharTokenizer()
    ds = SpeechDataset([Utterance("a", str(audio), 0.3, "HI THERE")], tok)
    assert len(ds) == 1
    uid, samples, target, text = ds[0]
    assert uid == "a" and text == "HI THERE"
    assert samples.dtype == torch.float32 and samples.shape == (4800,)  # resampled to 16 kHz
    assert target.dtype == torch.int64 and target.tolist() == tok.encode("HI THERE")


def test_dataset_speeds_are_drawn_per_item_and_epoch(tmp_path):
    audio = write_audio(tmp_path / "a.flac", sine(500, 1.0, 16000), 16000)
    rows = [Utterance(f"u{i}", str(audio), 1.0, "A") for i in range(40)]
    ds = SpeechDataset(rows, CharTokenizer(), speeds=(0.9, 1.0, 1.1), seed=3)
    lengths = {math.ceil(16000 / s) for s in (0.9, 1.0, 1.1)}  # 17778, 16000, 14546
    ds.set_epoch(0)
    epoch0 = [len(ds[i][1]) for i in range(len(ds))]
    assert set(epoch0) == lengths  # every speed is used, and only those
    assert [len(ds[i][1]) for i in reversed(range(len(ds)))] == epoch0[::-1]  # order-free
    ds.set_epoch(1)
    assert [len(ds[i][1]) for i in range(len(ds))] != epoch0  # drawn afresh each epoch
    again = SpeechDataset(rows, CharTokenizer(), speeds=(0.9, 1.0, 1.1), seed=3)
    again.set_epoch(0)
    assert [len(again[i][1]) for i in range(len(ds))] == epoch0  # and reproducibly
    assert len(SpeechDataset(rows, CharTokenizer())[0][1]) == 16000  # default: as recorded


def test_dataset_refuses_text_outside_the_alphabet(tmp_path):
    with pytest.raises(TextError, match="hello"):
        SpeechDataset([Utterance("a", str(tmp_path / "a.wav"), 1.0, "hello")], CharTokenizer())


def test_unreadable_audio_is_left_out_of_its_batch_with_the_reason(tmp_path):
    good = write_audio(tmp_path / "good.wav", sine(440, 0.5))
    ds = SpeechDataset([Utterance("a", str(tmp_path / "gone.wav"), 1.0, "A"),
                        Utterance("b", str(good), 0.5, "B")], CharTokenizer())
    uid, wave, target, message = ds[0]
    assert (uid, wave, target) == ("a", None, None) and "gone.wav" in message and "no such file" in message
    batch = collate([ds[0], ds[1]])
    assert batch["ids"] == ["b"] and batch["waves"].shape == (1, 8000) and batch["failed"] == [message]
    empty = collate([ds[0]])
    assert empty["ids"] == [] and empty["failed"] == [message] and len(empty["wave_lengths"]) == 0


def test_collate_pads():
    items = [
        ("a", torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3, 4]), "AB"),
        ("b", torch.tensor([4.0, 5.0, 6.0, 7.0, 8.0]), torch.tensor([5, 6, 7, 8]), "CDEF"),
        ("c", torch.tensor([9.0, 10.0]), torch.tensor([9]), "G"),
    ]
    batch = collate(items)
    assert batch["ids"] == ["a", "b", "c"] and batch["texts"] == ["AB", "CDEF", "G"]
    assert torch.equal(batch["waves"], torch.tensor([[1.0, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 10, 0, 0, 0]]))
    assert batch["wave_lengths"].tolist() == [3, 5, 2]
    assert torch.equal(batch["targets"], torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]]))
    assert batch["target_lengths"].tolist() == [2, 4, 1]
    assert batch["targets"].dtype == torch.int64
    assert batch["failed"] == []


# ----------------------------------------------------------------------------- the sampler

DURATIONS = [round(x, 2) for x in np.random.default_rng(7).uniform(0.5, 12.0, 83)]


def flat(batches):
    return [i for b in batches for i in b]


def epoch(sampler, e, start_batch=0):
    sampler.set_epoch(e, start_batch)
    return list(sampler)


def test_every_utterance_once_per_epoch_and_no_batch_too_long():
    sampler = BucketBatchSampler(DURATIONS, max_seconds=40.0, max_batch_size=6, seed=3)
    for e in range(4):
        batches = epoch(sampler, e)
        assert sorted(flat(batches)) == list(range(len(DURATIONS)))
        assert len(batches) == len(sampler)
        for b in batches:
            assert len(b) * max(DURATIONS[i] for i in b) <= 40.0  # padded cost
            assert 1 <= len(b) <= 6


def test_batches_are_full():
    # Greedy packing: the next (longer) utterance would not have fitted into the batch before it.
    sampler = BucketBatchSampler(DURATIONS, max_seconds=40.0, max_batch_size=6)
    batches = epoch(sampler, 0)
    for b, following in zip(batches, batches[1:]):
        if len(b) < 6:
            assert (len(b) + 1) * DURATIONS[following[0]] > 40.0


def test_an_utterance_longer_than_the_limit_gets_a_batch_of_its_own():
    sampler = BucketBatchSampler([1.0, 50.0, 2.0], max_seconds=10.0)
    assert epoch(sampler, 0) == [[0, 2], [1]]


def test_padding_efficiency_by_hand():
    assert BucketBatchSampler([1.0, 1.0, 2.0, 2.0], 4.0).padding_efficiency == 1.0  # [1, 1] [2, 2]
    # One batch [1 s, 2 s] pads to 2 x 2 s: 3 s of speech in 4 s of frames.
    assert BucketBatchSampler([1.0, 2.0], 4.0).padding_efficiency == pytest.approx(0.75)


def test_padding_efficiency_on_librispeech_like_durations():
    # train-clean-100's shape: mostly 10-17 s, a tail down to ~1 s, capped at ~25 s.
    rng = np.random.default_rng(0)
    durations = np.clip(rng.normal(12.7, 3.5, 28_000), 1.0, 24.5).tolist()
    sampler = BucketBatchSampler(durations, 200.0, max_batch_size=128)
    real = sum(durations)
    padded = sum(len(b) * max(durations[i] for i in b) for b in sampler.batches)
    assert sampler.padding_efficiency == pytest.approx(real / padded)
    assert sampler.padding_efficiency >= 0.99


def test_first_epoch_is_sorted_later_epochs_are_shuffled():
    sampler = BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3)
    first = epoch(sampler, 0)
    order = [DURATIONS[i] for i in flat(first)]
    assert order == sorted(order)
    second, third = epoch(sampler, 1), epoch(sampler, 2)
    # Same batches (as groups of utterances), different order.
    as_set = lambda bs: sorted(map(tuple, bs))  # noqa: E731
    assert as_set(second) == as_set(first) == as_set(third)
    assert second != first and third != second


def test_shuffle_is_deterministic_by_seed_and_epoch():
    a = BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3)
    b = BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3)
    assert epoch(a, 5) == epoch(b, 5)
    assert epoch(a, 2) == epoch(b, 2)  # any epoch, in any order, without replaying the others
    other = BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=4)
    assert epoch(other, 5) != epoch(a, 5)
    # The seed and the epoch enter as seed + epoch.
    assert epoch(other, 4) == epoch(a, 5)


def test_unsorted_first_epoch():
    sampler = BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3, sorted_first_epoch=False)
    sorted_sampler = BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3)
    assert epoch(sampler, 0) != epoch(sorted_sampler, 0)
    assert epoch(sampler, 1) == epoch(sorted_sampler, 1)


@pytest.mark.parametrize("e", [0, 1, 3])
def test_start_batch_yields_the_tail_of_the_epoch(e):
    sampler = BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3)
    full = epoch(sampler, e)
    for k in (0, 1, 5, len(full) - 1, len(full)):
        tail = epoch(sampler, e, start_batch=k)
        assert tail == full[k:]
        assert len(sampler) == len(full) - k


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_get_equal_counts_and_cover_everything(world_size):
    samplers = [BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3, rank=r, world_size=world_size)
                for r in range(world_size)]
    single = BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3)
    for e in range(3):
        per_rank = [epoch(s, e) for s in samplers]
        all_batches = epoch(single, e)
        counts = {len(batches) for batches in per_rank}
        assert len(counts) == 1  # every rank runs the same number of steps
        assert counts.pop() == len(samplers[0]) == -(-len(all_batches) // world_size)
        seen = flat(flat(per_rank))
        assert set(seen) == set(range(len(DURATIONS)))
        # Only the batches repeated to even the counts appear twice.
        extra = len(samplers[0]) * world_size - len(all_batches)
        assert len(seen) - len(DURATIONS) == sum(len(b) for b in all_batches[:extra])


def test_ranks_are_disjoint_when_batches_divide_evenly():
    durations = [1.0] * 24
    samplers = [BucketBatchSampler(durations, max_seconds=2.0, seed=1, rank=r, world_size=3) for r in range(3)]
    for e in range(3):
        per_rank = [flat(epoch(s, e)) for s in samplers]
        assert [len(x) for x in per_rank] == [8, 8, 8]
        assert sorted(per_rank[0] + per_rank[1] + per_rank[2]) == list(range(24))


def test_ranks_resume_mid_epoch():
    samplers = [BucketBatchSampler(DURATIONS, max_seconds=40.0, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in samplers:
        full = epoch(s, 1)
        assert epoch(s, 1, start_batch=2) == full[2:]


def test_sampler_drives_a_dataloader(tmp_path):
    durations = [0.1, 0.3, 0.2, 0.4]
    rows = [Utterance(str(i), str(write_audio(tmp_path / f"{i}.wav", sine(300 + 100 * i, d))), d, "AB"[: i % 2 + 1])
            for i, d in enumerate(durations)]
    sampler = BucketBatchSampler(durations, max_seconds=0.5)
    loader = torch.utils.data.DataLoader(SpeechDataset(rows, CharTokenizer()), batch_sampler=sampler,
                                         collate_fn=collate)
    batches = list(loader)
    assert [b["ids"] for b in batches] == [["0", "2"], ["1"], ["3"]]
    assert batches[0]["waves"].shape == (2, 3200)
    assert batches[0]["wave_lengths"].tolist() == [1600, 3200]
