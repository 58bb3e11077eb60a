"""Where the time of a training batch goes: convolutions, the neuron's forward and backward, the rest."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import torch
from torch.autograd import DeviceType

from ndot.bench.measure import LOSS_ALPHA, Levers, Row, Setup, fresh_model, sync, synthetic_batch
from ndot.layers import configure, neurons
from ndot.step import train_batch

# Autograd nodes of the neuron's backward: compiled, one node; eager, the surrogate (the x2.74 scale
# inside it for online rules) and the LIF's add (u), and for BPTT its subtraction (reset) and scale.
# The loss and weight standardisation add a few nodes of those names too, on tensors far smaller
# than a layer's activations.
_NEURON_BACKWARD = ("CompiledFunctionBackward", "SpikeFnBackward", "AddBackward0", "SubBackward0", "MulBackward0")
_EVALUATE = "autograd::engine::evaluate_function: "
# How many of the ops that own the most time a row names: what "other" holds is read off them.
TOP_OPS = 12


def _category(name: str) -> str | None:
    if name == "neuron":
        return "neuron_fwd"
    if name.startswith(_EVALUATE) and name[len(_EVALUATE):] in _NEURON_BACKWARD:
        return "neuron_bwd"
    return {"aten::convolution": "conv_fwd", "aten::convolution_backward": "conv_bwd"}.get(name)


def _labelled(fn: Callable) -> Callable:
    def run(*args, **kwargs):
        with torch.profiler.record_function("neuron"):
            return fn(*args, **kwargs)
    return run


def profile_snn(s: Setup, rule: str, mode: str, T: int, precision: str, levers: Levers, batches: int = 3) -> Row:
    """Time per batch by category: CPU op time on a CPU, CUDA kernel time on a GPU (no graph replay: it hides the ops);
    with the ops that own the most of it and, on a GPU, the kernels (and copies) a batch launches."""
    cuda = s.device.type == "cuda"
    model, opt = fresh_model(s, levers)
    configure(model, rule)
    for n in neurons(model):
        n.step_fn = _labelled(n.step_fn)
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
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    us = dict.fromkeys(("conv_fwd", "conv_bwd", "neuron_fwd", "neuron_bwd"), 0.0)
    for e in events:
        cat = _category(e.key)
        if cat:
            us[cat] += e.device_time_total if cuda else e.cpu_time_total
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
