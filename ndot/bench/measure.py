"""One benchmark case: a matrix product (the device's ceiling), an ANN step (the network's) or an SNN training batch, timed on synthetic data."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ndot.fast import accelerate
from ndot.graphs import GraphedStep
from ndot.layers import LIF, Both, configure, reset_state
from ndot.memory import AllocationMeter, SavedTensorMeter
from ndot.models import ARCHS, build
from ndot.step import step_loss, train_batch

Row = dict[str, Any]
LOSS_ALPHA = 0.05
CHANNELS, CLASSES = 3, 10


@dataclass(frozen=True)
class Levers:
    channels_last: bool = False
    fused_neuron: bool = False
    fused_ws: bool = False
    cuda_graph: bool = False

    @classmethod
    def parse(cls, text: str) -> "Levers":
        """Parse "plain" or lever names joined by "+", e.g. "channels_last+fused_neuron"."""
        names = [] if text == "plain" else text.split("+")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(names) - fields
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown lever(s) {sorted(unknown)}; valid: plain or {'+'.join(sorted(fields))}")
        return cls(**{n: True for n in names})

    def __str__(self) -> str:
        """As `parse` reads it: "plain", or the levers on joined by "+"."""
        return "+".join(f.name for f in dataclasses.fields(self) if getattr(self, f.name)) or "plain"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def timed(run: Callable[[], object], device: torch.device, warmup: int, min_seconds: float,
          base: int = 0) -> tuple[float, float | None]:
    """Seconds per call of `run` after warm-up, and the CUDA peak MiB over the timed calls above `base` bytes."""
    for _ in range(warmup):
        run()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    # Enough calls to fill min_seconds, judged from one; a single sync at the end.
    n = max(3, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-9)))
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    sync(device)
    seconds = (time.perf_counter() - t0) / n
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def ann_twin(model: nn.Module) -> nn.Module:
    """The same network with every LIF replaced by a ReLU (in place).

    A plain ReLU, without the ×2.74 the spikes carry: that scale keeps sparse spike maps' variance
    near 1 and a ReLU network needs none, and as a second elementwise pass each way (the neuron
    emits it from its own kernel) it would make the ceiling a few per cent easier to reach.
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LIF):
                setattr(parent, name, Both(F.relu, "relu"))
    return model


def ann_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, *, precision: str) -> tuple[Tensor]:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        o = model(x)
    loss = step_loss(o, y, 1, LOSS_ALPHA)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (loss.detach(),)


@dataclass(frozen=True)
class Setup:
    device: torch.device
    arch: str
    batch: int
    warmup: int
    min_seconds: float


def synthetic_batch(s: Setup) -> tuple[Tensor, Tensor]:
    g = torch.Generator(device=s.device).manual_seed(0)
    size = ARCHS[s.arch].input_size
    x = torch.randn(s.batch, CHANNELS, size, size, device=s.device, generator=g)
    return x, torch.randint(0, CLASSES, (s.batch,), device=s.device, generator=g)


def fresh_model(s: Setup, levers: Levers) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same weights in every case, built from a seeded CPU generator that is then given back to the caller as it
    was: a benchmark run from Python (main(argv) in a notebook) leaves the process's random draws its own."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        net = build(s.arch, CHANNELS, CLASSES)
    model = accelerate(net.to(s.device),
                       channels_last=levers.channels_last, fused_neuron=levers.fused_neuron, fused_ws=levers.fused_ws)
    model.train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _runner(step: Callable, model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, graph: bool) -> Callable[[], object]:
    if graph:
        graphed = GraphedStep(step, model, opt)
        return lambda: graphed(x, y)
    return lambda: step(model, opt, x, y)


def _unless_graph(peak: float | None, levers: Levers) -> float | None:
    # A replay allocates nothing: the step's tensors live in the graph's private pool, allocated
    # during capture (in the warm-up, before the peak is reset) and free blocks of it since. The
    # same case without cuda_graph measures that memory.
    return None if levers.cuda_graph else peak


