"""Evaluation: accuracy after each step, the best epoch's weights, and python -m ndot.evaluate."""
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
import torch

from helpers import HANG_S, batch, exit_status, make_model, small_cnn_of_an_older_ndot
from ndot import checkpoint, data, files, train as train_module
from ndot.config import ConfigError, TrainConfig
from ndot.evaluate import default_out, evaluate, main as evaluate_main, weights_file
from ndot.layers import LIF
from ndot.models import from_config
from ndot.step import eval_batch
from ndot.train import main as train_main

# Batch 128, a quarter of batch 32's steps: what is checked (which epoch's weights are kept and read, and that
# reading them scores as the trainer did) holds however much the three epochs learn.
RUN = ["--dataset", "digits", "--arch", "small_cnn", "--T", "2", "--epochs", "3", "--batch_size", "128",
       "--seed", "3", "--device", "cpu"]


def test_accuracy_after_step_t_is_that_of_a_t_step_run():
    # Static input and state dropped per batch: the first t steps of a T-step run are a t-step run.
    # T 3, not 5: its steps already disagree (asserted below), in 9 steps over the test set, not 20.
    cfg = TrainConfig(dataset="digits", arch="small_cnn", T=3, device="cpu", batch_size=64)
    info = data.info(cfg.dataset)
    torch.manual_seed(0)
    model = from_config(cfg, info.in_channels, info.num_classes)
    # An untrained net is near chance; a few large weights make its steps disagree.
    model.readout.weight.data.normal_(0, 1)
    _, test = data.loaders(cfg, torch.device("cpu"))
    detailed = evaluate(model, test, cfg, info.num_classes, detail=True)
    shorter = [evaluate(model, test, TrainConfig(**{**cfg.to_dict(), "T": t}), info.num_classes)["test_acc"]
               for t in range(1, cfg.T + 1)]
    assert detailed["acc_by_step"] == shorter
    assert detailed["test_acc"] == shorter[-1]
    assert len(set(shorter)) > 1, "the steps should not all agree, or the comparison shows nothing"
    rates = detailed["layer_firing_rates"]
    assert list(rates) == ["features.1", "features.3", "features.5"] and all(0 <= r <= 1 for r in rates.values())


class Batches(list):
    """A loader of fixed batches, as evaluate reads one."""

    @property
    def num_samples(self) -> int:
        return sum(len(y) for _, y in self)


