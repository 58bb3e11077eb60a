"""The sweep's search and early stopping, without Ray running: equal budgets, per-stratum ASHA, resumed trials."""
from __future__ import annotations

import json
import pickle
import statistics
import sys
from types import SimpleNamespace

import optuna
import pytest
from ray.train._internal.session import _TrainingResult
from ray.tune import Checkpoint
from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
from ray.tune.experiment import Experiment, Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from ndot import checkpoint
from ndot.sweep import state_sync
from ndot.sweep.scheduler import StratifiedASHA
from ndot.sweep.searcher import StratifiedGenerator, StratifiedSearch, listed_trials
from ndot.config import parse_method
from ndot.sweep.definitions import LEARNING_RATES, RECIPE
from ndot.sweep.space import STRATUM_KEY, SearchSpace, strata

METRIC = "best_test_acc"


def _search(n_strata: int = 3, budget: int = 4) -> StratifiedSearch:
    cells = strata({"T": tuple(range(1, n_strata + 1)), "method": ("ndot_A",)})
    return StratifiedSearch(cells, SearchSpace(lr=(1e-3, 1.0)), budget, METRIC, "max", "unused", seed=0)


def _result(acc: float, epoch: int = 1) -> dict:
    return {METRIC: acc, "epoch": epoch, "training_iteration": epoch}


def test_strata_cross_axes_and_split_methods():
    cells = strata({"T": (1, 4), "method": ("ndot_O", "bptt_A")})
    assert [c.label for c in cells] == ["T=1,ndot_O", "T=1,bptt_A", "T=4,ndot_O", "T=4,bptt_A"]
    assert cells[1].values == {"T": 1, "rule": "bptt", "mode": "A"}
    # An architecture is named plainly, like a method.
    assert [c.label for c in strata({"arch": ("vgg11_ws", "resnet_ws"), "method": ("ndot_A",)})] == [
        "vgg11_ws,ndot_A", "resnet_ws,ndot_A"]
    with pytest.raises(ValueError):
        parse_method("ndot")


def test_a_setting_for_some_rules_is_off_in_the_trials_of_the_others():
    # --set detach_reset=true --set signed_factor=true --set readout_trace=true --set weight_change=0.025 over three
    # rules and two modes: each trial records what it runs.
    base = {"detach_reset": True, "signed_factor": True, "readout_trace": True, "weight_change": 0.025}
    search = StratifiedSearch(strata({"method": ("ndot_A", "ottt_O", "bptt_A")}), SearchSpace(), 1, METRIC, "max", "unused", seed=0)
    configs = [{**base, **search.suggest(f"t{i}")} for i in range(3)]  # Tune lays a suggestion over the base config
    assert {c["rule"]: {k: c[k] for k in base} for c in configs} == {
        "ndot": {"detach_reset": False, "signed_factor": True, "readout_trace": True, "weight_change": 0.0},
        "ottt": {"detach_reset": False, "signed_factor": False, "readout_trace": True, "weight_change": 0.025},
        "bptt": {"detach_reset": True, "signed_factor": False, "readout_trace": False, "weight_change": 0.0}}


def test_weight_change_is_off_in_the_trials_at_one_time_step():
    # --T 1,2 --rules ndot_O --set weight_change=0.025 (or paper_dvs's, with --T 1,2): T = 1 has no step that reads it.
    base = {"weight_change": 0.025}
    search = StratifiedSearch(strata({"T": (1, 2), "method": ("ndot_O",)}), SearchSpace(), 1, METRIC, "max", "unused", seed=0)
    configs = [{**base, **search.suggest(f"t{i}")} for i in range(2)]
    assert {c["T"]: c["weight_change"] for c in configs} == {1: 0.0, 2: 0.025}


def test_a_setting_is_off_in_the_trials_where_the_sweeps_shared_t_or_rule_leaves_it_unread():
    # A sweep of its own whose strata leave T (or the method) out, with paper_dvs's weight_change: the trials
    # run it off (ndot.sweep.trainable.run_trial) and record what they run.
    for base, axes in (({"weight_change": 0.025, "T": 1}, {"method": ("ndot_O",)}),
                       ({"weight_change": 0.025, "rule": "ndot", "mode": "A"}, {"T": (2,)})):
        search = StratifiedSearch(strata(axes), SearchSpace(), 1, METRIC, "max", "unused", seed=0, base=base)
        assert {**base, **search.suggest("t0")}["weight_change"] == 0.0


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


