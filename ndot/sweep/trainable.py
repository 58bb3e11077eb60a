"""The Tune function trainable: one trial = one ndot.train.train run, reported and checkpointed every epoch."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.fs as pafs
import ray
import torch
from ray import tune
from ray.actor import ActorHandle

from ndot import checkpoint, results
from ndot.cli import Pace, show_progress, torch_threads
from ndot.config import TrainConfig, rule_flags_off
from ndot.device import described, resolve_device
from ndot.sweep import activity
from ndot.sweep.space import STRATUM_KEY
from ndot.train import train


def _node() -> dict[str, Any]:
    # node_id tells apart the nodes of a one-machine test cluster, which share ip and hostname.
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }


def check_gpus_usable(device: str, gpu_ids: Sequence[int | str]) -> None:
    """Raise where Ray gave the trial GPUs (`gpu_ids`) that torch cannot use and `device` ("auto") would
    run it on the CPU instead: for days, unnoticed, where a node's NVIDIA driver is too old for torch's CUDA."""
    if gpu_ids and device == "auto" and not torch.cuda.is_available():
        raise RuntimeError(f"Ray gave this trial GPU {', '.join(map(str, gpu_ids))} on {socket.gethostname()}, but torch "
                           f"{torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device there: is the node's "
                           "NVIDIA driver too old for it? (--set device=cpu runs on the CPU on purpose)")


def trial_threads() -> int:
    """torch's threads for this trial: its CPUs, as Ray counts them for OMP_NUM_THREADS (at least 1).

    Ray sets OMP_NUM_THREADS only where the worker's environment lacks it: set on the nodes (a batch
    system's, a shell's), it would give every trial that many threads, whatever --cpus-per-trial, which
    oversubscribes the cores and, as sums then split otherwise, changes the results.
    """
    return max(1, math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


class Reporter:
    """A trial's side: says what it does, from its start to its first epoch result in this process (a trial
    restarted on another node builds its data there again). A line that cannot be sent is dropped: a trial
    never fails or waits for one."""

    def __init__(self, trial_id: str) -> None:
        self._trial_id = trial_id
        self._pace = Pace()
        self._at: tuple[int, str] | None = None
        try:
            self._board: ActorHandle | None = ray.get_actor(activity.name())
        except Exception:  # ValueError where the driver made none (a sweep run without ndot.sweep.progress.Progress)
            self._board = None
        self.say("starting")

    def say(self, line: str) -> None:
        self._send("set", line)

    def batch(self, epoch: int, done: int, total: int, what: str = "batch") -> None:
        """train()'s on_batch: a line at each new epoch or test pass, then one every ndot.cli.PROGRESS_S."""
        if (epoch, what) != self._at or self._pace.due():
            self._at = (epoch, what)
            self._pace.printed()
            self.say(f"epoch {epoch}: {what} {done}/{total}")

    def done(self) -> None:
        """The first epoch result is in: from here on the status line counts the trial's epochs."""
        self._send("drop")
        self._board = None

    @contextlib.contextmanager
    def logged(self) -> Iterator[None]:
        """Within the block, the library's progress lines (logger "ndot": a cache built, a wait for another
        process's) are the trial's line."""
        handler = _Said(self)
        logger = logging.getLogger("ndot")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)  # a reused worker runs the next trial with a Reporter of its own

    def _send(self, method: str, *args: Any) -> None:
        if self._board is None:
            return
        try:
            getattr(self._board, method).remote(self._trial_id, *args)  # its answer is never waited for
        except Exception:  # an actor gone with its node, a Ray shutting down: the trial goes on without its lines
            self._board = None


class _Said(logging.Handler):
    def __init__(self, reporter: Reporter) -> None:
        super().__init__()
        self._reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self._reporter.say(record.getMessage())


def run_trial(config: dict[str, Any]) -> None:
    # The trials of a sweep started before its searcher turned off the settings that change nothing
    # for their rule (ndot.sweep.searcher) hold them on, which train() refuses.
    # The rest of the trial's config is TrainConfig's fields: a key that is none (a Plan built by hand)
    # is refused, not passed over with the field it was meant for left at its default.
    settings = {k: v for k, v in config.items() if k != STRATUM_KEY}
    cfg = TrainConfig.from_dict({**settings, **rule_flags_off(config)})
    check_gpus_usable(cfg.device, ray.get_gpu_ids())
    show_progress()  # into Ray's worker log: where a trial spends minutes converting data or waiting, it says so
    trial_id = tune.get_context().get_trial_id()
    # started_at: when this process began the trial, before data and model; a trial's first row
    # keeps its first start through restarts, so the trials table measures wall time from there.
    node = {**_node(), "started_at": time.time()}
    node["ran_on"] = described(resolve_device(cfg.device))  # after started_at: on a GPU, this initialises CUDA
    status = Reporter(trial_id)
    resume, history, best = None, [], None
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            resume = checkpoint.load(Path(d, checkpoint.TRIAL))
            history = checkpoint.read_history(pafs.LocalFileSystem(), d)
            best = checkpoint.load(Path(d, checkpoint.BEST)) if Path(d, checkpoint.BEST).is_file() else None
        if checkpoint.is_best(resume["metrics"]):
            best = checkpoint.best_of(resume)

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        nonlocal best
        if checkpoint.is_best(metrics):
            best = checkpoint.best_of(state)
        history.append(results.epoch_row(trial_id, config, metrics, node, time.time()))
        # A scratch folder, written plainly: Tune's copy of it into storage is what lands whole and
        # synced (ndot.files.WholeLocalFiles; an object store's upload), so syncing here too only cost time.
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d, checkpoint.TRIAL))
            # Every checkpoint carries the best epoch's weights, as state.pt when that is
            # this epoch: Tune keeps only the newest checkpoints (ndot.sweep.runner).
            if best is not None and best["epoch"] != state["epoch"]:
                torch.save(best, Path(d, checkpoint.BEST))
            checkpoint.write_history(d, history)
            status.done()  # before the report: the driver that reads the epoch no longer reads the trial's line
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    with torch_threads(trial_threads()), status.logged():
        train(cfg, on_epoch=on_epoch, resume=resume, on_batch=status.batch,
              on_test_batch=functools.partial(status.batch, what="test batch"))
