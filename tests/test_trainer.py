"""The trainer on the offline dataset: metrics, checkpoint/resume, divergence, the CLI."""
import dataclasses
import itertools
import json
import math
import random
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import HANG_S, assert_close
from ndot import checkpoint, data, malloc
from ndot.config import ConfigError, TrainConfig
from ndot.evaluate import evaluate
from ndot.models import from_config
from ndot.train import _rng_state, _set_rng_state, train

FAST = dict(dataset="digits", arch="small_cnn", T=2, batch_size=32, epochs=3, lr=0.1, seed=3, device="cpu")
# T 1 at batch 128, a few seconds an epoch: for what holds however little the network learns.
CHEAP = {**FAST, "T": 1, "batch_size": 128}

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


def test_the_optimiser_steps_by_the_recipes_sgd_at_each_epochs_cosine_lr():
    """Spec §5: SGD with momentum μ (dampening 0, not Nesterov), weight decay on every parameter, at the lr
    of epoch e of E: lr·½(1 + cos(π(e - 1)/E)). The reported lr alone does not show that the steps took it.
    A batch holds the whole training set, so mode A takes one step per epoch, b_e = μ b_(e-1) + g_e + wd p_(e-1)
    and p_e = p_(e-1) - lr_e b_e; runs from the same weights and batch tell wd and μ apart without g."""
    cheap = {**FAST, "T": 1, "batch_size": 2048, "epochs": 2, "mode": "A"}
    names = [n for n, _ in from_config(TrainConfig(**cheap), 1, 10).named_parameters()]

    def run(**kw) -> list[tuple[dict, dict | None]]:
        """(weights, momentum buffers b: None without momentum) after each epoch."""
        cfg, states = TrainConfig(**{**cheap, **kw}), []
        train(cfg, lambda m, s: states.append(s))
        return [({n: s["model"][n] for n in names},
                 {n: s["optimizer"]["state"][i]["momentum_buffer"] for i, n in enumerate(names)} if cfg.momentum else None)
                for s in states]

    def close(got: dict, want: dict, what: str) -> None:
        # The values, not their differences: a step is far smaller than a weight, and its difference mostly rounding.
        for n in names:
            assert_close(got[n], want[n], 1e-6, f"{what}: {n}")

    lr1, lr2 = 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 2))
    (p1, b1), (p2, b2) = run()
    close(p2, {n: p1[n] - lr2 * b2[n] for n in names}, "epoch 2's step")
    p0 = {n: p1[n] + lr1 * b1[n] for n in names}
    [(_, b1_wd)] = run(epochs=1, weight_decay=0.01)  # epoch 1 of 1 has epoch 1 of 2's lr
    close(b1_wd, {n: b1[n] + 0.01 * p0[n] for n in names}, "weight decay")
    # Without momentum epoch 1 steps alike (b_1 = g_1), and epoch 2 by g_2 alone: 0.9 b_1 less.
    (q1, _), (q2, _) = run(momentum=0.0)
    close(q1, p1, "epoch 1 without momentum")
    close(q2, {n: p2[n] + lr2 * 0.9 * b1[n] for n in names}, "momentum")


def test_the_result_holds_the_trained_network_which_scores_the_last_epochs_accuracy():
    cfg, states = TrainConfig(**{**FAST, "T": 1, "epochs": 2, "batch_size": 128}), []
    result = train(cfg, lambda m, s: states.append(s))
    weights = result.model.state_dict()
    assert weights.keys() == states[-1]["model"].keys()
    assert all(torch.equal(weights[k], v) for k, v in states[-1]["model"].items())
    _, test_loader = data.loaders(cfg, torch.device("cpu"))
    assert evaluate(result.model, test_loader, cfg, data.info(cfg.dataset).num_classes)["test_acc"] == result.metrics["test_acc"]