def test_a_restored_search_keeps_the_resuming_drivers_limit(tmp_path):
    search = _search()
    search.set_max_concurrency(1)
    assert search.suggest("a") and search.suggest("b") is None
    search.save(str(tmp_path / "searcher.pkl"))

    restored = _search()
    restored.set_max_concurrency(3)  # Tune sets the limit before it restores the searcher
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("b") and restored.suggest("c") and restored.suggest("d") is None


def test_first_point_is_each_stratums_first_trial():
    space = SearchSpace(lr=(0.01, 1.0), first={"lr": 0.1})
    cells = strata({"T": (1, 2), "method": ("ndot_A",)})
    search = StratifiedSearch(cells, space, 2, METRIC, "max", "unused", first=space.first_point())
    firsts = [search.suggest(f"t{i}")["lr"] for i in range(2)]
    assert firsts == [0.1, 0.1]
    assert search.suggest("t2")["lr"] != 0.1
    assert SearchSpace(lr=(0.2, 1.0), first={"lr": 0.1}).first_point() == {}
    # Each value on its own: one outside its range leaves the others (lr 0.1 here) to be tried first.
    wide = SearchSpace(lr=(0.01, 1.0), momentum=(0.5, 0.8), loss_alpha=(0.0, 0.2), first=RECIPE)
    assert wide.first_point() == {"lr": 0.1, "loss_alpha": 0.05}
    # A range includes its ends: --lr 0.1,1 still starts from the recipe's 0.1.
    assert SearchSpace(lr=(0.1, 1.0), momentum=(0.5, 0.9), first=RECIPE).first_point() == {"lr": 0.1, "momentum": 0.9}


def test_the_learning_rate_sweeps_first_trial_is_the_whole_recipe():
    preset = LEARNING_RATES.presets["paper"]
    space = SearchSpace(lr=preset.lr, momentum=preset.momentum, loss_alpha=preset.loss_alpha, first=preset.first)
    assert space.first_point() == {"lr": 0.1, "momentum": 0.9, "loss_alpha": 0.05}


def test_space_fixes_single_values_and_searches_ranges():
    study = optuna.create_study()
    trial = study.ask()
    fixed = SearchSpace(lr=(0.01, 1.0), momentum=(0.9, 0.9), batch_size=(64, 128))(trial)
    assert set(trial.params) == {"lr", "batch_size"} and 0.01 <= trial.params["lr"] <= 1.0
    assert fixed == {"momentum": 0.9, "loss_alpha": 0.05}
    assert len(SearchSpace(lr=(0.01, 1.0), batch_size=(64, 128)).corners()) == 4


def test_the_learning_rate_is_searched_log_uniformly_and_the_others_uniformly():
    trial = optuna.create_study().ask()
    SearchSpace(lr=(0.01, 1.0), momentum=(0.8, 0.95), loss_alpha=(0.0, 0.2))(trial)
    assert {name: d.log for name, d in trial.distributions.items()} == {"lr": True, "momentum": False, "loss_alpha": False}


def test_tpe_moves_towards_the_better_accuracy():
    # After Optuna's 10 seeded start-up trials TPE models the results: here accuracy rises with lr.
    cells = strata({"T": (1,), "method": ("ndot_A",)})
    search = StratifiedSearch(cells, SearchSpace(lr=(1e-3, 1.0)), 20, METRIC, "max", "unused", seed=0)
    lrs = []
    for i in range(20):
        lrs.append(search.suggest(f"t{i}")["lr"])
        search.on_trial_complete(f"t{i}", _result(lrs[-1]))
    assert statistics.median(lrs[10:]) > 2 * statistics.median(lrs[:10])


def test_errored_trial_resumed_after_restore_still_informs_its_study(tmp_path):
    search = _search(n_strata=1, budget=2)
    config = search.suggest("t0")
    search.on_trial_complete("t0", error=True)  # e.g. out of retries when its node died
    search.save(str(tmp_path / "searcher.pkl"))

    # Tuner.restore(resume_errored=True): a fresh searcher from the saved state, the same trial id again.
    restored = _search(n_strata=1, budget=2)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t0", _result(0.6, 2))

    (study,) = restored._studies  # the one stratum's Optuna study
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [(t.params["lr"], t.value) for t in done] == [(config["lr"], 0.6)]


