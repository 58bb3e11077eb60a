"""Equal Optuna budgets per stratum: one seeded TPE study per stratum, strata served in turn.

A single study with the stratum as a categorical parameter would let TPE stop
sampling the strata it rates poorly (a T sweep would lose its small T); here
every stratum gets exactly `trials_per_stratum` trials, and TPE only chooses
the tuned parameters inside a stratum, from that stratum's own results.

Tune resumes its trials from the experiment's state on storage, and this
searcher from a file of its own beside it. A driver killed while uploading
them leaves the two a step apart, or the searcher's files absent (cut short,
where Tune copies them plainly: ndot.files.WholeLocalFiles); on restore, Tune's
list of trials decides (`StratifiedSearch.restore_from_dir`).
"""
from __future__ import annotations

import json
import logging
import pickle
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState
from ray import cloudpickle
from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

from ndot import files
from ndot.config import rule_flags_off
from ndot.sweep import state_sync
from ndot.sweep.space import STRATUM_KEY, Stratum

# Here, because every process that runs a sweep's Tune controller imports this module to unpickle its searcher.
state_sync.install()

log = logging.getLogger(__name__)

# Tune's Experiment, which every trial is created from, kept beside the experiment by the sweep itself:
# Tune restores it only from its own search file, which a driver killed while uploading it leaves absent
# (or cut short, where Tune's upload is a plain copy), and without it a resume can create no trial.
SPEC_FILE = "search_spec.pkl"


