"""The trainer on the offline dataset: metrics, checkpoint/resume, divergence, the CLI."""
import json
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ndot import checkpoint
from ndot.config import ConfigError, TrainConfig
from ndot.train import _rng_state, _set_rng_state, train

FAST = dict(dataset="digits", arch="small_cnn", T=2, batch_size=32, epochs=3, lr=0.1, seed=3, device="cpu")

METRICS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "epoch_seconds",
           "image_steps_per_s", "peak_mem_mb", "firing_rate", "lr", "status"}


def test_metrics_every_epoch_and_learning():
    seen = []
    result = train(TrainConfig(**FAST, rule="ndot", mode="A"), lambda m, s: seen.append(m))
    assert result.status == "completed" and result.epochs_run == 3
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    for m in seen:
        assert METRICS <= set(m) and m["status"] == "ok"
        assert 0 < m["firing_rate"] < 1 and m["image_steps_per_s"] > 0 and m["peak_mem_mb"] > 0
    assert seen[-1]["best_test_acc"] == max(m["test_acc"] for m in seen)
    assert seen[-1]["test_acc"] > 0.5, "three epochs of NDOT_A should learn digits well past chance"
    # Cosine to zero, stepped per epoch.
    assert seen[0]["lr"] == 0.1 and seen[1]["lr"] == pytest.approx(0.075) and seen[2]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("rule,mode", [("ndot", "O"), ("bptt", "A")])
def test_resume_equals_uninterrupted(rule, mode):
    cfg = TrainConfig(**FAST, rule=rule, mode=mode, dropout=0.1)
    full = []
    train(cfg, lambda m, s: full.append(m))

    saved = {}

    class Killed(Exception):
        pass

    def stop_after_2(m, s):
        saved["state"] = s
        if m["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, stop_after_2)
    resumed = []
    train(cfg, lambda m, s: resumed.append(m), resume=saved["state"])
    assert [m["epoch"] for m in resumed] == [3]
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "firing_rate"):
        assert resumed[0][k] == full[2][k], k


def test_a_resume_keeps_the_best_accuracy_of_the_epochs_before_it():
    states, resumed = [], []
    train(TrainConfig(**{**FAST, "epochs": 1}), lambda m, s: states.append(s))
    # As if an earlier epoch had scored every test image: no later epoch may take best.pt from it.
    earlier_best = {**states[-1], "best_test_acc": 1.0}
    train(TrainConfig(**{**FAST, "epochs": 2}), lambda m, s: resumed.append(m), resume=earlier_best)
    assert resumed[0]["epoch"] == 2 and resumed[0]["test_acc"] < 1.0
    assert resumed[0]["best_test_acc"] == 1.0 and not checkpoint.is_best(resumed[0])


def test_divergence_is_a_status_not_a_crash():
    seen, states = [], []
    cfg = TrainConfig(**{**FAST, "lr": 1e30, "epochs": 4}, rule="ottt")
    result = train(cfg, lambda m, s: (seen.append(m), states.append(s)))
    assert result.status == "diverged"
    assert seen[-1]["status"] == "diverged" and result.epochs_run == seen[-1]["epoch"] < 4
    # Resuming from where it diverged trains nothing more and says so again.
    again = train(cfg, lambda m, s: pytest.fail("a diverged run was continued"), resume=states[-1])
    assert (again.status, again.epochs_run) == ("diverged", result.epochs_run)


def test_resume_refuses_another_runs_checkpoint_but_may_extend_it():
    states = []
    train(TrainConfig(**{**FAST, "epochs": 1}), lambda m, s: states.append(s))
    with pytest.raises(ConfigError, match="T 2 -> 4"):
        train(TrainConfig(**{**FAST, "epochs": 2, "T": 4}), resume=states[-1])
    assert train(TrainConfig(**{**FAST, "epochs": 2}), resume=states[-1]).epochs_run == 2
    # A run resumed at its last epoch trains none, and its result is that epoch's.
    done = train(TrainConfig(**{**FAST, "epochs": 1}), resume=states[-1])
    assert (done.status, done.epochs_run, done.metrics) == ("completed", 1, states[-1]["metrics"])


def test_a_run_extended_on_resume_follows_the_cosine_over_its_new_length():
    cheap = {**FAST, "T": 1, "batch_size": 128}
    states, extended = [], []
    train(TrainConfig(**cheap), lambda m, s: states.append(s))
    train(TrainConfig(**{**cheap, "epochs": 4}), lambda m, s: extended.append(m), resume=states[-1])
    assert [m["epoch"] for m in extended] == [4]
    # Epoch e of E: lr * (1 + cos(pi (e - 1) / E)) / 2; the 3-epoch cosine would have ended at zero.
    assert extended[0]["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * 3 / 4)) / 2) and extended[0]["lr"] > 0.01


def test_random_states_round_trip_exactly():
    np.random.seed(0)
    np.random.standard_normal(3)  # leaves a cached Gaussian and a position inside the key block
    random.seed(0)
    random.gauss(0, 1)
    saved = _rng_state()
    expected = (np.random.standard_normal(5).tolist(), random.gauss(0, 1), torch.rand(3))
    _set_rng_state(checkpoint_round_trip(saved))
    assert (np.random.standard_normal(5).tolist(), random.gauss(0, 1)) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def checkpoint_round_trip(obj):
    """Through a checkpoint file, as resume sees it (weights_only loading)."""
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(Path(d, "c.pt"), obj)
        return checkpoint.load(Path(d, "c.pt"))


def test_cli_trains_checkpoints_and_resumes(tmp_path):
    args = [sys.executable, "-m", "ndot.train", "--dataset", "digits", "--arch", "small_cnn", "--T", "1",
            "--epochs", "2", "--batch_size", "128", "--out", str(tmp_path)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch   2/2" in r.stdout
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 2
    r = subprocess.run(args[:-4] + ["--epochs", "3", "--out", str(tmp_path), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [json.loads(l)["epoch"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    r = subprocess.run(args[:-4] + ["--epochs", "4", "--T", "2", "--out", str(tmp_path), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "T 1 -> 2" in r.stderr
