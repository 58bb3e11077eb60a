"""python -m ndot.train: bad input refused in one line before the run folder is touched, resume, --help."""
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Callable

import pytest
import torch

from helpers import HANG_S, exit_status, small_cnn_of_an_older_ndot
from ndot import checkpoint, data, files
from ndot.cli import Terminated
from ndot.evaluate import main as evaluate_main
from ndot.config import RULES, ConfigError, TrainConfig
from ndot.models import ARCHS
from ndot.train import DEFAULT_OUT, RUN_LOCK, main, train

RUN = ["--dataset", "digits", "--arch", "small_cnn", "--T", "1", "--epochs", "1", "--batch_size", "64",
       "--seed", "3", "--device", "cpu"]
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl")


def refused(capsys, argv: list[str], words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    return err


def contents(folder) -> dict:
    # The lock a refused command held while it looked at the folder is no part of the run there.
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != RUN_LOCK}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[..., None]:
    """Puts into a folder a copy of what `python -m ndot.train` of RUN run for `epochs` leaves: the run is
    trained once in the module for each count, and each test changes or resumes its own copy."""
    runs: dict[int, Path] = {}

    def into(out: Path, epochs: int = 1) -> None:
        if epochs not in runs:
            runs[epochs] = tmp_path_factory.mktemp(f"epochs-{epochs}") / "run"
            assert main([*RUN, "--epochs", str(epochs), "--out", str(runs[epochs])]) == 0
        shutil.copytree(runs[epochs], out, dirs_exist_ok=True)
    return into


def test_cuda_graph_on_a_cpu_machine_is_refused_before_the_folder_is_touched(tmp_path, capsys, no_cuda):
    # --device auto resolves to the CPU here: only the resolved device tells that cuda_graph cannot run.
    argv = [*RUN, "--device", "auto", "--cuda_graph"]
    refused(capsys, [*argv, "--out", str(tmp_path / "new")], "cuda_graph needs a CUDA device")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="cuda_graph needs a CUDA device"):
        train(TrainConfig(dataset="digits", cuda_graph=True))

    for name in RUN_FILES:
        (tmp_path / name).write_bytes(b"an earlier run's " + name.encode())
    before = contents(tmp_path)
    refused(capsys, [*argv, "--out", str(tmp_path)], "cuda_graph")
    assert contents(tmp_path) == before


@pytest.mark.parametrize("held,then", [(RUN_FILES, "--resume to continue it"),
                                       (("best.pt",), "remove them"), (("metrics.jsonl",), "remove them")])
def test_a_fresh_run_refuses_a_folder_holding_a_run_and_keeps_it(tmp_path, capsys, held, then):
    for name in held:
        (tmp_path / name).write_bytes(b"an earlier run's " + name.encode())
    before = contents(tmp_path)
    err = refused(capsys, [*RUN, "--out", str(tmp_path)], f"{tmp_path} holds a run already ({', '.join(held)})")
    assert then in err
    assert contents(tmp_path) == before and not (tmp_path / RUN_LOCK).exists(), "the refused run's lock was left there"


@pytest.mark.parametrize("out,words", [("file", "is a file, not a folder"), ("file/run", "cannot write in --out"),
                                       ("/proc/nope", "cannot write in --out"),
                                       ("é" * 128, "cannot write in --out"),  # 256 bytes: too long a name
                                       ("dangling", "is a link to gone, which does not exist")])
def test_an_out_that_cannot_be_a_folder_is_refused(tmp_path, capsys, out, words):
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to("gone")
    refused(capsys, [*RUN, "--out", str(tmp_path / out)], words)


def test_a_tilde_in_out_is_the_home_folder_where_the_shell_leaves_it(tmp_path, capsys, monkeypatch):
    # --out=~/run: the shell expands no ~ after '=', and the run went to a folder named "~" in the current one.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = tmp_path / "home" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    refused(capsys, [*RUN, "--out=~/run"], f"{run} holds a run already")
    assert not (tmp_path / "~").exists()


