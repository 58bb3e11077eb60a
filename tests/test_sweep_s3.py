"""A sweep stored in S3: checkpoints, tables and figures land in a bucket and are read back from it.

The bucket is served on localhost by moto's S3-compatible server. The driver,
Ray Tune's checkpoint uploads in the trials' workers, pyarrow (the tables) and
python -m ndot.evaluate all reach it through AWS_ENDPOINT_URL, as they would
reach AWS itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import boto3
import pandas as pd
import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from helpers import HANG_S
from ndot import evaluate, files, results
from ndot.sweep import runner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bucket(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="ndot")
    yield "s3://ndot/sweeps"
    server.stop()


def _sweep(storage: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "sweeps" / "timesteps.py"), "--preset", "smoke", "--T", "1,2", "--rules", "ndot_A",
           "--epochs", "2", "--storage", storage, "--name", "s3", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S)


def _sorted(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.sort_values(by, ignore_index=True)


def test_sweep_stored_in_s3_is_read_back_resumed_and_evaluated_from_the_bucket(bucket, tmp_path):
    done = _sweep(bucket)
    assert done.returncode == 0, done.stderr[-2000:]
    experiment = f"{bucket}/s3"
    assert f"tables: {experiment}/epochs.parquet" in done.stdout
    epochs, trials = results.load(experiment), results.load(experiment, results.TRIALS_TABLE)
    assert (trials["status"] == results.COMPLETED).all() and len(trials) == 2 and len(epochs) == 4

    # The bucket holds the tables, the figures and the plan, and no temporary file of an atomic write.
    fs, path = files.filesystem(experiment)
    names = {PurePosixPath(i.path).name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert {"epochs.parquet", "trials.parquet", "sweep.json", "accuracy_vs_T.png", "cost_vs_T.png",
            "curves_vs_epoch.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    # Each trial, finished, keeps its last checkpoint alone (the one its row names), its older one deleted from
    # the bucket when the sweep ended.
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    folders = {str(PurePosixPath(i.path).relative_to(path)) for i in found
               if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}
    assert folders == set(trials["checkpoint"])
    # Plotted again, the figures the table no longer draws go from the bucket (one trial a stratum at one
    # learning rate: no accuracy_vs_lr); those it never drew are not there to remove, which is no error.
    files.write_bytes(f"{experiment}/accuracy_vs_lr.png", b"stale")
    assert results.main(["plot", experiment]) == 0
    assert files.kind(f"{experiment}/accuracy_vs_lr.png") == pafs.FileType.NotFound
    assert files.kind(f"{experiment}/accuracy_vs_T.png") == pafs.FileType.File

    # Rebuilt from the checkpoints in the bucket: the same tables.
    assert results.main(["collect", experiment]) == 0
    pd.testing.assert_frame_equal(_sorted(results.load(experiment), ["trial_id", "epoch"]), _sorted(epochs, ["trial_id", "epoch"]))
    pd.testing.assert_frame_equal(_sorted(results.load(experiment, results.TRIALS_TABLE), ["trial_id"]), _sorted(trials, ["trial_id"]))

    # Resuming the finished sweep restores it from the bucket and runs nothing again.
    again = _sweep(bucket, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(results.load(experiment)) == 4

    # The best trial's weights, scored straight from the bucket; the JSON lands in the trial's folder, which
    # Tune's checkpoint retention leaves alone.
    best = trials.loc[trials["best_test_acc"].idxmax()]
    weights = evaluate.weights_file(f"{experiment}/{best['checkpoint']}")
    assert weights.startswith(f"{experiment}/{best['checkpoint']}/")
    assert evaluate.main([f"{experiment}/{best['checkpoint']}"]) == 0
    name = PurePosixPath(weights).name.removesuffix(".pt")
    trial, ckpt = best["checkpoint"].split("/")
    scored = json.loads(files.read_bytes(f"{experiment}/{trial}/eval-{ckpt}-{name}-T{best['T']}.json"))
    assert scored["epoch"] == best["best_epoch"] and abs(scored["test_acc"] - best["best_test_acc"]) <= 0.01


def test_a_missing_bucket_is_refused_in_one_line_before_ray_starts(bucket, capsys):
    done = _sweep("s3://no-such-bucket/sweeps")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no-such-bucket" in done.stderr and "not writable" in done.stderr
    assert evaluate.main(["s3://no-such-bucket/sweeps/s3/x/checkpoint_000000"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_sweep_in_a_prefix_and_a_name_a_uri_escapes_keeps_its_tables_there(bucket):
    # s3://ndot/sweeps/my%20sweeps is the prefix "my sweeps": Tune names its experiment folder by that path,
    # which the tables' URI put back unescaped ("Cannot parse URI"), and a sweep's tables were never written.
    storage = f"{bucket}/my%20sweeps"
    experiment = runner.Plan("T=1 ü", storage, {}, (), None, 1, 1.0, 0.0).experiment
    assert experiment == f"{bucket}/my%20sweeps/T=1%20%C3%BC"
    fs, path = files.filesystem(experiment)
    assert path == "ndot/sweeps/my sweeps/T=1 ü"
    trial = SimpleNamespace(storage=SimpleNamespace(storage_filesystem=fs, experiment_fs_path=path))
    assert results.experiment_of(trial) == experiment
    files.write_bytes(results.plan_uri(experiment), b"{}")
    results.write_tables(results.experiment_of(trial), [])
    assert results.load(experiment).empty and results.sweeps_in(storage) == ["T=1 ü"]