@pytest.mark.skipif(not malloc._glibc(), reason="sets glibc's malloc only")
def test_a_cpu_run_reuses_the_memory_its_batches_free_instead_of_faulting_it_in_again():
    # Under glibc's own thresholds each of these batches faulted some 8,000 pages back in from the kernel,
    # zero-filled (a fifth of a digits batch's CPU time); reusing the heap, next to none.
    faults = []
    train(TrainConfig(**{**FAST, "epochs": 1, "batch_size": 64}),
          on_batch=lambda epoch, i, n: faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
    per_batch = np.diff(faults)[1:]  # the second batch's on: the first allocates the state for good
    assert np.median(per_batch) < 100, per_batch


def test_train_validates_a_config_built_in_python_before_touching_data(tmp_path):
    # CIFAR-10 is absent from tmp_path: reaching the data would raise a DataError instead.
    with pytest.raises(ConfigError, match="lr must be a number"):
        train(TrainConfig(**{**FAST, "dataset": "cifar10", "data_root": str(tmp_path), "lr": "0.1"}))
    with pytest.raises(TypeError, match="TrainConfig.from_dict builds one from a dict"):
        train(FAST)
    # A setting that would change nothing for the rule, as the command line refuses it too.
    with pytest.raises(ConfigError, match="^signed_factor applies to rule ndot only, not ottt$"):
        train(TrainConfig(**{**FAST, "dataset": "cifar10", "data_root": str(tmp_path), "rule": "ottt", "signed_factor": True}))
    with pytest.raises(ConfigError, match="^weight_change applies to T > 1 only, not T = 1: "):
        train(TrainConfig(**{**FAST, "dataset": "cifar10", "data_root": str(tmp_path), "mode": "O", "T": 1, "weight_change": 0.025}))


@pytest.mark.parametrize("rule,mode", [("ndot", "O"), ("bptt", "A")])
def test_resume_equals_uninterrupted(rule, mode):
    # Two epochs at batch 128: the resumed epoch still starts from momentum, dropout draws and a learning
    # rate the first left behind, in about a third of the time of three epochs at batch 32.
    cfg = TrainConfig(**{**FAST, "epochs": 2, "batch_size": 128}, rule=rule, mode=mode, dropout=0.1)
    full, states = [], []
    train(cfg, lambda m, s: (full.append(m), states.append(s)))
    # Epoch 1's state, kept while the run went on (as in a notebook): later epochs leave it alone.
    resumed, resumed_states = [], []
    train(cfg, lambda m, s: (resumed.append(m), resumed_states.append(s)), resume=states[0])
    assert [m["epoch"] for m in resumed] == [2]
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "firing_rate"):
        assert resumed[0][k] == full[1][k], k
    # Bit for bit, not only the metrics: every weight, momentum buffer and generator state of the last epoch.
    for part in ("model", "optimizer", "rng"):
        assert_same_tensors(resumed_states[0][part], states[1][part], part)


def test_a_state_resumed_from_is_left_alone_and_resumes_alike_again():
    # As in a notebook: two continuations of one epoch's state, or the state saved after a resume from it.
    states, runs = [], []
    train(TrainConfig(**{**CHEAP, "epochs": 1}), lambda m, s: states.append(s))
    kept = checkpoint_round_trip(states[0])
    for _ in range(2):
        train(TrainConfig(**{**CHEAP, "epochs": 2}), lambda m, s: runs.append(s), resume=states[0])
        assert_same_tensors(states[0], kept)
    for part in ("model", "optimizer", "rng"):
        assert_same_tensors(runs[1][part], runs[0][part], part)


