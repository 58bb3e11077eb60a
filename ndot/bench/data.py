"""Data-path throughput, one JSON line per measurement.

    python -m ndot.bench.data            # CIFAR shape, 10,000 images; DVS fixture with 100k events per recording
    python -m ndot.bench.data --small    # a quick run on a small CPU
    python -m ndot.bench.data --only cifar   # no DVS part: needs neither tonic nor faery

CIFAR pipelines run on synthetic uint8 images in memory (no dataset needed):
the PIL pipeline in DataLoader workers and the device pipeline, each with and
without AutoAugment. DVS conversion runs on a generated 1,000-recording
CIFAR10-DVS fixture (faery needed), first building the frame cache, then
reading it back (from the page cache: the file was just written).
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ndot.bench.measure import sync
from ndot.cli import Parser, refuse, run, show_progress, threads, torch_threads
from ndot.config import MAX_T, MAX_WORKERS, ConfigError, TrainConfig
from ndot.data import cifar
from ndot.device import resolve_device


def _images_per_s(loader, device: torch.device) -> float:
    loader.set_epoch(0)
    sync(device)  # the warm-up batch's kernels, still queued on a GPU, are not this loop's time
    t0 = time.perf_counter()
    for _ in loader:
        pass
    sync(device)
    return loader.num_samples / (time.perf_counter() - t0)


def bench_cifar(n: int, workers: int, device: torch.device) -> None:
    rng = np.random.default_rng(0)
    split = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))
    for pipeline, where in (("cpu", torch.device("cpu")), ("device", device)):
        for autoaugment in (True, False):
            cfg = TrainConfig(dataset="cifar10", loader=pipeline, workers=workers, autoaugment=autoaugment)
            train, _ = cifar.build(cfg, where, split, split)
            if pipeline == "device":  # warm-up: kernels, AutoAugment tables
                train.set_epoch(-1)
                next(iter(train))
            print(json.dumps({
                "bench": f"cifar_{pipeline}_pipeline", "device": str(where),
                "workers": workers if pipeline == "cpu" else 0, "autoaugment": autoaugment,
                "torch_threads": torch.get_num_threads(), "images": n,
                "images_per_s": round(_images_per_s(train, where)),
            }), flush=True)


def bench_dvs(events: int, T: int, workers: int) -> None:
    # Here, not at the top: tonic and faery are needed by this part only.
    from ndot.data import dvs, fixtures

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fixtures.write_cifar10dvs(root, per_class=100, events=events)
        dataset = dvs.CIFAR10DVS(save_to=str(root), transform=dvs.EventFrames(T, 48, "counts"))
        train, test = dvs.split(dataset.data, dataset.targets)
        frames = len(dataset) * T
        for phase in ("convert", "cached"):
            t0 = time.perf_counter()
            data = dvs.frames(dataset, train, test, root / "cache", workers)
            data.train_x.clone(), data.test_x.clone()  # a cached load is memory-mapped: read it all
            seconds = time.perf_counter() - t0
            print(json.dumps({
                "bench": f"dvs_{phase}", "recordings": len(dataset), "events_per_recording": events, "T": T,
                "size": 48, "workers": workers if phase == "convert" else 0,
                "frames_per_s": round(frames / seconds), "seconds": round(seconds, 2),
            }), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m ndot.bench.data", description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="fewer images and events, for a small CPU")
    p.add_argument("--device", default="auto", help="where the device pipeline runs (default: the GPU if there is one)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, MAX_WORKERS), help="CPU pipeline and DVS conversion")
    p.add_argument("--T", type=int, default=10, help="DVS frames per recording")
    p.add_argument("--threads", type=threads, default=None, help="torch intra-op threads of this process")
    p.add_argument("--only", choices=("cifar", "dvs"), default=None, help="run one part (default: both)")
    args = p.parse_args(argv)
    show_progress()
    # All of them, whichever part runs: a bad value is a slip to report, not to ignore.
    for flag, value, most in (("--workers", args.workers, MAX_WORKERS), ("--T", args.T, MAX_T)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
        if value is not None and value > most:
            p.error(f"{flag} must be at most {most}, got {value}")
    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        return refuse(e)
    if args.only in (None, "dvs") and importlib.util.find_spec("faery") is None:
        # The recordings are written for the run, in the real format, with the test extra's writer.
        return refuse("the DVS part writes its recordings with faery, which is not installed: pip install faery "
                      "(in ndot's test extra), or run --only cifar")
    with torch_threads(args.threads):
        if args.only in (None, "cifar"):
            bench_cifar(2_048 if args.small else 10_000, args.workers, device)
        if args.only in (None, "dvs"):
            bench_dvs(5_000 if args.small else 100_000, args.T, args.workers)
    return 0


if __name__ == "__main__":
    run(main)