def test_test_loss_top1_and_top5_are_those_of_the_whole_set_at_once():
    # Batches of unequal size (the last one partial): each batch's mean loss is weighted by its size.
    cfg = TrainConfig(T=3, loss_alpha=0.05)
    model = make_model(classes=20).eval()
    model.readout.weight.data.normal_(0, 1)  # logits far apart, so top-1 and top-5 differ
    x, y = batch(n=23, size=16, classes=20)
    whole_loss, o = eval_batch(model, x, y, T=3, loss_alpha=0.05)
    summed = o.sum(0)
    top5 = (summed.topk(5, dim=1).indices == y[:, None]).any(1).double().mean().item()
    top1 = (summed.argmax(1) == y).double().mean().item()
    got = evaluate(model, Batches([(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]), cfg, 20)
    assert got["test_loss"] == pytest.approx(whole_loss.item(), rel=1e-6)  # summed in float32
    assert (got["test_acc"], got["test_top5"]) == (top1, top5) and top1 < top5


def test_scores_are_over_the_samples_the_loader_yields_not_those_its_num_samples_counts():
    # A user's loader with drop_last: its num_samples counts the partial batch it leaves out.
    class DropsLast(Batches):
        num_samples = 23

    model = make_model().eval()
    x, y = batch(n=20, size=16)
    seen = [(x[:10], y[:10]), (x[10:], y[10:])]
    assert evaluate(model, DropsLast(seen), TrainConfig(T=2), 10) == evaluate(model, Batches(seen), TrainConfig(T=2), 10)


def test_a_loader_that_yields_no_batch_is_named_not_divided_by():
    with pytest.raises(data.DataError, match="^the digits test loader yielded no batch$"):
        evaluate(make_model().eval(), Batches([]), TrainConfig(T=2), 10)


def test_top5_of_the_detailed_evaluation_is_that_of_all_steps_summed_and_only_beyond_10_classes():
    # The command line evaluates with detail=True (accuracy after each step), whose top-5 must still be
    # that of the prediction, Σ_t o[t]; top-5 is reported with more than 10 classes only (docs/training.md).
    model = make_model(classes=20).eval()
    model.readout.weight.data.normal_(0, 1)
    x, y = batch(n=40, size=16, classes=20)
    _, o = eval_batch(model, x, y, T=4, loss_alpha=0.05)
    summed = o.sum(0)
    top5 = sum(int(y[i]) in summed[i].topk(5).indices.tolist() for i in range(len(y))) / len(y)
    got = evaluate(model, Batches([(x[:25], y[:25]), (x[25:], y[25:])]), TrainConfig(T=4), 20, detail=True)
    assert got["test_top5"] == top5
    x, y = batch(n=8, size=16)
    assert "test_top5" not in evaluate(make_model().eval(), Batches([(x, y)]), TrainConfig(T=2), 10, detail=True)


def test_spike_counts_are_exact_past_float32s_integers():
    # 2**24 + 1 neurons, every one firing: a float32 count would hold 2**24 and report a rate below 1.
    n = LIF().eval()
    n(torch.full((97, 257, 673), 5.0))
    assert int(n.spikes) == 97 * 257 * 673 == 2**24 + 1 and n.spikes.dtype == torch.long


def test_firing_rates_are_spikes_per_neuron_per_step_counted_at_each_spiking_layers_output():
    # Counted independently here from what each LIF module emits (scaled by 2.74, so a sum would not be a
    # count); the network's rate weighs each layer by its neurons, it is no mean of the layers' rates.
    model = make_model().eval()
    spikes, steps = {}, {}

    def count(name):
        def hook(module, inputs, output):
            spikes[name] = spikes.get(name, 0) + int(torch.count_nonzero(output[0]))
            steps[name] = steps.get(name, 0) + output[0].numel()
        return hook

    for name, m in model.named_modules():
        if isinstance(m, LIF):
            m.register_forward_hook(count(name))
    x, y = batch(n=12, size=16)
    eval_batch(model, x[:3], y[:3], T=2, loss_alpha=0.05)  # counted before, by hand: not the evaluation's
    spikes.clear(), steps.clear()
    got = evaluate(model, Batches([(x[:5], y[:5]), (x[5:], y[5:])]), TrainConfig(T=3), 10, detail=True)
    assert got["layer_firing_rates"] == pytest.approx({k: spikes[k] / steps[k] for k in spikes}, rel=1e-12)
    assert got["firing_rate"] == pytest.approx(sum(spikes.values()) / sum(steps.values()), rel=1e-12)
    assert len(set(steps.values())) > 1 and len(set(got["layer_firing_rates"].values())) > 1


def test_best_pt_holds_the_best_epoch_and_evaluates_to_its_accuracy(tmp_path, monkeypatch, capsys):
    real = train_module.evaluate
    scripted = iter([0.5, 0.9, 0.7])

    def evaluate_with_scripted_accuracy(*args, **kwargs):
        return {**real(*args, **kwargs), "test_acc": next(scripted)}

    monkeypatch.setattr(train_module, "evaluate", evaluate_with_scripted_accuracy)
    assert train_main([*RUN, "--out", str(tmp_path)]) == 0
    best, last = checkpoint.load(tmp_path / "best.pt"), checkpoint.load(tmp_path / "checkpoint.pt")
    assert (best["epoch"], best["metrics"]["test_acc"], last["epoch"]) == (2, 0.9, 3)
    assert any((best["model"][k] != last["model"][k]).any() for k in best["model"])

    monkeypatch.setattr(train_module, "evaluate", real)
    capsys.readouterr()
    assert evaluate_main([str(tmp_path)]) == 0
    assert "best.pt (epoch 2," in capsys.readouterr().out
    result = json.loads((tmp_path / "eval-best-T2.json").read_text())
    assert result["epoch"] == 2 and result["acc_by_step"][-1] == result["test_acc"]


def test_the_best_epochs_weights_are_a_copy_that_later_training_leaves_alone():
    # A sweep trial holds best_of's state in memory and writes it into later epochs' checkpoints; on a CPU,
    # .to("cpu") alone would return the live parameters themselves, and best.pt would hold the newest weights.
    model = torch.nn.Linear(3, 2)
    state = {"epoch": 2, "metrics": {"test_acc": 0.9}, "model": model.state_dict(), "config": {"T": 2}}
    best = checkpoint.best_of(state)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.mul_(3.0)
    assert all(torch.equal(best["model"][k], kept[k]) for k in kept)
    assert (best["epoch"], best["metrics"], best["config"]) == (2, {"test_acc": 0.9}, {"T": 2})


def test_evaluating_the_weights_reproduces_the_trainers_test_accuracy(tmp_path, monkeypatch):
    assert train_main([*RUN, "--out", str(tmp_path)]) == 0
    logged_config = checkpoint.load(tmp_path / "best.pt")["config"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert evaluate_main([str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "last.json")]) == 0
    result = json.loads((tmp_path / "last.json").read_text())
    assert result["test_acc"] == logged[-1]["test_acc"] and result["firing_rate"] == logged[-1]["firing_rate"]
    # Another T changes the run, not the weights.
    # The JSON keeps the run's config, the T it trained at, and says apart what the evaluation ran with.
    monkeypatch.chdir(tmp_path)
    assert evaluate_main([".", "--T", "4", "--batch-size", "50"]) == 0
    result = json.loads((tmp_path / "eval-best-T4.json").read_text())
    assert len(result["acc_by_step"]) == 4 and result["config"] == logged_config
    assert result["evaluated_with"] == {"T": 4, "precision": "fp32", "batch_size": 50, "data_root": None, "device": "cpu"}
    assert result["weights"] == str(tmp_path / "best.pt")
    # Its first line read (`| head -1`), the command ends as SIGPIPE ends one, with its result written and no traceback.
    proc = subprocess.Popen([sys.executable, "-m", "ndot.evaluate", str(tmp_path), "--T", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "evaluating with T=3" in proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=HANG_S) == 128 + signal.SIGPIPE and proc.stderr.read() == ""
    assert len(json.loads((tmp_path / "eval-best-T3.json").read_text())["acc_by_step"]) == 3


def test_the_evaluation_says_how_far_it_is(tmp_path, monkeypatch, capsys):
    # A line every PROGRESS_S; at 0, a line after every batch but the last. CIFAR-10's test set takes minutes on a
    # CPU, in which the command said nothing after its first line.
    assert train_main([*RUN, "--epochs", "1", "--out", str(tmp_path)]) == 0
    monkeypatch.setattr("ndot.cli.PROGRESS_S", 0.0)
    capsys.readouterr()
    assert evaluate_main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    m = int(lines[1].partition("/")[2])
    assert m > 1 and lines[1:m] == [f"batch {i}/{m}" for i in range(1, m)] and lines[m].startswith("test accuracy ")


def test_an_evaluation_out_of_gpu_memory_ends_in_one_line_naming_the_batch_size(tmp_path, monkeypatch, capsys):
    # CUDA does not run here: the step raises what torch raises on the GPU.
    import ndot.evaluate as evaluate_module

    assert train_main([*RUN, "--epochs", "1", "--out", str(tmp_path)]) == 0

    def step(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. Of the allocated memory 70 GiB ...")

    monkeypatch.setattr(evaluate_module, "eval_batch", step)
    capsys.readouterr()
    assert evaluate_main([str(tmp_path), "--batch_size", "4096"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: out of memory on cpu at batch size 4096, T = 2 (CUDA out of memory. Tried to allocate 2.00 GiB.): "
                   "give a smaller --batch_size\n"), err


def test_a_disk_that_fills_during_the_evaluation_ends_it_in_one_line_after_its_scores(tmp_path, monkeypatch, capsys):
    # The result is checked writable before the work and written after it: a disk that filled in between ended
    # the command in a traceback, its scores never printed.
    assert train_main([*RUN, "--epochs", "1", "--out", str(tmp_path)]) == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    real = files._Landing.write

    def full_for_json(self, b):
        if self._path.endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, b)

    monkeypatch.setattr(files._Landing, "write", full_for_json)
    capsys.readouterr()
    assert evaluate_main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "\ntest accuracy " in out and "\nfiring rate " in out and "->" not in out
    assert err == f"error: cannot write the result to {tmp_path}/eval-best-T2.json: [Errno 28] No space left on device\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a stray temporary file"


def test_threads_holds_for_the_evaluation_alone(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset="digits", arch="small_cnn", T=1, epochs=1, batch_size=64, device="cpu")
    train_module.train(cfg, on_epoch=lambda m, state: checkpoint.save(tmp_path / "best.pt", state))
    during, real = [], evaluate
    monkeypatch.setattr("ndot.evaluate.evaluate", lambda *args, **kw: during.append(torch.get_num_threads()) or real(*args, **kw))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the count asked, so that a count left behind shows
    try:
        assert evaluate_main([str(tmp_path), "--threads", "1"]) == 0
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert during == [1] and after == 2


def test_the_result_of_a_sweep_trials_checkpoint_goes_to_the_trials_folder(tmp_path, monkeypatch):
    # Tune deletes a checkpoint's folder two epochs on, and a result written there with it.
    trial = tmp_path / "fd40def0_T=4,ndot_A"
    (trial / "checkpoint_000002").mkdir(parents=True)
    checkpoint.write_history(trial / "checkpoint_000002", [])
    assert default_out(f"{trial}/checkpoint_000002/best.pt", 4) == f"{trial}/eval-checkpoint_000002-best-T4.json"
    monkeypatch.chdir(trial)
    assert default_out("checkpoint_000002/state.pt", 2) == "./eval-checkpoint_000002-state-T2.json"
    # A run of python -m ndot.train that happens to be named so is no trial: its result stays beside its weights.
    run = tmp_path / "runs" / "checkpoint_1"
    run.mkdir(parents=True)
    assert default_out(f"{run}/best.pt", 4) == f"{run}/eval-best-T4.json"


BEST_EPOCH = {"status": "ok", "test_acc": 0.9, "best_test_acc": 0.9}
WORSE_EPOCH = {"status": "ok", "test_acc": 0.8, "best_test_acc": 0.9}
# As train writes it: a diverged epoch is not tested, and carries the best accuracy so far.
DIVERGED_EPOCH = {"status": "diverged", "best_test_acc": 0.0}


@pytest.mark.parametrize("history,files,picked", [
    ([WORSE_EPOCH, BEST_EPOCH], ["state.pt", "best.pt"], "state.pt"),
    ([BEST_EPOCH, WORSE_EPOCH], ["state.pt", "best.pt"], "best.pt"),
    ([DIVERGED_EPOCH], ["state.pt"], "state.pt"),
    ([BEST_EPOCH, {**DIVERGED_EPOCH, "best_test_acc": 0.9}], ["state.pt", "best.pt"], "best.pt"),
])
def test_a_sweep_checkpoint_yields_the_weights_its_history_names_best(tmp_path, history, files, picked):
    # A best.pt beside the best epoch's own state is left over from an earlier attempt at the
    # same checkpoint (Tune writes a re-run epoch into the same folder): it is not the best.
    for name in files:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / checkpoint.HISTORY).write_text(json.dumps([{"epoch": i + 1, **r} for i, r in enumerate(history)]))
    assert weights_file(tmp_path) == str(tmp_path / picked)


@pytest.mark.parametrize("lacks", [checkpoint.HISTORY, checkpoint.TRIAL, checkpoint.BEST])
def test_a_sweep_trials_folder_stands_for_its_newest_whole_checkpoint(tmp_path, lacks):
    # Epoch 2 was the best, so epoch 3's checkpoint holds it as best.pt beside its own state.
    history = [WORSE_EPOCH, BEST_EPOCH, WORSE_EPOCH]
    for epoch in (1, 2, 3):
        folder = tmp_path / f"checkpoint_{epoch - 1:06d}"
        folder.mkdir()
        (folder / checkpoint.TRIAL).write_bytes(b"")
        (folder / checkpoint.HISTORY).write_text(json.dumps([{"epoch": i + 1, **r} for i, r in enumerate(history[:epoch])]))
    (tmp_path / "checkpoint_000002" / checkpoint.BEST).write_bytes(b"")
    assert weights_file(tmp_path) == str(tmp_path / "checkpoint_000002" / checkpoint.BEST)
    # An upload killed in mid-copy (Tune copies a checkpoint's files in parallel) can lack any of them.
    (tmp_path / "checkpoint_000002" / lacks).unlink()
    assert weights_file(tmp_path) == str(tmp_path / "checkpoint_000001" / checkpoint.TRIAL)
    assert checkpoint.newest(pafs.LocalFileSystem(), str(tmp_path))[0] == str(tmp_path / "checkpoint_000001")


@pytest.mark.parametrize("content", ['{"epoch": 1}', "null", "[]", "[1, 2]", '[{"epoch": "1"}]', '[{"epoch": 2}]',
                                     '[{"epoch": 1}, {"epoch": 1}]'])
def test_a_history_that_is_not_a_trials_epoch_rows_is_passed_over_and_refused_where_named(tmp_path, content, capsys):
    for epoch in (1, 2):
        folder = tmp_path / f"checkpoint_{epoch - 1:06d}"
        folder.mkdir()
        (folder / checkpoint.TRIAL).write_bytes(b"")
        (folder / checkpoint.HISTORY).write_text(json.dumps([{"epoch": i + 1, **WORSE_EPOCH} for i in range(epoch)]))
    (tmp_path / "checkpoint_000001" / checkpoint.HISTORY).write_text(content)
    assert checkpoint.newest(pafs.LocalFileSystem(), str(tmp_path))[0] == str(tmp_path / "checkpoint_000000")
    assert exit_status(evaluate_main, [str(tmp_path / "checkpoint_000001")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "history.json is not the rows of a trial's epochs 1, 2, ... in order" in err


@pytest.mark.parametrize("make,args,message", [
    (None, [], "does not exist"),
    ("dir", [], "holds none of best.pt, checkpoint.pt, state.pt"),
    ("run", ["--out", "/proc/nope/x.json"], "cannot write the result to /proc/nope/x.json"),
    ("run", ["--out", "/tmp"], "--out /tmp is a folder: name the JSON file to write"),
    ("garbage", [], "w.pt is not a readable checkpoint: not a file of torch.save"),
    ("empty", [], "w.pt is not a readable checkpoint: the file is empty"),
    # e.g. a sweep's tuner.pkl, of which torch.load warns too
    ("pickle", [], "w.pt is not a readable checkpoint: it holds Python objects besides tensors and plain data"),
    ("cut", [], "w.pt is not a readable checkpoint: a zip archive that is no whole file of torch.save"),
    ("unreadable", [], "w.pt cannot be read: [Errno 13] Permission denied"),
    ("object", [], "w.pt is not a readable checkpoint: it holds Python objects besides tensors and plain data"),
    ("tensor", [], "no model weights and configuration"),
    ("run", ["--T", "0"], "T must be an integer in [1, 10000]"),
    ("run", ["--device", "cuda:7"], "CUDA device"),
    ("otherarch", [], "the weights are not those of the network their config names, resnet_ws for digits"),
    ("cfgstr", [], "no model weights and configuration"),
    # small_cnn of an older ndot: what differs, not torch's lines of every key
    ("older", [], "small_cnn for digits, as this version of ndot builds it (features.2.weight missing, "
                  "features.3.weight unexpected and 10 more)"),
    ("newer", [], "w.pt was written by a newer ndot (checkpoint format 3; this one reads up to 2): update ndot"),
    ("nan", [], "the weights are not finite (a run that diverged at epoch 3): nothing to evaluate"),
    ("run", ["--threads", "0"], "--threads: must be a whole number in [1, "),
    # The storage of the result, not the weights, is named.
    ("run", ["--out", "foo://x/y.json"], "error: cannot write the result to foo://x/y.json: Unrecognized filesystem type"),
    ("run", ["--out", "s3:///y.json"], "error: cannot write the result to s3:///y.json: "),
    # An unset shell variable: neither the default place nor auto.
    ("run", ["--out", ""], "error: argument --out: must name a file or folder, got an empty string"),
    ("run", ["--device", ""], "device must be 'auto', 'cpu' or 'cuda[:N]', got ''"),
    ("none", [""], "error: argument path: must name a file or folder, got an empty string"),
])
def test_bad_input_is_one_line(tmp_path, capsys, recwarn, monkeypatch, make, args, message):
    path = tmp_path / "w.pt"
    if make == "dir":
        path = tmp_path
    elif make == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif make == "empty":
        path.write_bytes(b"")
    elif make == "unreadable":
        monkeypatch.setattr(files, "read_bytes", lambda uri: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
        path.write_bytes(b"")
    elif make == "pickle":
        path.write_bytes(pickle.dumps({"trials": [object]}, protocol=5))
    elif make in ("cut", "object"):
        torch.save({"model": {"w": torch.zeros(64)}, "config": {} if make == "cut" else object}, path)
        if make == "cut":
            path.write_bytes(path.read_bytes()[:200])
    elif make == "tensor":
        torch.save(torch.zeros(3), path)
    elif make in ("run", "otherarch", "cfgstr", "nan", "older", "newer"):
        cfg = TrainConfig(dataset="digits", arch="small_cnn")
        weights = from_config(cfg, 1, 10).state_dict()
        if make == "older":
            weights = small_cnn_of_an_older_ndot(weights)
        config = {"otherarch": {**cfg.to_dict(), "arch": "resnet_ws"}, "cfgstr": "small_cnn"}.get(make, cfg.to_dict())
        if make == "nan":  # the checkpoint.pt of a run that diverged in its third epoch
            weights["features.0.weight"][0] = float("nan")
        checkpoint.save(path, {"model": weights, "config": config, "epoch": 3, "format": checkpoint.FORMAT + (make == "newer")})
    assert exit_status(evaluate_main, ([] if make == "none" else [str(path)]) + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not [w for w in recwarn if "pickle" in str(w.message)], "a warning on stderr before the one line"


def test_weights_in_storage_that_refuses_the_credentials_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    assert evaluate_main(["gs://ndot-test-bucket/runs/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: gs://ndot-test-bucket/runs/x: ") and "OAuth2" in err, err


def test_weights_that_are_no_state_dict_or_hold_no_tensor_are_named_so():
    expected = make_model().state_dict()
    with pytest.raises(ConfigError, match="^the weights are a list, not the state dict of a network$"):
        checkpoint.check_weights([], expected, "small_cnn")
    key = next(iter(expected))
    with pytest.raises(ConfigError, match=rf"small_cnn, as this version of ndot builds it \({re.escape(key)} no tensor\)$"):
        checkpoint.check_weights({**expected, key: 0.5}, expected, "small_cnn")
