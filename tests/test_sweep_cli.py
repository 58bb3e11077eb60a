"""Bad sweep input is refused before Ray starts: one line on stderr, a non-zero exit code."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
import psutil  # after ray: Ray's copy, on the path once ray is imported
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR as JOB_CONFIG
from ray.cluster_utils import Cluster

from data_fixtures import closed_port
from helpers import HANG_S, exit_status
from ndot import data, files, results
from ndot.data import digits, dvs, fixtures
from ndot.data.storage import cache_root
from ndot.cli import show_progress
from ndot.config import ConfigError, TrainConfig
from ndot.models import ARCHS, register
from ndot.sweep import cli, reach, resources, runner, trainable
from ndot.sweep.definitions import ARCHITECTURES, LEARNING_RATES, PAPER_DVS, TIMESTEPS
from ndot.sweep.space import STRATUM_KEY

ROOT = Path(__file__).resolve().parents[1]
RAY_SESSIONS = Path(tempfile.gettempdir(), "ray")


def _sessions() -> set[Path]:
    return set(RAY_SESSIONS.glob("session_2*"))


def write_trials(plan: runner.Plan, statuses: str | list[str] = "completed") -> list:
    """What a sweep's run leaves where Ray's part stands in: its trials table, one trial per stratum."""
    Path(plan.experiment).mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"stratum": [s.label for s in plan.strata], "status": statuses, "best_test_acc": 0.5,
                  "final_test_acc": 0.5, "lr": 0.1, "best_epoch": 1, "checkpoint": "t/checkpoint_000000"}
                 ).to_parquet(results.table_uri(plan.experiment, results.TRIALS_TABLE))
    return []


def stand_in_for_ray(monkeypatch, run=lambda plan, resume, callbacks, launcher: [], cpus: float = 4.0) -> None:
    """No cluster: the driver connects to nothing, the nodes are one of `cpus` CPUs, and `run` is the sweep."""
    monkeypatch.setattr(runner, "connect", lambda address: None)
    monkeypatch.setattr(runner, "head_address", lambda address: None)
    monkeypatch.setattr(runner, "run", run)
    monkeypatch.setattr(resources, "node_shapes", lambda launcher: [{"CPU": cpus}])
    monkeypatch.setattr(reach, "unimportable", lambda imports, client: None)


@pytest.fixture
def storage(tmp_path):
    return ["--storage", str(tmp_path / "runs")]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--T", "0"], "T must be an integer in [1, 10000]"),
        (["--T", "2,-1"], "T must be an integer in [1, 10000]"),
        (["--T", "two"], "--T"),
        (["--rules", "ndot_O,magic_A"], "--rules: unknown rule 'magic'"),
        (["--rules", "ndot"], "--rules: rule 'ndot' needs its mode, written RULE_MODE"),
        (["--rules", "bptt_O"], "--rules: rule 'bptt' needs the whole sequence"),
        (["--rules", "ndot_X"], "--rules: unknown mode 'X'; valid modes: O, A"),
        (["--archs", "transformer"], "unknown architecture"),
        (["--dataset", "mnist"], "unknown dataset"),
        (["--lr", "0"], "lr must be > 0"),
        (["--lr=-0.1,0.5"], "lr must be > 0"),
        (["--lr", "0.1,1e39"], "at most float32's largest"),  # every trial would fail in its first step
        (["--lr", "0.5,0.1"], "LOW must not exceed HIGH"),
        (["--lr", "0.1,0.2,0.3"], "expected VALUE or LOW,HIGH, got '0.1,0.2,0.3'"),
        (["--archs", "small_cnn,vgg11_ws"], "takes one value in the timesteps sweep"),
        (["--trials", "0"], "--trials"),
        (["--lr", "0.1", "--trials", "2"], "repeats one run: give --trials 1"),
        (["--name", "a/../b"], "must be a folder name"),
        (["--name", ".."], "must be a folder name"),
        (["--name", "é" * 128], "--name is 256 bytes long"),
        (["--resume", "--name", "é" * 128], "--name is 256 bytes long"),
        (["--resume"], "--resume needs the --name"),
        (["--resume", "--name", "never-ran"], "no experiment to resume"),
        (["--set", "precision"], "FIELD=VALUE"),
        (["--set", "warp=9"], "unknown setting 'warp'"),
        (["--set", "T=4"], "use --T"),
        (["--set", "fused_neuron=maybe"], "true or false"),
        (["--set", "dropout=lots"], "dropout is a number"),
        (["--set", "precision=fp16"], "unknown precision 'fp16'"),
        (["--set", "device=cuda"], "needs --gpus-per-trial > 0"),
        (["--set", "cuda_graph=true"], "cuda_graph"),
        (["--set", "readout_trace=true", "--rules", "bptt_A"], "--set readout_trace applies to rule ndot or"),
        (["--set", "detach_reset=yes", "--rules", "ndot_O,ottt_A"], "--set detach_reset applies to rule bptt only, not ndot, ottt"),
        (["--set", "weight_change=0.025", "--rules", "ndot_A,ottt_A"], "--set weight_change applies to mode O only, not A"),
        (["--set", "weight_change=0.025", "--rules", "ndot_O", "--T", "1"], "--set weight_change applies to T > 1 only, not T = 1"),
        (["--T", "20000"], "T must be an integer in [1, 10000]"),
        (["--epochs", "1000000"], "epochs must be an integer in [1, 100000]"),
        (["--lr", "inf"], "lr must be a finite number"),
        (["--lr", "0.1,inf"], "lr must be a finite number"),
        (["--set", "tau=inf"], "tau must be a finite number"),
        (["--gpus-per-trial", "nan"], "--gpus-per-trial must be"),
        (["--gpus-per-trial", "inf"], "--gpus-per-trial must be"),
        (["--cpus-per-trial", "inf"], "--cpus-per-trial must be a finite number > 0"),
        (["--T", "1,,2"], "comma-separated list of int"),
        (["--storag", "x"], "unrecognized arguments: --storag"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, says, storage, capsys):
    rc = exit_status(cli.main, TIMESTEPS, [*argv, *storage])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and says in err, err
    assert not ray.is_initialized()


def test_weight_change_over_several_T_is_taken_where_one_of_them_reads_it():
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(
        ["--rules", "ndot_O", "--T", "1,2", "--set", "weight_change=0.025"]))
    assert plan.base["weight_change"] == 0.025  # the searcher turns it off at T = 1 (tests/test_sweep_search.py)


def test_a_sweeps_searcher_turns_settings_off_by_the_t_its_strata_leave_out(tmp_path):
    # A sweep of the user's over rules alone, with paper_dvs's weight_change and T = 1: its trials run it off
    # (trainable.run_trial) and record it so (tests/test_sweep_search.py has the searcher's side).
    sweep = dataclasses.replace(LEARNING_RATES, presets={"dvs": dataclasses.replace(PAPER_DVS, T=(1,), method=("ndot_O",))})
    plan = cli.build_plan(sweep, cli.parser(sweep).parse_args(["--preset", "dvs", "--storage", str(tmp_path), "--max-concurrent", "1"]))
    search = runner._new_tuner(plan, [], launcher=False)._local_tuner._tune_config.search_alg.searcher.searcher
    assert plan.base["weight_change"] == 0.025 and {**plan.base, **search.suggest("t0")}["weight_change"] == 0.0


def test_a_name_of_255_bytes_is_a_folder_name_and_names_the_experiment(tmp_path):
    name = "é" * 127 + "s"
    runner.save_plan(cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--storage", str(tmp_path), "--name", name])), new=True)
    assert (tmp_path / name / results.PLAN_FILE).is_file()


def test_a_resume_takes_resources_and_trials_at_once_from_its_flags_and_the_rest_as_started(tmp_path):
    def parse(*flags: str):
        return cli.parser(TIMESTEPS).parse_args(["--storage", str(tmp_path), "--name", "s", *flags])

    plan = cli.build_plan(TIMESTEPS, parse("--max-concurrent", "1", "--T", "1,2"))
    runner.save_plan(plan)
    (Path(plan.experiment) / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    assert cli.resumed_plan(TIMESTEPS, parse("--resume")) == plan
    changed = cli.resumed_plan(TIMESTEPS, parse("--resume", "--max-concurrent", "3", "--cpus-per-trial", "2", "--T", "1,2"))
    assert changed == dataclasses.replace(plan, max_concurrent=3, cpus_per_trial=2)
    with pytest.raises(cli.InputError, match="--max-concurrent must be at least 1, got 0"):
        cli.resumed_plan(TIMESTEPS, parse("--resume", "--max-concurrent", "0"))
    assert cli._ignored_on_resume(parse("--resume", "--max-concurrent", "3", "--T", "1,2")) == []
    with pytest.raises(cli.InputError, match="experiment s is a timesteps sweep: resume it with sweeps/timesteps.py"):
        cli.resumed_plan(ARCHITECTURES, parse("--resume"))
    # Through ray:// the tuner runs in the cluster, out of the resume's reach.
    client = parse("--resume", "--max-concurrent", "3", "--address", "ray://head:10001")
    assert cli._ignored_on_resume(client) == ["--max-concurrent"]
    assert cli._ignored_on_resume(parse("--resume", "--address", "ray://head:10001")) == []


def test_a_resume_refuses_in_one_line_each_flag_that_would_change_the_sweep_and_takes_those_it_started_with(tmp_path, capsys):
    # Run as started, more trials or another seed asked for would be dropped with exit 0; run as asked, a
    # sweep's trials would mix two plans.
    started = ["--storage", str(tmp_path), "--name", "s", "--preset", "smoke", "--T", "1,2", "--rules", "ndot_O,bptt_A",
               "--lr", "0.02,0.5", "--trials", "2", "--epochs", "2", "--seed", "1", "--set", "tau=3"]
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(started))
    runner.save_plan(plan)
    (Path(plan.experiment) / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    assert cli.resumed_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args([*started, "--resume"])) == plan
    for changed, says in [(["--trials", "4"], "--trials 4 (started with 2)"), (["--T", "1,2,4"], "--T 1,2,4 (started with 1,2)"),
                          (["--seed", "2"], "--seed 2 (started with 1)"), (["--epochs", "3"], "--epochs 3 (started with 2)"),
                          (["--rules", "ndot_A"], "--rules ndot_A (started with ndot_O,bptt_A)"),
                          (["--lr", "0.1"], "--lr 0.1 (started with 0.02,0.5)"), (["--preset", "paper"], "--preset paper (started with smoke)"),
                          (["--set", "tau=2"], "--set tau=2.0 (started with 3.0)")]:
        assert exit_status(cli.main, TIMESTEPS, ["--storage", str(tmp_path), "--name", "s", "--resume", *changed]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"experiment s as it was started, not with {says}: leave them out" in err, err


def test_a_resume_given_a_relative_data_root_and_download_as_started_or_without_them_continues_the_sweep(tmp_path, monkeypatch):
    # The plan saves the data root absolute and --download as a setting: neither, typed again or left out, is a change.
    monkeypatch.chdir(tmp_path)
    started = ["--storage", str(tmp_path), "--name", "s", "--dataset", "cifar10", "--data-root", "data", "--download"]
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(started))
    runner.save_plan(plan)
    (Path(plan.experiment) / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    for resume in ([*started, "--resume"], [*started[:4], "--resume"]):
        assert cli.resumed_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(resume)) == plan, resume


def test_a_resume_compares_the_preset_the_sweep_started_with_only_where_its_plan_names_it(tmp_path):
    # A sweep started without --preset ran the default one; a plan saved before plans named theirs says nothing.
    flags = ["--storage", str(tmp_path), "--name", "s"]
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(flags))
    runner.save_plan(plan)
    (Path(plan.experiment) / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    with pytest.raises(cli.InputError, match=rf"--preset paper \(started with {cli.DEFAULT_PRESET}\)"):
        cli.resumed_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args([*flags, "--resume", "--preset", "paper"]))
    saved = json.loads(files.read_bytes(results.plan_uri(plan.experiment)))
    del saved["preset"]
    files.write_bytes(results.plan_uri(plan.experiment), json.dumps(saved).encode())
    resumed = cli.resumed_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args([*flags, "--resume", "--preset", "paper"]))
    assert resumed == dataclasses.replace(plan, preset="")


def test_the_command_printed_to_continue_a_sweep_resumes_it_as_pasted_into_a_shell(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sweeps/timesteps.py"])
    started = ["--storage", str(tmp_path / "my runs"), "--name", "s", "--T", "1,2"]
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(started))
    runner.save_plan(plan)
    (Path(plan.experiment) / "tuner.pkl").touch()
    words = shlex.split(cli.resume_command(plan, "ray://head:10001"))
    assert words[:2] == ["python", "sweeps/timesteps.py"]
    again = cli.parser(TIMESTEPS).parse_args(words[2:])
    assert again.address == "ray://head:10001" and cli.resumed_plan(TIMESTEPS, again) == plan
    # Run from a notebook, whose sys.argv[0] is its kernel's launcher: the sweep's own script, as typed in a shell.
    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/ipykernel_launcher.py", "-f", "kernel.json"])
    assert shlex.split(cli.resume_command(plan, None))[:2] == ["python", "sweeps/timesteps.py"]
    assert cli.parser(TIMESTEPS).prog == "timesteps.py"


def test_a_resume_whose_newest_experiment_state_is_cut_short_is_refused_before_ray_starts(tmp_path, capsys):
    # Tune would start the experiment afresh in its folder, and its earlier trials would drop out of the sweep.
    flags = ["--storage", str(tmp_path), "--name", "s"]
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(flags))
    runner.save_plan(plan)
    experiment = Path(plan.experiment)
    (experiment / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [')  # a copy cut off
    rc = exit_status(cli.main, TIMESTEPS, [*flags, "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "experiment_state-2026-01-01_00-00-00.json, is unreadable" in err and "no earlier one" in err
    (experiment / "experiment_state-2025-12-31_00-00-00.json").write_text('{"trial_data": []}')
    assert exit_status(cli.main, TIMESTEPS, [*flags, "--resume"]) == 2
    assert "move it aside to resume from the one before it, experiment_state-2025-12-31_00-00-00.json" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_resumed_sweep_on_a_dataset_of_the_users_own_imports_its_module_before_the_data_checks(tmp_path, monkeypatch,
                                                                                                user_data):
    # A resume is a process of its own, which has not imported the module: its plan's imports must be read first.
    module, dataset = user_data
    flags = ["--storage", str(tmp_path), "--name", "s"]
    runner.save_plan(cli.build_plan(ARCHITECTURES, cli.parser(ARCHITECTURES).parse_args(
        [*flags, "--dataset", dataset, "--set", f"imports={module}"])))
    (tmp_path / "s" / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    data.DATASETS.pop(dataset)
    sys.modules.pop(module)
    ran = []
    stand_in_for_ray(monkeypatch, lambda plan, resume, callbacks, launcher: ran.append(resume) or write_trials(plan))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert exit_status(cli.main, ARCHITECTURES, [*flags, "--resume"]) == 0 and ran == [True]
    assert dataset in data.DATASETS


@pytest.mark.parametrize("change, says", [
    (lambda plan: plan["strata"][1]["values"].update(T=20000), "T must be an integer in [1, 10000], got 20000"),
    (lambda plan: plan["base"].update(warp=9), "unknown setting 'warp'"),
], ids=["bound", "setting"])
def test_a_resumed_plan_whose_trials_this_ndot_would_refuse_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys,
                                                                                        change, says):
    # A plan saved by another ndot: each trial it creates would fail once Ray ran it.
    flags = ["--storage", str(tmp_path), "--name", "s"]
    runner.save_plan(cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args([*flags, "--T", "1,2"])))
    (tmp_path / "s" / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    saved = json.loads((tmp_path / "s" / results.PLAN_FILE).read_text())
    change(saved)
    (tmp_path / "s" / results.PLAN_FILE).write_text(json.dumps(saved))
    monkeypatch.setattr(runner, "connect", lambda address: pytest.fail("the sweep started Ray"))
    assert exit_status(cli.main, TIMESTEPS, [*flags, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: experiment s cannot run as started ({results.PLAN_FILE}): {says}" in err, err


@pytest.mark.parametrize("storage, says", [("", "--storage must name a folder or a URI"),
                                           ("foo://x", "storage foo://x is not writable"),
                                           ("s3://", "--storage s3:// names no bucket")])
def test_storage_that_names_nothing_writable_is_refused_in_one_line(storage, says, capsys):
    assert exit_status(cli.main, TIMESTEPS, ["--storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert not ray.is_initialized()


@pytest.mark.parametrize("storage", ["file://", "file://  "])
def test_a_file_uri_that_names_no_path_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch, storage):
    # abspath("") is the folder the sweep was typed in: the experiment would have landed there.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.InputError, match=f"--storage must name a folder or a URI, got {storage!r}"):
        cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--storage", storage]))


def test_a_resume_whose_plan_is_not_readable_is_refused_in_one_line(tmp_path, capsys):
    flags = ["--storage", str(tmp_path), "--name", "s"]
    runner.save_plan(cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(flags)))
    (tmp_path / "s" / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    (tmp_path / "s" / "sweep.json").write_text('{"name": "s", ')
    assert exit_status(cli.main, TIMESTEPS, [*flags, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep.json is not a readable sweep plan" in err, err
    assert not ray.is_initialized()


@pytest.mark.parametrize("change, says", [
    (lambda folder: (folder / "sweep.json").unlink(), "has no sweep.json"),
    # Tune's state names the folder it started in: a resume of the copy would write into the original.
    (lambda folder: shutil.copytree(folder, folder.with_name("renamed")), "was started as s: resume it under that name"),
], ids=["no-plan", "renamed"])
def test_a_resume_of_a_folder_that_is_not_the_plans_is_refused_in_one_line(tmp_path, capsys, change, says):
    runner.save_plan(cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--storage", str(tmp_path), "--name", "s"])))
    (tmp_path / "s" / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    change(tmp_path / "s")
    name = "renamed" if (tmp_path / "renamed").exists() else "s"
    assert exit_status(cli.main, TIMESTEPS, ["--storage", str(tmp_path), "--name", name, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert not ray.is_initialized()


def test_object_storage_that_refuses_the_credentials_is_one_line(tmp_path, monkeypatch, capsys):
    # No credentials file where the variable points: the GCS client's "permanent error", which pyarrow
    # raises as a bare ArrowException (neither OSError nor ValueError); found offline, at once.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    assert exit_status(cli.main, TIMESTEPS, ["--storage", "gs://ndot-test-bucket/sweeps"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: storage gs://ndot-test-bucket/sweeps is not writable: ")
    assert not ray.is_initialized()


def test_a_storage_check_that_takes_a_while_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "SLOW_CHECK_S", 0.0)
    monkeypatch.setattr(files, "check_writable", lambda storage: time.sleep(0.5))
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--storage", str(tmp_path), "--name", "s"]))
    show_progress()
    cli.check(plan, resume=False)
    assert capsys.readouterr().err == f"checking that {tmp_path} can be written\n"


def test_data_missing_from_a_resumed_sweeps_data_root_names_its_plan_not_ndot_data(tmp_path, monkeypatch):
    monkeypatch.setenv("NDOT_DATA", str(tmp_path / "elsewhere"))
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(
        ["--storage", str(tmp_path), "--name", "s", "--dataset", "cifar10", "--data-root", str(tmp_path / "gone")]))
    with pytest.raises(data.DataError) as e:
        cli.check(plan, resume=True)
    assert str(e.value).endswith(f"the data root is the data_root saved in {plan.experiment}/{results.PLAN_FILE}; "
                                 "a resume keeps it: put the data there")


def test_local_storage_is_a_plain_absolute_path_which_tune_writes_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for given, storage in [("runs", str(tmp_path / "runs")), (f"file://{tmp_path}/runs", str(tmp_path / "runs")),
                           ("~/runs", str(tmp_path / "home" / "runs")), ("s3://bucket/sweeps", "s3://bucket/sweeps")]:
        plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--storage", given]))
        assert plan.storage == storage
        assert (files.tune_filesystem(plan.storage) is None) == storage.startswith("s3://")


def test_a_file_uri_is_read_as_pyarrow_and_ray_read_it(tmp_path):
    # RFC 8089's path is percent-encoded: file:///a%20b named a folder "a%20b", where ndot.results, through
    # pyarrow, looked for "a b".
    def storage(given: str) -> str:
        return cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--storage", given])).storage

    assert storage(f"file://{tmp_path}/a%20b") == str(tmp_path / "a b") == files.filesystem(f"file://{tmp_path}/a%20b")[1]
    for given, says in [("file://host/runs", "Unsupported hostname"), ("file:runs", "cannot be relative"),
                        (f"file://{tmp_path}/a b", "Cannot parse URI")]:
        with pytest.raises(cli.InputError, match=f"^--storage {given} is no file URI: .*{says}"):
            storage(given)


def test_trials_read_the_data_root_the_driver_checked(tmp_path, monkeypatch):
    # Tune runs each trial in a folder of its own, and $NDOT_DATA does not reach another node's processes.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NDOT_DATA", raising=False)

    def root(*flags: str) -> str | None:
        args = cli.parser(TIMESTEPS).parse_args(["--dataset", "cifar10", *flags])
        return cli.build_plan(TIMESTEPS, args).base.get("data_root")

    assert root() is None  # each node's ~/data, the same path on nodes of one image
    assert root("--data-root", "data") == str(tmp_path / "data")
    monkeypatch.setenv("NDOT_DATA", "shared/data")
    assert root() == str(tmp_path / "shared" / "data")
    # digits ships inside scikit-learn: its trials record no root, which they would not read.
    assert cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--dataset", "digits"])).base.get("data_root") is None


def test_a_relative_ndot_cache_in_the_jobs_runtime_env_is_refused(tmp_path, monkeypatch, capsys):
    # It reaches every trial as it is, and each, in a folder of its own, would build the frames there again.
    monkeypatch.setenv(JOB_CONFIG, json.dumps({"runtime_env": {"env_vars": {"NDOT_CACHE": "frames"}}}))
    rc = exit_status(cli.main, TIMESTEPS, ["--storage", str(tmp_path), "--address", f"127.0.0.1:{closed_port()}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "NDOT_CACHE=frames in the job's runtime_env is relative" in err, err
    # ~ is each trial's home, as cache_root reads it.
    monkeypatch.setenv(JOB_CONFIG, json.dumps({"runtime_env": {"env_vars": {"NDOT_CACHE": "~/frames"}}}))
    cli.check(cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--storage", str(tmp_path), "--name", "s"])), resume=False)


def test_trials_on_the_clusters_other_nodes_cache_where_the_drivers_ndot_cache_says(tmp_path, monkeypatch):
    # The cluster starts without it, as its other machines do, and the driver sets it after: relative, as Tune
    # runs each trial in a folder of its own.
    monkeypatch.delenv("NDOT_CACHE", raising=False)
    monkeypatch.delenv(JOB_CONFIG, raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cached_in = ray.remote(cache_root)
    cfg = TrainConfig(dataset="cifar10dvs", data_root=str(tmp_path / "data"))
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("NDOT_CACHE", "frames")
        runner.connect(cluster.address)
        assert ray.get(cached_in.remote(cfg)) == tmp_path / "frames"
        ray.shutdown()
        # Run by `ray job submit`, whose runtime_env sets it: that one reaches the trials, and a second is refused.
        monkeypatch.setenv(JOB_CONFIG, json.dumps({"runtime_env": {"env_vars": {"NDOT_CACHE": str(tmp_path / "job")}}}))
        runner.connect(cluster.address)
        assert ray.get(cached_in.remote(cfg)) == tmp_path / "job"
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("flags,says", [
    (["--dataset", "digits", "--data-root", "data"], "--data-root does not apply to dataset 'digits'"),
    (["--dataset", "digits", "--download"], "--download does not apply to dataset 'digits'"),
    (["--dataset", "cifar10", "--data-root", ""], "--data-root must name a folder, got ''"),
])
def test_a_data_flag_that_would_change_nothing_is_refused(tmp_path, capsys, flags, says):
    assert exit_status(cli.main, TIMESTEPS, [*flags, "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_set_fixes_any_other_field_for_every_trial(tmp_path):
    args = cli.parser(TIMESTEPS).parse_args(
        ["--set", "precision=bf16", "--set", "fused_neuron=true", "--set", "dropout=0.1", "--storage", str(tmp_path)])
    base = cli.build_plan(TIMESTEPS, args).base
    assert (base["precision"], base["fused_neuron"], base["dropout"]) == ("bf16", True, 0.1)


def test_help_says_what_every_flag_is():
    p = cli.parser(TIMESTEPS)  # every sweep's script has the same flags
    assert all(action.help for action in p._actions), [a.dest for a in p._actions if not a.help]
    assert all(name in p.format_help() for name in ("cifar10dvs", "digits"))


@pytest.mark.parametrize("sweep", [TIMESTEPS, ARCHITECTURES, LEARNING_RATES], ids=lambda s: s.name)
def test_every_preset_is_a_valid_plan(sweep):
    for preset in sweep.presets:
        plan = cli.build_plan(sweep, cli.parser(sweep).parse_args(["--preset", preset]))
        assert plan.num_trials == len(plan.strata) * sweep.presets[preset].trials > 0


def test_missing_dataset_is_refused(tmp_path, capsys):
    rc = exit_status(cli.main, TIMESTEPS, ["--dataset", "cifar10", "--data-root", str(tmp_path / "empty"), "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    # Every stratum reads the same data: its line names no stratum.
    assert rc != 0 and err.count("\n") == 1 and err.startswith(f"error: cifar10 is incomplete in {tmp_path / 'empty'}"), err


def test_unwritable_storage_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc = exit_status(cli.main, TIMESTEPS, ["--storage", str(blocker / "runs")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "not writable" in err


def test_an_architecture_sweep_checks_its_strata_too(tmp_path, capsys):
    rc = exit_status(cli.main, ARCHITECTURES, ["--archs", "small_cnn,nope", "--storage", str(tmp_path)])
    assert rc != 0 and "unknown architecture 'nope'" in capsys.readouterr().err


@pytest.fixture
def dvs_root(tmp_path, monkeypatch) -> Path:
    """CIFAR10-DVS of 100 recordings a class (tonic's minimum of 1,000), its frames cached in tmp_path/cache."""
    monkeypatch.setattr(dvs, "RECORDINGS_PER_CLASS", 100)
    monkeypatch.setenv("NDOT_CACHE", str(tmp_path / "cache"))
    fixtures.write_cifar10dvs(tmp_path / "dvs", per_class=100, events=300)
    return tmp_path / "dvs"


@pytest.mark.parametrize("rules, which", [("ndot_O,ottt_A", "T=2,ndot_O and 1 more that read its data"), ("ndot_O", "T=2,ndot_O")])
def test_a_stratum_whose_frames_cannot_be_cached_is_refused_before_ray_starts_where_the_firsts_are(dvs_root, tmp_path,
                                                                                                     monkeypatch, capsys,
                                                                                                     rules, which):
    # A cache that holds T=1's frames and takes no more: each trial at T=2 would fail, once Ray ran it.
    dvs.load_frames(TrainConfig(dataset="cifar10dvs", data_root=str(dvs_root), T=1, workers=0), dvs.INFO.image_size)
    capsys.readouterr()  # its progress line, where an earlier test showed them
    frames, access = tmp_path / "cache" / "cifar10dvs", os.access
    # As root every folder is writable: a read-only cache mount is the permission faked.
    monkeypatch.setattr(os, "access", lambda path, mode: not (mode & os.W_OK and Path(path) == frames) and access(path, mode))
    checked = []
    check = dvs.check
    monkeypatch.setattr(dvs, "check", lambda cfg: (checked.append(cfg.T), check(cfg)))
    monkeypatch.setattr(runner, "connect", lambda address: pytest.fail("the sweep started Ray"))
    rc = exit_status(cli.main, TIMESTEPS, ["--dataset", "cifar10dvs", "--data-root", str(dvs_root), "--T", "1,2",
                                           "--rules", rules, "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"error: stratum {which}: cannot write the CIFAR10-DVS frame cache in {frames}" in err, err
    assert checked == [1, 2], "each T's frames checked once, not once a rule"


def test_a_sweep_on_a_ray_of_its_own_caches_each_ts_frames_before_its_trials_start_and_says_so(dvs_root, tmp_path,
                                                                                              monkeypatch, capsys):
    # Ray forwards no trial's output: a trial's conversion, minutes on the real data set, would pass in silence.
    cached = []
    stand_in_for_ray(monkeypatch, lambda plan, resume, callbacks, launcher:
                     cached.append(sorted(p.name for p in (tmp_path / "cache" / "cifar10dvs").glob("*.pt"))) or write_trials(plan))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    argv = ["--dataset", "cifar10dvs", "--data-root", str(dvs_root), "--T", "1,2", "--rules", "ndot_O,ottt_A",
            "--storage", str(tmp_path / "runs")]
    assert exit_status(cli.main, TIMESTEPS, argv) == 0
    assert [[name.split("-")[1] for name in names] for names in cached] == [["T1", "T2"]]
    err = capsys.readouterr().err
    assert [line.split(" into ")[1].split()[0] for line in err.splitlines() if " recordings into " in line] == ["1", "2"], err
    # The frames a trial's loaders read: those cached, converted again by none.
    for T in (1, 2):
        data.loaders(TrainConfig(dataset="cifar10dvs", data_root=str(dvs_root), T=T, workers=0), torch.device("cpu"))
    assert " recordings into " not in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "cifar10dvs").glob("*.pt"))) == 2