@functools.cache
def gflop_per_image_step(arch: str) -> float:
    """GFLOP of one image's forward and backward through the convolutions and readout of `arch`.

    Counted by torch's FlopCounterMode on the ANN twin, on the meta device (no data, no time). One
    SNN time step runs the same convolutions forward and backward under every rule (an online rule
    takes the weight gradient from the trace instead of the input), and its elementwise work has
    no matrix FLOPs: the figure serves the ANN step and each rule's image-step alike.
    """
    with torch.device("meta"):
        model = ann_twin(build(arch, CHANNELS, CLASSES))
        size = ARCHS[arch].input_size
        x, y = torch.empty(1, CHANNELS, size, size), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as count:
        step_loss(model(x), y, 1, LOSS_ALPHA).backward()
    return count.get_total_flops() / 1e9


def bench_matmul(s: Setup, precision: str, n: int) -> Row:
    """TFLOP/s of an n x n x n matrix product on random data: the device's own arithmetic ceiling.

    fp32 is timed in the math mode the convolutions use: TF32 where cuDNN has it on (PyTorch's
    CUDA default), which plain matrix products do not get by default.
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator(device=s.device).manual_seed(0)
    a, b = (torch.randn(n, n, device=s.device, generator=g).to(dtype) for _ in range(2))
    tf32 = s.device.type == "cuda" and precision == "fp32" and torch.backends.cudnn.allow_tf32
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        seconds, _ = timed(lambda: torch.mm(a, b), s.device, s.warmup, s.min_seconds)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return {"kind": "matmul", "precision": precision, "math": "tf32" if tf32 else precision, "n": n,
            "tflop_per_s": 2 * n**3 / seconds / 1e12}


def bench_ann(s: Setup, precision: str, levers: Levers) -> Row:
    base = allocated(s.device)
    model, opt = fresh_model(s, levers)
    step = functools.partial(ann_step, precision=precision)
    x, y = synthetic_batch(s)
    run = _runner(step, ann_twin(model), opt, x, y, levers.cuda_graph)
    seconds, peak = timed(run, s.device, s.warmup, s.min_seconds, base)
    return {"kind": "ann", "arch": s.arch, "batch": s.batch, "precision": precision, **dataclasses.asdict(levers),
            "images_per_s": s.batch / seconds, "step_ms": 1e3 * seconds, "peak_mem_mb": _unless_graph(peak, levers),
            "tflop_per_s": gflop_per_image_step(s.arch) * s.batch / seconds / 1e3}


def bench_snn(s: Setup, rule: str, mode: str, T: int, precision: str, levers: Levers) -> Row:
    # What earlier cases left allocated is not this case's memory.
    base = allocated(s.device)
    model, opt = fresh_model(s, levers)
    configure(model, rule)
    step = functools.partial(train_batch, rule=rule, mode=mode, T=T, loss_alpha=LOSS_ALPHA, precision=precision)
    x, y = synthetic_batch(s)
    seconds, peak = timed(_runner(step, model, opt, x, y, levers.cuda_graph), s.device, s.warmup, s.min_seconds, base)
    # One more batch, not replayed, for what it holds: the tensors autograd saves and everything it
    # allocates (after timing, so nothing compiles under the hooks), from no neuron state, so that it
    # frees nothing it did not allocate.
    reset_state(model)
    with SavedTensorMeter() as saved, AllocationMeter(s.device) as alloc:
        step(model, opt, x, y)
    return {"kind": "snn", "arch": s.arch, "rule": rule, "mode": mode, "T": T, "batch": s.batch,
            "precision": precision, **dataclasses.asdict(levers), "image_steps_per_s": s.batch * T / seconds,
            "tflop_per_s": gflop_per_image_step(s.arch) * s.batch * T / seconds / 1e3,
            "batch_ms": 1e3 * seconds, "peak_mem_mb": _unless_graph(peak, levers),
            "batch_peak_mb": alloc.peak / 2**20, "saved_mb": saved.peak / 2**20}


def env_row(device: torch.device) -> Row:
    row: Row = {"kind": "env", "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        row.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    return row