def _listed(trial_id: str, config: dict, status: str, last_result: dict | None = None) -> Trial:
    """A trial as Tune's experiment state lists it."""
    trial = Trial("run_trial", config=config, trial_id=trial_id, stub=True)
    trial.create_placement_group_factory()  # as Tune's add_trial does
    trial.set_status(status)
    trial.run_metadata.last_result = last_result or {}
    return trial


def _search_from_the_recipe(experiment: str = "unused") -> StratifiedSearch:
    space = SearchSpace(lr=(1e-3, 1.0), first={"lr": 0.1})
    cells = strata({"T": (1, 2), "method": ("ndot_A",)})
    return StratifiedSearch(cells, space, 2, METRIC, "max", experiment, first=space.first_point())


def _states(study: optuna.Study) -> list[tuple[str, float | None, float]]:
    return [(t.state.name, t.value, t.params["lr"]) for t in study.trials]


def test_a_restored_search_behind_tunes_list_takes_over_the_trials_it_missed():
    search = _search_from_the_recipe()
    done = search.suggest("done")
    # Tune's list was saved later: "done" has ended, "later" was issued and runs, "failed" errored.
    later = {**done, "T": 2, STRATUM_KEY: "T=2,ndot_A"}
    failed = {**done, "lr": 0.02, "T": 2, STRATUM_KEY: "T=2,ndot_A"}
    search.agree_with([
        _listed("done", done, Trial.TERMINATED, _result(0.4)),
        _listed("later", later, Trial.RUNNING),
        _listed("failed", failed, Trial.ERROR),
    ])
    first, second = search._studies
    assert _states(first) == [("COMPLETE", 0.4, 0.1)]
    assert _states(second) == [("RUNNING", None, 0.1), ("RUNNING", None, 0.02)]
    search.on_trial_complete("later", _result(0.7))
    assert _states(second)[0] == ("COMPLETE", 0.7, 0.1)
    # Both strata have had their recipe trial; "failed" runs again and counts as live.
    search.set_max_concurrency(2)
    assert search.suggest("next")["lr"] != 0.1 and search.suggest("more") is None
    search.on_trial_complete("next", _result(0.5))
    assert search.suggest("last") == Searcher.FINISHED


def test_a_restored_search_ahead_of_tunes_list_drops_the_trials_tune_will_replace():
    search = _search_from_the_recipe()
    search.set_max_concurrency(2)
    kept, _ = search.suggest("kept"), search.suggest("dropped")
    search.on_trial_complete("kept", _result(0.6))
    # Tune's list was saved before "dropped" was issued and "kept" ended: it reruns "kept".
    search.agree_with([_listed("kept", kept, Trial.RUNNING)])
    first, second = search._studies
    assert _states(second) == [("FAIL", None, 0.1)]
    search.on_trial_complete("kept", _result(0.6))
    assert _states(first) == [("COMPLETE", 0.6, 0.1)]
    # The stratum's first trial again, with the recipe: and the budget of two trials each is whole.
    issued = [search.suggest(i)[STRATUM_KEY] for i in ("a", "b")]
    assert issued == ["T=2,ndot_A", "T=1,ndot_A"] and second.trials[-1].params["lr"] == 0.1
    search.on_trial_complete("a", _result(0.1))
    assert search.suggest("c")[STRATUM_KEY] == "T=2,ndot_A"
    assert search.suggest("d") is None  # two live
    search.on_trial_complete("b", _result(0.1))
    assert search.suggest("d") == Searcher.FINISHED