def assert_same_tensors(got, want, where: str = "") -> None:
    """Equal nested dicts and lists, their tensors bit for bit (dtype and shape included)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_same_tensors(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_tensors(g, w, f"{where}/{i}")
    else:
        assert got == want, where


def test_a_resume_keeps_the_best_accuracy_of_the_epochs_before_it():
    states, resumed = [], []
    train(TrainConfig(**{**CHEAP, "epochs": 1}), lambda m, s: states.append(s))
    # As if an earlier epoch had scored every test image: no later epoch may take best.pt from it.
    earlier_best = {**states[-1], "best_test_acc": 1.0}
    train(TrainConfig(**{**CHEAP, "epochs": 2}), lambda m, s: resumed.append(m), resume=earlier_best)
    assert resumed[0]["epoch"] == 2 and resumed[0]["test_acc"] < 1.0
    assert resumed[0]["best_test_acc"] == 1.0 and not checkpoint.is_best(resumed[0])


def test_divergence_is_a_status_not_a_crash():
    seen, states = [], []
    cfg = TrainConfig(**{**CHEAP, "lr": 1e30, "epochs": 4}, rule="ottt")
    result = train(cfg, lambda m, s: (seen.append(m), states.append(s)))
    assert result.status == "diverged"
    assert seen[-1]["status"] == "diverged" and result.epochs_run == seen[-1]["epoch"] < 4
    # Resuming from where it diverged trains nothing more and says so again.
    again = train(cfg, lambda m, s: pytest.fail("a diverged run was continued"), resume=states[-1])
    assert (again.status, again.epochs_run) == ("diverged", result.epochs_run)


def test_weights_gone_nan_are_divergence_though_the_loss_stays_finite(monkeypatch):
    # A NaN membrane never reaches the threshold: the poisoned layer falls silent, the readout's bias
    # alone gives the logits, and the loss stays finite, so the loss cannot be what tells.
    import ndot.train
    real = ndot.train.train_batch

    def poisoned(model, *args, **kw):
        out = real(model, *args, **kw)
        with torch.no_grad():
            model.features[0].weight[0] = float("nan")
        return out

    monkeypatch.setattr(ndot.train, "train_batch", poisoned)
    seen = []
    result = train(TrainConfig(**{**FAST, "T": 1, "batch_size": 256, "epochs": 1}), lambda m, s: seen.append(m))
    assert math.isfinite(seen[0]["train_loss"])
    assert (result.status, result.epochs_run) == ("diverged", 1) and seen[0]["status"] == "diverged"


def test_resume_refuses_another_runs_checkpoint_but_may_extend_it():
    states = []
    train(TrainConfig(**{**CHEAP, "epochs": 1}), lambda m, s: states.append(s))
    with pytest.raises(ConfigError, match="T 1 -> 4"):
        train(TrainConfig(**{**CHEAP, "epochs": 2, "T": 4}), resume=states[-1])
    assert train(TrainConfig(**{**CHEAP, "epochs": 2}), resume=states[-1]).epochs_run == 2
    # A run resumed at its last epoch trains none, and its result is that epoch's.
    done = train(TrainConfig(**{**CHEAP, "epochs": 1}), resume=states[-1])
    assert (done.status, done.epochs_run, done.metrics) == ("completed", 1, states[-1]["metrics"])


def test_a_run_extended_on_resume_follows_the_cosine_over_its_new_length():
    states, extended = [], []
    train(TrainConfig(**{**CHEAP, "epochs": 1}), lambda m, s: states.append(s))
    train(TrainConfig(**{**CHEAP, "epochs": 2}), lambda m, s: extended.append(m), resume=states[-1])
    assert [m["epoch"] for m in extended] == [2]
    # Epoch e of E: lr * (1 + cos(pi (e - 1) / E)) / 2; the 1-epoch cosine would have ended at zero, and the
    # saved optimiser's lr, epoch 1's, is the base lr.
    assert extended[0]["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * 1 / 2)) / 2) and extended[0]["lr"] > 0.01


def test_random_states_round_trip_exactly():
    np.random.seed(0)
    np.random.standard_normal(3)  # leaves a cached Gaussian and a position inside the key block
    random.seed(0)
    random.gauss(0, 1)
    saved = _rng_state(torch.device("cpu"))
    expected = (np.random.standard_normal(5).tolist(), random.gauss(0, 1), torch.rand(3))
    _set_rng_state(checkpoint_round_trip(saved), torch.device("cpu"))
    assert (np.random.standard_normal(5).tolist(), random.gauss(0, 1)) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_only_the_runs_own_gpu_generator_is_saved_and_restored_to_the_gpu_it_resumes_on(monkeypatch):
    # No GPU here: torch.cuda's per-device generator calls are stood in for by a table of states. A run on
    # cuda:1 keeps cuda:1's draws and continues them on cuda:0 (a node with one GPU visible), where
    # every visible GPU's states, restored by position, failed there and gave cuda:0 its own draws.
    gpus = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpus[torch.device(device).index].clone())

    def set_rng_state(state, device):
        gpus[torch.device(device).index] = state

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    saved = checkpoint_round_trip(_rng_state(torch.device("cuda:1")))
    assert [s.tolist() for s in saved["cuda"]] == [[1]]
    _set_rng_state(saved, torch.device("cuda:0"))
    assert gpus[0].tolist() == [1]
    # And to a GPU other than the first, which a state restored by position would leave alone for cuda:0's.
    saved = checkpoint_round_trip(_rng_state(torch.device("cuda:0")))
    gpus[0] = torch.tensor([7], dtype=torch.uint8)
    _set_rng_state(saved, torch.device("cuda:1"))
    assert (gpus[0].tolist(), gpus[1].tolist()) == ([7], [1])
    assert _rng_state(torch.device("cpu"))["cuda"] == []


def checkpoint_round_trip(obj):
    """Through a checkpoint file, as resume sees it (weights_only loading)."""
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(Path(d, "c.pt"), obj)
        return checkpoint.load(Path(d, "c.pt"))


def test_cli_trains_checkpoints_and_resumes(tmp_path):
    args = [sys.executable, "-m", "ndot.train", "--dataset", "digits", "--arch", "small_cnn", "--T", "1",
            "--epochs", "2", "--batch_size", "128", "--out", str(tmp_path)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr
    assert "epoch   2/2" in r.stdout
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 2
    r = subprocess.run(args[:-4] + ["--epochs", "3", "--out", str(tmp_path), "--resume"], capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr
    assert [json.loads(l)["epoch"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    r = subprocess.run(args[:-4] + ["--epochs", "4", "--T", "2", "--out", str(tmp_path), "--resume"], capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "T 1 -> 2" in r.stderr


def test_resume_refuses_a_change_to_any_field_but_where_and_how_long_it_runs():
    # The fields a resume may change are _RESUMABLE_CHANGES' few; any other changed is another run.
    from ndot.train import _RESUMABLE_CHANGES, check_resume
    saved = TrainConfig(**FAST)
    changed = {"dataset": "cifar10", "arch": "vgg11_ws", "rule": "ottt", "mode": "O", "T": 3, "lr": 0.2,
               "momentum": 0.5, "weight_decay": 1e-4, "batch_size": 64, "loss_alpha": 0.1, "surrogate_alpha": 2.0,
               "tau": 4.0, "v_th": 0.5, "dropout": 0.1, "signed_factor": True, "detach_reset": True,
               "readout_trace": True, "weight_change": 0.025, "seed": 4, "precision": "bf16", "crop": False, "flip": False,
               "autoaugment": False, "cutout": False, "dvs_encoding": "authors"}
    assert set(changed) | _RESUMABLE_CHANGES == {f.name for f in dataclasses.fields(TrainConfig)}
    resume = {"config": saved.to_dict(), "epoch": 2, "model": from_config(saved, 1, 10).state_dict()}
    for name, value in changed.items():
        with pytest.raises(ConfigError, match=f"another run: {name} "):
            check_resume(dataclasses.replace(saved, **{name: value}), resume)
    check_resume(dataclasses.replace(saved, epochs=5, device="auto", workers=0, loader="cpu"), resume)


def test_the_seed_sets_the_initial_weights(monkeypatch):
    import ndot.train as train_module

    built = []

    class Built(Exception):
        pass

    real = train_module.from_config

    def record(*args):
        built.append({k: v.clone() for k, v in real(*args).state_dict().items()})
        raise Built

    monkeypatch.setattr(train_module, "from_config", record)
    for seed in (3, 3, 4):
        with pytest.raises(Built):
            train(TrainConfig(**{**FAST, "seed": seed}))
    same, other = built[1], built[2]
    assert all(torch.equal(built[0][k], same[k]) for k in same)
    assert not all(torch.equal(built[0][k], other[k]) for k in other)


def test_train_metrics_are_per_sample_and_throughput_counts_time_steps(monkeypatch):
    # A stand-in step of known loss and predictions: the epoch's figures are means over the samples
    # (not over the batches), and the throughput counts image-steps (samples x T).
    import ndot.train as train_module

    def step(model, opt, x, y, **kw):
        logits = torch.zeros(len(y), 10)
        logits[:, 0] = 1.0  # predicts class 0 for every sample
        # A loss that differs from batch to batch (its labels' mean): a constant would read the same as a
        # mean over the batches, which the last, smaller batch (1437 = 44 x 32 + 29) tells apart.
        return y.double().mean(), logits

    monkeypatch.setattr(train_module, "train_batch", step)
    seen, made = [], []
    real_loaders = train_module.data.loaders

    class SkipsFirst:
        """A user's loader whose num_samples is not what it yields: it leaves out its first batch (as one with
        drop_last leaves out its last), which the epoch's figures must not count."""

        def __init__(self, loader):
            self.loader, self.num_samples, self.set_epoch = loader, loader.num_samples, loader.set_epoch

        def __len__(self):
            return len(self.loader) - 1

        def __iter__(self):
            return itertools.islice(iter(self.loader), 1, None)

    def loaders(cfg, device):
        train_loader, test_loader = real_loaders(cfg, device)
        made.append(SkipsFirst(train_loader))
        return made[-1], test_loader

    monkeypatch.setattr(train_module.data, "loaders", loaders)
    train(TrainConfig(**{**FAST, "epochs": 1, "T": 3}), lambda m, s: seen.append(m))
    loader, = made
    n = sum(len(y) for _, y in loader)
    zeros = sum(int((y == 0).sum()) for _, y in loader)
    label_sum = sum(int(y.sum()) for _, y in loader)
    m, = seen
    assert n < loader.num_samples
    assert m["train_loss"] == pytest.approx(label_sum / n, rel=1e-6)
    assert m["train_acc"] == zeros / n
    assert m["image_steps_per_s"] == pytest.approx(n * 3 / m["epoch_seconds"])


