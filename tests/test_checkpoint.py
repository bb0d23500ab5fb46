import os
import pickle

import numpy as np
import pytest
import torch

from conftest import assert_error_names_file
from asr.checkpoint import FORMAT_VERSION, load_model_file, save_model_file
from asr.config import to_dict
from asr.errors import ModelFileError
from asr.features import N_MELS
from asr.model import BiLSTMCTC, ModelConfig
from asr.text import CharTokenizer
from asr.transcribe import Transcriber


def tiny_payload() -> dict:
    config = ModelConfig(hidden_size=8, num_layers=1, conv_channels=4, dropout=0.0)
    tok = CharTokenizer()
    model = BiLSTMCTC(config, len(tok))
    return {
        "model_config": to_dict(config),
        "tokens": tok.tokens,
        "feature_stats": {"mean": torch.randn(N_MELS), "std": torch.rand(N_MELS) + 0.5},
        "model": model.state_dict(),
        "decoding": {"decoder": "greedy"},
    }


@pytest.fixture
def saved(tmp_path):
    payload = tiny_payload()
    path = tmp_path / "model.pt"
    save_model_file(payload, path)
    return payload, path


def test_round_trip(saved):
    payload, path = saved
    loaded = load_model_file(path)
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["model_config"] == payload["model_config"]
    assert loaded["tokens"] == payload["tokens"]
    assert loaded["decoding"] == {"decoder": "greedy"}
    for key in ("mean", "std"):
        assert torch.equal(loaded["feature_stats"][key], payload["feature_stats"][key])
    assert loaded["model"].keys() == payload["model"].keys()
    for key, value in payload["model"].items():
        assert torch.equal(loaded["model"][key], value), key


def test_written_atomically_and_plain(saved):
    _, path = saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary left behind
    # Plain data only: loads with the safe unpickler and nothing else.
    assert torch.load(path, weights_only=True)["format_version"] == FORMAT_VERSION


def test_overwrite_and_nested_folder(tmp_path):
    path = tmp_path / "a" / "b" / "model.pt"
    save_model_file(tiny_payload(), path)
    payload = tiny_payload()
    payload["decoding"] = {"decoder": "greedy", "note": "second"}
    save_model_file(payload, path)
    assert load_model_file(path)["decoding"]["note"] == "second"


def test_a_saved_model_transcribes_after_reload(saved):
    payload, path = saved
    transcriber = Transcriber.from_file(path, device="cpu")
    reference = BiLSTMCTC(ModelConfig(**payload["model_config"]), 29)
    reference.load_state_dict(payload["model"])
    for key, value in reference.state_dict().items():
        assert torch.equal(transcriber.model.state_dict()[key], value)
    assert torch.equal(transcriber.log_mel.mean, payload["feature_stats"]["mean"])
    assert isinstance(transcriber.transcribe(torch.zeros(1600).numpy(), sample_rate=16000), str)


def assert_refused(path, *words):
    return assert_error_names_file(ModelFileError, load_model_file, path, *words)


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "nope.pt", "no such")


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    for fraction in (0.5, 0.9, 0.01):
        path.write_bytes(data[: int(len(data) * fraction)])
        assert_refused(path)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes(tmp_path, seed):
    # Garbage breaks torch's unpickler in many ways (IndexError, KeyError, ...): each is refused.
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    assert_refused(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert_refused(path)


class RunsCode:
    """Unpickling this runs a shell command (the classic malicious model file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = tiny_payload()
    payload["format_version"] = FORMAT_VERSION
    payload["decoding"] = RunsCode(marker)
    torch.save(payload, evil)
    # The trap is real: an unrestricted load would run it.
    probe = tmp_path / "probe.pt"
    torch.save(RunsCode(tmp_path / "probe-ran"), probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    assert_refused(evil, "refused")
    assert not marker.exists()


def test_a_plain_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format_version": FORMAT_VERSION, "x": RunsCode(marker)}, f, protocol=2)
    assert_refused(evil)
    assert not marker.exists()


def test_wrong_format_version(tmp_path):
    payload = tiny_payload()
    payload["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.pt"
    save_model_file(payload, path)
    assert_refused(path, f"format {FORMAT_VERSION + 1}", f"reads format {FORMAT_VERSION}")


def test_foreign_torch_files(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(BiLSTMCTC(ModelConfig(hidden_size=8, num_layers=1), 29).state_dict(), path)
    assert_refused(path, "not an asr model file", "format_version")
    torch.save([1, 2, 3], path)
    assert_refused(path, "not an asr model file")
    payload = tiny_payload()
    del payload["tokens"]
    save_model_file(payload, path)
    assert_refused(path, "missing tokens")


def test_weights_that_do_not_fit_the_config(tmp_path):
    payload = tiny_payload()
    payload["model_config"]["hidden_size"] = 16  # the weights are for 8
    path = tmp_path / "mismatch.pt"
    save_model_file(payload, path)
    with pytest.raises(ModelFileError, match="does not match"):
        Transcriber.from_file(path, device="cpu")
    payload = tiny_payload()
    payload["model_config"]["attention_heads"] = 4
    save_model_file(payload, path)
    with pytest.raises(ModelFileError, match="does not match"):
        Transcriber.from_file(path, device="cpu")