# A dataset of the user's that caches what it reads per T, as CIFAR10-DVS does: digits, its prepare recorded.
_CACHING_DATA = """
from ndot.data import DatasetInfo, digits, register

PREPARED = []  # (T, workers) of each call


def prepare(cfg, workers):
    PREPARED.append((cfg.T, workers))


def loaders(cfg, device, input_size):
    return digits.loaders(cfg, device, input_size)


register("digits_by_T", loaders, DatasetInfo(10, 1, None, in_data_root=False, depends_on=("T",)), prepare=prepare)
"""


def test_a_sweep_on_a_ray_of_its_own_prepares_a_dataset_of_the_users_own_once_per_distinct_data(tmp_path, monkeypatch):
    # With the cores Ray would give the trials, before they start, as ndot's own CIFAR10-DVS frames are.
    (tmp_path / "caching_data.py").write_text(_CACHING_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    stand_in_for_ray(monkeypatch, lambda plan, resume, callbacks, launcher: write_trials(plan))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    argv = ["--dataset", "digits_by_T", "--set", "imports=caching_data", "--T", "1,2", "--rules", "ndot_O,ottt_A",
            "--storage", str(tmp_path / "runs")]
    try:
        assert exit_status(cli.main, TIMESTEPS, argv) == 0
        cpus = int(resources.local_ray()["CPU"])
        assert sys.modules["caching_data"].PREPARED == [(1, cpus), (2, cpus)]
    finally:
        data.DATASETS.pop("digits_by_T", None)
        sys.modules.pop("caching_data", None)


def test_an_architecture_registered_in_the_driver_alone_is_refused_naming_the_module_to_import(tmp_path, capsys, user_arch):
    # Its trials, in processes of their own, would each error "unknown architecture" after Ray had started.
    module, arch = user_arch
    __import__(module)
    rc = exit_status(cli.main, ARCHITECTURES, ["--archs", f"small_cnn,{arch}", "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"architecture '{arch}' is registered in this process only" in err, err
    assert err.rstrip().endswith(f"--set imports={module}") and not ray.is_initialized()


@pytest.mark.parametrize("what", ["architecture", "dataset"])
def test_a_name_registered_in_the_driver_for_ndots_own_network_or_data_is_refused_without_imports(tmp_path, capsys, what):
    # ndot's own builder or loaders under a new name (vgg11_ws for 64 px input, say): the trials know the function,
    # not the name, which the sweep let through as ndot's, and each trial errored on it as unknown.
    if what == "architecture":
        register("small_cnn_32", ARCHS["small_cnn"].build, 32)
        argv = ["--archs", "small_cnn_32"]
    else:
        data.register("digits_again", digits.loaders, digits.INFO)
        argv = ["--dataset", "digits_again"]
    try:
        rc = exit_status(cli.main, ARCHITECTURES, [*argv, "--storage", str(tmp_path), "--address", f"127.0.0.1:{closed_port()}"])
    finally:
        ARCHS.pop("small_cnn_32", None)
        data.DATASETS.pop("digits_again", None)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{what} '{argv[1]}' is registered in this process only" in err and err.rstrip().endswith("--set imports=MODULE"), err


def test_an_architecture_that_a_module_of_imports_registers_passes_the_sweeps_checks(tmp_path, user_arch):
    module, arch = user_arch  # imported by the checks, as by each trial
    plan = cli.build_plan(ARCHITECTURES, cli.parser(ARCHITECTURES).parse_args(
        ["--archs", f"small_cnn,{arch}", "--set", f"imports={module}", "--storage", str(tmp_path)]))
    assert {s.values["arch"] for s in plan.strata} == {"small_cnn", arch} and plan.base["imports"] == module


def test_an_architecture_that_a_module_of_imports_registers_through_a_module_it_imports_passes(tmp_path, user_arch):
    module, arch = user_arch
    (tmp_path / "user" / "lab_models.py").write_text(f"import {module}\n")
    try:
        plan = cli.build_plan(ARCHITECTURES, cli.parser(ARCHITECTURES).parse_args(
            ["--archs", arch, "--set", "imports=lab_models", "--storage", str(tmp_path)]))
    finally:
        sys.modules.pop("lab_models", None)
    assert {s.values["arch"] for s in plan.strata} == {arch}


@pytest.mark.parametrize("what", ["architecture", "dataset"])
def test_a_module_of_imports_that_registers_through_one_the_driver_imported_first_passes(tmp_path, monkeypatch,
                                                                                         user_arch, user_data, what):
    # The driver's import of user_arch registered the name, crediting only the modules importing then: lab_models,
    # imported after, was refused as registering nothing, though each trial's import of it registers the name.
    module, name = user_arch if what == "architecture" else user_data
    __import__(module)
    # Its own output, a line left open, before what the fresh process that checks it answers.
    (tmp_path / "user" / "lab_models.py").write_text(f"import {module}\nprint('lab models:', end='')\n")
    monkeypatch.chdir(tmp_path)  # found on the driver's sys.path (a notebook's sys.path.append), not in its folder
    try:
        plan = cli.build_plan(ARCHITECTURES, cli.parser(ARCHITECTURES).parse_args(
            ["--archs" if what == "architecture" else "--dataset", name, "--set", "imports=lab_models",
             "--storage", str(tmp_path)]))
    finally:
        sys.modules.pop("lab_models", None)
    assert plan.base["imports"] == "lab_models" and name in (plan.base["dataset"], *(s.values.get("arch") for s in plan.strata))


@pytest.mark.parametrize("what", ["architecture", "dataset"])
def test_a_name_that_the_modules_of_imports_do_not_register_is_refused_naming_the_module_that_does(
        tmp_path, capsys, user_arch, user_data, what):
    # The driver imported the module that registers it, the trials only those of imports: each would have errored
    # on the name as unknown, after Ray had started.
    module, name = user_arch if what == "architecture" else user_data
    __import__(module)
    rc = exit_status(cli.main, ARCHITECTURES, ["--archs" if what == "architecture" else "--dataset", name,
                                               "--set", "imports=ndot.layers", "--storage", str(tmp_path),
                                               "--address", f"127.0.0.1:{closed_port()}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{what} '{name}' is registered by {module}, not by the modules the sweep's trials import " \
           f"(--set imports=ndot.layers): add {module} to imports" in err, err


def test_a_module_whose_name_only_begins_as_the_registering_ones_does_not_register_it(tmp_path, user_arch):
    # user_arch_extra is no submodule of user_arch: importing it imports nothing of user_arch's.
    module, arch = user_arch
    __import__(module)
    (tmp_path / "user" / f"{module}_extra.py").write_text("")
    try:
        with pytest.raises(cli.InputError, match=f"is registered by {module}, not by the modules"):
            cli.build_plan(ARCHITECTURES, cli.parser(ARCHITECTURES).parse_args(
                ["--archs", arch, "--set", f"imports={module}_extra", "--storage", str(tmp_path)]))
    finally:
        sys.modules.pop(f"{module}_extra", None)


def test_an_architecture_registered_by_the_scripts_own_code_is_refused_whatever_imports_says(tmp_path):
    # ndot's builder, from a module the trials can import, registered under this name by the script's top level.
    exec("from ndot.models import ARCHS, register\nregister('mine', ARCHS['small_cnn'].build, 16)", {"__name__": "__main__"})
    try:
        with pytest.raises(cli.InputError) as e:
            cli.build_plan(ARCHITECTURES, cli.parser(ARCHITECTURES).parse_args(
                ["--archs", "mine", "--set", "imports=ndot.layers", "--storage", str(tmp_path)]))
    finally:
        ARCHS.pop("mine")
    assert str(e.value) == ("architecture 'mine' is registered by the script that started the sweep, not by the modules "
                            "the sweep's trials import (--set imports=ndot.layers): register it in a module of its own "
                            "and add that to imports")


def test_an_architecture_defined_in_the_script_that_starts_the_sweep_is_refused_whatever_imports_says(tmp_path, capsys):
    # A trial imports the modules of imports, never the driver's script (__main__ there is Ray's worker).
    script = {"__name__": "__main__"}
    exec("from ndot.models import ARCHS\ndef mine(c, k, n):\n    return ARCHS['small_cnn'].build(c, k, n)", script)
    register("mine", script["mine"], 16)
    try:
        rc = exit_status(cli.main, ARCHITECTURES, ["--archs", "mine", "--set", "imports=ndot.layers", "--storage", str(tmp_path),
                                                   "--address", f"127.0.0.1:{closed_port()}"])
    finally:
        ARCHS.pop("mine")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "architecture 'mine' is defined in the script that started the sweep" in err, err


def test_a_dataset_registered_in_the_driver_alone_is_refused_naming_the_module_to_import(tmp_path, capsys, user_data):
    # As an architecture is: its trials would each error "unknown dataset" after Ray had started.
    module, dataset = user_data
    __import__(module)
    rc = exit_status(cli.main, ARCHITECTURES, ["--dataset", dataset, "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"dataset '{dataset}' is registered in this process only" in err, err
    assert err.rstrip().endswith(f"--set imports={module}") and not ray.is_initialized()


def test_script_exits_nonzero_without_starting_ray(tmp_path):
    before = _sessions()
    done = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "timesteps.py"), "--T", "0", "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=HANG_S,
    )
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "T must be an integer in [1, 10000]" in done.stderr
    assert _sessions() == before, "a Ray session was started"


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "127.0.0.1:notaport"])
def test_an_address_nothing_answers_at_is_refused_before_ray_starts(storage, capsys, address):
    before = _sessions()
    rc = exit_status(cli.main, TIMESTEPS, ["--address", address.format(port=closed_port()), *storage])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "127.0.0.1" in err
    assert _sessions() == before, "a Ray session was started"


@pytest.mark.parametrize("recorded, says", [
    (None, "error: --address 'auto': no Ray cluster runs on this node"),
    # The cluster this node last joined, recorded by Ray, gone since: ray.init would wait on it for minutes.
    ("127.0.0.1:{port}", "error: --address 'auto', which found '127.0.0.1:{port}': no Ray cluster answers"),
], ids=["none", "gone"])
def test_auto_where_no_ray_runs_is_refused_before_the_sweep_starts(storage, capsys, monkeypatch, recorded, says):
    # What ray.init("auto") looks at: $RAY_ADDRESS, this node's record of its cluster, Ray's processes here
    # (another test session's Ray would be found: none is).
    port = closed_port()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: recorded and recorded.format(port=port))
    before = _sessions()
    rc = exit_status(cli.main, TIMESTEPS, ["--address", "auto", *storage])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and err.startswith(says.format(port=port)), err
    assert "starting" not in out, "refused only after the sweep said that it starts"
    assert _sessions() == before and not ray.is_initialized()


@pytest.mark.parametrize("address,says", [
    ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:"),
    ("http://127.0.0.1:8265", "'http://127.0.0.1:8265' is a dashboard's URL, for `ray job`"),
])
def test_ray_address_from_the_environment_is_the_cluster_a_sweep_joins(storage, capsys, monkeypatch, address, says):
    # `ray job submit` runs its driver with RAY_ADDRESS set: the sweep joins that cluster, and says so where it fails.
    monkeypatch.setenv("RAY_ADDRESS", address.format(port=closed_port()))
    before = _sessions()
    rc = exit_status(cli.main, TIMESTEPS, storage)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: $RAY_ADDRESS ") and says in err, err
    assert _sessions() == before, "a Ray session was started"
    # --address, given, stands over it.
    assert cli.cluster_address("auto") == ("auto", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert cli.cluster_address(None) == (None, "$RAY_ADDRESS")


def test_on_the_head_of_a_ray_up_cluster_a_sweep_joins_it_unless_told_local(tmp_path, monkeypatch, capsys):
    # `ray up cluster/gpu.yaml`, then `python sweeps/timesteps.py` in a shell on its head: a Ray of the sweep's
    # own there has the head's resources alone (no GPU), where the cluster was meant.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.cluster_address(None) == (None, "$RAY_ADDRESS")  # no launcher's config: a laptop
    (tmp_path / resources.BOOTSTRAP_CONFIG.name).write_text((ROOT / "cluster" / "gpu.yaml").read_text())
    address, source = cli.cluster_address(None)
    assert address == "auto" and source.startswith("on a `ray up` head") and "--address local" in source
    assert cli.cluster_address("local") == (None, "--address")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cli.cluster_address(None) == ("10.0.0.1:6379", "$RAY_ADDRESS")
    monkeypatch.delenv("RAY_ADDRESS")
    # Joined as `auto` says, and a resume of a sweep run on a Ray of its own there says --address local.
    checked = []
    monkeypatch.setattr(runner, "check_address", lambda address, **kw: checked.append(address) or pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception):
        cli.main(TIMESTEPS, ["--T", "1", "--storage", str(tmp_path / "runs")])
    assert checked == ["auto"]
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--T", "1", "--name", "s"]))
    assert cli.resume_command(plan, None).endswith(" --address local")
    assert cli.resume_command(plan, "auto").endswith(" --address auto")


def test_trial_resources_must_fit_some_node_now_or_launchable():
    gpu_node, cpu_node = {"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0}
    assert resources.fits(2, 0.25, [cpu_node, gpu_node]) and resources.fits(8, 1, [gpu_node])
    assert not resources.fits(1, 1, [cpu_node]), "Tune would wait forever for a GPU"
    assert not resources.fits(4, 0, [cpu_node, {"CPU": 3.0, "GPU": 4.0}]), "no single node has 4 CPUs"


def test_trials_that_no_node_holds_are_refused_but_through_ray_client_only_warned_of(tmp_path, monkeypatch, capsys):
    # A fresh `ray up` cluster is a head with no CPU for trials. Joined on the cluster, the launcher's config
    # says what can be launched; through ray:// it is out of sight, and the autoscaler may launch a node that fits.
    ran = []

    stand_in_for_ray(monkeypatch, lambda plan, resume, callbacks, launcher: ran.append(launcher) or write_trials(plan),
                     cpus=0.0)
    monkeypatch.setattr(runner, "check_address", lambda address, **kw: None)
    monkeypatch.setattr(reach, "spans_machines", lambda launcher: False)  # its nodes run here, and reach the storage
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(cli, "_settle_tables", lambda experiment: [])
    argv = ["--T", "1", "--rules", "ndot_A", "--storage", str(tmp_path), "--gpus-per-trial", "1"]
    assert exit_status(cli.main, TIMESTEPS, [*argv, "--name", "a", "--address", "10.0.0.1:6379"]) == 2
    assert capsys.readouterr().err == ("error: no node of this cluster has, or can be launched with, 1 CPU and 1 GPU "
                                       "for a trial: lower --cpus-per-trial or --gpus-per-trial\n")
    assert not ran
    assert exit_status(cli.main, TIMESTEPS, [*argv, "--name", "b", "--address", "ray://10.0.0.1:10001"]) == 0
    assert ran == [False]
    assert "no node up now has 1 CPU and 1 GPU for a trial; through ray://" in capsys.readouterr().err


# An address no machine has (TEST-NET-3, for documentation): a node on another machine.
ELSEWHERE = "203.0.113.7"


def _head(ip: str) -> dict:
    return {"Alive": True, "NodeManagerAddress": ip, "Resources": {"CPU": 0.0}}


def test_a_cluster_spans_machines_where_a_node_up_now_or_launchable_is_on_another(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(ray, "nodes", lambda: [_head("127.0.0.1"), {**_head(ELSEWHERE), "Alive": False}])
    assert not reach.spans_machines(launcher=True), "a one-machine cluster (a dead node elsewhere is no node)"
    monkeypatch.setattr(ray, "nodes", lambda: [_head("127.0.0.1"), _head(ELSEWHERE)])
    assert reach.spans_machines(launcher=False)
    # The head of a fresh `ray up` cluster, alone: its launcher's config holds the workers to come.
    monkeypatch.setattr(ray, "nodes", lambda: [_head("127.0.0.1")])
    (tmp_path / resources.BOOTSTRAP_CONFIG.name).write_text((ROOT / "cluster" / "gpu.yaml").read_text())
    assert resources.launchable_workers(True) == 10 and resources.launchable_workers(False) == 0
    assert reach.spans_machines(launcher=True) and not reach.spans_machines(launcher=False)


def test_the_filesystem_of_a_path_is_its_deepest_mount_points(tmp_path):
    # /proc is mounted on / (Linux): the path's own mount point decides, also for a path not there yet.
    assert reach.filesystem_type("/proc/self/status") == reach.filesystem_type("/proc/no/such/file") == "proc"
    assert reach.filesystem_type("/proc/../etc") == reach.filesystem_type("/")
    assert [reach.is_shared(t) for t in ("nfs4", "lustre", "fuse.mountpoint-s3")] == [True] * 3
    assert [reach.is_shared(t) for t in ("ext4", "xfs", "overlay", "tmpfs", "")] == [False] * 5
    assert reach.unreachable("s3://bucket/sweeps", launcher=True) is None, "a bucket is every node's"


def test_local_storage_that_the_clusters_other_machines_cannot_reach_is_refused(tmp_path, monkeypatch, capsys):
    # On the head of a `ray up` cluster, a folder there (the default runs/sweeps) is out of the workers'
    # reach: Ray Tune failed every trial at its first checkpoint, after a whole epoch, on each restart too.
    if reach.is_shared(reach.filesystem_type(str(tmp_path))):
        pytest.skip(f"{tmp_path} is on a network filesystem, which the check takes as every node's")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / resources.BOOTSTRAP_CONFIG.name).write_text((ROOT / "cluster" / "gpu.yaml").read_text())
    ran = []
    monkeypatch.setattr(runner, "connect", lambda address: None)
    monkeypatch.setattr(runner, "check_address", lambda address, **kw: None)
    monkeypatch.setattr(runner, "head_address", lambda address: None)
    monkeypatch.setattr(runner, "run", lambda *args, **kwargs: ran.append(args))
    monkeypatch.setattr(ray, "nodes", lambda: [_head(ELSEWHERE)])
    storage = tmp_path / "runs"
    for address in ("auto", "ray://127.0.0.1:10001"):  # through ray://, every node is elsewhere
        rc = exit_status(cli.main, TIMESTEPS, ["--T", "1", "--storage", str(storage), "--address", address])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and not ran, err
        assert err.startswith(f"error: --storage {storage} is on this machine's own disk (") and "give s3://" in err, err
    assert not any(storage.iterdir()), "the sweep left a plan behind"


def test_a_trial_given_gpus_that_torch_cannot_use_errors_instead_of_training_on_the_cpu(monkeypatch):
    monkeypatch.setattr(trainable.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainable.ray, "get_gpu_ids", lambda: [0])
    with pytest.raises(RuntimeError, match="^Ray gave this trial GPU 0 on .* sees no CUDA device there"):
        trainable.run_trial(TrainConfig().to_dict())  # before any work: no Tune session is needed to get there
    trainable.check_gpus_usable("cpu", [0])  # asked for
    trainable.check_gpus_usable("auto", [])  # a CPU trial
    monkeypatch.setattr(trainable.torch.cuda, "is_available", lambda: True)
    trainable.check_gpus_usable("auto", [0])


def test_a_trial_config_with_a_key_that_is_no_setting_errors_instead_of_running_the_default(monkeypatch):
    monkeypatch.setattr(trainable.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainable.ray, "get_gpu_ids", lambda: [0])
    config = {**TrainConfig().to_dict(), STRATUM_KEY: "T=4,ndot_A"}
    with pytest.raises(ConfigError, match="^unknown setting 'lrr'; did you mean 'lr'"):
        trainable.run_trial({**config, "lrr": 0.05})  # a Plan built by hand, its base misspelt
    # The stratum is the one key of a trial's config besides the settings: the trial gets past them.
    with pytest.raises(RuntimeError, match="^Ray gave this trial GPU 0"):
        trainable.run_trial(config)


def test_trials_at_once_are_counted_node_by_node_within_the_clusters_max_workers():
    config = {"head_node_type": "head", "max_workers": 3, "available_node_types": {
        "head": {"resources": {"CPU": 16}, "max_workers": 0},
        "small": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2},
        "big": {"resources": {"CPU": 8, "GPU": 4}, "max_workers": 2}}}
    # 2 CPU + 0.25 GPU: the head's CPUs hold none, a small node 2 (its CPUs), a big one 4; cluster-wide
    # totals (40 CPUs, 10 GPUs) would say 20. Three workers at most: the two big ones and a small one.
    assert [resources.node_slots(2, 0.25, t["resources"]) for t in config["available_node_types"].values()] == [0, 2, 4]
    assert resources.grown_slots(2, 0.25, config) == 4 + 4 + 2
    assert resources.grown_slots(2, 0, config) == 8 + 4 + 4 + 2  # without GPUs the head holds 8


def test_resources_no_node_can_hold_are_refused_in_one_line(storage, capsys, tmp_path, monkeypatch):
    # This machine has no GPU and Ray starts here with none: a GPU per trial would wait forever. On the head
    # of a launched cluster too (its config beside it), given --address local: the sweep runs on a Ray of its own.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / resources.BOOTSTRAP_CONFIG.name).write_text((ROOT / "cluster" / "gpu.yaml").read_text())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for Ray here, on a machine with one too
    before = _sessions()
    rc = exit_status(cli.main, TIMESTEPS, ["--gpus-per-trial", "1", "--address", "local", *storage])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1, err
    assert "0 GPU, too few for 1 CPU and 1 GPU for a trial: lower --cpus-per-trial or --gpus-per-trial" in err, err
    # Known before Ray starts: the Ray is the one the sweep would start on this machine.
    assert "starting" not in out and _sessions() == before and not ray.is_initialized()
    cpus = exit_status(cli.main, TIMESTEPS, ["--cpus-per-trial", str(resources.local_ray()["CPU"] + 1), "--address", "local",
                                             *storage])
    assert cpus == 2 and "too few for" in capsys.readouterr().err and _sessions() == before


@pytest.mark.parametrize("flags, says", [
    # Every end of a searched range is checked, not only the ends of the first.
    (["--loss-alpha", "0.05,2"], "loss_alpha must be in [0, 1]"),
    (["--momentum", "0.5,1"], "momentum must be in [0, 1)"),
    (["--batch-size", "64,0"], "batch_size must be a positive integer"),
    # Ray takes a fraction of one GPU, or whole GPUs.
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial must be a fraction in [0, 1] or a whole number"),
])
def test_a_plan_no_trial_could_run_is_refused_before_ray_starts(flags, says):
    with pytest.raises((cli.InputError, ConfigError), match=re.escape(says)):
        cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(flags))


def test_presets_run_what_the_readme_says():
    def plan(sweep, preset):
        return cli.build_plan(sweep, cli.parser(sweep).parse_args(["--preset", preset]))

    dvs = plan(TIMESTEPS, "paper_dvs")
    assert sorted({s.values["T"] for s in dvs.strata}) == [2, 4, 6, 8, 10] and dvs.space.loss_alpha == (0.001, 0.001)
    # Searched, the DVS loss alpha starts at the authors' DVS script's 0.001, not the CIFAR recipe's 0.05.
    searched = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--preset", "paper_dvs", "--loss-alpha", "0,0.2"]))
    assert searched.space.first_point() == {"lr": 0.1, "loss_alpha": 0.001}
    # The authors' DVS script's weight-change term, read by the mode-O trials (the others run it off), with none
    # of the rules given in mode O too: it is the preset's, not asked for.
    assert dvs.base["weight_change"] == 0.025 and "weight_change" not in plan(TIMESTEPS, "paper").base
    cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--preset", "paper_dvs", "--rules", "ndot_A,ottt_A"]))
    cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--preset", "paper_dvs", "--T", "1"]))
    assert sorted({s.values["T"] for s in plan(TIMESTEPS, "paper").strata}) == [1, 2, 4, 6]
    # Each stratum's first trial runs the recipe's searched values, except in the learning-rate smoke sweep.
    assert plan(TIMESTEPS, "smoke").space.first_point() == {"lr": 0.1}
    assert plan(LEARNING_RATES, "smoke").space.first_point() == {}


def test_a_resume_from_a_copy_in_other_storage_is_refused(tmp_path):
    # Tune would create the resumed sweep's new trials in the storage it started in.
    def parse(storage, *flags: str):
        return cli.parser(TIMESTEPS).parse_args(["--storage", str(storage), "--name", "s", *flags])

    runner.save_plan(cli.build_plan(TIMESTEPS, parse(tmp_path / "a")))
    (tmp_path / "a" / "s" / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    shutil.copytree(tmp_path / "a" / "s", tmp_path / "b" / "s")
    with pytest.raises(cli.InputError, match=f"was started in {tmp_path / 'a'}: resume it there"):
        cli.resumed_plan(TIMESTEPS, parse(tmp_path / "b", "--resume"))


def test_max_concurrent_given_is_the_limit_else_the_clusters_slots_and_at_least_one(tmp_path, monkeypatch):
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--storage", str(tmp_path), "--max-concurrent", "2"]))
    monkeypatch.setattr(resources, "slots", lambda cpus, gpus, launcher: 7)
    assert runner._trials_at_once(plan, launcher=False) == 2
    assert runner._trials_at_once(dataclasses.replace(plan, max_concurrent=None), launcher=False) == 7
    monkeypatch.undo()
    # A head that runs no trial and no launcher's config (joined through ray://): one at a time, not none.
    monkeypatch.setattr(resources, "_live_nodes", lambda: [{"CPU": 0.0, "memory": 1e9}])
    assert resources.slots(1, 0, launcher=False) == 1


def test_an_address_without_a_port_is_checked_at_rays_default_port(monkeypatch):
    tried = []

    def refused(address, timeout):
        tried.append(address)
        raise OSError("connection refused")

    monkeypatch.setattr(runner.socket, "create_connection", refused)
    for address in ("10.0.0.1", "ray://10.0.0.1"):
        with pytest.raises(ConnectionError, match="no Ray cluster answers"):
            runner.check_address(address)
    assert tried == [("10.0.0.1", runner.GCS_PORT), ("10.0.0.1", runner.CLIENT_PORT)] == [("10.0.0.1", 6379), ("10.0.0.1", 10001)]


@pytest.mark.parametrize("statuses, rc, says", [
    (["completed", "stopped_early", "diverged"], 0, None),
    (["completed", "errored", "stopped_early"], 1, "1 trials errored: retry them with"),
    (["completed", "running", "stopped_early"], 130, "interrupted with 1 of 3 trials unfinished: continue with"),
], ids=["finished", "errored", "interrupted"])
def test_the_exit_status_says_how_the_trials_ended(tmp_path, monkeypatch, capsys, statuses, rc, says):
    # Ray's part stands in: the sweep's run leaves its trials table, one trial per stratum.
    stand_in_for_ray(monkeypatch, lambda plan, resume, callbacks, launcher: write_trials(plan, statuses))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    # Rewriting the tables from the trials' checkpoints is Ray's part too (test_sweep.py): here, whether it runs.
    settled = []
    monkeypatch.setattr(cli, "_settle_tables", lambda experiment: settled.append(experiment) or [])
    argv = ["--T", "1", "--rules", "ndot_A,ndot_O,bptt_A", "--storage", str(tmp_path), "--name", "s"]
    assert exit_status(cli.main, TIMESTEPS, argv) == rc
    err = capsys.readouterr().err
    assert (says in err) if says else "unfinished" not in err and "errored" not in err, err
    assert settled == ([str(tmp_path / "s")] if rc == 130 else []), "the tables are rewritten when, and only when, trials are unfinished"


def test_node_shapes_are_the_live_nodes_and_the_launchers_node_types(tmp_path, monkeypatch):
    # A trial that fits a node up now (e.g. a GPU worker started by hand) must not be refused because
    # the launcher's config lists no such type; nor one that only a launchable type fits. No Ray needed.
    live, dead = {"CPU": 8.0, "GPU": 1.0}, {"CPU": 64.0, "GPU": 8.0}
    monkeypatch.setattr(resources.ray, "nodes", lambda: [{"Alive": True, "Resources": live}, {"Alive": False, "Resources": dead}])
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / resources.BOOTSTRAP_CONFIG.name).write_text(
        "available_node_types:\n  head: {resources: {CPU: 0}}\n  gpu: {resources: {CPU: 4, GPU: 4}, max_workers: 2}\n")
    assert resources.node_shapes(True) == [live, {"CPU": 0}, {"CPU": 4, "GPU": 4}]
    # A private local Ray on the launcher's head: its config describes another cluster.
    assert resources.node_shapes(False) == [live]
    assert resources.fits(8, 1, resources.node_shapes(False)) and not resources.fits(2, 4, resources.node_shapes(False))


def _subreaper() -> int:
    flag = ctypes.c_int()
    ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    return flag.value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="re-parenting to a subreaper is Linux's")
def test_ending_the_local_ray_kills_its_processes_orphans_included_and_no_other(monkeypatch):
    # Ray's part stands in: its "ray.init" starts a daemon, and a process whose parent ends at once, as
    # a trial's worker outlives its raylet. A child from before (a notebook's, a test session's cluster) stays.
    monkeypatch.setattr(runner, "_not_ray", None)
    before = subprocess.Popen(["sleep", "60"])
    ray_pids = []

    def init(**kwargs):
        ray_pids.append(subprocess.Popen(["sleep", "60"]).pid)
        orphan = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], stdout=subprocess.PIPE, text=True)
        ray_pids.append(int(orphan.stdout))

    monkeypatch.setattr(runner.ray, "init", init)
    try:
        runner.connect(None)
        assert _subreaper() == 1 and psutil.Process(ray_pids[1]).ppid() == os.getpid()
        assert runner.end_local_ray(timeout_s=10)
        assert not any(map(psutil.pid_exists, ray_pids)), "killed and reaped, none left a zombie"
        assert before.poll() is None
        # Done with Ray: this process no longer adopts orphans, and has none of its Ray's left to end.
        assert _subreaper() == 0 and runner.end_local_ray(timeout_s=0)
    finally:
        runner._adopt_orphans(False)
        for pid in ray_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        before.kill()
        before.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="re-parenting to a subreaper is Linux's")