@pytest.mark.parametrize("saved, listed", [(1, 2), (None, 2), (2, 1)], ids=["state-behind-the-list", "no-state", "state-ahead"])
def test_a_resumed_stratum_draws_the_lrs_of_the_sweep_uninterrupted_each_once(tmp_path, saved, listed):
    # A driver killed mid-upload leaves the searcher's state a trial behind Tune's list, none at all, or a trial ahead.
    alone = _search(n_strata=1, budget=4)
    uninterrupted = [alone.suggest(i)["lr"] for i in "abcd"]
    started = _search(n_strata=1, budget=4)
    issued = []
    for trial_id in "ab":
        issued.append(_listed(trial_id, started.suggest(trial_id), Trial.RUNNING))
        if saved == len(issued):
            started.save(str(tmp_path / "searcher.pkl"))

    resumed = _search(n_strata=1, budget=4)
    if saved:
        resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.agree_with(issued[:listed])
    lrs = [t.config["lr"] for t in issued[:listed]] + [resumed.suggest(f"new{i}")["lr"] for i in range(4 - listed)]
    assert lrs == uninterrupted, "a stratum's budget spent on one lr twice, or on others than the seed's"


@pytest.mark.parametrize("kept_since", [("_base",), ("_seed", "_base")])
def test_a_searcher_pickled_before_its_seed_or_base_was_kept_goes_on_suggesting(kept_since):
    # Tune unpickles the searcher a sweep was started with: one started before has no _seed or _base of its own.
    old = _search(n_strata=1, budget=3)
    old.suggest("a")
    for name in kept_since:
        del old.__dict__[name]
    old = pickle.loads(pickle.dumps(old))
    assert len({old.suggest(i)["lr"] for i in "bc"}) == 2 and old.suggest("d") == Searcher.FINISHED


def _noop(config: dict) -> None:
    pass


def _sweep(tmp_path) -> Experiment:
    # num_samples=-1 as tune.run passes it on.
    return Experiment("sweep", _noop, num_samples=sys.maxsize, storage_path=str(tmp_path))


def test_a_resume_replaces_a_dropped_last_trial_though_the_search_had_finished(tmp_path):
    experiment = tmp_path / "sweep"
    generator = StratifiedGenerator(_search_from_the_recipe(str(experiment)), max_concurrent=8)
    generator.add_configurations(_sweep(tmp_path))
    trials = [generator.next_trial() for _ in range(4)]
    assert generator.next_trial() is None and generator.is_finished()
    for trial in trials:
        trial.create_placement_group_factory()  # as Tune's add_trial does
    generator.save_to_dir(str(tmp_path), "1")
    # Tune's list was saved before the last trial was created.
    state = {"trial_data": [t.get_json_state() for t in trials[:3]]}
    (experiment / "experiment_state-x.json").write_text(json.dumps(state))

    # As Tune resumes: the generator as pickled at the start, restored, no add_configurations.
    resumed = StratifiedGenerator(_search_from_the_recipe(str(experiment)), max_concurrent=6)
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.searcher.max_concurrent == 6, "the limit saved at the start, not the resuming driver's"
    assert not resumed.is_finished()
    replacement = resumed.next_trial()
    assert replacement.config[STRATUM_KEY] == trials[3].config[STRATUM_KEY]
    assert resumed.next_trial() is None and resumed.is_finished()


def test_a_search_that_cannot_read_tunes_list_on_resume_fails_at_first_use_until_it_can(tmp_path):
    experiment = tmp_path / "sweep"
    search = _search_from_the_recipe(str(experiment))
    config = search.suggest("a")
    search.save_to_dir(str(tmp_path), "1")

    # Raised in restore_from_dir, the error would make Tune start the experiment afresh.
    restored = _search_from_the_recipe(str(experiment))
    restored.set_max_concurrency(1)  # "a", still live as saved, fills it
    restored.restore_from_dir(str(tmp_path))
    with pytest.raises(RuntimeError, match="could not be matched to its trials.*no experiment state in.*run --resume again"):
        restored.suggest("b")
    restored.save_to_dir(str(tmp_path), "2")  # Tune saves the state of the run that stopped

    # Tune's list, written as Tune writes it, readable at the next resume.
    experiment.mkdir()
    listed = _listed("a", config, Trial.TERMINATED, _result(0.5))
    (experiment / "experiment_state-x.json").write_text(json.dumps({"trial_data": [listed.get_json_state()]}))
    again = _search_from_the_recipe(str(experiment))
    again.restore_from_dir(str(tmp_path))
    assert [t.trial_id for t in listed_trials(str(experiment))] == ["a"]
    assert again.suggest("b")[STRATUM_KEY] == "T=2,ndot_A"
    assert _states(again._studies[0]) == [("COMPLETE", 0.5, 0.1)]


