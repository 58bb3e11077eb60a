"""Sweeps end to end on a one-machine Ray cluster: the smoke preset, divergence, a killed driver, a killed node.

The cluster (a head with no CPUs, two workers advertising one CPU and one fake
GPU each) is shared by the module: starting Ray costs seconds. The test that
removes a worker node runs last.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.fs as pafs
import pytest
import ray
from ray import tune
from ray.cluster_utils import Cluster
from ray.train._internal.storage import StorageContext
from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
from ray.tune.experiment import Trial

from helpers import HANG_S
from ndot import checkpoint, evaluate, files, results
from ndot.sweep import activity, cli, reach, recorder, runner, trainable
from ndot.sweep.definitions import ARCHITECTURES, SMOKE, TIMESTEPS
from ndot.sweep.progress import Progress
from ndot.sweep.recorder import TensorBoardCallback
from ndot.sweep.searcher import listed_trials
from ndot.sweep.space import STRATUM_KEY, SearchSpace, Stratum, strata

ROOT = Path(__file__).resolve().parents[1]
# Node deaths are noticed in about a second instead of Ray's default half minute.
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_FAILURE_DETECTION})
    for _ in range(2):
        c.add_node(num_cpus=1, num_gpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _sweep_cmd(storage: Path, name: str, address: str, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweeps" / "timesteps.py"), "--storage", str(storage), "--name", name, "--address", address, *flags]


def _start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """A sweep's process, its stderr in `log`: where it ends too soon, the test's failure says why."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **kwargs)
    proc.log = log
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def _running(proc: subprocess.Popen, before: str) -> None:
    if proc.poll() is not None:
        raise AssertionError(f"the sweep ended (exit {proc.returncode}) before {before}; its stderr ends:\n{_stderr(proc)[-3000:]}")


def _wait_for_epoch(experiment: Path, proc: subprocess.Popen, min_epoch: int, max_epoch: int) -> results.Row:
    """The last row of the first trial found between min_epoch and max_epoch (exclusive), polling its checkpoints."""
    fs, deadline = pafs.LocalFileSystem(), time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        _running(proc, "it could be interrupted")
        for trial_dir in experiment.glob("*_T=*"):
            _, history = checkpoint.newest(fs, str(trial_dir))
            if history and min_epoch <= history[-1]["epoch"] < max_epoch:
                return history[-1]
        time.sleep(0.2)
    raise TimeoutError(f"no trial reached epoch {min_epoch} in {experiment}")


def _assert_epochs_complete(epochs: pd.DataFrame, trials: pd.DataFrame) -> None:
    """Every trial has exactly the epochs 1..epochs_run: no gap, no duplicate."""
    for trial_id, g in epochs.groupby("trial_id"):
        run = trials.set_index("trial_id").loc[trial_id, "epochs_run"]
        assert sorted(g["epoch"]) == list(range(1, run + 1)), trial_id


def _assert_checkpoints_hold_best_weights(experiment: Path, trials: pd.DataFrame) -> None:
    """Each trial's checkpoint is its last epoch's state, with the weights of its best epoch, and, the trial
    finished, its only one."""
    for _, trial in trials.iterrows():
        folder = experiment / trial["checkpoint"]
        assert sorted(folder.parent.glob("checkpoint_*")) == [folder], trial["trial_id"]
        assert checkpoint.load(folder / checkpoint.TRIAL)["epoch"] == trial["epochs_run"], trial["trial_id"]
        assert checkpoint.load(evaluate.weights_file(folder))["epoch"] == trial["best_epoch"], trial["trial_id"]