def test_ending_the_local_ray_gives_back_a_supervisors_adoption_of_orphans(monkeypatch):
    # A process that adopted orphans before the sweep (a supervisor's, a container's init) still does after it.
    monkeypatch.setattr(runner, "_not_ray", None)
    monkeypatch.setattr(runner, "_adopted_before", False)
    monkeypatch.setattr(runner.ray, "init", lambda **kwargs: None)
    runner._adopt_orphans(True)
    try:
        runner.connect(None)
        assert runner.end_local_ray(timeout_s=10)
        assert _subreaper() == 1
    finally:
        runner._adopt_orphans(False)


def test_the_token_notice_of_the_local_ray_a_sweep_starts_is_left_out_and_a_later_rays_is_not(monkeypatch, caplog):
    # Ray's part stands in: the notice its start logs. Run from Python, the process's own later Ray says it again.
    notice = logging.getLogger(runner._TOKEN_NOTICE_LOGGER)
    said = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    monkeypatch.setattr(runner, "_not_ray", None)
    monkeypatch.setattr(runner.ray, "init", lambda **kwargs: notice.warning(said))
    try:
        with caplog.at_level(logging.WARNING, logger=notice.name):
            runner.connect(None)
            assert not caplog.records
            runner.ray.init()
    finally:
        runner._adopt_orphans(False)
    assert [r.getMessage() for r in caplog.records] == [said]


