"""ASHA early stopping that compares a trial only with trials of its own stratum.

One global ASHA would stop every T=1 trial of a T sweep because T=6 trials
are ahead at the same epoch; one AsyncHyperBandScheduler per stratum keeps
the rungs separate.

Tune saves no scheduler state: a resumed experiment re-adds its trials to a
fresh scheduler. Each trial's checkpoint holds its epoch history, so the rungs
are rebuilt from it, and trials after a resume are judged against the same
records as before it. Being the first to see each restored trial, the scheduler
also points one whose recorded checkpoint is gone at its newest whole one
(`continue_from_whole_checkpoint`), before the trial restarts from it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
from ray import tune
from ray.train._internal.session import _TrainingResult
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from ndot import checkpoint, files
from ndot.sweep.space import STRATUM_KEY

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

log = logging.getLogger(__name__)


class StratifiedASHA(FIFOScheduler):
    def __init__(
        self,
        metric: str,
        mode: str,
        time_attr: str,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
    ) -> None:
        super().__init__()
        self._metric, self._mode = metric, mode
        self._asha_args: dict[str, Any] = dict(
            metric=metric, mode=mode, time_attr=time_attr, max_t=max_t,
            grace_period=min(grace_period, max_t), reduction_factor=reduction_factor,
        )
        self._by_stratum: dict[str, AsyncHyperBandScheduler] = {}

    def _asha(self, trial: Trial) -> AsyncHyperBandScheduler:
        key = trial.config[STRATUM_KEY]
        if key not in self._by_stratum:
            self._by_stratum[key] = AsyncHyperBandScheduler(**self._asha_args)
        return self._by_stratum[key]

    def on_trial_add(self, tune_controller: "TuneController", trial: Trial) -> None:
        asha = self._asha(trial)
        asha.on_trial_add(tune_controller, trial)
        if trial.checkpoint is not None:
            continue_from_whole_checkpoint(trial)
            if trial.checkpoint is not None:  # None: no whole one is left, and the trial starts afresh
                self._replay(tune_controller, asha, trial)

    @staticmethod
    def _replay(tune_controller: "TuneController", asha: AsyncHyperBandScheduler, trial: Trial) -> None:
        """Feed a restored trial's epochs to `asha` in the order Tune fed them the first time."""
        try:
            history = checkpoint.read_history(trial.checkpoint.filesystem, trial.checkpoint.path)
        except files.STORAGE_ERRORS as e:
            # Without its past the trial is judged like a new one; the resume itself goes on.
            log.warning("ASHA cannot replay trial %s from %s: %s", trial.trial_id, trial.checkpoint.path, e)
            return
        for row in history:
            asha.on_trial_result(tune_controller, trial, row)
        # A finished trial's last result was also passed to on_trial_complete, which
        # records it at the final rung; Tune will not call it again after the resume.
        if history and trial.status == Trial.TERMINATED:
            asha.on_trial_complete(tune_controller, trial, history[-1])

    def on_trial_error(self, tune_controller: "TuneController", trial: Trial) -> None:
        self._asha(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: "TuneController", trial: Trial, result: dict[str, Any]) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: "TuneController", trial: Trial, result: dict[str, Any]) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: "TuneController", trial: Trial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"Using AsyncHyperBand per stratum ({len(self._by_stratum)} strata)"


def _exists(c: tune.Checkpoint) -> bool:
    return c.filesystem.get_file_info(c.path).type != pafs.FileType.NotFound


def continue_from_whole_checkpoint(trial: Trial) -> None:
    """Point a restored trial whose recorded checkpoint is gone at its newest whole one (none: it starts afresh).

    Tune deletes a trial's oldest kept checkpoint as it registers a new one, and saves the experiment
    state only later: a driver killed between the two leaves a state naming a checkpoint that no
    longer exists, and Tune would then fail to restore that trial at this resume and every later one.
    """
    if _exists(trial.checkpoint):
        return
    fs = trial.storage.storage_filesystem
    found = list(checkpoint.whole(fs, trial.path))
    path = found[0][0] if found else None
    log.warning("trial %s: its recorded checkpoint %s is gone; it continues from %s", trial.trial_id,
                trial.checkpoint.path, path or "its start")
    manager = trial.run_metadata.checkpoint_manager
    # Tune's own bookkeeping, which has no call for this: list the whole checkpoints on storage, oldest first,
    # as if the trial had just reported them. Its retention then deletes the oldest beyond the number kept,
    # which the state did not list either (written after it was saved), and would otherwise stay for good.
    manager._checkpoint_results, manager._latest_checkpoint_result = [], None
    for kept, history in reversed(found):
        # One report per epoch: Tune's iteration count is the epochs the checkpoint holds.
        metrics = {**history[-1], "training_iteration": len(history)}
        manager.register_checkpoint(_TrainingResult(checkpoint=tune.Checkpoint(kept, filesystem=fs), metrics=metrics))
    # The trial's next checkpoint follows the one it continues from: numbered after the recorded one, it
    # could land below a newer one on storage, which would then pass for the trial's newest.
    trial.storage.current_checkpoint_index = int(checkpoint.TRIAL_CHECKPOINT.search(path).group(1)) if path else -1
    trial.run_metadata.invalidate_cache()
    trial.invalidate_json_state()
