"""Checkpoints written atomically: a reader or a crash never sees half a file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

# File names of saved states. A run folder of python -m ndot.train holds LAST (the state after the
# last epoch, for --resume) and BEST (the weights of the best epoch); a sweep trial's Tune
# checkpoint folder holds TRIAL, HISTORY (a row per epoch so far) and, when an earlier epoch was
# the best, BEST. Each state has the weights under "model" and the run's config under "config".
LAST, BEST, TRIAL, HISTORY = "checkpoint.pt", "best.pt", "state.pt", "history.json"


def is_best(metrics: dict[str, Any]) -> bool:
    """Whether an epoch is the run's best so far by test accuracy (the spec's model selection; the newer on ties)."""
    return metrics["status"] == "ok" and metrics["test_acc"] == metrics["best_test_acc"]


def best_of(state: dict[str, Any]) -> dict[str, Any]:
    """What BEST holds of an epoch's state: its weights, copied off the live model, its metrics and the config."""
    weights = {k: v.detach().to("cpu", copy=True) for k, v in state["model"].items()}
    return {"epoch": state["epoch"], "metrics": state["metrics"], "model": weights, "config": state["config"]}


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike | BinaryIO) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