def test_an_empty_out_is_refused_not_taken_for_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert exit_status(main, [*RUN, "--out", ""]) == 2
    assert "argument --out: must name a folder, got an empty string" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resume_takes_the_config_from_the_checkpoint_and_only_the_flags_given(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run's")
    assert main([*RUN, "--out", str(tmp_path)]) == 0  # batch 64, T 1, seed 3: none the default
    assert {p.name for p in tmp_path.iterdir()} == {"notes.txt", RUN_LOCK, *RUN_FILES}
    assert main(["--out", str(tmp_path), "--resume", "--epochs", "2", "--workers", "0"]) == 0
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 2
    assert {k: saved["config"][k] for k in ("batch_size", "T", "seed", "device", "epochs", "workers")} == \
        {"batch_size": 64, "T": 1, "seed": 3, "device": "cpu", "epochs": 2, "workers": 0}
    # A flag given is a change even where it names the default.
    refused(capsys, ["--out", str(tmp_path), "--resume", "--epochs", "3", "--batch_size", "128"],
            "batch_size 64 -> 128")


def test_resume_with_nothing_to_resume_creates_nothing(tmp_path, capsys):
    refused(capsys, [*RUN, "--out", str(tmp_path / "new"), "--resume"], "does not exist")
    assert not (tmp_path / "new").exists()
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    refused(capsys, ["--out", str(tmp_path), "--resume"], "not a readable checkpoint")


def test_a_run_from_a_thread_other_than_the_main_one_trains(tmp_path, capsys):
    # A notebook's or a service's worker thread, where Python refuses to set a signal handler: the run's own
    # SIGTERM handler is left out there, not a ValueError that ends it.
    ended = []
    thread = threading.Thread(target=lambda: ended.append(main([*RUN, "--out", str(tmp_path)])))
    thread.start()
    thread.join(timeout=HANG_S)
    assert ended == [0], capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").is_file()

@pytest.mark.parametrize("args,words", [(["--workers", "-1"], "workers must be"), (["--seed", "-1"], "seed must be"),
                                        (["--weight_decay", "nan"], "weight_decay must be")])
def test_out_of_range_numbers_are_refused(tmp_path, capsys, args, words):
    refused(capsys, [*RUN, *args, "--out", str(tmp_path / "run")], words)
    assert not (tmp_path / "run").exists()


def test_threads_sets_torchs_threads_for_the_command_alone_and_stays_out_of_the_run_config(tmp_path, capsys, monkeypatch):
    refused_at_parse = exit_status(main, [*RUN, "--threads", "0", "--out", str(tmp_path / "run")])
    assert refused_at_parse == 2 and "--threads: must be a whole number in [1, " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    during, real = [], train
    monkeypatch.setattr("ndot.train.train", lambda *args: during.append(torch.get_num_threads()) or real(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the count asked, so that a count left behind shows
    try:
        assert main([*RUN, "--threads", "1", "--out", str(tmp_path / "run")]) == 0
        after_run = torch.get_num_threads()
        # A resume takes it like any run: a setting of this process, not of the run.
        assert main(["--out", str(tmp_path / "run"), "--resume", "--epochs", "2", "--threads", "1"]) == 0
        after_resume = torch.get_num_threads()
        # Run from Python, the command's count ends with it: a later run in the process has its own.
        assert main(["--out", str(tmp_path / "run"), "--resume", "--epochs", "3"]) == 0
    finally:
        torch.set_num_threads(before)
    assert during == [1, 1, 2] and (after_run, after_resume) == (2, 2)
    assert "threads" not in checkpoint.load(tmp_path / "run" / "checkpoint.pt")["config"]


def test_help_gives_every_option_its_default_and_valid_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no help text wrapped, at a hyphen or elsewhere
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    # An option's entry: its flags, then its help, on that line or the next; by the option's name.
    entries = {e.split()[0].strip("-,"): " ".join(e.split()) for e in capsys.readouterr().out.split("\n  -")}
    for f in dataclasses.fields(TrainConfig):
        default = "$NDOT_DATA, else ~/data" if f.default is None else "none" if f.default == "" else f.default
        assert f"(default: {default})" in entries[f.name], f.name
    assert ", ".join(RULES) in entries["rule"]
    assert f"{', '.join(sorted(ARCHS))}, or one that a module of --imports registers" in entries["arch"]
    assert f"{', '.join(sorted(data.DATASETS))}, or one that a module of --imports registers" in entries["dataset"]
    assert f"(default: {DEFAULT_OUT})" in entries["out"]


def test_an_architecture_and_a_dataset_of_modules_named_in_imports_train_and_evaluate_where_those_are_not_imported(
        tmp_path, capsys, user_arch, user_data):
    (arch_module, arch), (data_module, dataset) = user_arch, user_data
    out = tmp_path / "run"
    assert main([*RUN, "--imports", f"{arch_module},{data_module}", "--arch", arch, "--dataset", dataset,
                 "--out", str(out)]) == 0
    # The module's network (16 channels first), on the module's data's info, not digits': four classes.
    model = checkpoint.load(out / checkpoint.BEST)["model"]
    assert model["features.0.weight"].shape[0] == 16 and model["readout.weight"].shape[0] == 4
    # A process that has not imported them, as ndot.evaluate's is: the run's config names the modules.
    ARCHS.pop(arch)
    data.DATASETS.pop(dataset)
    sys.modules.pop(arch_module)
    sys.modules.pop(data_module)
    assert evaluate_main([str(out), "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["config"]["dataset"] == dataset and dataset in data.DATASETS
    assert arch in ARCHS
    # The module's data again, made in the evaluating process: the run's own test accuracy.
    assert result["test_acc"] == json.loads((out / "metrics.jsonl").read_text())["test_acc"]


@pytest.mark.parametrize("text, words", [
    ("from ndot.models import register\nregister('small_cnn', lambda c, k, n: None, 16)\n",
     "imports: 'taken': architecture 'small_cnn' is registered already, by ndot.models"),
    ("from ndot.data import register\nfrom ndot.data.digits import INFO\nregister('digits', None, INFO)\n",
     "imports: 'taken': dataset 'digits' is registered already, by ndot.data.digits"),
], ids=["arch", "dataset"])
def test_a_module_of_imports_that_registers_a_name_already_taken_is_refused_in_one_line(
        tmp_path, monkeypatch, capsys, text, words):
    (tmp_path / "taken.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    refused(capsys, [*RUN, "--imports", "taken", "--out", str(tmp_path / "run")], words)
    assert not (tmp_path / "run").exists() and "taken" not in sys.modules


def test_a_run_whose_architectures_module_moved_resumes_with_imports_naming_it_anew(tmp_path, capsys, user_arch):
    # The module renamed (into a package of the user's, say): the weights are checked against the network it builds.
    module, arch = user_arch
    out = tmp_path / "run"
    assert main([*RUN, "--imports", module, "--arch", arch, "--out", str(out)]) == 0
    moved = f"{module}_moved"
    Path(f"{module}.py").rename(f"{moved}.py")  # in the current folder, on sys.path (user_arch)
    ARCHS.pop(arch)
    sys.modules.pop(module)
    try:
        assert main(["--out", str(out), "--resume", "--epochs", "2", "--imports", moved]) == 0
        saved = checkpoint.load(out / checkpoint.LAST)
        assert (saved["epoch"], saved["config"]["imports"]) == (2, moved)
        assert ARCHS[arch].build.__module__ == moved
    finally:
        sys.modules.pop(moved, None)


def test_the_default_out_folder_is_named_after_the_flags_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(capsys, [*RUN, "--resume"], "runs/digits-small_cnn-ndot_A-T1-seed3/checkpoint.pt does not exist")


@pytest.mark.parametrize("flag,rule", [("--signed_factor", "ottt"), ("--detach_reset", "ndot"), ("--readout_trace", "bptt")])
def test_a_flag_that_cannot_change_the_rule_is_refused(tmp_path, capsys, flag, rule):
    refused(capsys, [*RUN, "--rule", rule, flag, "--out", str(tmp_path / "run")], f"{flag} applies to rule")
    assert not (tmp_path / "run").exists()


def test_weight_change_is_refused_in_mode_A(tmp_path, capsys):
    refused(capsys, [*RUN, "--mode", "A", "--weight_change", "0.025", "--out", str(tmp_path / "run")],
            "--weight_change applies to mode O only, not A")
    assert not (tmp_path / "run").exists()


def test_weight_change_is_refused_at_one_time_step(tmp_path, capsys):
    # RUN's T is 1: a batch of one step has no previous step to compare the weights with.
    refused(capsys, [*RUN, "--mode", "O", "--weight_change", "0.025", "--out", str(tmp_path / "run")],
            "--weight_change applies to T > 1 only, not T = 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,words", [(["--data_root", "data"], "--data_root does not apply to dataset 'digits'"),
                                         (["--download"], "--download does not apply to dataset 'digits'"),
                                         (["--data_root", ""], "data_root must be a folder or None, got ''")])
def test_a_data_flag_digits_would_ignore_is_refused_fresh_and_on_resume(trained, tmp_path, capsys, flags, words):
    refused(capsys, [*RUN, *flags, "--out", str(tmp_path / "run")], words)
    assert not (tmp_path / "run").exists()
    trained(tmp_path)
    before = contents(tmp_path)
    refused(capsys, ["--out", str(tmp_path), "--resume", "--epochs", "2", *flags], words)
    assert contents(tmp_path) == before


def test_resume_refuses_fewer_epochs_a_finished_run_and_names_another_run_before_its_data(trained, tmp_path, capsys):
    trained(tmp_path, epochs=2)
    before = contents(tmp_path)
    refused(capsys, ["--out", str(tmp_path), "--resume", "--epochs", "1"], "has run 2 epochs, more than epochs 1")
    refused(capsys, ["--out", str(tmp_path), "--resume"], "has done its 2 epochs: --epochs N (more) extends it")
    # cifar10 is not on this machine: that the checkpoint is another run's is what to say.
    refused(capsys, ["--out", str(tmp_path), "--resume", "--dataset", "cifar10"], "another run: dataset 'digits' -> 'cifar10'")
    assert contents(tmp_path) == before


def test_a_resumed_run_logs_each_epoch_once_wherever_the_killed_one_stopped(trained, tmp_path):
    run = tmp_path / "run"
    trained(run, epochs=2)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # What the log holds when the run of epoch 3 is killed after its line but before its checkpoint,
    # in mid-line, and (as the order before this had it) after epoch 2's checkpoint but before its line.
    killed = {
        "after the line": [*lines, json.dumps({**json.loads(lines[-1]), "epoch": 3, "test_acc": -1.0})],
        "in mid-line": [*lines, '{"epoch": 3, "train_lo'],
        "before the line": lines[:1],
    }
    for where, log in killed.items():
        out = tmp_path / where.replace(" ", "-")
        shutil.copytree(run, out)
        (out / "metrics.jsonl").write_text("\n".join(log) + ("" if where == "in mid-line" else "\n"))
        assert main(["--out", str(out), "--resume", "--epochs", "3", "--workers", "0"]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3], where
        assert rows[:2] == [json.loads(line) for line in lines] and rows[2]["test_acc"] >= 0, where


def test_a_run_killed_between_its_checkpoint_and_best_pt_gets_its_best_weights_back(trained, tmp_path, capsys):
    trained(tmp_path, epochs=2)
    # What a kill between the two files leaves when epoch 2 is the best: best.pt of an earlier epoch.
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    state["metrics"].update(test_acc=1.0, best_test_acc=1.0)
    checkpoint.save(tmp_path / "checkpoint.pt", state)
    stale = {**checkpoint.best_of(state), "epoch": 1}
    stale["model"] = {k: torch.zeros_like(v) for k, v in stale["model"].items()}
    checkpoint.save(tmp_path / "best.pt", stale)
    # The run is at its last epoch: a resume is refused, and mends the folder all the same.
    refused(capsys, ["--out", str(tmp_path), "--resume"], "has done its 2 epochs")
    best = checkpoint.load(tmp_path / "best.pt")
    assert best["epoch"] == 2 and all(torch.equal(best["model"][k], state["model"][k]) for k in state["model"])
    before = contents(tmp_path)
    refused(capsys, ["--out", str(tmp_path), "--resume"], "has done its 2 epochs")
    assert contents(tmp_path) == before, "a folder that agrees with its checkpoint is left as it is"


def test_ctrl_c_ends_the_run_in_one_line_that_says_how_to_continue(tmp_path, capsys, monkeypatch):
    real = train

    def stopped_after_epoch_1(cfg, on_epoch, *args):
        def then_ctrl_c(m, st):
            on_epoch(m, st)
            raise KeyboardInterrupt
        return real(cfg, then_ctrl_c, *args)

    run = tmp_path / "a run"
    monkeypatch.setattr("ndot.train.train", stopped_after_epoch_1)
    assert main([*RUN, "--epochs", "2", "--out", str(run), "--threads", "1"]) == 130
    err = capsys.readouterr().err
    # A command to paste: the folder quoted for the shell, and the thread count, which the run does not save.
    assert err == f"interrupted after epoch 1 of 2: continue with python -m ndot.train --out '{run}' --resume --threads 1\n", err
    monkeypatch.setattr("ndot.train.train", real)
    assert main(["--out", str(run), "--resume"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_long_epoch_and_its_test_pass_each_say_how_far_they_are(tmp_path, capsys, monkeypatch):
    # A line every PROGRESS_S; at 0, a line after every batch but the last. The test pass of VGG-11 on a CPU
    # takes minutes, in which the run said nothing after its last batch line.
    monkeypatch.setattr("ndot.cli.PROGRESS_S", 0.0)
    assert main([*RUN, "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    trained = [line for line in lines if "  batch " in line]
    tested = [line for line in lines if "  test batch " in line]
    n, m = (int(part[-1].rpartition("/")[2]) for part in (trained, tested))
    assert trained == [f"epoch   1/1  batch {i}/{n}" for i in range(1, n)] and m > 1
    assert lines[:n + m - 2] == trained + tested == trained + [f"epoch   1/1  test batch {i}/{m}" for i in range(1, m)]
    assert lines[n + m - 2].startswith("epoch   1/1  loss ")


def test_sigterm_ends_the_run_as_ctrl_c_does_with_its_own_status(tmp_path):
    # How a scheduler stops a job (SLURM, Kubernetes, `kill`): the run says how to continue, its epochs saved.
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ndot.train", *RUN, "--epochs", "50", "--threads", "1", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # After the first epoch's line; a slow machine prints a batch line ("epoch   1/50  batch …") before it.
    next(line for line in proc.stdout if line.startswith("epoch") and " loss " in line)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 128 + signal.SIGTERM, err
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert err == (f"interrupted after epoch {epochs[-1]} of 50: continue with python -m ndot.train --out {run} "
                   f"--resume --threads 1\n"), err
    assert epochs == list(range(1, len(epochs) + 1)) and checkpoint.load(run / "checkpoint.pt")["epoch"] == epochs[-1]


def test_a_run_folder_is_written_by_one_run_at_a_time_and_let_go_when_that_run_is_killed(tmp_path, capsys):
    # Two runs started into one --out at once both found it empty and trained there: metrics.jsonl held both
    # runs' epochs interleaved, checkpoint.pt and best.pt whichever wrote last. A --resume of the run while it
    # still went mended its log under it, then did the same.
    run = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-m", "ndot.train", *RUN, "--epochs", "50", "--threads", "1", "--out", str(run)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().endswith(f"-> {run}\n")  # it has the folder, and no epoch yet
        holder = f"error: another run is writing in --out {run} (pid {other.pid} on "
        assert refused(capsys, [*RUN, "--lr", "0.05", "--out", str(run)], "): wait for it to end, or pass another --out") \
            .startswith(holder)
        next(line for line in other.stdout if line.startswith("epoch") and " loss " in line)
        assert refused(capsys, ["--out", str(run), "--resume"], "): resume it once that run has ended").startswith(holder)
    finally:
        other.kill()  # SIGKILL: nothing of its own lets the folder go
        other.wait(timeout=HANG_S)
    # The folder holds its one run's epochs, and is the next command's: here refused for them, not the lock.
    done = checkpoint.load(run / "checkpoint.pt")["epoch"]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, done + 1))
    assert checkpoint.load(run / "best.pt")["config"]["lr"] == TrainConfig().lr != 0.05
    refused(capsys, [*RUN, "--out", str(run)], f"{run} holds a run already")


def test_sigterm_while_a_checkpoint_is_written_ends_the_run_as_between_epochs(tmp_path, capsys, monkeypatch):
    # Most of a large model's save is spent in torch's zip writer, which calls the file's Python write:
    # that is where the signal's handler raises, and the writer then failed on closing, its words
    # ("unexpected pos") in a traceback in place of the line that says how to continue.
    real = files._Landing.write

    def terminated_in_epoch_2s_checkpoint(self, b):
        if self._path.endswith(checkpoint.LAST) and Path(self._path).exists() and self.tell() > 0:
            raise Terminated
        return real(self, b)

    run = tmp_path / "run"
    monkeypatch.setattr(files._Landing, "write", terminated_in_epoch_2s_checkpoint)
    assert main([*RUN, "--epochs", "2", "--out", str(run)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err == f"interrupted after epoch 1 of 2: continue with python -m ndot.train --out {run} --resume\n", err
    assert sorted(p.name for p in run.iterdir()) == sorted([*RUN_FILES, RUN_LOCK]), "a stray temporary file"
    assert checkpoint.load(run / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("name, saved", [(checkpoint.LAST, 0), (checkpoint.BEST, 1)])
@pytest.mark.parametrize("stop", ["full disk", "SIGTERM"])
def test_a_run_stopped_in_its_first_epochs_files_names_what_was_saved_and_the_command_works(tmp_path, capsys, monkeypatch,
                                                                                            name, saved, stop):
    # Stopped in checkpoint.pt, the first epoch's line was left in metrics.jsonl, for which "start it again"
    # was refused ("holds a run already"); stopped in best.pt, after checkpoint.pt had landed, the run
    # said no epoch was saved, and starting again was refused for checkpoint.pt.
    real = files._Landing.write

    def stopped(self, b):
        if self._path.endswith(name) and self.tell() > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if stop == "full disk" else Terminated
        return real(self, b)

    run = tmp_path / "run"
    monkeypatch.setattr(files._Landing, "write", stopped)
    assert main([*RUN, "--epochs", "2", "--out", str(run)]) == (1 if stop == "full disk" else 128 + signal.SIGTERM)
    err = capsys.readouterr().err
    then = f"continue with python -m ndot.train --out {run} --resume" if saved else "start it again"
    expected = {("full disk", 0): "error: cannot write in --out {run}: [Errno 28] No space left on device; no epoch was "
                                  "saved: once it can be written, start it again",
                ("full disk", 1): "error: cannot write in --out {run}: [Errno 28] No space left on device; epoch 1 of 2 "
                                  "is the last saved: once it can be written, {then}",
                ("SIGTERM", 0): "interrupted after epoch 0 of 2: no epoch finished: start it again",
                ("SIGTERM", 1): "interrupted after epoch 1 of 2: {then}"}[stop, saved]
    assert err == expected.format(run=run, then=then) + "\n", err
    monkeypatch.setattr(files._Landing, "write", real)
    assert main(["--out", str(run), "--resume"] if saved else [*RUN, "--epochs", "2", "--out", str(run)]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_out_of_gpu_memory_ends_in_one_line_naming_its_size_and_what_was_saved(tmp_path, capsys, monkeypatch):
    # CUDA does not run here: the step raises what torch raises on the GPU, in the second epoch.
    import ndot.train as train_module

    real, calls = train_module.train_batch, []
    words = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
             "is free. Of the allocated memory 76.90 GiB is allocated by PyTorch. If reserved but unallocated memory is "
             "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")

    def step(*args, **kw):
        calls.append(None)
        if len(calls) > 23:  # 1437 training digits in batches of 64: 23 a epoch
            raise torch.OutOfMemoryError(words)
        return real(*args, **kw)

    monkeypatch.setattr(train_module, "train_batch", step)
    run = tmp_path / "run"
    assert main([*RUN, "--epochs", "2", "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: out of memory on cpu at batch size 64, T = 1 (CUDA out of memory. Tried to allocate 2.00 GiB. "
                   f"GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.); epoch 1 of 2 is the last saved: "
                   f"where the memory was another process's, continue with python -m ndot.train --out {run} --resume\n"), err
    monkeypatch.setattr(train_module, "train_batch", real)
    assert main(["--out", str(run), "--resume"]) == 0


def test_a_resume_from_weights_alone_is_refused_before_the_folder_is_touched(trained, tmp_path, capsys):
    run = tmp_path / "run"
    trained(run)
    shutil.copy(run / "best.pt", run / "checkpoint.pt")
    before = contents(run)
    refused(capsys, ["--out", str(run), "--resume", "--epochs", "2"], "holds no best_test_acc, optimizer, rng: not the checkpoint.pt of a run")
    assert contents(run) == before


def older(state: dict) -> dict:
    """`state` as the first ndot wrote it: a learning-rate scheduler's state, no metrics, status or format."""
    kept = {k: v for k, v in state.items() if k not in ("metrics", "status", "format")}
    return {**kept, "scheduler": {"T_max": state["config"]["epochs"], "last_epoch": state["epoch"]}}


@pytest.mark.parametrize("change,words", [
    (lambda st: {**st, "format": checkpoint.FORMAT + 1}, "checkpoint.pt was written by a newer ndot (checkpoint format 3; "
                                                          "this one reads up to 2): update ndot to read it"),
    (older, "checkpoint.pt is of an older ndot, whose checkpoints held a learning-rate scheduler's state and no metrics"),
    (lambda st: {**st, "model": small_cnn_of_an_older_ndot(st["model"])},
     "small_cnn for digits, as this version of ndot builds it (features.2.weight missing, features.3.weight unexpected and"),
], ids=["newer", "older", "older_network"])
def test_a_checkpoint_of_another_version_is_refused_on_resume_before_the_folder_is_touched(trained, tmp_path, capsys, change, words):
    trained(tmp_path)
    for name in ("checkpoint.pt", "best.pt"):  # both of this version's, which a newer one can tell
        assert checkpoint.load(tmp_path / name)["format"] == checkpoint.FORMAT
    checkpoint.save(tmp_path / "checkpoint.pt", change(checkpoint.load(tmp_path / "checkpoint.pt")))
    before = contents(tmp_path)
    refused(capsys, ["--out", str(tmp_path), "--resume", "--epochs", "2"], words)
    assert contents(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU is what it resumes on")
@pytest.mark.parametrize("device, cuda_graph, flags", [
    ("cuda", True, "--device cpu --no-cuda_graph"), ("cuda:1", False, "--device cpu"), ("auto", True, "--no-cuda_graph")])
def test_a_gpu_run_resumed_without_a_gpu_is_told_the_flags_that_continue_it_here(trained, tmp_path, capsys, device, cuda_graph, flags):
    # The saved device was refused, then, once --device cpu was given, cuda_graph: one at a time.
    trained(tmp_path)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    state["config"].update(device=device, cuda_graph=cuda_graph)
    checkpoint.save(tmp_path / "checkpoint.pt", state)
    capsys.readouterr()
    assert exit_status(main, ["--out", str(tmp_path), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(f"(resuming {tmp_path / 'checkpoint.pt'}): add {flags} to continue it "
                                                  "on this machine's CPU\n"), err
    assert main(["--out", str(tmp_path), "--resume", "--epochs", "2", *flags.split()]) == 0, capsys.readouterr().err
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 2


@pytest.mark.parametrize("saved,off", [
    # As ndot saved an ndot trial of a sweep that set detach_reset for its bptt trials, before 7ea7bad.
    ({"detach_reset": True}, {"detach_reset": False}),
    # As ndot saved a mode-O run at T = 1 (RUN's) with weight_change, before 561e840.
    ({"mode": "O", "weight_change": 0.025}, {"weight_change": 0.0})])
def test_a_checkpoint_holding_a_setting_on_that_its_run_ignores_resumes_with_it_off(trained, tmp_path, capsys, saved, off):
    trained(tmp_path)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    state["config"].update(saved)
    checkpoint.save(tmp_path / "checkpoint.pt", state)
    assert main(["--out", str(tmp_path), "--resume", "--epochs", "2"]) == 0, capsys.readouterr().err
    resumed = checkpoint.load(tmp_path / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["config"] == {**state["config"], **off, "epochs": 2}


def test_a_resume_leaves_best_pt_alone_when_the_checkpoints_epoch_is_not_the_best(trained, tmp_path, capsys):
    # _mend rewrites best.pt only for a checkpoint that is the best epoch: one that is not would
    # put a worse epoch's weights where the best epoch's are.
    trained(tmp_path, epochs=2)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    state["metrics"].update(test_acc=0.0, best_test_acc=1.0)
    checkpoint.save(tmp_path / "checkpoint.pt", state)
    checkpoint.save(tmp_path / "best.pt", {**checkpoint.best_of(state), "epoch": 1})
    before = (tmp_path / "best.pt").read_bytes()
    refused(capsys, ["--out", str(tmp_path), "--resume"], "has done its 2 epochs")
    assert (tmp_path / "best.pt").read_bytes() == before


def test_a_diverged_run_exits_3_and_its_resume_says_diverged_again_even_at_its_last_epoch(tmp_path, capsys):
    assert main([*RUN, "--rule", "ottt", "--lr", "1e30", "--out", str(tmp_path)]) == 3
    assert checkpoint.load(tmp_path / "checkpoint.pt")["status"] == "diverged"
    capsys.readouterr()
    # Its last epoch diverged: the run ended there, which a resume reports rather than refuses.
    assert main(["--out", str(tmp_path), "--resume"]) == 3
    assert "diverged" in capsys.readouterr().out


def test_a_diverged_epochs_line_is_strict_json_its_loss_null(tmp_path):
    # json.dumps wrote the loss as a bare NaN, which jq 1.6, JavaScript's JSON.parse and strict parsers refuse.
    def strict(line: str) -> dict:
        return json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} is no JSON: {line}"))

    assert main([*RUN, "--rule", "ottt", "--lr", "1e30", "--epochs", "2", "--out", str(tmp_path)]) == 3
    (row,) = map(strict, (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert row["status"] == "diverged" and row["train_loss"] is None
    assert math.isnan(checkpoint.load(tmp_path / "checkpoint.pt")["metrics"]["train_loss"])
    # A resume mends the log from the checkpoint's metrics, whose loss is the float NaN: the same line.
    before = contents(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    assert main(["--out", str(tmp_path), "--resume"]) == 3
    assert contents(tmp_path) == before


def test_ctrl_c_before_any_epoch_says_to_start_again(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("ndot.train.train", interrupted)
    assert main([*RUN, "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "interrupted after epoch 0 of 1: no epoch finished: start it again\n"


def test_each_epoch_writes_its_log_line_then_checkpoint_pt_then_best_pt(tmp_path, monkeypatch):
    # The order _mend repairs from (docs/training.md: "An epoch's line is written before checkpoint.pt, and best.pt
    # after it"): a kill between any two leaves a folder a resume can mend. Each save records what is there.
    real, seen = checkpoint.save, []

    def save(path, state):
        log = tmp_path / "metrics.jsonl"
        seen.append((path.name, state["epoch"], len(log.read_text().splitlines()) if log.exists() else 0,
                     (tmp_path / "checkpoint.pt").exists() and checkpoint.load(tmp_path / "checkpoint.pt")["epoch"]))
        real(path, state)

    monkeypatch.setattr(checkpoint, "save", save)
    assert main([*RUN, "--out", str(tmp_path)]) == 0
    # checkpoint.pt of epoch 1 once the log holds its line; best.pt once checkpoint.pt holds epoch 1.
    assert seen == [("checkpoint.pt", 1, 1, False), ("best.pt", 1, 1, 1)]


def test_an_out_of_blanks_is_refused_too(tmp_path, capsys, monkeypatch):
    # " " (a quoted unset variable beside a space) names no folder any more than "" does.
    monkeypatch.chdir(tmp_path)
    assert exit_status(main, [*RUN, "--out", " "]) == 2
    assert "argument --out: must name a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_ends_quietly_when_its_reader_goes_away(tmp_path):
    # pyproject's ndot-train runs as pip's wrapper runs it, sys.exit(entry()): the entry must be the one that
    # turns a closed stdout (`ndot-train ... | head -1`) into SIGPIPE's status rather than a traceback.
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, entry = pyproject["project"]["scripts"]["ndot-train"].split(":")
    code = f"import sys; from {module} import {entry}; sys.argv[0] = 'ndot-train'; sys.exit({entry}())"
    proc = subprocess.Popen([sys.executable, "-c", code, *RUN, "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "-> " in proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=HANG_S) == 128 + signal.SIGPIPE and proc.stderr.read() == ""


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/ndot-train", "ndot-train"),
                                          ("/repo/ndot/train.py", "python -m ndot.train")])
def test_help_names_the_command_as_it_was_run(capsys, monkeypatch, argv0, prog):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert exit_status(main, ["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


@pytest.mark.parametrize("seconds_per_reading, batch_lines", [(0.3, False), (2.0, True)], ids=["short-epochs", "long-epochs"])
def test_a_batch_line_comes_only_after_10_s_without_any_line(tmp_path, capsys, monkeypatch, seconds_per_reading, batch_lines):
    # The clock of ndot.cli.Pace moves at each reading (one per batch): at 0.3 s an epoch of 23 batches and its test
    # pass of 6 last 9 s, under the 10 s between lines once the epoch's own line counts, which the second epoch,
    # past 10 s of the run, needs; at 2 s the batch lines keep a long epoch visible.
    now = [0.0]

    def monotonic() -> float:
        now[0] += seconds_per_reading
        return now[0]

    monkeypatch.setattr("ndot.cli.time", types.SimpleNamespace(monotonic=monotonic))
    assert main([*RUN, "--epochs", "1" if batch_lines else "2", "--out", str(tmp_path)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if " batch " in line]
    assert bool(printed) == batch_lines, printed


def test_a_full_disk_ends_the_run_in_one_line_keeping_the_epochs_saved_before(tmp_path, capsys, monkeypatch):
    # ENOSPC from the second epoch's checkpoint.pt on, in mid-file as a filling disk gives it: torch's zip
    # writer then failed again on closing, and the run ended in two tracebacks ending in torch's internals.
    # (A failure at the file's first byte leaves the writer's position right, and shows none of that.)
    real = files._Landing.write

    def full_from_epoch_2(self, b):
        if self._path.endswith(checkpoint.LAST) and Path(self._path).exists() and self.tell() > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, b)

    run = tmp_path / "run"
    monkeypatch.setattr(files._Landing, "write", full_from_epoch_2)
    assert main([*RUN, "--epochs", "2", "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: cannot write in --out {run}: [Errno 28] No space left on device; epoch 1 of 2 is the last "
                   f"saved: once it can be written, continue with python -m ndot.train --out {run} --resume\n"), err
    assert sorted(p.name for p in run.iterdir()) == sorted([*RUN_FILES, RUN_LOCK]), "a stray temporary file"
    assert checkpoint.load(run / "checkpoint.pt")["epoch"] == 1
    monkeypatch.setattr(files._Landing, "write", real)
    assert main(["--out", str(run), "--resume"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
