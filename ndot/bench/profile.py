"""Where the time of a training batch goes: convolutions, the neuron, the weight standardisation, SGD, the rest."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterable

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from ndot.bench.measure import LOSS_ALPHA, Levers, Row, Setup, fresh_model, sync, synthetic_batch
from ndot.layers import WSConv2d, configure, neurons
from ndot.step import train_batch

_EVALUATE = "autograd::engine::evaluate_function: "
# The labelled regions of the forward: the neuron's step and the standardisation (eager or compiled alike).
REGIONS = {"neuron": ("neuron_fwd", "neuron_bwd"), "standardise": ("standardise", "standardise")}
CATEGORIES = ("conv_fwd", "conv_bwd", "neuron_fwd", "neuron_bwd", "standardise", "sgd")
# How many of the ops that own the most time a row names: what "other" holds is read off them.
TOP_OPS = 12


def _labelled(fn: Callable, label: str) -> Callable:
    def run(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return run


def _ancestors(e: FunctionEvent | None) -> Iterable[FunctionEvent]:
    while e is not None:
        yield e
        e = e.cpu_parent


def backward_regions(events: Iterable[FunctionEvent]) -> dict[int, str]:
    """The labelled region (REGIONS) of the forward op that created each autograd node, by its sequence number.

    An op records the sequence number the next node will get, whether it creates one or not: of the
    forward ops that record a number, the last in time is the one that created that node. A backward
    node's evaluation records the same number, which ties it to its forward op, eager or compiled.
    """
    forward = [e for e in events if e.device_type == DeviceType.CPU and e.sequence_nr >= 0
               and not any(a.name.startswith(_EVALUATE) for a in _ancestors(e))]
    regions = {}
    for e in sorted(forward, key=lambda e: e.time_range.start):
        regions[e.sequence_nr] = next((a.name for a in _ancestors(e) if a.name in REGIONS), None)
    return {n: r for n, r in regions.items() if r}


def _category(e: FunctionEvent, regions: dict[int, str]) -> str | None:
    if e.name in REGIONS:
        return REGIONS[e.name][0]
    if e.name.startswith(_EVALUATE) and e.sequence_nr in regions:
        return REGIONS[regions[e.sequence_nr]][1]
    if e.name.startswith("Optimizer.step#"):
        return "sgd"
    return {"aten::convolution": "conv_fwd", "aten::convolution_backward": "conv_bwd"}.get(e.name)


def labelled_model(s: Setup, levers: Levers, rule: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`fresh_model` with each neuron step and standardisation in a profiler region of its name (REGIONS)."""
    model, opt = fresh_model(s, levers)
    configure(model, rule)
    for n in neurons(model):
        n.step_fn = _labelled(n.step_fn, "neuron")
    for m in model.modules():
        if isinstance(m, WSConv2d):
            m.standardise_fn = _labelled(m.standardise_fn, "standardise")
    return model, opt


def profile_snn(s: Setup, rule: str, mode: str, T: int, precision: str, levers: Levers, batches: int = 3) -> Row:
    """Time per batch by category (CATEGORIES, and "other": the loss, pooling, casts, gradient accumulation):
    CPU op time on a CPU, CUDA kernel time on a GPU (no graph replay: it hides the ops); with the ops that own
    the most of it and, on a GPU, the kernels (and copies) a batch launches."""
    cuda = s.device.type == "cuda"
    model, opt = labelled_model(s, levers, rule)
    x, y = synthetic_batch(s)
    run = functools.partial(train_batch, model, opt, x, y, rule=rule, mode=mode, T=T, loss_alpha=LOSS_ALPHA, precision=precision)
    for _ in range(s.warmup + 1):
        run()
    sync(s.device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(batches):
            run()
        sync(s.device)
        wall_us = 1e6 * (time.perf_counter() - t0)
    # CPU-side events carry the kernels they launched; GPU-side copies of annotations would count them twice.
    timeline = prof.events()
    regions = backward_regions(timeline)
    us = dict.fromkeys(CATEGORIES, 0.0)

    def add(e: FunctionEvent) -> None:
        cat = _category(e, regions)
        if cat is None:
            for child in e.cpu_children:
                add(child)
        else:  # all of its time, its children's too: none of them is counted again
            us[cat] += e.device_time_total if cuda else e.cpu_time_total

    for e in timeline:
        if e.device_type == DeviceType.CPU and e.cpu_parent is None:
            add(e)
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    total = sum(e.self_device_time_total for e in events) if cuda else wall_us
    us["other"] = total - sum(us.values())
    conv, neuron = us["conv_fwd"] + us["conv_bwd"], us["neuron_fwd"] + us["neuron_bwd"]
    # Each op's own time (its kernels, not its children's): under graph replay a batch costs about
    # the sum of its kernels, many of which are too short for anything but their launch to count.
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    top = [{"op": e.key, "ms_per_batch": own(e) / batches / 1e3, "calls_per_batch": e.count / batches}
           for e in sorted(events, key=own, reverse=True)[:TOP_OPS] if own(e) > 0]
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == DeviceType.CUDA) / batches if cuda else None
    return {"kind": "profile", "arch": s.arch, "rule": rule, "mode": mode, "T": T, "batch": s.batch,
            "precision": precision, **dataclasses.asdict(levers),
            "basis": "CUDA kernel time" if cuda else "CPU op time (wall clock for the total)",
            "batch_ms": wall_us / batches / 1e3, "ms_per_batch": {k: v / batches / 1e3 for k, v in us.items()},
            "fraction": {k: v / total for k, v in us.items()}, "neuron_over_conv": neuron / conv if conv else None,
            "kernels_per_batch": kernels, "top_ops": top}
