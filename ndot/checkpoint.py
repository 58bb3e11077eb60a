"""Saved states: written atomically (a reader or a crash never sees half a file), read back with
one-line errors (read), found again, and of a finished sweep trial all but the last deleted (drop_all_but)."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow.fs as pafs
import torch

from ndot import files
from ndot.config import ConfigError

# File names of saved states. A run folder of python -m ndot.train holds LAST (the state after the
# last epoch, for --resume) and BEST (the weights of the best epoch); a sweep trial's Tune
# checkpoint folder holds TRIAL, HISTORY (a row per epoch so far) and, when an earlier epoch was
# the best, BEST. Each state has the weights under "model" and the run's config under "config".
LAST, BEST, TRIAL, HISTORY = "checkpoint.pt", "best.pt", "state.pt", "history.json"
# The layout of a saved state, stored in it under "format" (states written before it was stored have
# none). Raise it with a change that an older ndot would misread, which `load` then refuses rather than
# misreading: TrainConfig.from_record passes over a setting it does not know, the run's default standing in.
# 2: weight_change, which an older ndot would resume without.
FORMAT = 2


def is_best(metrics: dict[str, Any]) -> bool:
    """Whether an epoch is the run's best so far by test accuracy (the spec's model selection; the newer on ties)."""
    return metrics["status"] == "ok" and metrics["test_acc"] == metrics["best_test_acc"]


def on_cpu(tree: Any) -> Any:
    """A copy on the CPU of the tensors in nested dicts and lists (a state dict), the rest as it is:
    what later training leaves alone."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [on_cpu(v) for v in tree]
    return tree


