"""Tune callbacks that record a sweep while it runs: its Parquet tables, kept current, TensorBoard's files, and
of each finished trial its last checkpoint alone, once the sweep ends."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import pyarrow.fs as pafs
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import TBXLoggerCallback

from ndot import checkpoint, files, results
from ndot.cli import logs_without

log = logging.getLogger(__name__)


class TablesCallback(tune.Callback):
    """Rewrites epochs.parquet and trials.parquet in the experiment folder.

    The folder is the one Tune keeps the trials in. A trial's rows are the
    history in its newest checkpoint. Tune registers a checkpoint only after its
    callbacks have returned, and drops it when one raises, so `on_checkpoint`
    only notes the folder; the history is read when the tables are next written.
    Tables are rewritten at most every `min_interval_s` (a write is linear in the
    sweep's size, though it builds anew only the rows of trials that changed:
    results.Tables) and at once when a trial ends and when the experiment ends.
    Storage that fails for a moment costs a warning and a retry at the next
    write, never the sweep: the tables can always be rebuilt from the
    checkpoints (python -m ndot.results collect).
    """

    # The experiment's tables, once its folder is known. A class attribute: a callback that Tune unpickles from a
    # sweep started by an older ndot, which kept the folder alone, has it too.
    _tables: results.Tables | None = None

    def __init__(self, min_interval_s: float = 10.0) -> None:
        self._min_interval_s = min_interval_s
        # trial id -> (history, checkpoint relative to the experiment)
        self._saved: dict[str, tuple[list[results.Row], str | None]] = {}
        # trial id -> (filesystem, path, path relative to the experiment) of a checkpoint registered since the last read
        self._unread: dict[str, tuple[pafs.FileSystem, str, str]] = {}
        self._trials: list[Trial] = []
        # Trials Tune ended (completed, stopped or errored), in this run or before a resume.
        self._ended: set[str] = set()
        self._changed = self._trial_ended = False
        self._last_write = self._next_read = 0.0

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self._tables is not None or not trials or time.monotonic() < self._next_read:
            return
        self._ended |= {t.trial_id for t in trials if t.status == Trial.TERMINATED}
        # A restored experiment: start from what its trials' checkpoints already hold. (Not from
        # Tune's experiment state, which the driver may be writing at this moment.)
        try:
            self._saved = {r.trial_id: (r.history, r.checkpoint) for r in map(results.record, trials)}
        except files.STORAGE_ERRORS as e:  # Tune does not catch a callback's error: it would end the sweep
            log.warning("ndot: could not read the trials' checkpoints (%s); trying again in %.0f s", e, self._min_interval_s)
            self._next_read = time.monotonic() + self._min_interval_s
            return
        self._tables = results.Tables(results.experiment_of(trials[0]))

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: tune.Checkpoint, **info: Any) -> None:
        self._unread[trial.trial_id] = checkpoint.filesystem, checkpoint.path, results.relative_checkpoint(trial, checkpoint.path)
        self._changed = True

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Tune sets the final status after this hook: write at the end of the step.
        self._ended.add(trial.trial_id)
        self._trial_ended = True

    on_trial_error = on_trial_complete

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._trials = trials
        due = self._changed and time.monotonic() - self._last_write >= self._min_interval_s
        if self._trial_ended or due:
            self._write()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._trials = trials
        self._write()

    def _status(self, trial: Trial) -> str:
        # An interrupted sweep (Ctrl-C) ends by marking its running trials TERMINATED, though they
        # never finished: they are RUNNING, as the experiment state saved just before says.
        if trial.status == Trial.TERMINATED and trial.trial_id not in self._ended:
            return Trial.RUNNING
        return trial.status

    def _write(self) -> None:
        if self._tables is None:
            return
        for trial_id, (fs, path, relative) in list(self._unread.items()):
            try:
                self._saved[trial_id] = checkpoint.read_history(fs, path), relative
            except files.STORAGE_ERRORS as e:
                log.warning("ndot: could not read the history of %s (%s); trying again at the next write", path, e)
                continue
            del self._unread[trial_id]
        records = [results.TrialRecord.of(t, *self._saved.get(t.trial_id, ([], None)), status=self._status(t)) for t in self._trials]
        self._last_write = time.monotonic()
        try:
            self._tables.write(records)
        except files.STORAGE_ERRORS as e:
            log.warning("ndot: could not write the tables to %s (%s); trying again in %.0f s",
                        self._tables.experiment, e, self._min_interval_s)
            self._changed, self._trial_ended = True, False
            return
        self._changed, self._trial_ended = bool(self._unread), False


class CheckpointsCallback(tune.Callback):
    """Deletes the checkpoints of each finished trial (completed, stopped early or diverged) but its last, when
    the sweep ends.

    Tune keeps a trial's newest two whatever its state (ndot.sweep.runner.CHECKPOINTS_KEPT), the older one
    for a restart or a reader where the newer's upload was cut short. A finished trial is never restarted,
    and Tune completes it only once its last checkpoint is uploaded and registered; that one holds the whole
    history and the best weights, which the tables name. Not at once: a driver killed before Tune's next
    snapshot of the experiment would resume the trial as running, from the checkpoint just deleted, to error
    on each restart. The sweep ends after Tune's last snapshot is uploaded (a Ctrl-C's too; not where Tune's
    own loop raised, which skips that snapshot and leaves this window open); the trials finished by a killed
    driver are in this callback's state, which a resume restores. An errored trial,
    which --resume runs again, is left as it is, and so are the trials a Ctrl-C stops, which Tune ends
    without completing them.
    """

    # The ids of the finished trials. A class attribute, as the searcher's _seed: a callback that Tune unpickles
    # from a sweep saved without it has it too.
    _finished: frozenset[str] = frozenset()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finished |= {trial.trial_id}

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial in trials:
            if trial.trial_id not in self._finished or trial.checkpoint is None:  # None: ended before its first epoch
                continue
            try:
                checkpoint.drop_all_but(trial.storage.storage_filesystem, trial.path, trial.checkpoint.path)
            except files.STORAGE_ERRORS as e:  # Tune does not catch a callback's error: a traceback at the end
                log.warning("ndot: could not delete the older checkpoints of trial %s (%s)", trial.trial_id, e)

    def get_state(self) -> dict[str, Any]:
        return {"finished": sorted(self._finished)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._finished = frozenset(state["finished"])


class TensorBoardCallback(TBXLoggerCallback):
    """Tune's TensorBoard event files, a folder per trial, each closed when the sweep ends, finished or not.

    Tune closes a trial's writer only when the trial ends, so an interrupted sweep left the writers of
    its unfinished trials to tensorboardX's exit handler, which Python 3.12 does not let start a thread
    at interpreter shutdown: a traceback after the sweep's last line, the one saying how to resume.
    """

    def setup(self, **info: Any) -> None:
        super().setup(**info)
        # In the process that writes the files (the driver's, or the cluster's under ray://), until the sweep ends.
        logging.getLogger(_NONFINITE_NOTICE_LOGGER).addFilter(_without_the_nonfinite_notice)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial in list(self._trial_writer):
            self._trial_writer.pop(trial).close()
            self._trial_result.pop(trial, None)
        # Tune calls this as the sweep ends, at a first Ctrl-C too, not at a second: in the driver's process
        # runner.run takes the filter away whichever way the sweep ended (without_the_nonfinite_notice).
        logging.getLogger(_NONFINITE_NOTICE_LOGGER).removeFilter(_without_the_nonfinite_notice)


# tensorboardX says this, without naming trial or metric, for each scalar that is not finite: a diverged epoch's
# infinite training loss (Tune leaves NaN out itself), which the sweep's own line already reports as diverged.
_NONFINITE_NOTICE_LOGGER = "tensorboardX.x2num"


def _without_the_nonfinite_notice(record: logging.LogRecord) -> bool:
    return record.getMessage() != "NaN or Inf found in input tensor."


def without_the_nonfinite_notice() -> contextlib.AbstractContextManager[None]:
    """tensorboardX's notice of each scalar that is not finite, left out until the block ends: run from Python,
    the process's later tensorboardX writers say it again."""
    return logs_without(_NONFINITE_NOTICE_LOGGER, _without_the_nonfinite_notice)