def test_storage_that_fails_as_the_sweep_ends_costs_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, caplog):
    # Seen on a full disk: every trial completed into its checkpoint, then the figures' write raised out of
    # the sweep (a traceback, no summary), and where the tables had never been written, so did reading them.
    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "_new_tuner", lambda plan, callbacks, launcher: types.SimpleNamespace(fit=lambda: None))
    monkeypatch.setattr(results, "write_plots", no_space)
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(["--T", "1", "--storage", str(tmp_path), "--name", "s"]))
    assert runner.run(plan) == []
    assert "could not write the figures" in caplog.text and "No space left on device" in caplog.text
    assert f"python -m ndot.results plot {plan.experiment} draws them" in caplog.text
    # A bug in drawing them is no storage that failed: it is not passed off as one.
    monkeypatch.setattr(results, "write_plots", lambda experiment: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):
        runner.run(dataclasses.replace(plan, name="u"))

    stand_in_for_ray(monkeypatch)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(results, "write_bytes", no_space)  # the tables, rebuilt from the checkpoints at the end
    capsys.readouterr()
    assert exit_status(cli.main, TIMESTEPS, ["--T", "1", "--storage", str(tmp_path), "--name", "t"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: no tables in {tmp_path / 't'} (") and "Traceback" not in err, err
    assert f"python -m ndot.results collect {tmp_path / 't'} writes the tables" in err


def test_a_name_whose_experiment_holds_tunes_state_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "tuner.pkl").write_bytes(b"")  # what Tune's can_restore looks for
    monkeypatch.setattr(runner, "connect", lambda address: pytest.fail("Ray started"))
    monkeypatch.setattr(resources, "node_shapes", lambda launcher: [{"CPU": 4.0}])
    assert exit_status(cli.main, TIMESTEPS, ["--T", "1", "--storage", str(tmp_path), "--name", "s"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: experiment {tmp_path / 's'} exists: pass --resume to continue it, or another --name\n", err


def test_two_drivers_started_at_once_with_one_name_run_one_sweep_and_refuse_the_other(tmp_path, monkeypatch, capsys):
    # Both used to pass the check of the folder (Tune's files appear only once Ray has started) and both ran
    # into one folder: Tune's state and the tables then held one driver's trials, the other's were lost to them.
    argv = ["--T", "1", "--storage", str(tmp_path), "--name", "s"]
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(argv))
    other = dataclasses.replace(plan, seed=7)
    started = []
    monkeypatch.setattr(runner, "connect", lambda address: runner.save_plan(other, new=True))  # the other one, meanwhile
    monkeypatch.setattr(runner, "head_address", lambda address: None)
    monkeypatch.setattr(runner, "_new_tuner", lambda *args: started.append(args))
    monkeypatch.setattr(resources, "node_shapes", lambda launcher: [{"CPU": 4.0}])
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert exit_status(cli.main, TIMESTEPS, argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: experiment {plan.experiment} was started meanwhile, by another driver: pass another --name\n", err
    assert not started and runner.load_plan(plan.experiment) == other
    # A driver started later is refused before Ray starts, though Tune has written nothing yet.
    monkeypatch.setattr(runner, "connect", lambda address: pytest.fail("Ray started"))
    assert exit_status(cli.main, TIMESTEPS, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is being started by another driver" in err, err


def test_a_sweep_run_by_a_live_driver_is_refused_to_another_and_taken_once_that_driver_is_killed(tmp_path, monkeypatch, capsys):
    # A second driver resuming a running sweep (a job resubmitted while the first still ran) ran its trials
    # again into the same folders and created the trials left twice; the tables kept one driver's trials.
    argv = ["--T", "1", "--storage", str(tmp_path), "--name", "s"]
    plan = cli.build_plan(TIMESTEPS, cli.parser(TIMESTEPS).parse_args(argv))
    runner.save_plan(plan)
    (tmp_path / "s" / "tuner.pkl").touch()  # what Tuner.can_restore looks for
    ran = []
    stand_in_for_ray(monkeypatch, lambda plan, resume, callbacks, launcher: ran.append(resume) or write_trials(plan))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    # The other driver: a process of its own that holds the sweep, then is killed without a word (SIGKILL).
    code = ("import sys, time; from ndot.sweep import runner\n"
            "with runner.held(sys.argv[1], True):\n    print('held', flush=True); time.sleep(600)")
    other = subprocess.Popen([sys.executable, "-c", code, plan.experiment], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert other.stdout.readline() == "held\n"
        assert exit_status(cli.main, TIMESTEPS, [*argv, "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: experiment {plan.experiment} is being run by another driver (pid {other.pid} on ")
        assert err.endswith("): resume it once that driver has ended\n") and err.count("\n") == 1 and not ran, err
    finally:
        other.kill()
        other.wait(timeout=HANG_S)
    assert exit_status(cli.main, TIMESTEPS, [*argv, "--resume"]) == 0 and ran == [True], capsys.readouterr().err
    # Held while it ran, let go as it ended: the next resume is not refused by this one either.
    assert exit_status(cli.main, TIMESTEPS, [*argv, "--resume"]) == 0 and ran == [True, True]


def test_a_sweep_in_an_object_store_is_held_on_this_machine(tmp_path, monkeypatch):
    # No lock reaches a bucket: two drivers on this machine are kept apart all the same.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the machine's locks are
    with runner.held("s3://bucket/sweeps/s", resume=False):
        with pytest.raises(runner.Busy, match=r"^experiment s3://bucket/sweeps/s is being run by another driver "
                                              r"\(pid \d+ on .*\): pass another --name$"):
            with runner.held("s3://bucket/sweeps/s", resume=False):
                pass
        with runner.held("s3://bucket/sweeps/t", resume=False):
            pass
    assert len(list(tmp_path.glob(f"ndot-drivers-*/*-{runner.DRIVER_FILE}"))) == 2


def test_a_sweep_runs_from_a_thread_other_than_the_main_one(tmp_path, monkeypatch, capsys):
    # A notebook's or a service's worker thread: the sweep's SIGTERM handler, which only the main thread may
    # set, ended it in a traceback once Ray had started (a real sweep run so completes, 1 trial of 1 epoch).
    stand_in_for_ray(monkeypatch, lambda plan, resume, callbacks, launcher: write_trials(plan))
    ended = []
    thread = threading.Thread(target=lambda: ended.append(cli.main(TIMESTEPS, ["--T", "1", "--storage", str(tmp_path)])))
    thread.start()
    thread.join(timeout=HANG_S)
    assert ended == [0], capsys.readouterr().err
