"""The sweep's tables and progress lines, without Ray running: where they are written, storage that fails for a moment, checkpoints gone."""
from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

from ray.train._internal.session import _TrainingResult
from ray.train._internal.storage import StorageContext
from ray.tune import Checkpoint, CheckpointConfig
from ray.tune.experiment import Trial
from tensorboardX import SummaryWriter

import pandas as pd

from ndot import checkpoint, results
from ndot.sweep import cli, runner
from ndot.sweep.progress import Progress, status_line
from ndot.sweep.definitions import ARCHITECTURES, TIMESTEPS
from ndot.sweep.recorder import CheckpointsCallback, TablesCallback, TensorBoardCallback
from ndot.sweep.scheduler import continue_from_whole_checkpoint

CONFIG = {"dataset": "digits", "arch": "small_cnn", "rule": "ndot", "mode": "A", "T": 2, "epochs": 3, "stratum": "T=2,ndot_A"}


def _trial(experiment: Path, trial_id: str = "t0", kept: int | None = None) -> Trial:
    storage = StorageContext(storage_path=str(experiment.parent), experiment_dir_name=experiment.name, trial_dir_name=trial_id)
    return Trial("run_trial", config=dict(CONFIG), trial_id=trial_id, stub=True, storage=storage,
                 checkpoint_config=CheckpointConfig(num_to_keep=kept))


def _checkpoint(trial: Trial, epoch: int, write_history: bool = True) -> SimpleNamespace:
    """A checkpoint folder as the trainable leaves it, holding the history of epochs 1..epoch."""
    path = Path(trial.storage.trial_fs_path, f"checkpoint_{epoch - 1:06d}")
    path.mkdir(parents=True)
    (path / checkpoint.TRIAL).write_bytes(b"")  # every epoch is the best: its own state holds the best weights
    if write_history:
        metrics = [{"epoch": e, "status": "ok", "train_loss": 1.0 / e, "test_acc": 0.5 + e / 10, "best_test_acc": 0.5 + e / 10,
                    "epoch_seconds": 1.0, "peak_mem_mb": 10.0, "image_steps_per_s": 100.0} for e in range(1, epoch + 1)]
        rows = [results.epoch_row(trial.trial_id, trial.config, m, {"node_ip": "1.2.3.4"}, 1000.0 + m["epoch"]) for m in metrics]
        checkpoint.write_history(path, rows)
    return Checkpoint.from_directory(str(path))


def _step(callback: TablesCallback, trials: list[Trial], checkpoint_of: dict[str, SimpleNamespace] | None = None) -> None:
    callback.on_step_begin(0, trials)
    for trial in trials:
        if checkpoint_of and trial.trial_id in checkpoint_of:
            callback.on_checkpoint(0, trials, trial, checkpoint_of[trial.trial_id])
    callback.on_step_end(0, trials)


def test_tables_go_to_the_trials_experiment_folder(tmp_path):
    trial = _trial(tmp_path / "sweeps" / "exp")
    callback = TablesCallback(min_interval_s=0)
    _step(callback, [trial], {"t0": _checkpoint(trial, 2)})
    trials = results.load(str(tmp_path / "sweeps" / "exp"), results.TRIALS_TABLE)
    assert trials["epochs_run"].tolist() == [2] and trials["checkpoint"].tolist() == ["t0/checkpoint_000001"]
    assert len(results.load(str(tmp_path / "sweeps" / "exp"))) == 2