def best_of(state: dict[str, Any]) -> dict[str, Any]:
    """What BEST holds of an epoch's state: a copy of its weights (which a caller's state may share with
    the live model), its metrics and the config."""
    return {"format": FORMAT, "epoch": state["epoch"], "metrics": state["metrics"], "model": on_cpu(state["model"]),
            "config": state["config"]}


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` (e.g. the one train's on_epoch gets) to the local `path` with torch.save, atomically."""
    def write(f: BinaryIO) -> None:
        try:
            torch.save(state, f)
        except RuntimeError as e:
            # A write that failed (a full disk) leaves torch's zip writer to fail again as it closes, with a
            # message of its internals ("unexpected pos 465152 vs 465040"): the write's own error says what happened.
            # So does Ctrl-C or SIGTERM, whose handler raises in the write, where a large save spends its time.
            if isinstance(e.__context__, (OSError, KeyboardInterrupt)):
                raise e.__context__ from None
            raise

    files.write_local(path, write)


def load(path: str | os.PathLike | BinaryIO) -> dict[str, Any]:
    """A state that `save` wrote, on the CPU, tensors and plain data only (weights_only); ConfigError where a
    newer ndot wrote it (FORMAT). `read` adds one-line errors for a file that is no such state."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    written = state.get("format", 0) if isinstance(state, dict) else 0
    if not isinstance(written, int) or written > FORMAT:
        raise ConfigError(f"was written by a newer ndot (checkpoint format {written!r}; this one reads up to {FORMAT}): "
                          "update ndot to read it")
    return state


def read(path: str) -> dict[str, Any]:
    """A saved state with the weights ("model") and the run's configuration ("config"); ConfigError otherwise."""
    try:
        raw = files.read_bytes(path)
    except files.STORAGE_ERRORS as e:  # e.g. no permission: one line, for ndot.evaluate and ndot.train --resume alike
        raise ConfigError(f"{path} cannot be read: {e}") from None
    try:
        with warnings.catch_warnings():
            # torch.load warns of a pickle it did not write (a sweep's tuner.pkl) before it fails: the error says it.
            warnings.simplefilter("ignore")
            state = load(io.BytesIO(raw))
    except ConfigError as e:
        raise ConfigError(f"{path} {e}") from None
    except Exception as e:  # torch.load raises many types for a file that is not a checkpoint
        raise ConfigError(f"{path} is not a readable checkpoint: {_unreadable(raw, e)}") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys() or not isinstance(state["config"], dict):
        raise ConfigError(f"{path} has no model weights and configuration: not a checkpoint of python -m ndot.train")
    return state


def check_weights(weights: Any, expected: dict[str, torch.Tensor], network: str) -> None:
    """ConfigError naming how a state's weights ("model") differ from `expected`, the state dict of the
    `network` they are to be loaded into: torch's own error is lines of every key."""
    if not isinstance(weights, dict):
        raise ConfigError(f"the weights are a {type(weights).__name__}, not the state dict of a network")
    missing = [f"{k} missing" for k in expected if k not in weights]
    unexpected = [f"{k} unexpected" for k in weights if k not in expected]
    other = []
    for k, v in expected.items():
        w = weights.get(k, v)
        if not isinstance(w, torch.Tensor):
            other.append(f"{k} no tensor")
        elif w.shape != v.shape:
            other.append(f"{k} of shape {tuple(w.shape)}, not {tuple(v.shape)}")
    shown = [kind[0] for kind in (missing, unexpected, other) if kind]
    if shown:
        more = len(missing) + len(unexpected) + len(other) - len(shown)
        # An older ndot's network (small_cnn's layers, the neuron's output scale) differs so.
        raise ConfigError(f"the weights are not those of the network their config names, {network}, as this version of "
                          f"ndot builds it ({', '.join(shown)}{f' and {more} more' if more else ''})")


def _unreadable(raw: bytes, e: Exception) -> str:
    # torch.load's own messages name its internals (a zip directory, a pickle's load key, weights_only).
    if not raw:
        return "the file is empty"
    zipped = raw.startswith(b"PK\x03\x04")  # torch.save's format; b"\x80" opens a pickle (its legacy one, a tuner.pkl)
    if isinstance(e, pickle.UnpicklingError) and (zipped or raw.startswith(b"\x80")):  # weights_only's refusal
        return "it holds Python objects besides tensors and plain data, which are not loaded"
    if zipped:
        return "a zip archive that is no whole file of torch.save (cut short or damaged?)"
    return "not a file of torch.save"


# A sweep trial's folder holds one folder per kept Tune checkpoint, numbered by epoch - 1, and the
# trial's config, which Tune uploads with its experiment state (so it can lag the checkpoints).
TRIAL_CHECKPOINT = re.compile(r"checkpoint_(\d+)$")
TRIAL_PARAMS = "params.json"


def in_trial(folder: str) -> bool:
    """Whether `folder` (a path or URI) is one of a sweep trial's checkpoints: named so, and holding a HISTORY."""
    name = folder.rpartition("/")[2]
    return bool(TRIAL_CHECKPOINT.fullmatch(name)) and files.kind(f"{folder}/{HISTORY}") == pafs.FileType.File


def write_history(folder: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Store the epoch rows of a sweep trial in a local checkpoint folder (HISTORY), for read_history."""
    Path(folder, HISTORY).write_text(json.dumps(rows))


def read_history(fs: pafs.FileSystem, folder: str) -> list[dict[str, Any]]:
    """The epoch rows a sweep trial's checkpoint folder holds (HISTORY); ValueError where it holds
    something else (json.JSONDecodeError where it is not JSON)."""
    with fs.open_input_stream(f"{folder}/{HISTORY}") as f:
        rows = json.loads(f.readall())
    # A trial writes epochs 1..k, all of them, into the checkpoint of epoch k.
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
            and [r.get("epoch") for r in rows] == list(range(1, len(rows) + 1))):
        raise ValueError(f"{folder}/{HISTORY} is not the rows of a trial's epochs 1, 2, ... in order")
    return rows


def whole(fs: pafs.FileSystem, trial_path: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A sweep trial's readable checkpoint folders with their histories, newest first.

    A checkpoint whose upload was cut short (its history unreadable, or weights
    it names absent) is passed over.
    """
    try:
        infos = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
    except FileNotFoundError:  # allow_not_found still raises when Tune creates the folder as it is listed
        return
    found = sorted(
        ((int(m.group(1)), i.path) for i in infos if i.type == pafs.FileType.Directory and (m := TRIAL_CHECKPOINT.search(i.path))),
        reverse=True,
    )
    for _, path in found:
        try:
            history = read_history(fs, path)
        except (FileNotFoundError, ValueError):
            continue
        # Tune uploads a checkpoint's files in parallel: one killed in mid-upload can lack its weights.
        if all(fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File for name in {TRIAL, weights_of(history)}):
            yield path, history


def drop_all_but(fs: pafs.FileSystem, trial_path: str, kept: str) -> None:
    """Delete a sweep trial's checkpoint folders other than `kept` (a path on `fs`), to free what a
    finished trial no longer needs: its last checkpoint holds its history and best weights."""
    name = kept.rpartition("/")[2]
    for i in fs.get_file_info(pafs.FileSelector(trial_path)):
        if i.type == pafs.FileType.Directory and TRIAL_CHECKPOINT.fullmatch(i.base_name) and i.base_name != name:
            fs.delete_dir(i.path)


def newest(fs: pafs.FileSystem, trial_path: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The newest readable checkpoint folder of a sweep trial and its history ((None, []) before the first epoch).

    That checkpoint can be newer than the one Tune's experiment state names,
    when the driver died after the trial wrote it.
    """
    return next(whole(fs, trial_path), (None, []))


def weights_of(history: list[dict[str, Any]]) -> str:
    """Which file of a sweep trial's checkpoint holds the best epoch's weights, by its history: TRIAL
    when the best is the checkpoint's own epoch (or no epoch was, all diverged), else BEST."""
    return BEST if any(map(is_best, history[:-1])) and not is_best(history[-1]) else TRIAL