def test_a_resume_without_the_searchers_files_rebuilds_it_from_tunes_list(tmp_path):
    experiment, staging = tmp_path / "sweep", tmp_path / "staging"
    started = _search_from_the_recipe(str(experiment))
    listed = [_listed("a", started.suggest("a"), Trial.TERMINATED, _result(0.5)), _listed("b", started.suggest("b"), Trial.RUNNING)]
    experiment.mkdir()
    staging.mkdir()
    (experiment / "experiment_state-x.json").write_text(json.dumps({"trial_data": [t.get_json_state() for t in listed]}))

    # The driver died before its searcher's files first reached storage: Tune's list alone.
    resumed = StratifiedGenerator(_search_from_the_recipe(str(experiment)), max_concurrent=2)
    assert resumed.has_checkpoint(str(staging))
    resumed.restore_from_dir(str(staging))
    search = resumed.searcher.searcher
    assert _states(search._studies[0]) == [("COMPLETE", 0.5, 0.1)]
    assert _states(search._studies[1]) == [("RUNNING", None, 0.1)]
    assert search.suggest("c")[STRATUM_KEY] == "T=1,ndot_A" and search.suggest("d") is None


@pytest.mark.parametrize("files", ["cut-short", "absent"])
def test_a_resume_whose_search_files_are_cut_short_or_absent_creates_the_remaining_trials(tmp_path, files):
    experiment, staging = tmp_path / "sweep", tmp_path / "staging"
    started = StratifiedGenerator(_search_from_the_recipe(str(experiment)), max_concurrent=8)
    started.add_configurations(Experiment("sweep", _noop, config={"epochs": 3}, num_samples=sys.maxsize, storage_path=str(tmp_path)))
    first = started.next_trial()
    first.create_placement_group_factory()
    staging.mkdir()
    if files == "cut-short":
        # A driver killed while Tune copied its state to storage: Tune's upload is no atomic write.
        started.save_to_dir(str(staging), "1")
        for f in staging.iterdir():
            f.write_bytes(b"")
    (experiment / "experiment_state-x.json").write_text(json.dumps({"trial_data": [first.get_json_state()]}))

    resumed = StratifiedGenerator(_search_from_the_recipe(str(experiment)), max_concurrent=8)
    resumed.restore_from_dir(str(staging))  # raised here, the error would have Tune start the sweep afresh
    rest = [resumed.next_trial() for _ in range(3)]
    assert resumed.next_trial() is None and resumed.is_finished()
    assert sorted(t.config[STRATUM_KEY] for t in [first, *rest]) == ["T=1,ndot_A"] * 2 + ["T=2,ndot_A"] * 2
    assert all(t.config["epochs"] == 3 for t in rest), "a trial without the sweep's fixed values"

    # Without the sweep's own copy either, the resume stops when it needs a trial: nothing is lost.
    (experiment / "search_spec.pkl").unlink()
    again = StratifiedGenerator(_search_from_the_recipe(str(experiment)), max_concurrent=8)
    again.restore_from_dir(str(staging))
    assert not again.is_finished(), "Tune would end the sweep short of its trials, and never ask why"
    with pytest.raises(RuntimeError, match="cannot create its remaining trials.*search_spec.pkl"):
        again.next_trial()


def _trial(trial_id: str, stratum: str) -> Trial:
    return Trial("run_trial", config={STRATUM_KEY: stratum}, trial_id=trial_id, stub=True)


def _asha(max_t: int = 9) -> StratifiedASHA:
    return StratifiedASHA(METRIC, "max", time_attr="epoch", max_t=max_t, grace_period=1, reduction_factor=3)


def test_asha_compares_trials_only_within_their_stratum():
    asha = _asha()
    good_t6, poor_t1, poorer_t1 = _trial("a", "T=6"), _trial("b", "T=1"), _trial("c", "T=1")
    for t in (good_t6, poor_t1, poorer_t1):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good_t6, _result(0.9)) == TrialScheduler.CONTINUE
    # Far below the T=6 trial, but the first of its own stratum: kept.
    assert asha.on_trial_result(None, poor_t1, _result(0.2)) == TrialScheduler.CONTINUE
    # Below the only other T=1 trial at the same rung: stopped.
    assert asha.on_trial_result(None, poorer_t1, _result(0.1)) == TrialScheduler.STOP