def test_sweeps_tables_concatenated_say_which_sweep_each_row_is_of_as_written_and_as_rebuilt(tmp_path, capsys):
    # The live tables, and those rebuilt from the trials' folders (no experiment state), of three sweeps, two of
    # them of one --name in two storages.
    experiments = {}
    for sweep, storage, name in ((TIMESTEPS, "here", "t-smoke"), (ARCHITECTURES, "here", "a-smoke"), (TIMESTEPS, "there", "t-smoke")):
        args = ["--storage", str(tmp_path / storage), "--name", name]
        plan = cli.build_plan(sweep, cli.parser(sweep).parse_args(args))
        runner.save_plan(plan, new=True)
        trials = [_trial(Path(plan.experiment), f"{storage}-{name}-{i}") for i in range(2)]
        _step(TablesCallback(min_interval_s=0), trials, {t.trial_id: _checkpoint(t, 2) for t in trials})
        experiments[plan.experiment] = [results.load(plan.experiment, table) for table in (results.EPOCHS_TABLE, results.TRIALS_TABLE)]
        assert results.main(["collect", plan.experiment]) == 0
        assert "no readable experiment state" in capsys.readouterr().err
        for table, live in zip((results.EPOCHS_TABLE, results.TRIALS_TABLE), experiments[plan.experiment]):
            rebuilt = results.load(plan.experiment, table)
            assert list(rebuilt.columns[:4]) == list(live.columns[:4]) == ["experiment", "sweep", "storage", "trial_id"]
            assert rebuilt[["experiment", "sweep", "storage"]].equals(live[["experiment", "sweep", "storage"]])
    for table in (results.EPOCHS_TABLE, results.TRIALS_TABLE):
        all_three = pd.concat([pd.read_parquet(results.table_uri(e, table)) for e in experiments])
        assert all(pd.api.types.is_string_dtype(all_three[col]) for col in ("experiment", "sweep", "storage"))
        by_sweep = all_three.groupby(["storage", "experiment"])
        ids = by_sweep["trial_id"].unique().map(sorted).to_dict()
        assert ids == {(str(tmp_path / storage), name): [f"{storage}-{name}-{i}" for i in range(2)]
                       for storage, name in (("here", "t-smoke"), ("here", "a-smoke"), ("there", "t-smoke"))}, table
        assert by_sweep["sweep"].unique().map(list).to_dict() == {
            (str(tmp_path / "here"), "t-smoke"): ["timesteps"], (str(tmp_path / "here"), "a-smoke"): ["architectures"],
            (str(tmp_path / "there"), "t-smoke"): ["timesteps"]}
    # The summary and figures read tables with the columns as they read those written before them.
    experiment = next(iter(experiments))
    assert results.main(["summary", experiment]) == 0 and results.main(["plot", experiment]) == 0


def test_a_history_that_cannot_be_read_yet_is_read_at_a_later_write(tmp_path, caplog):
    trial = _trial(tmp_path / "exp")
    callback = TablesCallback(min_interval_s=0)
    first = _checkpoint(trial, 1, write_history=False)
    with caplog.at_level(logging.WARNING):
        _step(callback, [trial], {"t0": first})  # must not raise: Tune would drop the checkpoint
    assert "could not read the history" in caplog.text
    assert results.load(str(tmp_path / "exp"), results.TRIALS_TABLE)["epochs_run"].tolist() == [0]

    second = _checkpoint(trial, 2)
    _step(callback, [trial], {"t0": second})
    assert results.load(str(tmp_path / "exp"), results.TRIALS_TABLE)["epochs_run"].tolist() == [2]


def test_tables_that_cannot_be_written_cost_a_warning_and_a_retry(tmp_path, caplog):
    experiment = tmp_path / "exp"
    trial = _trial(experiment)
    checkpoint = _checkpoint(trial, 3)
    callback = TablesCallback(min_interval_s=0)
    blocker = experiment / f"{results.EPOCHS_TABLE}.parquet"
    blocker.mkdir()  # a folder where the table goes: every write of it fails
    with caplog.at_level(logging.WARNING):
        _step(callback, [trial], {"t0": checkpoint})
        callback.on_trial_complete(0, [trial], trial)
        trial.set_status(Trial.TERMINATED)
        callback.on_experiment_end([trial])
    assert caplog.text.count("could not write the tables") == 2

    shutil.rmtree(blocker)
    _step(callback, [trial])
    trials = results.load(str(experiment), results.TRIALS_TABLE)
    assert trials["status"].tolist() == [results.COMPLETED] and trials["best_epoch"].tolist() == [3]