class StratifiedSearch(Searcher):
    def __init__(
        self,
        strata: Sequence[Stratum],
        space: Callable[[Any], dict[str, Any] | None],
        trials_per_stratum: int,
        metric: str,
        mode: str,
        experiment: str,
        seed: int = 0,
        first: dict[str, Any] | None = None,
        base: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        # One "study created" line per stratum is noise in a sweep's log.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._strata = list(strata)
        self._space = space
        self._budget = trials_per_stratum
        self._experiment = experiment
        self._first = first or None
        # The settings every trial shares (Tune lays each suggestion over them): a T, rule or mode that is no stratum's.
        self._base = dict(base or {})
        # One seed for all: the strata draw the same random start-up points, so
        # their results compare like for like until TPE's own choices begin.
        self._seed = seed
        direction = "maximize" if mode == "max" else "minimize"
        # Each trial's sampler is set as the trial is asked for (`_sampler`).
        self._studies = [optuna.create_study(direction=direction) for _ in self._strata]
        self._stratum_of: dict[str, int] = {}  # every trial of the sweep so far
        self._number: dict[str, int] = {}  # a trial's number in its stratum's study
        self._live: set[str] = set()
        self._max_concurrent = 0  # 0: no limit
        self._unrestored: str | None = None  # why a resume could not restore this searcher

    @property
    def experiment(self) -> str:
        return self._experiment

    # A class attribute: a searcher that Tune unpickles from a sweep started before it was kept has it too,
    # and its studies go on drawing from their own samplers in turn, as they did.
    _seed: int | None = None
    # Likewise: a searcher saved before it was kept turns settings off from the strata's values alone, as it did.
    _base: Mapping[str, Any] = MappingProxyType({})

    @property
    def trial_ids(self) -> list[str]:
        """Every trial of the sweep so far."""
        return list(self._stratum_of)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        # Tune's ConcurrencyLimiter would drop completions of trials it no longer
        # counts as live (a resumed errored trial); counting here avoids that.
        self._max_concurrent = max_concurrent
        return True

    def _issued(self) -> list[int]:
        issued = [0] * len(self._strata)
        for i in self._stratum_of.values():
            issued[i] += 1
        return issued

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._check_restored()
        if self._max_concurrent and len(self._live) >= self._max_concurrent:
            return None
        issued = self._issued()
        open_strata = [i for i, n in enumerate(issued) if n < self._budget]
        if not open_strata:
            return Searcher.FINISHED
        i = min(open_strata, key=lambda j: (issued[j], j))
        study = self._studies[i]
        if self._seed is not None:
            study.sampler = _sampler(self._seed, issued[i])
        if self._first and issued[i] == 0:
            study.enqueue_trial(self._first)
        trial = study.ask()
        fixed = self._space(trial) or {}
        self._stratum_of[trial_id], self._number[trial_id] = i, trial.number
        self._live.add(trial_id)
        stratum = self._strata[i]
        # A setting for some of the sweep's rules (--set detach_reset=true with bptt among them), or of its T, is
        # recorded off in the trials of the others, as it runs there (ndot.sweep.trainable.run_trial).
        off = rule_flags_off({**self._base, **stratum.values})
        return {**trial.params, **fixed, **stratum.values, **off, STRATUM_KEY: stratum.label}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self._check_restored()
        self._live.discard(trial_id)
        if error:
            # Leave the Optuna trial open: a restore with resume_errored runs
            # this trial again under the same id, and its results count then.
            return
        study, number = self._studies[self._stratum_of[trial_id]], self._number[trial_id]
        if _finished(study, number):
            return  # told before a resume that ran it again (it was still running in Tune's list)
        value = result.get(self.metric) if result else None
        study.tell(number, value, state=TrialState.PRUNED if value is None else TrialState.COMPLETE)

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

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        # Tune takes an error raised here for a failed resume and starts the experiment afresh in
        # the same folder, whose newer state then hides every earlier trial: this searcher rebuilds
        # itself from Tune's list without its own file, and fails at first use without the list.
        try:
            super().restore_from_dir(checkpoint_dir)
        except Exception as e:
            log.warning("ndot: the searcher's saved state is unreadable (%s); rebuilding it from Tune's trials", e)
        self._unrestored = None  # as saved by a run that stopped for it
        try:
            self.agree_with(listed_trials(self._experiment))
        except Exception as e:
            self._unrestored = f"{type(e).__name__}: {e}"

    def _check_restored(self) -> None:
        if self._unrestored:
            raise RuntimeError(f"the sweep's searcher could not be matched to its trials on resume ({self._unrestored}); "
                               "nothing was lost: run --resume again")

    def agree_with(self, trials: Sequence[Trial]) -> None:
        """Take `trials`, the list Tune resumes, as the sweep's trials: the restored state may be a step off it."""
        listed = {t.trial_id: t for t in trials}
        for trial_id in set(self._stratum_of) - set(listed):
            # Issued after the list was saved: Tune does not know it, and its stratum gets a new trial instead.
            study, number = self._studies[self._stratum_of.pop(trial_id)], self._number.pop(trial_id)
            self._live.discard(trial_id)
            if not _finished(study, number):
                study.tell(number, state=TrialState.FAIL)
        for trial_id, trial in listed.items():
            if trial_id not in self._stratum_of:
                self._take_over(trial)
            if trial.status == Trial.TERMINATED:
                self.on_trial_complete(trial_id, trial.last_result)  # told here unless told before
            else:
                self._live.add(trial_id)  # Tune runs it (again), errored trials included

    def _take_over(self, trial: Trial) -> None:
        """Put a trial issued after this searcher's state was saved into its stratum's study, with its values."""
        i = [s.label for s in self._strata].index(trial.config[STRATUM_KEY])
        values = optuna.trial.FixedTrial(trial.config)
        self._space(values)
        study = self._studies[i]
        study.add_trial(optuna.trial.create_trial(params=values.params, distributions=values.distributions, state=TrialState.RUNNING))
        self._stratum_of[trial.trial_id], self._number[trial.trial_id] = i, len(study.get_trials(deepcopy=False)) - 1


class StratifiedGenerator(SearchGenerator):
    """Tune's driver of a StratifiedSearch, limited to `max_concurrent` trials at once.

    A resume restores the searcher, which matches itself to Tune's list of trials,
    even when its files never reached storage or were cut short there; the Experiment
    the trials are created from then comes from SPEC_FILE, written whole at the start.
    The searcher, not the "finished" flag SearchGenerator restores from those files,
    says whether the sweep is done: a last trial `agree_with` dropped gets its replacement.
    """

    def __init__(self, search: StratifiedSearch, max_concurrent: int) -> None:
        # The limiter lets the searcher count (set_max_concurrency); a starting Tune reads
        # its limit for how many trials may wait for resources at once.
        super().__init__(ConcurrencyLimiter(search, max_concurrent))

    # Why a resume could not rebuild the Experiment. A class attribute: a generator that Tune
    # unpickles from a sweep started before it existed has it too.
    _unrestored: str | None = None

    @property
    def _search(self) -> StratifiedSearch:
        return self.searcher.searcher

    def _spec_uri(self) -> str:
        return files.join(self._search.experiment, SPEC_FILE)

    def add_configurations(self, experiments: Any) -> None:
        super().add_configurations(experiments)
        # Before Tune saves any state of its own: every experiment that can be resumed has it.
        files.write_bytes(self._spec_uri(), cloudpickle.dumps(self._experiment))

    def set_max_concurrency(self, max_concurrent: int) -> None:
        limiter = self.searcher
        limiter.max_concurrent = max_concurrent
        limiter.searcher.set_max_concurrency(max_concurrent)

    def has_checkpoint(self, dirpath: str) -> bool:
        return True  # a restore without its files, cut off before their first upload, rebuilds the searcher

    def restore_from_dir(self, dirpath: str) -> None:
        # Tune takes an error raised here for a failed resume and starts the experiment afresh in the
        # same folder, hiding every earlier trial: an unreadable file of Tune's costs a rebuild instead.
        limit = self.searcher.max_concurrent  # the resuming driver's, not the saved one
        try:
            super().restore_from_dir(dirpath)  # it raises, if at all, reading its own file, before changing anything
        except Exception as e:
            log.warning("ndot: Tune's search state is absent or unreadable (%s: %s); rebuilding it from %s and Tune's trials",
                        type(e).__name__, e, SPEC_FILE)
            self._search.restore_from_dir(dirpath)
            self._rebuild()
        self.searcher.max_concurrent = limit
        self._finished = False

    def _rebuild(self) -> None:
        try:
            self._experiment = cloudpickle.loads(files.read_bytes(self._spec_uri()))
        except Exception as e:
            self._unrestored = f"{self._spec_uri()}: {type(e).__name__}: {e}"
            return
        self._total_samples = self._experiment.spec.get("num_samples", 1)
        self._counter = len(self._search.trial_ids)  # Tune's list, which the searcher took

    def is_finished(self) -> bool:
        # Not finished without an Experiment to count its trials by: Tune asks for the next trial, which says why.
        return not self._unrestored and super().is_finished()

    def next_trial(self) -> Trial | None:
        if self._unrestored:
            # Raised here, not in restore_from_dir: the sweep stops with its state as it was.
            raise RuntimeError(f"the sweep cannot create its remaining trials: Tune's search state is unreadable "
                               f"and so is the sweep's own copy ({self._unrestored})")
        return super().next_trial()


def _sampler(seed: int, place: int) -> optuna.samplers.TPESampler:
    """The sampler that draws a stratum's trial number `place` (from 0) of the sweep, from `seed` and that place alone.

    One sampler drawing in turn would draw again, after a resume, what it drew for the trials its saved
    state lags behind Tune's list (`StratifiedSearch.agree_with` takes them over): the same lr twice.
    A trial it drops for being ahead of the list is replaced with the same draw, as if never issued.
    """
    return optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([seed, place]).generate_state(1)[0]))


def _finished(study: optuna.Study, number: int) -> bool:
    return study.get_trials(deepcopy=False)[number].state.is_finished()


def listed_trials(experiment: str) -> list[Trial]:
    """The trials in the experiment state Tune resumes from (the newest on storage), with their last results."""
    fs, path = files.filesystem(experiment)
    # Tune's own choice of file, so that this list is the one it resumes.
    newest = _find_newest_experiment_checkpoint(path, fs=fs)
    if newest is None:
        raise FileNotFoundError(f"no experiment state in {experiment}")
    with fs.open_input_stream(newest) as f:
        state = json.loads(f.readall())
    trials = []
    for trial_state, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_state, stub=True)
        trial.restore_run_metadata(run_metadata)
        trials.append(trial)
    return trials
