"""The data-path benchmark: its small run completes and reports each pipeline; bad input is refused."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from helpers import HANG_S, exit_status
from ndot.bench import data


def test_small_run_reports_the_dvs_pipelines():
    # The CIFAR part runs in the dry run of bench/gpu_check.sh (test_gpu_check.py), as on the GPU machine.
    done = subprocess.run([sys.executable, "-m", "ndot.bench.data", "--small", "--only", "dvs", "--workers", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=HANG_S, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["bench"] for r in rows] == ["dvs_convert", "dvs_cached"]
    assert all(r["frames_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("argv, says", [
    (["--device", "cuda:7"], "cuda:7"),
    (["--T", "0"], "--T must be >= 1, got 0"),
    (["--T", "-3", "--only", "dvs"], "--T must be >= 1, got -3"),
    (["--T", "0", "--only", "cifar"], "--T must be >= 1, got 0"),
    (["--T", "2.5"], "invalid int value"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "10000"], "--workers must be at most 512, got 10000"),
    (["--threads", "0"], "--threads: must be a whole number in [1, "),
    (["--threads", "-2"], "--threads: must be a whole number in [1, "),
    (["--threads", "100000000"], "--threads: must be a whole number in [1, "),
    (["--threads", "1.5"], "got '1.5'"),
    (["--T", "1000000000", "--only", "dvs"], "--T must be at most 10000"),
    (["--device", "mps"], "device must be 'auto', 'cpu' or 'cuda[:N]'"),
])
def test_bad_input_is_one_line_before_measuring(argv, says, capsys):
    status = exit_status(data.main, ["--small", *argv])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and says in captured.err


def test_the_dvs_part_without_faery_is_one_line_before_measuring(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faery" else real(name, *a))
    assert exit_status(data.main, ["--small", "--only", "dvs"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "pip install faery" in captured.err


class Clock:
    """time.perf_counter for ndot.bench.data alone: each reading half a second after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.5
        return self.now


class Loader(list):
    num_samples = 1000

    def set_epoch(self, epoch):
        pass


def test_throughput_counts_images_not_batches(monkeypatch):
    monkeypatch.setattr(data, "time", Clock())
    # Four batches of a thousand images, read in half a second.
    assert data._images_per_s(Loader([None] * 4), torch.device("cpu")) == 2000


class Timeline(Clock):
    """The clock's readings and the device syncs, in the order they happen."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def perf_counter(self) -> float:
        self.events.append("clock")
        return super().perf_counter()

    def sync(self, device: torch.device) -> None:
        self.events.append("sync")


def test_the_throughput_clock_starts_once_the_device_has_done_earlier_work(monkeypatch):
    # bench_cifar's warm-up batch leaves its kernels queued on a GPU: unsynced, they ran in the timed loop.
    timeline = Timeline()
    monkeypatch.setattr(data, "time", timeline)
    monkeypatch.setattr(data, "sync", timeline.sync)
    data._images_per_s(Loader([None]), torch.device("cpu"))
    assert timeline.events == ["sync", "clock", "sync", "clock"]


@pytest.mark.usefixtures("one_torch_thread")
def test_dvs_frames_per_second_count_every_recording_of_both_splits(monkeypatch, capsys):
    pytest.importorskip("faery")
    monkeypatch.setattr(data, "time", Clock())
    data.bench_dvs(events=20, T=3, workers=0)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # 1,000 recordings (900 train, 100 test) of 3 frames each, in half a second per phase.
    assert [(r["recordings"], r["seconds"], r["frames_per_s"]) for r in rows] == [(1000, 0.5, 6000)] * 2