def test_checkpoints_that_cannot_be_read_at_the_start_cost_a_warning_and_a_retry(tmp_path, caplog, monkeypatch):
    # The first step of a sweep, or of a resume, reads every trial's checkpoints from storage.
    trial = _trial(tmp_path / "exp")
    _checkpoint(trial, 2)
    record = results.record

    def storage_down(t):
        raise OSError("When listing objects under key 'exp/t0': connection reset (simulated)")

    monkeypatch.setattr(results, "record", storage_down)
    callback = TablesCallback(min_interval_s=0)
    with caplog.at_level(logging.WARNING):
        _step(callback, [trial])  # must not raise: Tune would end the sweep
    assert "could not read the trials' checkpoints" in caplog.text

    monkeypatch.setattr(results, "record", record)
    callback.on_trial_complete(0, [trial], trial)
    _step(callback, [trial])
    assert results.load(str(tmp_path / "exp"), results.TRIALS_TABLE)["epochs_run"].tolist() == [2]


def test_a_finished_trial_whose_recorded_checkpoint_was_deleted_keeps_its_newest_one(tmp_path):
    # Retention deleted the checkpoint the saved experiment state names, and then the driver died:
    # collecting (and resuming) must still read the trial, from what its folder holds.
    trial = _trial(tmp_path / "exp")
    _checkpoint(trial, 1)
    gone = _checkpoint(trial, 2)
    trial.run_metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(checkpoint=Checkpoint.from_directory(gone.path), metrics={}))
    trial.set_status(Trial.TERMINATED)
    shutil.rmtree(gone.path)
    record = results.record(trial)
    assert [row["epoch"] for row in record.history] == [1] and record.checkpoint == "t0/checkpoint_000000"


def test_trials_an_interrupted_sweep_stops_are_running_not_finished(tmp_path):
    # Ctrl-C: Tune marks the trials it was running TERMINATED without completing them.
    done, cut = _trial(tmp_path / "exp", "done"), _trial(tmp_path / "exp", "cut")
    callback = TablesCallback(min_interval_s=0)
    _step(callback, [done, cut], {"done": _checkpoint(done, 3), "cut": _checkpoint(cut, 1)})
    callback.on_trial_complete(0, [done, cut], done)
    for trial in (done, cut):
        trial.set_status(Trial.TERMINATED)
    callback.on_experiment_end([done, cut])
    status = results.load(str(tmp_path / "exp"), results.TRIALS_TABLE).set_index("trial_id")["status"]
    assert status.to_dict() == {"done": results.COMPLETED, "cut": "running"}


def test_a_write_builds_anew_only_the_rows_of_the_trials_that_changed(tmp_path, monkeypatch):
    # The driver rewrites the tables every few seconds for the whole sweep: building every trial's rows anew
    # each time made a write's work grow with the trials finished (4 s a write at 500 trials of 300 epochs).
    built = []
    epochs_of = results._epochs_of

    def counted(record: results.TrialRecord):
        built.append(record.trial_id)
        return epochs_of(record)

    monkeypatch.setattr(results, "_epochs_of", counted)
    trials = [_trial(tmp_path / "exp", f"t{i}") for i in range(3)]
    callback = TablesCallback(min_interval_s=0)
    _step(callback, trials, {t.trial_id: _checkpoint(t, 1) for t in trials})
    assert sorted(built) == ["t0", "t1", "t2"]
    built.clear()
    _step(callback, trials, {"t1": _checkpoint(trials[1], 2)})
    assert built == ["t1"]
    built.clear()
    callback.on_trial_complete(0, trials, trials[2])  # stopped early, its history as it was
    trials[2].set_status(Trial.TERMINATED)
    _step(callback, trials)
    assert built == ["t2"]
    table = results.load(str(tmp_path / "exp"), results.TRIALS_TABLE).set_index("trial_id")
    assert table["epochs_run"].to_dict() == {"t0": 1, "t1": 2, "t2": 1}
    assert table["status"].to_dict() == {"t0": "pending", "t1": "pending", "t2": results.STOPPED_EARLY}
    epochs = results.load(str(tmp_path / "exp"))
    assert list(zip(epochs["trial_id"], epochs["epoch"])) == [("t0", 1), ("t1", 1), ("t1", 2), ("t2", 1)]


def test_a_trial_tune_reads_back_as_pending_is_running_once_it_has_epochs(tmp_path):
    # Tune's state loader turns RUNNING into PENDING: collected after the driver stopped, a trial it cut
    # short must read as the tables written at the stop say, `running`; one that never began stays pending.
    begun, waiting = _trial(tmp_path / "exp", "begun"), _trial(tmp_path / "exp", "waiting")
    _checkpoint(begun, 2)
    status = {t.trial_id: results.outcome(results.record(t).tune_status, None, 3) for t in (begun, waiting)}
    assert status == {"begun": "running", "waiting": "pending"}


