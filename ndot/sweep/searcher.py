"""Equal Optuna budgets per stratum: one seeded TPE study per stratum, strata served in turn.

A single study with the stratum as a categorical parameter would let TPE stop
sampling the strata it rates poorly (a T sweep would lose its small T); here
every stratum gets exactly `trials_per_stratum` trials, and TPE only chooses
the tuned parameters inside a stratum, from that stratum's own results.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable, Sequence

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ndot.sweep.space import STRATUM_KEY, Stratum


class StratifiedSearch(Searcher):
    def __init__(
        self,
        strata: Sequence[Stratum],
        space: Callable[[Any], dict[str, Any] | None],
        trials_per_stratum: int,
        metric: str,
        mode: str,
        seed: int = 0,
        first: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        # One "study created" line per stratum is noise in a sweep's log.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._strata = list(strata)
        self._budget = trials_per_stratum
        # One seed for all: the strata draw the same random start-up points, so
        # their results compare like for like until TPE's own choices begin.
        self._studies = [
            OptunaSearch(space, metric=metric, mode=mode, seed=seed, points_to_evaluate=[first] if first else None)
            for _ in self._strata
        ]
        self._issued = [0] * len(self._strata)
        self._stratum_of: dict[str, int] = {}
        self._live: set[str] = set()
        self._max_concurrent = 0  # 0: no limit

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        # Tune's ConcurrencyLimiter would drop completions of trials it no longer
        # counts as live (a resumed errored trial); counting here avoids that.
        self._max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._max_concurrent and len(self._live) >= self._max_concurrent:
            return None
        open_strata = [i for i, n in enumerate(self._issued) if n < self._budget]
        if not open_strata:
            return Searcher.FINISHED
        i = min(open_strata, key=lambda j: (self._issued[j], j))
        params = self._studies[i].suggest(trial_id)
        self._issued[i] += 1
        self._stratum_of[trial_id] = i
        self._live.add(trial_id)
        stratum = self._strata[i]
        return {**params, **stratum.values, STRATUM_KEY: stratum.label}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._studies[self._stratum_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self._live.discard(trial_id)
        if error:
            # Leave the Optuna trial open: a restore with resume_errored runs
            # this trial again under the same id, and OptunaSearch ignores every
            # result of a trial it has already closed as failed.
            return
        self._studies[self._stratum_of[trial_id]].on_trial_complete(trial_id, result)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        # The limit is the resuming driver's (Tune sets it before restoring): resources
        # per trial and the cluster may have changed since the state was saved.
        state.pop("_max_concurrent")
        self.__dict__.update(state)