def test_a_sweep_shorter_than_its_grace_period_is_never_stopped_early():
    # --preset paper --epochs 10: the preset's grace period (30 epochs) exceeds the trials' length.
    asha = StratifiedASHA(METRIC, "max", time_attr="epoch", max_t=10, grace_period=30, reduction_factor=3)
    first, poorer = _trial("a", "T=1"), _trial("b", "T=1")
    for t in (first, poorer):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, first, _result(0.9)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, poorer, _result(0.1)) == TrialScheduler.CONTINUE


def test_asha_rungs_survive_a_resume(tmp_path):
    """A resumed experiment re-adds its trials to a fresh scheduler; their checkpoints rebuild the rungs."""
    accs = [0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.84, 0.86, 0.9]
    rows = [_result(acc, epoch) for epoch, acc in enumerate(accs, 1)]
    live = _asha()
    done = _trial("done", "T=1")
    live.on_trial_add(None, done)
    for row in rows:
        live.on_trial_result(None, done, row)
    live.on_trial_complete(None, done, rows[-1])

    # The same trial as Tuner.restore hands it over: finished, its history in its newest checkpoint.
    checkpoint.write_history(tmp_path, rows)
    restored_done = _trial("done", "T=1")
    restored_done.run_metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(checkpoint=Checkpoint.from_directory(str(tmp_path)), metrics=rows[-1]))
    restored_done.set_status(Trial.TERMINATED)
    restored = _asha()
    restored.on_trial_add(None, restored_done)

    def decisions(asha: StratifiedASHA, trial_id: str) -> list[str]:
        # Level with the finished trial at the first rung (1), behind it at the second (3).
        late = _trial(trial_id, "T=1")
        asha.on_trial_add(None, late)
        return [asha.on_trial_result(None, late, _result(acc, epoch)) for epoch, acc in ((1, 0.55), (2, 0.6), (3, 0.65))]

    expected = [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert decisions(live, "late") == expected
    assert decisions(restored, "late") == expected
    # Without the rebuilt rungs the late trial would be the first of its stratum, and kept.
    assert TrialScheduler.STOP not in decisions(_asha(), "late")


def test_a_restored_trial_with_an_unreadable_checkpoint_is_added_as_new(tmp_path):
    trial = _trial("cut", "T=1")
    # A checkpoint folder whose history upload was cut short.
    (tmp_path / checkpoint.HISTORY).write_text('[{"epoch": 1, ')
    trial.run_metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(checkpoint=Checkpoint.from_directory(str(tmp_path)), metrics={}))
    asha = _asha()
    asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, trial, _result(0.1)) == TrialScheduler.CONTINUE


def test_each_save_of_the_experiment_state_first_waits_for_the_last_upload_and_survives_its_failure(monkeypatch):
    # test_sweep.py checks this against uploads on a Ray cluster; here the order of the calls alone, without Ray.
    calls, warnings = [], []
    monkeypatch.setattr(state_sync, "logger", SimpleNamespace(warning=lambda *args: warnings.append(args[0] % args[1:])))

    class Syncer:
        def __init__(self, fails: bool) -> None:
            self.fails = fails

        def wait(self) -> None:
            calls.append("wait for the last upload")
            if self.fails:
                raise RuntimeError("upload cut short")

    def sync_up(manager, save_fn, force=False, wait=False):
        calls.append(("Tune's sync_up", force, wait))
        save_fn()

    patched = state_sync._after_the_last_upload(sync_up)
    for fails in (False, True):
        calls.clear()
        manager = SimpleNamespace(_storage=SimpleNamespace(syncer=Syncer(fails), experiment_fs_path="bucket/exp"))
        patched(manager, lambda: calls.append("save"), force=True, wait=False)
        assert calls == [("Tune's sync_up", True, False), "wait for the last upload", "save"]
    # A failed upload is Tune's to retry with the next save: logged, and this save still happens.
    assert warnings == ["an upload of the experiment state to bucket/exp failed: upload cut short"]
    # Installed by importing the searcher, once: installing again wraps nothing twice.
    installed = _ExperimentCheckpointManager.sync_up_experiment_state
    assert installed.waits_for_the_last_upload
    state_sync.install()
    assert _ExperimentCheckpointManager.sync_up_experiment_state is installed