def test_the_progress_line_gives_an_accuracy_only_where_an_epoch_was_tested(tmp_path, capsys):
    progress = Progress(total=2)
    first, later = _trial(tmp_path / "exp", "first"), _trial(tmp_path / "exp", "later")
    for trial in (first, later):
        trial.config["lr"] = 0.1
    first.update_last_result({"epoch": 1, "status": "diverged", "best_test_acc": 0.0})
    later.update_last_result({"epoch": 2, "status": "diverged", "best_test_acc": 0.625})
    progress.on_trial_complete(0, [first, later], first)
    first.set_status(Trial.TERMINATED)
    progress.on_trial_complete(0, [first, later], later)
    assert capsys.readouterr().out.splitlines() == ["[1/2] T=2,ndot_A lr=0.1: diverged (epoch 1, not tested)",
                                                    "[2/2] T=2,ndot_A lr=0.1: diverged (epoch 2, best acc 0.6250)"]


def test_a_running_sweep_says_where_it_stands_at_each_interval(tmp_path, capsys):
    now = 0.0
    progress = Progress(total=6, every_s=300, clock=lambda: now)
    trials = {name: _trial(tmp_path / "exp", name) for name in ("done", "diverged", "ahead", "behind", "waiting")}
    for trial, lr in zip(trials.values(), (0.1, 0.2, 0.3, 0.4, 0.5)):
        trial.config["lr"] = lr
    trials["done"].update_last_result({"epoch": 3, "status": "ok", "best_test_acc": 0.875})
    trials["diverged"].update_last_result({"epoch": 1, "status": "diverged", "best_test_acc": 0.0})
    trials["ahead"].update_last_result({"epoch": 2, "status": "ok", "best_test_acc": 0.9375})
    for name, status in (("done", Trial.TERMINATED), ("diverged", Trial.ERROR), ("ahead", Trial.RUNNING), ("behind", Trial.RUNNING)):
        trials[name].set_status(status)
    lines = []
    for now in (299.0, 300.0, 301.0, 650.0):
        progress.on_step_end(0, list(trials.values()))
        lines.append(capsys.readouterr().out)
    # The sixth trial is not created yet: it waits too.
    assert lines == ["", "0:05:00 in: 2/6 trials done, 2 running (0-2 of 3 epochs done), 2 waiting; best acc so far 0.9375 (T=2,ndot_A lr=0.3)\n",
                     "", "0:10:50 in: 2/6 trials done, 2 running (0-2 of 3 epochs done), 2 waiting; best acc so far 0.9375 (T=2,ndot_A lr=0.3)\n"]
    # A trial diverged in its first epoch was never tested: its 0 is no accuracy.
    assert status_line([trials["diverged"]], 2, 61.0) == "0:01:01 in: 1/2 trials done, 0 running, 1 waiting"
    trials["behind"].update_last_result({"epoch": 2, "status": "ok", "best_test_acc": 0.5})
    assert "2 running (2 of 3 epochs done)" in status_line(list(trials.values()), 6, 0.0)


def _register(trial: Trial, ckpt: Checkpoint, epoch: int) -> None:
    manager = trial.run_metadata.checkpoint_manager
    manager.register_checkpoint(_TrainingResult(checkpoint=ckpt, metrics={"epoch": epoch, "training_iteration": epoch}))


def test_a_resume_past_checkpoints_retention_deleted_keeps_only_the_newest_ones(tmp_path):
    # Two kept: the state saved at epoch 4 names epochs 3 and 4; the trial went on to epoch 6, Tune
    # deleting 3 and 4 as it went, and the driver died before its next save.
    trial = _trial(tmp_path / "exp", kept=2)
    for epoch in (3, 4):
        _register(trial, _checkpoint(trial, epoch), epoch)
    newer = [_checkpoint(trial, epoch) for epoch in (5, 6)]
    for epoch in (3, 4):
        shutil.rmtree(Path(trial.storage.trial_fs_path, f"checkpoint_{epoch - 1:06d}"))

    continue_from_whole_checkpoint(trial)
    assert trial.checkpoint.path == newer[1].path and trial.storage.current_checkpoint_index == 5
    # Both left on storage are Tune's again: its next checkpoint retires epoch 5's, which the state never listed.
    trial.storage.current_checkpoint_index += 1
    _register(trial, _checkpoint(trial, 7), 7)
    on_storage = sorted(p.name for p in Path(trial.storage.trial_fs_path).glob("checkpoint_*"))
    assert on_storage == ["checkpoint_000005", "checkpoint_000006"]