def test_smoke_preset_end_to_end(cluster, tmp_path, capsys, monkeypatch):
    # Its two shortest T: T = 4 and 6 would take three quarters of the time and test nothing more
    # (test_sweep_cli checks every preset's plan).
    T = SMOKE.T[:2]
    # No --address: the cluster comes from RAY_ADDRESS, as `ray job submit` hands it to its driver.
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    rc = cli.main(TIMESTEPS, ["--preset", "smoke", "--T", ",".join(map(str, T)), "--storage", str(tmp_path), "--name", "smoke"])
    swept = capsys.readouterr()
    assert rc == 0, swept.err
    assert f"on the cluster at {cluster.address} ($RAY_ADDRESS)" in swept.out
    experiment = tmp_path / "smoke"
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    trials = pd.read_parquet(experiment / "trials.parquet")

    expected = {s.label for s in strata({"T": T, "method": SMOKE.method})}
    assert set(trials["stratum"]) == expected and len(trials) == len(expected) * SMOKE.trials
    assert set(epochs["stratum"]) == expected
    assert (trials["status"] == results.COMPLETED).all()
    # Whose rows they are, in tables concatenated with other sweeps': its --name, its script and its --storage.
    for table in (epochs, trials):
        assert (table["experiment"] == "smoke").all() and (table["sweep"] == TIMESTEPS.name).all()
        assert (table["storage"] == str(tmp_path)).all()
    assert len(epochs) == len(trials) * SMOKE.epochs
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    _assert_epochs_complete(epochs, trials)
    # Flat, typed columns: config values, metrics and where/when each epoch ran.
    assert epochs["T"].dtype == "int64" and epochs["test_acc"].dtype == "float64"
    assert isinstance(epochs["timestamp"].dtype, pd.DatetimeTZDtype)
    assert epochs[["lr", "epoch_lr", "peak_mem_mb", "image_steps_per_s", "node_ip", "hostname"]].notna().all().all()
    assert epochs["test_acc"].between(0, 1).all()
    # What "auto" resolved to, where each epoch ran: this machine's CPU (the cluster has no GPU).
    assert set(epochs["ran_on"]) == set(trials["ran_on"]) == {"cpu"}
    assert set(epochs["node_id"]) <= {n.node_id for n in cluster.worker_nodes}, "a trial ran outside the cluster"
    # A trial's start is measured before its setup, so its wall time holds more than its epochs' training.
    first = epochs[epochs["epoch"] == 1].set_index("trial_id")
    assert (first["started_at"] < first["timestamp"] - pd.to_timedelta(first["epoch_seconds"], unit="s")).all()
    assert (trials["wall_time_s"] > trials["train_time_s"]).all()
    # Re-collected from the experiment directory: the same tables as written live.
    assert results.main(["collect", str(experiment)]) == 0
    by = ["trial_id", "epoch"]
    recollected = results.load(str(experiment))
    pd.testing.assert_frame_equal(recollected.sort_values(by, ignore_index=True), epochs.sort_values(by, ignore_index=True))
    recollected = results.load(str(experiment), results.TRIALS_TABLE)
    by = ["trial_id"]
    pd.testing.assert_frame_equal(recollected.sort_values(by, ignore_index=True), trials.sort_values(by, ignore_index=True))
    # Without Tune's experiment state, the trials' folders give the same tables, less what only that state held.
    stateless = tmp_path / "stateless"
    shutil.copytree(experiment, stateless)
    for state in stateless.glob(TRIALS_STATE[0]):
        state.unlink()
    # Every other trial as a driver killed before its state's next upload leaves it: checkpoints, no params.json.
    for params in sorted(stateless.glob(f"*/{checkpoint.TRIAL_PARAMS}"))[::2]:
        params.unlink()
    assert results.main(["collect", str(stateless)]) == 0
    captured = capsys.readouterr()
    assert "no readable experiment state" in captured.err
    pd.testing.assert_frame_equal(results.load(str(stateless)).sort_values(["trial_id", "epoch"], ignore_index=True),
                                  epochs.sort_values(["trial_id", "epoch"], ignore_index=True))
    from_folders = results.load(str(stateless), results.TRIALS_TABLE).sort_values(by, ignore_index=True)
    assert from_folders["num_failures"].isna().all()
    pd.testing.assert_frame_equal(from_folders.drop(columns="num_failures"),
                                  trials.sort_values(by, ignore_index=True).drop(columns="num_failures"))
    printed = swept.out + captured.out + capsys.readouterr().out
    assert "best_test_acc" in printed and all(label in printed for label in expected), "no per-stratum summary"
    # A damaged history (a hand edit, a disk error) is passed over like an upload cut short, with a word: the
    # trial, finished, kept its last checkpoint alone, so a rebuild has none of its epochs.
    damaged = tmp_path / "damaged"
    shutil.copytree(experiment, damaged)
    trial_id = trials["trial_id"].iloc[0]
    [last] = damaged.glob(f"{trial_id}_*/checkpoint_*")
    (last / checkpoint.HISTORY).write_text("[]")
    assert results.main(["collect", str(damaged)]) == 0
    captured = capsys.readouterr()
    assert f"warning: trial {trial_id}: " in captured.err and "read from no checkpoint instead" in captured.err
    rows = results.load(str(damaged))
    assert not (rows["trial_id"] == trial_id).any()
    printed += captured.out
    for figure in ("accuracy_vs_T", "cost_vs_T", "curves_vs_epoch"):
        assert (experiment / f"{figure}.png").stat().st_size > 0
        assert str(experiment / f"{figure}.png") in printed
    # One trial a stratum, each at the recipe's learning rate: no figure against it.
    assert not (experiment / "accuracy_vs_lr.png").exists()
    _assert_checkpoints_hold_best_weights(experiment, trials)
    # The summary names each stratum's best trial's checkpoint, which python -m ndot.evaluate reads: it
    # scores what the trial reported (to a sample or so: the trial ran on one thread, this process on more).
    best = results.summary(trials).iloc[0]
    assert evaluate.main([str(experiment / best["checkpoint"]), "--out", str(tmp_path / "eval.json")]) == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert abs(scored["test_acc"] - best["best_test_acc"]) <= 0.01


def test_a_sweep_run_from_python_leaves_the_process_its_signal_handlers_environment_and_logs(cluster, tmp_path, monkeypatch):
    # A notebook's: after the sweep, SIGTERM and SIGUSR1 must reach them and Ctrl-C interrupt, not the
    # sweep's handler or Ray Tune's, which outlived it; Tune's settings must not be the notebook's; and its later
    # Tune runs must log what the sweep's own lines stand in for (the sweep's log filters outlived it).
    def notebooks(signum, frame):
        pass

    kept = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    before = {n: signal.getsignal(n) for n in kept}
    for name in runner._TUNE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    signal.signal(signal.SIGTERM, notebooks)
    signal.signal(signal.SIGUSR1, notebooks)
    try:
        argv = ["--T", "1", "--rules", "ndot_A", "--epochs", "1", "--storage", str(tmp_path), "--name", "notebook",
                "--address", cluster.address]
        assert cli.main(TIMESTEPS, argv) == 0
        after = {n: signal.getsignal(n) for n in kept}
    finally:
        for n, handler in before.items():
            signal.signal(n, handler)
    assert after == {signal.SIGTERM: notebooks, signal.SIGINT: before[signal.SIGINT], signal.SIGUSR1: notebooks}
    assert [name for name in runner._TUNE_SETTINGS if name in os.environ] == []
    filters = [("ray.tune.tune", cli._without_tunes_resume_hint), (results._ANALYSIS_LOGGER, results._without_the_metrics_notice),
               (recorder._NONFINITE_NOTICE_LOGGER, recorder._without_the_nonfinite_notice)]
    assert [name for name, keep in filters if keep in logging.getLogger(name).filters] == []


class _CtrlCTwice(tune.Callback):
    """Presses Ctrl-C twice at the sweep's first step: the first stops Tune, the second ends it on the spot,
    without the callbacks' on_experiment_end."""

    def on_step_begin(self, iteration, trials, **info):
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_sweep_ended_by_a_second_ctrl_c_leaves_the_process_its_logs(cluster, tmp_path):
    handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGUSR1)}  # Tune's fit sets them
    runner.connect(cluster.address)
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run(_plan(tmp_path, "ctrl-c", 1), callbacks=[_CtrlCTwice()])
    finally:
        ray.shutdown()
        for n, handler in handlers.items():
            signal.signal(n, handler)
    assert recorder._without_the_nonfinite_notice not in logging.getLogger(recorder._NONFINITE_NOTICE_LOGGER).filters


