"""ASHA early stopping that compares a trial only with trials of its own stratum.

One global ASHA would stop every T=1 trial of a T sweep because T=6 trials
are ahead at the same epoch; one AsyncHyperBandScheduler per stratum keeps
the rungs separate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from ndot.sweep.space import STRATUM_KEY

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController


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
        self._asha_args = dict(
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
        self._asha(trial).on_trial_add(tune_controller, trial)

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
