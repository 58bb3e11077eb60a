"""A Tune callback that keeps the sweep's Parquet tables current while it runs."""
from __future__ import annotations

import time
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from ndot import results


class TablesCallback(tune.Callback):
    """Rewrites epochs.parquet and trials.parquet in the experiment directory.

    A trial's rows are the history in its newest checkpoint, read when Tune
    registers that checkpoint; its row in trials.parquet names that checkpoint.
    Tables are rewritten at most every `min_interval_s` (rewriting is linear in
    the sweep's size) and at once when a trial ends and when the experiment ends.
    """

    def __init__(self, experiment: str, min_interval_s: float = 10.0) -> None:
        self._experiment = experiment
        self._min_interval_s = min_interval_s
        # trial id -> (history, checkpoint relative to the experiment)
        self._saved: dict[str, tuple[list[results.Row], str | None]] = {}
        self._trials: list[Trial] = []
        self._changed = self._trial_ended = False
        self._last_write = 0.0

    def setup(self, **info: Any) -> None:
        # A restored experiment: start from what its checkpoints already hold.
        if results.has_state(self._experiment):
            self._saved = {r.trial_id: (r.history, r.checkpoint) for r in results.collect(self._experiment)}

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: tune.Checkpoint, **info: Any) -> None:
        history = results.read_history(checkpoint.filesystem, checkpoint.path)
        self._saved[trial.trial_id] = history, results.relative_checkpoint(trial, checkpoint.path)
        self._changed = True

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Tune sets the final status after this hook: write at the end of the step.
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

    def _write(self) -> None:
        records = [results.TrialRecord.of(t, *self._saved.get(t.trial_id, ([], None))) for t in self._trials]
        results.write_tables(self._experiment, records)
        self._changed = self._trial_ended = False
        self._last_write = time.monotonic()
