"""The sweep's search and early stopping, without Ray running: equal budgets, per-stratum ASHA, resumed errored trials."""
from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from ndot.sweep.scheduler import StratifiedASHA
from ndot.sweep.searcher import StratifiedSearch
from ndot.sweep.space import STRATUM_KEY, SearchSpace, parse_method, strata

METRIC = "best_test_acc"


def _search(n_strata: int = 3, budget: int = 4, **space) -> StratifiedSearch:
    cells = strata({"T": tuple(range(1, n_strata + 1)), "method": ("ndot_A",)})
    return StratifiedSearch(cells, SearchSpace(lr=(1e-3, 1.0), **space), budget, METRIC, "max", seed=0)


def _result(acc: float, epoch: int = 1) -> dict:
    return {METRIC: acc, "epoch": epoch, "training_iteration": epoch}


def test_strata_cross_axes_and_split_methods():
    cells = strata({"T": (1, 4), "method": ("ndot_O", "bptt_A")})
    assert [c.label for c in cells] == ["T=1,ndot_O", "T=1,bptt_A", "T=4,ndot_O", "T=4,bptt_A"]
    assert cells[1].values == {"T": 1, "rule": "bptt", "mode": "A"}
    with pytest.raises(ValueError):
        parse_method("ndot")


def test_every_stratum_gets_the_same_budget_whatever_the_results():
    search = _search()
    issued = []
    for i in range(12):
        config = search.suggest(f"t{i}")
        issued.append(config[STRATUM_KEY])
        # Strongly favour one stratum: a single TPE study would starve the others.
        search.on_trial_complete(f"t{i}", _result(0.99 if config["T"] == 1 else 0.01))
    assert issued[:3] == ["T=1,ndot_A", "T=2,ndot_A", "T=3,ndot_A"]  # served in turn
    assert {s: issued.count(s) for s in set(issued)} == {"T=1,ndot_A": 4, "T=2,ndot_A": 4, "T=3,ndot_A": 4}
    assert search.suggest("t12") == Searcher.FINISHED


def test_concurrency_limit_counts_live_trials():
    search = _search()
    assert search.set_max_concurrency(2)
    assert search.suggest("a") and search.suggest("b")
    assert search.suggest("c") is None
    search.on_trial_complete("a", _result(0.5))
    assert search.suggest("c") is not None


def test_first_point_is_each_stratums_first_trial():
    space = SearchSpace(lr=(0.01, 1.0), first={"lr": 0.1})
    cells = strata({"T": (1, 2), "method": ("ndot_A",)})
    search = StratifiedSearch(cells, space, 2, METRIC, "max", first=space.first_point())
    firsts = [search.suggest(f"t{i}")["lr"] for i in range(2)]
    assert firsts == [0.1, 0.1]
    assert search.suggest("t2")["lr"] != 0.1
    assert SearchSpace(lr=(0.2, 1.0), first={"lr": 0.1}).first_point() == {}


def test_space_fixes_single_values_and_searches_ranges():
    study = optuna.create_study()
    trial = study.ask()
    fixed = SearchSpace(lr=(0.01, 1.0), momentum=(0.9, 0.9), batch_size=(64, 128))(trial)
    assert set(trial.params) == {"lr", "batch_size"} and 0.01 <= trial.params["lr"] <= 1.0
    assert fixed == {"momentum": 0.9, "loss_alpha": 0.05}
    assert len(SearchSpace(lr=(0.01, 1.0), batch_size=(64, 128)).corners()) == 4


def test_errored_trial_resumed_after_restore_still_informs_its_study(tmp_path):
    search = _search(n_strata=1, budget=2)
    config = search.suggest("t0")
    search.on_trial_result("t0", _result(0.3, 1))
    search.on_trial_complete("t0", error=True)  # e.g. out of retries when its node died
    search.save(str(tmp_path / "searcher.pkl"))

    # Tuner.restore(resume_errored=True): a fresh searcher from the saved state, the same trial id again.
    restored = _search(n_strata=1, budget=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("t0", _result(0.6, 2))
    restored.on_trial_complete("t0", _result(0.6, 2))

    done = [t for t in restored.study(config[STRATUM_KEY]).trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [(t.params["lr"], t.value) for t in done] == [(config["lr"], 0.6)]


def _trial(trial_id: str, stratum: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={STRATUM_KEY: stratum})


def test_asha_compares_trials_only_within_their_stratum():
    asha = StratifiedASHA(METRIC, "max", time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3)
    good_t6, poor_t1, poorer_t1 = _trial("a", "T=6"), _trial("b", "T=1"), _trial("c", "T=1")
    for t in (good_t6, poor_t1, poorer_t1):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good_t6, _result(0.9)) == TrialScheduler.CONTINUE
    # Far below the T=6 trial, but the first of its own stratum: kept.
    assert asha.on_trial_result(None, poor_t1, _result(0.2)) == TrialScheduler.CONTINUE
    # Below the only other T=1 trial at the same rung: stopped.
    assert asha.on_trial_result(None, poorer_t1, _result(0.1)) == TrialScheduler.STOP
