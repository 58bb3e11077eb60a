"""What every command line shares (ndot.cli): `-` and `_` alike inside a flag, no abbreviations; progress on stderr;
Ctrl-C and SIGTERM in one line."""
from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys

import pytest

from ndot.cli import Parser, listed, logs_without, named, show_progress


def parser() -> Parser:
    p = Parser(prog="test")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--readout_trace", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--tau", type=float, default=2.0)
    return p


@pytest.mark.parametrize("argv, batch_size, readout_trace", [
    (["--batch_size", "8"], 8, None),
    (["--batch-size", "8"], 8, None),
    (["--batch-size=8"], 8, None),
    (["--readout-trace"], 1, True),
    (["--readout_trace"], 1, True),
    # argparse declares the off switch as --no-readout_trace: every spelling of it is the same flag.
    (["--no-readout-trace"], 1, False),
    (["--no_readout_trace"], 1, False),
    (["--no-readout_trace"], 1, False),
])
def test_dash_and_underscore_are_the_same_in_every_flag(argv, batch_size, readout_trace):
    args = parser().parse_args(argv)
    assert (args.batch_size, args.readout_trace) == (batch_size, readout_trace)


@pytest.mark.parametrize("value", ["-1e-3", "-0.1,0.3", "-.5", "-2"])
def test_a_value_that_starts_with_a_minus_is_taken_as_the_value_for_its_check_to_judge(value):
    p = parser()
    p.add_argument("--lr")
    assert p.parse_args(["--lr", value, "--tau", "-1.5"]).lr == value
    with pytest.raises(SystemExit):  # a flag is still a flag
        p.parse_args(["--lr", "--tau"])


@pytest.mark.parametrize("argv", [["--t", "4"], ["--batch", "8"], ["--no-readout"]])
def test_abbreviations_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unrecognized arguments" in err


def test_progress_lines_reach_stderr_once_each_and_not_stdout(capsys):
    show_progress()
    show_progress()  # every command calls it, and a process may run several (tests, a notebook)
    logging.getLogger("ndot.data.dvs").info("cifar10dvs: 10/100 recordings converted")
    logging.getLogger("ndot.data.dvs").debug("not shown")
    out, err = capsys.readouterr()
    assert out == "" and err == "cifar10dvs: 10/100 recordings converted\n"


def test_a_named_path_with_a_tilde_is_in_the_home_folder_and_a_uri_is_left_alone(tmp_path, monkeypatch):
    # ndot.evaluate --out=~/e.json and ndot.bench --out=~/b.jsonl: the shell expands no ~ after '='.
    monkeypatch.setenv("HOME", str(tmp_path))
    assert named("~/e.json") == str(tmp_path / "e.json")
    assert named("s3://bucket/~x") == "s3://bucket/~x"


def test_a_listed_value_given_twice_is_measured_once_in_the_order_given():
    assert listed(int)("8,4,8") == (8, 4)
    assert listed(str)("vgg11_ws,small_cnn,vgg11_ws") == ("vgg11_ws", "small_cnn")
    for bad in ("", "4,,8", "4,x"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated list of int"):
            listed(int)(bad)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_command_stopped_by_ctrl_c_or_sigterm_says_so_in_one_line(stop):
    # ndot.evaluate, ndot.bench, ndot.bench.data and the rest end through run(): a traceback of where the signal
    # landed (a DataLoader worker's queue, torch.compile), or at SIGTERM no word at all, was all a user saw.
    # The sleep is where the command works; the signal, sent before it, ends it at once.
    command = f"import os, time; from ndot.cli import run; run(lambda: os.kill(os.getpid(), {int(stop)}) or time.sleep(600))"
    done = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (128 + stop, f"interrupted ({stop.name})\n")


def test_a_log_filter_lasts_the_block_and_one_there_before_stays(caplog):
    # A sweep's filters of Ray's and Tune's notices outlived it: a notebook's later Tune runs lost them.
    def keep(record: logging.LogRecord) -> bool:
        return record.getMessage() != "noise"

    log = logging.getLogger("ndot.test_logs_without")
    with caplog.at_level(logging.INFO, logger=log.name):
        with logs_without(log.name, keep):
            log.info("noise")
        log.info("noise")
        assert [r.getMessage() for r in caplog.records] == ["noise"] and keep not in log.filters
        with pytest.raises(KeyboardInterrupt), logs_without(log.name, keep):  # a sweep stopped in a notebook
            raise KeyboardInterrupt
        assert keep not in log.filters
        log.addFilter(keep)
        with logs_without(log.name, keep):
            pass
        assert keep in log.filters
    log.removeFilter(keep)