def test_a_training_loader_that_yields_no_batch_is_named_not_divided_by(monkeypatch):
    # A user's loader with drop_last and fewer samples than a batch.
    import ndot.train as train_module

    real_loaders = train_module.data.loaders
    class Empty:
        num_samples = 0

        def set_epoch(self, epoch):
            pass

        def __len__(self):
            return 0

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(train_module.data, "loaders", lambda cfg, device: (Empty(), real_loaders(cfg, device)[1]))

    with pytest.raises(data.DataError, match="^the digits training loader yielded no batch in epoch 1$"):
        train(TrainConfig(**{**FAST, "epochs": 1}))


def test_peak_memory_is_in_megabytes():
    # /proc's VmHWM is in KiB: a process that has imported torch holds tens of MB at least, not a fraction of one.
    from ndot.memory import peak_mem_mb
    assert 20 < peak_mem_mb(torch.device("cpu")) < 1e6


def test_the_readmes_python_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [example] = re.findall(r"```python\n(from ndot.config import TrainConfig\n.*?)```", readme, re.S)
    assert "epochs=2" in example and "T=4" in example
    # One epoch at T = 1 shows that it runs, in 2 s where the README's run took 10.3 s at b280e25.
    exec(example.replace("epochs=2", "epochs=1").replace("T=4", "T=1"), {})
    epoch, status = capsys.readouterr().out.splitlines()
    assert epoch.startswith("1 0.") and status.startswith("completed 0.")