def test_a_finished_trial_keeps_its_last_checkpoint_alone_and_an_errored_one_keeps_two_for_its_resume(tmp_path, caplog):
    names = ("done", "done_before_a_kill", "failed", "stopped_by_ctrl_c", "unbegun")
    trials = {trial_id: _trial(tmp_path / "exp", trial_id, kept=2) for trial_id in names}
    for trial in trials.values():
        if trial.trial_id != "unbegun":
            for epoch in (2, 3):
                _register(trial, _checkpoint(trial, epoch), epoch)
    # Newer than the one Tune recorded last, which the tables name: left from before a resume that ended it sooner.
    _checkpoint(trials["done"], 4)
    # A driver killed after this trial completed: its callback's state, as Tune's snapshot saved it, is resumed.
    killed = CheckpointsCallback()
    killed.on_trial_complete(0, list(trials.values()), trials["done_before_a_kill"])
    callback = CheckpointsCallback()
    callback.set_state(pickle.loads(pickle.dumps(killed.get_state())))
    for trial_id, ended in (("done", callback.on_trial_complete), ("failed", callback.on_trial_error),
                            ("unbegun", callback.on_trial_complete)):
        ended(0, list(trials.values()), trials[trial_id])
    for trial in trials.values():
        trial.set_status(Trial.ERROR if trial.trial_id == "failed" else Trial.TERMINATED)  # a Ctrl-C's stop too

    def kept() -> dict[str, list[str]]:
        return {t.trial_id: sorted(p.name for p in Path(t.path).glob("checkpoint_*")) for t in trials.values()}

    # Until the sweep ends, past Tune's last snapshot, a resume may yet run a completed trial from its older one.
    assert kept()["done"] == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]
    with caplog.at_level(logging.WARNING):
        callback.on_experiment_end(list(trials.values()))
    assert not caplog.records
    both = ["checkpoint_000001", "checkpoint_000002"]
    assert kept() == {"done": ["checkpoint_000002"], "done_before_a_kill": ["checkpoint_000002"], "failed": both,
                      "stopped_by_ctrl_c": both, "unbegun": []}
    record = results.record(trials["done"])
    assert len(record.history) == 3 and record.checkpoint == "done/checkpoint_000002"


def test_checkpoints_that_cannot_be_deleted_cost_a_warning_not_the_sweep(tmp_path, caplog):
    # Storage that fails as a finished trial's older checkpoints are deleted (here its folder is gone, as from a
    # mount lost): Tune does not catch a callback's error, and the sweep would end with its traceback.
    trial = _trial(tmp_path / "exp", kept=2)
    for epoch in (2, 3):
        _register(trial, _checkpoint(trial, epoch), epoch)
    shutil.rmtree(trial.path)
    callback = CheckpointsCallback()
    callback.on_trial_complete(0, [trial], trial)
    with caplog.at_level(logging.WARNING):
        callback.on_experiment_end([trial])
    assert "could not delete the older checkpoints of trial t0" in caplog.text


def test_a_sweep_started_by_an_older_ndot_prunes_its_finished_trials_after_a_resume(tmp_path):
    # Tune unpickles the callbacks a sweep was started with: an older ndot's CheckpointsCallback held nothing.
    trial = _trial(tmp_path / "exp", kept=2)
    for epoch in (2, 3):
        _register(trial, _checkpoint(trial, epoch), epoch)
    started = CheckpointsCallback()
    vars(started).clear()  # as an older ndot's
    callback = pickle.loads(pickle.dumps(started))
    callback.on_trial_complete(0, [trial], trial)
    callback.on_experiment_end([trial])
    assert sorted(p.name for p in Path(trial.path).glob("checkpoint_*")) == ["checkpoint_000002"]


