"""The model file: one self-contained `.pt` that transcribes with nothing beside it.

Contents (plain dicts, lists, numbers, strings and tensors, so it loads with
`torch.load(weights_only=True)` and no code can run from it):

    format_version  int, FORMAT_VERSION
    model_config    dict of ModelConfig
    tokens          list[str], index = token id, 0 = CTC blank
    feature_stats   {"mean": (N_MELS,) tensor, "std": (N_MELS,) tensor}
    model           the acoustic model's state dict
    decoding        dict of decoding settings (decoder name and options)
    train_config    dict of the TrainConfig that made the weights (for RESULTS.md)
    train_state     optional: config, optimizer, RNG, epoch, step, batch_in_epoch (the sampler
                    position), elapsed seconds, best dev metrics; in last.pt, for resume
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from asr.errors import ModelFileError

FORMAT_VERSION = 1
REQUIRED = ("format_version", "model_config", "tokens", "feature_stats", "model")


def save_feature_stats(stats: dict, path: str | os.PathLike) -> None:
    """The feature statistics of a training set alone ({"mean", "std"} tensors), as the recipe
    stage before training writes them; same container and safety as a model file."""
    _save({"format_version": FORMAT_VERSION, "feature_stats": stats}, Path(path))


def load_feature_stats(path: str | os.PathLike) -> dict:
    """{"mean", "std"} from a file of `save_feature_stats` (or from a model file)."""
    path = Path(path)
    payload = _load(path, "cpu", what="feature statistics file")
    stats = payload.get("feature_stats") if isinstance(payload, dict) else None
    if not (isinstance(stats, dict) and all(isinstance(stats.get(k), torch.Tensor) for k in ("mean", "std"))):
        raise ModelFileError(f"{path}: holds no feature statistics (mean and std tensors)")
    return stats


def save_model_file(payload: dict, path: str | os.PathLike) -> None:
    """Write `payload` atomically: a temporary file, fsync, then rename over `path`."""
    _save({"format_version": FORMAT_VERSION, **payload}, Path(path))


def load_model_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a model file without running any code from it; ModelFileError says what is wrong."""
    path = Path(path)
    payload = _load(path, map_location)
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED):
        raise ModelFileError(f"{path}: not an asr model file (missing "
                             f"{', '.join(k for k in REQUIRED if not isinstance(payload, dict) or k not in payload)})")
    if payload["format_version"] != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model file format {payload['format_version']}, "
                             f"this asr reads format {FORMAT_VERSION}")
    return payload


def _save(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path, map_location, what: str = "model file"):
    if not path.is_file():
        raise ModelFileError(f"{path}: no such {what}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(f"{path}: refused, holds objects other than tensors and plain data "
                             f"({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - torch's unpickler fails on garbage in many ways (IndexError, ...)
        raise ModelFileError(f"{path}: not a readable {what} (truncated or foreign: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return payload