def test_an_architecture_and_a_dataset_of_the_users_own_modules_are_swept_by_trials_that_import_them(
        cluster, tmp_path, user_arch, user_data):
    # Registered in the driver alone, the trials' processes would not know them: --set imports has each import them.
    (arch_module, arch), (data_module, dataset) = user_arch, user_data
    argv = ["--archs", arch, "--dataset", dataset, "--set", f"imports={arch_module},{data_module}", "--T", "1",
            "--rules", "ndot_A", "--epochs", "1", "--batch-size", "32", "--storage", str(tmp_path), "--name", "mine",
            "--address", cluster.address]
    assert cli.main(ARCHITECTURES, argv) == 0
    trials = pd.read_parquet(tmp_path / "mine" / "trials.parquet")
    assert list(trials["status"]) == [results.COMPLETED] and list(trials["arch"]) == [arch]
    assert list(trials["dataset"]) == [dataset]
    # The trial trained the module's network (16 channels first), not another under its name, on the module's
    # data, of four classes, not digits' ten.
    state = checkpoint.load(tmp_path / "mine" / trials["checkpoint"][0] / checkpoint.TRIAL)
    assert state["model"]["features.0.weight"].shape[0] == 16
    assert state["model"]["readout.weight"].shape[0] == 4


def test_a_module_of_imports_that_the_clusters_processes_cannot_import_is_refused_before_any_trial(
        cluster, tmp_path, user_arch, monkeypatch, capsys):
    # On the driver's sys.path (as its PYTHONPATH, or a folder its script adds, puts it) but outside its current
    # folder, which Ray puts on its workers' path: every trial errored at its import, on each restart too. Named
    # after a module they import, past a space, as TrainConfig reads the list.
    module, arch = user_arch
    monkeypatch.chdir(tmp_path)
    argv = ["--archs", arch, "--set", f"imports=json, {module}", "--T", "1", "--rules", "ndot_A", "--epochs", "1",
            "--storage", str(tmp_path / "runs"), "--name", "far", "--address", cluster.address]
    assert cli.main(ARCHITECTURES, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot import {module!r} (No module named {module!r})" in err, err
    assert "run the sweep from the module's folder" in err
    assert not (tmp_path / "runs" / "far").exists()
    # Through ray:// Ray puts no folder of the driver's on the workers' path: running from one is no way out there.
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        line = reach.unimportable(module, client=True)
    finally:
        ray.shutdown()
    assert "module's folder" not in line and line.endswith("ship that folder with `ray job submit --working-dir`")


def test_a_sweep_run_where_ray_is_initialised_already_is_refused_in_one_line_and_leaves_it(cluster, tmp_path, capsys):
    ray.init(address=cluster.address, logging_level="WARNING")  # a notebook's own connection
    try:
        argv = ["--T", "1", "--rules", "ndot_A", "--epochs", "1", "--storage", str(tmp_path), "--name", "twice"]
        assert cli.main(TIMESTEPS, argv) == 2
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    out, err = capsys.readouterr()
    assert out == "" and err == ("error: Ray is already initialised in this process: ray.shutdown() first (a sweep "
                                 "connects to Ray itself, and disconnects when it ends)\n")
    assert not (tmp_path / "twice").exists()


def _plan(storage: Path, name: str, epochs: int, *stratified: Stratum) -> runner.Plan:
    """A sweep of NDOT_A at T 1 on digits, one trial a stratum (one stratum where none is given)."""
    return runner.Plan(
        name=name, storage=str(storage),
        base={"dataset": "digits", "arch": "small_cnn", "rule": "ndot", "mode": "A", "T": 1, "epochs": epochs},
        strata=stratified or (Stratum({}, name),), space=SearchSpace(), trials_per_stratum=1, cpus_per_trial=1,
        gpus_per_trial=0,
    )


def _run(cluster: Cluster, plan: runner.Plan) -> None:
    runner.connect(cluster.address)
    try:
        runner.run(plan)
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _trials_run_by(monkeypatch, trial, **shared: object):
    """Within the block a sweep's trials run `trial` in place of the trainable, reading `shared`, globals of this
    module set for the block. The trials run in Ray workers, which cannot import this module: it goes by value."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for name, value in shared.items():
        monkeypatch.setattr(sys.modules[__name__], name, value)
    monkeypatch.setattr(runner, "run_trial", trial)
    try:
        yield
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_diverging_trial_ends_diverged_and_the_sweep_goes_on(cluster, tmp_path):
    plan = _plan(tmp_path, "divergence", 3, Stratum({"lr": 0.1}, "lr=0.1"), Stratum({"lr": 1e4}, "lr=1e4"))
    _run(cluster, plan)
    trials = results.load(plan.experiment, results.TRIALS_TABLE).set_index("stratum")
    epochs = results.load(plan.experiment)
    assert trials.loc["lr=1e4", "status"] == results.DIVERGED
    assert trials.loc["lr=1e4", "epochs_run"] == 1
    assert list(epochs.loc[epochs["stratum"] == "lr=1e4", "status"]) == ["diverged"]
    assert trials.loc["lr=0.1", "status"] == results.COMPLETED
    assert trials.loc["lr=0.1", "epochs_run"] == 3
    # Each finished, a trial keeps its last checkpoint alone.
    assert sorted(p.name for p in Path(plan.experiment).glob("*/checkpoint_*")) == ["checkpoint_000000", "checkpoint_000002"]


# Test accuracies of epochs 1-4, scripted (the test sets them): the best epoch's weights reach the last
# checkpoint as best.pt across a restart after epoch 3, from a best.pt or, where epoch 3 was the best, its state.
SCRIPTED_ACC = (0.5, 0.9, 0.7, 0.6)


def _trial_with_scripted_accuracy(config: dict) -> None:
    """The sweep's trainable, its test accuracies SCRIPTED_ACC; the first attempt fails after epoch 3's checkpoint."""
    import ndot.train
    from ray import tune

    first = tune.get_checkpoint() is None
    accuracies = iter(SCRIPTED_ACC[:3] if first else SCRIPTED_ACC[3:])
    real = ndot.train.evaluate

    def scripted(*args, **kwargs):
        acc = next(accuracies, None)
        if acc is None:
            raise RuntimeError("failure injected after epoch 3")
        return {**real(*args, **kwargs), "test_acc": acc}

    ndot.train.evaluate = scripted
    try:
        runner.run_trial(config)
    finally:
        ndot.train.evaluate = real


@pytest.mark.parametrize("accuracies, best_epoch", [((0.5, 0.9, 0.7, 0.6), 2), ((0.5, 0.7, 0.9, 0.6), 3)],
                         ids=["best-before-the-restart", "best-at-the-restart"])
def test_last_checkpoint_holds_the_best_epochs_weights_across_a_restart(cluster, tmp_path, monkeypatch, accuracies, best_epoch):
    plan = _plan(tmp_path, "best", 4)
    with _trials_run_by(monkeypatch, _trial_with_scripted_accuracy, SCRIPTED_ACC=accuracies):
        _run(cluster, plan)
    trial = results.load(plan.experiment, results.TRIALS_TABLE).iloc[0]
    assert (trial["status"], trial["num_failures"], trial["best_epoch"]) == (results.COMPLETED, 1, best_epoch)
    assert list(results.load(plan.experiment)["test_acc"]) == list(accuracies)
    folder = Path(plan.experiment, trial["checkpoint"])
    assert evaluate.weights_file(folder) == str(folder / checkpoint.BEST)
    best, last = checkpoint.load(folder / checkpoint.BEST), checkpoint.load(folder / checkpoint.TRIAL)
    assert (best["epoch"], best["metrics"]["test_acc"], last["epoch"]) == (best_epoch, 0.9, 4)
    assert any((best["model"][k] != last["model"][k]).any() for k in best["model"])


# A file the trial appends the torch threads of each of its epochs to (the test names it).
THREADS_SEEN: str | None = None


def _trial_where_the_node_sets_two_omp_threads(config: dict) -> None:
    """The sweep's trainable in a worker whose environment held OMP_NUM_THREADS=2, which Ray leaves as it
    finds it, and torch starts at; each epoch's threads, read as it is tested, go to THREADS_SEEN."""
    import ndot.train
    import torch

    before, real = torch.get_num_threads(), ndot.train.evaluate

    def recording(*args, **kwargs):
        with open(THREADS_SEEN, "a") as f:
            f.write(f"{torch.get_num_threads()}\n")
        return real(*args, **kwargs)

    torch.set_num_threads(2)
    ndot.train.evaluate = recording
    try:
        runner.run_trial(config)
    finally:
        ndot.train.evaluate = real
        torch.set_num_threads(before)


def test_a_trial_trains_at_its_cpus_threads_whatever_omp_num_threads_its_node_holds(cluster, tmp_path, monkeypatch):
    plan = _plan(tmp_path, "threads", 2)
    seen = tmp_path / "threads-seen"
    with _trials_run_by(monkeypatch, _trial_where_the_node_sets_two_omp_threads, THREADS_SEEN=str(seen)):
        _run(cluster, plan)
    assert results.load(plan.experiment, results.TRIALS_TABLE).iloc[0]["status"] == results.COMPLETED
    assert seen.read_text().split() == ["1", "1"]


# A folder of files the driver's stdout creates (_Releasing): each releases the trial where it waits for it.
RELEASE: str | None = None


def _trial_held_until_the_driver_says_what_it_does(config: dict) -> None:
    """The sweep's trainable, held where a paper run takes minutes: in its data build, which says how far it has
    come as ndot's own do; in its first epoch, after one batch; in its test pass, after one batch; and at its second
    epoch's start. Past HANG_S it is held no more, and the test fails on the lines it finds."""
    import logging

    import ndot.data
    import ndot.train

    real_loaders, real_batch, real_lr, real_evaluate = (ndot.data.loaders, ndot.train.train_batch, ndot.train.epoch_lr,
                                                        ndot.train.evaluate)
    deadline, batches = time.monotonic() + HANG_S, iter(range(1, 1 << 30))

    def released(name: str) -> None:
        while not Path(RELEASE, name).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def loaders(cfg, device):
        logging.getLogger("ndot.data.digits").info("digits: 3/10 recordings converted")
        released("data")
        return real_loaders(cfg, device)

    def train_batch(*args, **kwargs):
        if next(batches) == 2:
            released("epoch 1")
        return real_batch(*args, **kwargs)

    def epoch_lr(lr, epoch, epochs):
        if epoch == 2:
            released("epoch 2")
        return real_lr(lr, epoch, epochs)

    def evaluate(*args, on_batch, **kwargs):
        def tested(done, total):
            on_batch(done, total)
            if done == 1:
                released("test pass")
        return real_evaluate(*args, on_batch=tested, **kwargs)

    ndot.data.loaders, ndot.train.train_batch, ndot.train.epoch_lr, ndot.train.evaluate = loaders, train_batch, epoch_lr, evaluate
    try:
        runner.run_trial(config)
    finally:
        ndot.data.loaders, ndot.train.train_batch, ndot.train.epoch_lr, ndot.train.evaluate = (real_loaders, real_batch, real_lr,
                                                                                              real_evaluate)


class _Releasing(io.StringIO):
    """The driver's stdout, which releases the held trial once a status line has shown where it is held."""

    def __init__(self, release: Path) -> None:
        super().__init__()
        self._release = release

    def write(self, text: str) -> int:
        lines = text.splitlines()  # a status line, and a line below it for each running trial that says what it does
        if len(lines) == 2 and "(0 of 2 epochs done)" in lines[0]:
            for name, says in (("data", ": digits: 3/10 recordings converted"), ("epoch 1", ": epoch 1: batch 1/"),
                               ("test pass", ": epoch 1: test batch 1/")):
                if says in lines[1]:
                    (self._release / name).touch()
        # Its first epoch reported, the trial is counted in epochs, and says no more.
        if len(lines) == 1 and "(1 of 2 epochs done)" in lines[0]:
            (self._release / "epoch 2").touch()
        return super().write(text)


def test_the_drivers_status_line_says_what_a_trial_on_another_node_does_before_its_first_epoch(cluster, tmp_path,
                                                                                               monkeypatch):
    # On a cluster a trial builds its data caches on its node, where its output stays (runner.connect): tens of
    # minutes of CIFAR10-DVS frames, then minutes of a paper run's first epoch, read "0 epochs done" all along.
    plan = _plan(tmp_path / "runs", "held", 2)
    release = tmp_path / "release"
    release.mkdir()
    out = _Releasing(release)
    runner.connect(cluster.address)
    try:
        with _trials_run_by(monkeypatch, _trial_held_until_the_driver_says_what_it_does, RELEASE=str(release)), \
                contextlib.redirect_stdout(out):
            runner.run(plan, callbacks=[Progress(plan.num_trials, every_s=0.1)])
    finally:
        ray.shutdown()
    assert results.load(plan.experiment, results.TRIALS_TABLE).iloc[0]["status"] == results.COMPLETED
    said = [line for line in out.getvalue().splitlines() if line.startswith("  ")]
    assert "  held lr=0.1: digits: 3/10 recordings converted" in said, out.getvalue()[-3000:]
    assert any(re.fullmatch(r"  held lr=0\.1: epoch 1: batch 1/\d+", line) for line in said), out.getvalue()[-3000:]
    assert any(re.fullmatch(r"  held lr=0\.1: epoch 1: test batch 1/\d+", line) for line in said), out.getvalue()[-3000:]
    assert (release / "epoch 2").exists(), "the trial's line outlived its first epoch result"


def test_a_trials_line_follows_its_batches_at_a_pace_and_ends_with_its_first_epoch_or_the_trial(cluster, monkeypatch,
                                                                                                 capsys, caplog):
    # Step by step what the test above runs end to end: the trial's side in this process, as in a Ray worker that
    # runs one trial after another (reuse_actors), and the driver's lines under its status line.
    def shown(*trials: Trial) -> list[str]:
        progress.on_step_end(0, list(trials))
        return capsys.readouterr().out.splitlines()[1:]

    first, second = (Trial("run_trial", config={STRATUM_KEY: "s", "lr": lr, "epochs": 2}, trial_id=trial_id, stub=True)
                     for trial_id, lr in (("first", 0.1), ("second", 0.2)))
    for trial in (first, second):
        trial.set_status(Trial.RUNNING)
    monkeypatch.setattr("ndot.cli.PROGRESS_S", math.inf)
    ndot_logger = logging.getLogger("ndot")
    handlers = list(ndot_logger.handlers)
    ray.init(address=cluster.address)
    try:
        progress = Progress(2, every_s=0.0)
        progress.setup()
        status = trainable.Reporter("first")
        assert shown(first, second) == ["  s lr=0.1: starting"]
        with status.logged(), caplog.at_level(logging.INFO, logger="ndot"):
            logging.getLogger("ndot.data.digits").info("digits: 3/10 recordings converted")
            assert shown(first) == ["  s lr=0.1: digits: 3/10 recordings converted"]
            status.batch(1, 1, 10)
            status.batch(1, 2, 10)  # the next line of an epoch is PROGRESS_S after its last
            assert shown(first) == ["  s lr=0.1: epoch 1: batch 1/10"]
            monkeypatch.setattr("ndot.cli.PROGRESS_S", 0.0)
            status.batch(1, 3, 10)
            assert shown(first) == ["  s lr=0.1: epoch 1: batch 3/10"]
            monkeypatch.setattr("ndot.cli.PROGRESS_S", math.inf)
            status.batch(1, 1, 4, what="test batch")
            assert shown(first) == ["  s lr=0.1: epoch 1: test batch 1/4"]
            status.done()
            status.batch(2, 1, 10)
            assert shown(first) == []
        assert ndot_logger.handlers == handlers
        # A trial that ended before its first epoch result (a restart of the first that failed) shows its last line
        # no more; the worker's next trial takes the library's lines, the first's handler none.
        trainable.Reporter("first")
        first.set_status(Trial.ERROR)
        status = trainable.Reporter("second")
        with status.logged(), caplog.at_level(logging.INFO, logger="ndot"):
            logging.getLogger("ndot.data.digits").info("digits: 5/10 recordings converted")
        assert shown(first, second) == ["  s lr=0.2: digits: 5/10 recordings converted"]
        # The actor gone (its node with it): the status line goes on without the trials' lines, the trials without it.
        board = ray.get_actor(activity.name())
        ray.kill(board)
        # ray.kill returns before the actor ends, which may yet take the line below: once it answers no more.
        with pytest.raises(ray.exceptions.RayActorError):
            while True:
                ray.get(board.lines.remote(), timeout=HANG_S)
        status.say("lost")
        assert shown(first, second) == []
    finally:
        ray.shutdown()


# Another sweep's driver: it makes its trials' actor, then says what that holds once told to, and ends.
_OTHER_DRIVER = """
import sys, ray
from ndot.sweep import activity
ray.init(address=sys.argv[1], namespace="shared")
board = activity.board()
print("ready", flush=True)
sys.stdin.readline()
print(activity.read(board), flush=True)
"""


def test_sweeps_whose_drivers_share_a_namespace_keep_their_trials_lines_apart(cluster, capsys):
    # Through ray:// with RAY_NAMESPACE set, drivers share their named actors: the second sweep's trials sent their
    # lines to the first's actor, which ended with the first driver, and the lines with it.
    trial = Trial("run_trial", config={STRATUM_KEY: "s", "lr": 0.1, "epochs": 2}, trial_id="t", stub=True)
    trial.set_status(Trial.RUNNING)
    other = subprocess.Popen([sys.executable, "-c", _OTHER_DRIVER, cluster.address], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert other.stdout.readline() == "ready\n"
        ray.init(address=cluster.address, namespace="shared")
        try:
            progress = Progress(1, every_s=0.0)
            progress.setup()
            trainable.Reporter("t")
            progress.on_step_end(0, [trial])
            assert capsys.readouterr().out.splitlines()[1:] == ["  s lr=0.1: starting"]
            other.stdin.write("\n")
            other.stdin.flush()
            assert other.stdout.readline() == "{}\n"
            other.stdin.close()
            assert other.wait(timeout=HANG_S) == 0
            progress.on_step_end(0, [trial])
            assert capsys.readouterr().out.splitlines()[1:] == ["  s lr=0.1: starting"]
        finally:
            ray.shutdown()
    finally:
        other.kill()
        other.wait()


def test_a_resumed_sweeps_status_lines_count_from_its_resume_on_this_machines_clock(cluster, capsys):
    # Tune restores the Progress pickled as the sweep started: its times were read on that machine's clock (a
    # monotonic one, from its boot). Resumed where the clock reads less, the next line was due only once it
    # reached theirs: days of a sweep without one.
    now = 1e6
    progress = Progress(1, every_s=10.0, clock=lambda: now)
    now = 5.0
    trial = Trial("run_trial", config={STRATUM_KEY: "s", "lr": 0.1, "epochs": 2}, trial_id="t", stub=True)
    ray.init(address=cluster.address)
    try:
        progress.setup()
        now = 15.0
        progress.on_step_end(0, [trial])
    finally:
        ray.shutdown()
    assert capsys.readouterr().out.startswith("0:00:10 in: 0/1 trials done")


# A file the test creates: while it exists, every trial fails at its start.
FAIL_WHILE: str | None = None


def _trial_failing_while_flagged(config: dict) -> None:
    if FAIL_WHILE is not None and Path(FAIL_WHILE).exists():
        raise RuntimeError("failure injected")
    runner.run_trial(config)


def test_an_errored_trial_exits_1_with_the_retry_command_which_runs_it_again(cluster, tmp_path, monkeypatch, capsys):
    flag = tmp_path / "fail"
    flag.touch()
    monkeypatch.setattr(runner, "MAX_FAILURES", 0)  # Tune's own retries would only repeat the failure
    argv = ["--preset", "smoke", "--T", "1", "--rules", "ndot_A", "--epochs", "2",
            "--storage", str(tmp_path), "--name", "errored", "--address", cluster.address]
    with _trials_run_by(monkeypatch, _trial_failing_while_flagged, FAIL_WHILE=str(flag)):
        assert cli.main(TIMESTEPS, argv) == 1
        err = capsys.readouterr().err
        errored = results.load(str(tmp_path / "errored"), results.TRIALS_TABLE)
        # What the line says to run, run: the trial that errored trains again, now without the failure.
        again = shlex.split(err.split("1 trials errored: retry them with ")[1].splitlines()[0])
        flag.unlink()
        assert cli.main(TIMESTEPS, again[again.index("--resume"):]) == 0  # after `python SCRIPT`
    retried = results.load(str(tmp_path / "errored"), results.TRIALS_TABLE)
    assert list(errored["status"]) == [results.ERRORED]
    assert list(retried["trial_id"]) == list(errored["trial_id"])
    assert (retried.iloc[0]["status"], retried.iloc[0]["epochs_run"]) == (results.COMPLETED, 2)


def _overlapping(epochs: pd.DataFrame) -> list[tuple[str, str]]:
    """Pairs of trials that ran at the same time, from when each started to its last epoch."""
    spans = epochs.groupby("trial_id").agg(start=("started_at", "min"), end=("timestamp", "max"))
    return [(a, b) for a in spans.index for b in spans.index
            if a < b and spans.loc[a, "start"] < spans.loc[b, "end"] and spans.loc[b, "start"] < spans.loc[a, "end"]]


def _copy_while_written(src: Path, dst: Path, tries: int = 5) -> None:
    """copytree of a folder a trial's worker may still write into (its driver killed, Ray ends it a moment
    later): a file listed may be renamed away before it is copied, which only another try gets past."""
    for _ in range(tries - 1):
        try:
            shutil.copytree(src, dst)
            return
        except shutil.Error:
            shutil.rmtree(dst)
            time.sleep(1)
    shutil.copytree(src, dst)


def test_killed_driver_resumes_to_the_trials_asked_for(cluster, tmp_path):
    # Two strata: the one running when the driver dies and one it never started, which the resume runs beside it.
    # Killed at its epoch 2 (or 3, ended as the driver died), the first has 5 epochs or more to run on resume: the
    # second starts seconds after it (3.8 s, measured on an idle machine), and with an epoch or two left (1.4 s
    # each) the first had ended by then, so that the two never overlapped however many might.
    epochs = 8
    flags = ("--T", "1", "--rules", "ndot_A,ottt_A", "--epochs", str(epochs))
    cmd = _sweep_cmd(tmp_path, "driver", cluster.address, *flags)
    proc = _start([*cmd, "--max-concurrent", "1"], tmp_path / "stderr")
    try:
        _wait_for_epoch(tmp_path / "driver", proc, 2, 3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {r.trial_id for r in results.collect(str(tmp_path / "driver"))}
    assert len(before) == 1

    # A copy elsewhere is refused: Tune would create the sweep's later trials in the original place.
    copy = tmp_path / "copy"
    _copy_while_written(tmp_path / "driver", copy / "driver")
    refused = subprocess.run([*_sweep_cmd(copy, "driver", cluster.address, *flags), "--resume"],
                             capture_output=True, text=True, timeout=HANG_S)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "resume it there" in refused.stderr
    # Its experiment state cut short, the trial is read from its folder; only its Tune status is lost.
    for state in (copy / "driver").glob(TRIALS_STATE[0]):
        state.write_bytes(b"")
    [alone] = results.collect(str(copy / "driver"))
    assert {alone.trial_id} == before and alone.tune_status == results.UNKNOWN and len(alone.history) >= 2
    # (Its worker may have ended its last epoch as the driver died.)
    assert results.trials_frame([alone])["status"].item() == "unknown"

    # The resume may run more trials at once than the start did (the cluster grew, say).
    done = subprocess.run([*cmd, "--resume", "--max-concurrent", "2"], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming driver: 2 strata x 1 trials, 8 epochs" in done.stdout and "ignored" not in done.stdout
    rows = results.load(str(tmp_path / "driver"))
    trials = results.load(str(tmp_path / "driver"), results.TRIALS_TABLE)
    assert sorted(trials["stratum"]) == sorted(s.label for s in strata({"T": (1,), "method": ("ndot_A", "ottt_A")}))
    assert (trials["status"] == results.COMPLETED).all() and (trials["epochs_run"] == epochs).all()
    assert before <= set(trials["trial_id"]), "a trial running when the driver died was re-created, not resumed"
    _assert_checkpoints_hold_best_weights(tmp_path / "driver", trials)
    _assert_epochs_complete(rows, trials)
    assert len(rows) == 2 * epochs
    assert _overlapping(rows), "the resume kept the one trial at a time the sweep started with"
    # Both drivers had Tune write through the filesystem that lands each file whole (ndot.files).
    listed = listed_trials(str(tmp_path / "driver"))
    assert len(listed) == 2 and all(isinstance(t.storage.storage_filesystem.handler, files.WholeLocalFiles) for t in listed)


def test_tensorboards_files_of_unfinished_trials_are_closed_when_the_sweep_ends(cluster, tmp_path):
    # Left open, tensorboardX closes them at exit, which Python 3.12 refuses (a traceback after the resume line).
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp", trial_dir_name="t0")
    trial = Trial("run_trial", config={}, trial_id="t0", stub=True, storage=storage)
    tensorboard = TensorBoardCallback()
    runner.connect(cluster.address)  # where the driver's staging folder is
    try:
        tensorboard.log_trial_result(1, trial, {"training_iteration": 1, "test_acc": 0.5})
        [events] = Path(trial.local_path).glob("events.out.tfevents.*")
        tensorboard.on_experiment_end([trial])
    finally:
        ray.shutdown()
    assert not tensorboard._trial_writer and events.stat().st_size > 0


class _SlowUploads(files.WholeLocalFiles):
    """Storage whose every file takes a while to upload, as to S3."""

    def open_output_stream(self, path, metadata):
        time.sleep(0.3)
        return super().open_output_stream(path, metadata)


def test_each_save_of_the_experiment_state_waits_for_the_last_upload(cluster, tmp_path):
    # Tune 2.60 saves into the folder it uploads while its last upload may still copy it: ndot.sweep.state_sync,
    # installed by importing the sweep (its searcher), holds the save back.
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp",
                             storage_filesystem=pafs.PyFileSystem(_SlowUploads()))
    manager = _ExperimentCheckpointManager(storage=storage, checkpoint_period=0)
    uploading = []

    def save():
        uploading.append(bool(storage.syncer._should_continue_existing_sync()))
        staging = Path(storage.experiment_driver_staging_path)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "experiment_state-x.json").write_text(json.dumps(len(uploading)))

    runner.connect(cluster.address)  # where the driver's staging folder is
    try:
        for last in (False, False, False, True):
            manager.sync_up_experiment_state(save_fn=save, force=True, wait=last)
    finally:
        ray.shutdown()
    assert uploading == [False] * 4, "a save wrote into the folder while it was uploaded"
    assert json.loads((tmp_path / "exp" / "experiment_state-x.json").read_text()) == 4


# A driver's state is three files: Tune's list of trials, and the searcher's state in two.
TRIALS_STATE, SEARCHER_STATE = ("experiment_state-*.json",), ("searcher-state-*.pkl", "search_gen_state-*.json")


def _whole(path: Path, data: bytes) -> bool:
    """Whether a state file read while the driver may be copying it is whole."""
    try:
        json.loads(data) if path.match(TRIALS_STATE[0]) else pickle.loads(data)  # Tune pickles search_gen_state-*.json
    except (pickle.UnpicklingError, EOFError, ValueError):
        return False
    return True


def _state_naming(experiment: Path, proc: subprocess.Popen, n_trials: int) -> dict[Path, bytes]:
    """The driver's state files, once the experiment has `n_trials` trials and both its states name all of them."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        _running(proc, "its state could be taken")
        ids = [p.name.split("_")[0].encode() for p in experiment.glob("*_T=*")]
        state = {p: p.read_bytes() for pattern in TRIALS_STATE + SEARCHER_STATE for p in experiment.glob(pattern)}
        naming = [b for p, b in state.items() if p.match(TRIALS_STATE[0]) or p.match(SEARCHER_STATE[0])]
        if (len(ids) == n_trials and len(state) == 3 and all(_whole(p, b) for p, b in state.items())
                and all(i in b for i in ids for b in naming)):
            return state
        time.sleep(0.1)
    raise TimeoutError(f"no state naming {n_trials} trials in {experiment}")


def _studies(experiment: Path) -> list[optuna.Study]:
    """The per-stratum Optuna studies, as the searcher saved them last."""
    with open(max(experiment.glob(SEARCHER_STATE[0])), "rb") as f:
        return pickle.load(f)["_studies"]


def _staging(cluster: Cluster, name: str) -> Path:
    """Experiment `name`'s folder in the cluster's session on this machine: the driver's copy of its state and the
    trials' working folders. A resume takes its run's, and finds there what an earlier resume of the run left."""
    [folder] = Path(cluster.head_node.get_session_dir_path(), "artifacts").glob(f"*/{name}")
    return folder


@pytest.fixture(scope="module")
def killed_mid_upload(cluster, tmp_path_factory):
    """A sweep of two strata, one trial at a time, its driver killed once its state named the second trial: its
    command; its experiment and its staging folder, with a copy of each as the driver left them; its state files as
    they named the first trial and as they named both. A resume must run where the sweep started: each case puts
    the copies back in place."""
    storage = tmp_path_factory.mktemp("upload")
    experiment = storage / "upload"
    cmd = _sweep_cmd(storage, "upload", cluster.address, "--T", "1,2", "--rules", "ndot_A", "--epochs", "3", "--max-concurrent", "1")
    proc = _start(cmd, storage / "stderr")
    try:
        first = _state_naming(experiment, proc, 1)
        second = _state_naming(experiment, proc, 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = {folder: tmp_path_factory.mktemp("left") / folder.name for folder in (experiment, _staging(cluster, "upload"))}
    for folder, copy in left.items():
        _copy_while_written(folder, copy)
    return cmd, experiment, left, first, second


@pytest.mark.parametrize("behind, cut", [(SEARCHER_STATE, ()), (TRIALS_STATE, ()), (TRIALS_STATE, SEARCHER_STATE)],
                         ids=["searcher-behind", "trials-behind", "trials-behind-searcher-cut-short"])
def test_a_driver_killed_mid_upload_resumes_with_every_stratums_trial(killed_mid_upload, behind, cut):
    # Tune uploads a driver's state file by file: killed in between, the driver leaves the searcher a
    # trial behind Tune's list of trials, or ahead of it (its newest trial never reached the list).
    # Each upload is a plain copy: killed during one, the driver leaves files cut short (empty, here).
    cmd, experiment, left, first, second = killed_mid_upload
    for folder, copy in left.items():  # as the killed driver left them, not as an earlier case's resume did
        shutil.rmtree(folder)
        shutil.copytree(copy, folder)
    for path in second:
        if any(path.match(pattern) for pattern in cut):
            path.write_bytes(b"")
        elif any(path.match(pattern) for pattern in behind):
            path.write_bytes(first[path])  # one driver session: the same file names
    [second_id] = {p.name.split("_")[0] for p in experiment.glob("*_T=2,*")}

    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = results.load(str(experiment), results.TRIALS_TABLE)
    assert sorted(trials["stratum"]) == ["T=1,ndot_A", "T=2,ndot_A"]
    assert (trials["status"] == results.COMPLETED).all() and (trials["epochs_run"] == 3).all()
    assert (second_id in set(trials["trial_id"])) == (behind == SEARCHER_STATE), "resumed the trial Tune listed, re-created the one it did not"
    _assert_epochs_complete(results.load(str(experiment)), trials)
    # TPE learnt each stratum's trial, once.
    best = trials.set_index("stratum")["best_test_acc"]
    told = [[t.value for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE] for s in _studies(experiment)]
    assert told == [[best["T=1,ndot_A"]], [best["T=2,ndot_A"]]]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_sweep_says_how_to_continue_and_leaves_its_trials_unfinished(cluster, tmp_path, stop):
    cmd = _sweep_cmd(tmp_path, "stopped", cluster.address, "--T", "1", "--rules", "ndot_A,ottt_A", "--epochs", "8")
    proc = _start(cmd, tmp_path / "stderr")
    try:
        _wait_for_epoch(tmp_path / "stopped", proc, 1, 7)
        proc.send_signal(stop)
        proc.wait(timeout=HANG_S)
    finally:
        proc.kill()
    err = _stderr(proc)
    last = err.splitlines()[-1]
    assert proc.returncode == 130 and "interrupted" in last and "--resume --name stopped" in last, err[-6000:]
    assert "Tuner.restore" not in err, "Tune's own resume hint, which this command line does not take"
    status = results.load(str(tmp_path / "stopped"), results.TRIALS_TABLE).set_index("trial_id")["status"]
    assert "running" in set(status) and results.STOPPED_EARLY not in set(status), status.tolist()
    # The tables hold every epoch the trials' checkpoints do, those Tune had not registered yet too.
    rebuilt = results.epochs_frame(results.collect(str(tmp_path / "stopped")))
    assert len(results.load(str(tmp_path / "stopped"))) == len(rebuilt) > 0
    # Collected again from the experiment folder, the trials read the same.
    assert results.main(["collect", str(tmp_path / "stopped")]) == 0
    assert results.load(str(tmp_path / "stopped"), results.TRIALS_TABLE).set_index("trial_id")["status"].to_dict() == status.to_dict()


def test_a_resume_whose_recorded_checkpoint_is_gone_continues_from_the_newest_whole_one(cluster, tmp_path):
    # Tune deletes a trial's oldest kept checkpoint as it registers a new one and saves its state later: a
    # driver killed between the two leaves a state naming a checkpoint that is gone, from which Tune would
    # fail to restore the trial at every resume.
    cmd = _sweep_cmd(tmp_path, "gone", cluster.address, "--T", "1", "--rules", "ndot_A", "--epochs", "8")
    proc = _start(cmd, tmp_path / "stderr")
    try:
        _wait_for_epoch(tmp_path / "gone", proc, 2, 7)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=HANG_S)
    finally:
        proc.kill()
    [trial] = listed_trials(str(tmp_path / "gone"))
    shutil.rmtree(trial.checkpoint.path)

    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = results.load(str(tmp_path / "gone"), results.TRIALS_TABLE)
    assert trials["status"].tolist() == [results.COMPLETED] and trials["epochs_run"].tolist() == [8]
    _assert_epochs_complete(results.load(str(tmp_path / "gone")), trials)
    _assert_checkpoints_hold_best_weights(tmp_path / "gone", trials)


def test_sigterm_to_the_process_group_ends_the_sweep_with_its_local_ray_and_loses_nothing(tmp_path):
    # `timeout` and batch schedulers signal every process of the job: the Ray this driver started too.
    cmd = [sys.executable, str(ROOT / "sweeps" / "timesteps.py"), "--storage", str(tmp_path), "--name", "group",
           "--T", "1", "--rules", "ndot_A,ottt_A", "--epochs", "4"]
    proc = _start(cmd, tmp_path / "stderr", start_new_session=True)
    try:
        _wait_for_epoch(tmp_path / "group", proc, 1, 3)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=HANG_S)
        # Nothing of its Ray outlives it: a trial's worker goes on to the end of its epoch and writes its
        # checkpoint, which the tables the driver wrote would then lack.
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    err = _stderr(proc)
    last = err.splitlines()[-1]
    assert proc.returncode == 130 and f"continue with python {cmd[1]} --resume --name group" in last, last
    assert "Token authentication" not in err, "Ray's notice at each start of a local Ray, noise to a sweep"
    # The tables hold every epoch the trials' checkpoints do, as a rebuild from them would.
    rebuilt = results.epochs_frame(results.collect(str(tmp_path / "group")))
    assert len(results.load(str(tmp_path / "group"))) == len(rebuilt) > 0

    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = results.load(str(tmp_path / "group"), results.TRIALS_TABLE)
    assert len(trials) == 2 and (trials["status"] == results.COMPLETED).all() and (trials["epochs_run"] == 4).all()
    _assert_epochs_complete(results.load(str(tmp_path / "group")), trials)


def test_killed_worker_node_trials_resume_elsewhere(cluster, tmp_path):
    workers = {n.node_id: n for n in cluster.worker_nodes}
    # The GPUs are Ray's resources only: on this machine's torch the trials run on the CPU, as asked.
    # Two trials of a CPU each, on two one-CPU nodes: one on each from the start, the killed one's trial then
    # resumes after the other's on the node left.
    flags = ("--T", "1", "--rules", "ndot_A,ottt_A", "--epochs", "5", "--gpus-per-trial", "0.5", "--set", "device=cpu")
    proc = _start(_sweep_cmd(tmp_path, "nodes", cluster.address, *flags), tmp_path / "stderr")
    try:
        victim = _wait_for_epoch(tmp_path / "nodes", proc, 2, 4)["node_id"]
        cluster.remove_node(workers[victim], allow_graceful=False)
        proc.wait(timeout=HANG_S)
    finally:
        proc.kill()
        cluster.add_node(num_cpus=1, num_gpus=1)
    assert proc.returncode == 0, _stderr(proc)[-2000:]

    epochs = results.load(str(tmp_path / "nodes"))
    trials = results.load(str(tmp_path / "nodes"), results.TRIALS_TABLE)
    assert set(epochs["node_id"]) == set(workers), "trials did not spread over both worker nodes"
    assert (trials["status"] == results.COMPLETED).all() and (trials["epochs_run"] == 5).all()
    _assert_epochs_complete(epochs, trials)
    # The interrupted trial kept the epochs it ran on the dead node and continued
    # on the other one from its checkpoint, rather than starting again.
    moved = [g.sort_values("epoch")["node_id"].tolist() for _, g in epochs.groupby("trial_id")]
    moved = [nodes for nodes in moved if len(set(nodes)) > 1]
    assert moved and all(nodes[0] == victim and nodes[-1] != victim for nodes in moved)
    assert trials["num_failures"].max() >= 1