def test_a_trial_asha_stopped_is_stopped_early_in_its_run_and_after_a_resume(tmp_path):
    # ASHA ends a trial short of its epochs: Tune completes it (TERMINATED), unlike a sweep's Ctrl-C.
    trial = _trial(tmp_path / "exp", "cut")
    callback = TablesCallback(min_interval_s=0)
    ckpt = _checkpoint(trial, 1)
    _step(callback, [trial], {"cut": ckpt})
    callback.on_trial_complete(0, [trial], trial)
    trial.set_status(Trial.TERMINATED)
    callback.on_experiment_end([trial])
    status = results.load(str(tmp_path / "exp"), results.TRIALS_TABLE)["status"]
    assert status.tolist() == [results.STOPPED_EARLY]
    # A resume's callback sees it TERMINATED from its first step, and never completes it again.
    _register(trial, ckpt, 1)
    resumed = TablesCallback(min_interval_s=0)
    _step(resumed, [trial])
    resumed.on_experiment_end([trial])
    status = results.load(str(tmp_path / "exp"), results.TRIALS_TABLE)["status"]
    assert status.tolist() == [results.STOPPED_EARLY]


def test_a_history_that_could_not_be_read_is_read_again_without_waiting_for_a_new_checkpoint(tmp_path, caplog):
    # An epoch can take hours: the tables must not wait for the next checkpoint to show this one.
    trial = _trial(tmp_path / "exp")
    ckpt = _checkpoint(trial, 1)
    history = Path(ckpt.path, checkpoint.HISTORY)
    history.rename(history.with_suffix(".away"))
    callback = TablesCallback(min_interval_s=0)
    with caplog.at_level(logging.WARNING):
        _step(callback, [trial], {"t0": ckpt})
    assert "could not read the history" in caplog.text
    history.with_suffix(".away").rename(history)
    _step(callback, [trial])
    assert results.load(str(tmp_path / "exp"), results.TRIALS_TABLE)["epochs_run"].tolist() == [1]


def test_an_errored_trial_is_read_from_the_checkpoint_tune_recorded_last(tmp_path):
    # Restarted from epoch 1's checkpoint by a resume whose state lagged, it failed before saving again:
    # epoch 2's checkpoint, from before the resume, is newer on storage but not where the trial ended.
    trial = _trial(tmp_path / "exp")
    recorded = _checkpoint(trial, 1)
    _checkpoint(trial, 2)
    _register(trial, recorded, 1)
    trial.set_status(Trial.ERROR)
    record = results.record(trial)
    assert [row["epoch"] for row in record.history] == [1] and record.checkpoint == "t0/checkpoint_000000"


def test_a_diverged_epochs_infinite_loss_goes_to_tensorboard_without_a_line_of_tensorboardx(tmp_path, caplog):
    # Its line named no trial nor metric; the sweep's own says the trial diverged. Tune leaves NaN out itself.
    callback = TensorBoardCallback()
    callback.setup()
    try:
        with SummaryWriter(str(tmp_path)) as writer, caplog.at_level(logging.WARNING):
            writer.add_scalar("ray/tune/train_loss", math.inf)
    finally:
        # Ended as Tune ends every sweep: left set up, its log filter outlived the test, in every later test.
        callback.on_experiment_end([])
    assert not caplog.records


def test_collect_says_nothing_of_a_trial_stopped_in_its_first_epoch(tmp_path, caplog):
    # Tune's ExperimentAnalysis named each trial without a result.json, a file the tables are not read from: on
    # stderr at every interrupted sweep's end, resume and collect.
    trial = _trial(tmp_path / "exp")
    Path(trial.storage.trial_fs_path).mkdir(parents=True)
    trial.create_placement_group_factory()  # as Tune does before it saves a trial's state
    state = {"trial_data": [trial.get_json_state()]}
    (tmp_path / "exp" / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        [record] = results.collect(str(tmp_path / "exp"))
    assert record.trial_id == "t0" and record.history == [] and not caplog.records
    # Only there: a notebook's later Tune analyses log it again.
    assert results._without_the_metrics_notice not in logging.getLogger(results._ANALYSIS_LOGGER).filters