def test_the_runs_settings_reach_every_training_and_evaluation_batch(monkeypatch):
    # The one test of a bf16 run (tests/test_fast_path.py, on CUDA) skips on a CPU, where bf16 autocast runs too:
    # a trainer that dropped cfg.precision would train and test in fp32 and pass every other test here. So did
    # one that trained every rule in mode A, or at loss α 0.05 whatever the config's (the DVS recipe's is 0.001).
    import ndot.evaluate as evaluate_module
    import ndot.train as train_module
    asked = []

    def recorded(name, real):  # runs as it is, its settings noted
        def run(*args, **kwargs):
            asked.append((name, tuple(sorted(kwargs.items()))))
            return real(*args, **kwargs)
        return run

    for module, name in ((train_module, "train_batch"), (evaluate_module, "eval_batch")):
        monkeypatch.setattr(module, name, recorded(name, getattr(module, name)))
    cfg = TrainConfig(**{**FAST, "T": 2, "epochs": 1, "batch_size": 128, "precision": "bf16", "rule": "ottt", "mode": "O",
                         "loss_alpha": 0.2, "weight_change": 0.3})
    assert train(cfg).status == "completed"
    same = {"T": 2, "loss_alpha": 0.2, "precision": "bf16"}
    trained = {**same, "rule": "ottt", "mode": "O", "weight_change": 0.3}
    assert set(asked) == {("train_batch", tuple(sorted(trained.items()))),
                          ("eval_batch", tuple(sorted(same.items())))}
