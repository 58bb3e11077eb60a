"""Throughput and memory of online training, against an ANN step of the same network as the ceiling.

    python -m ndot.bench              # real size (GPU): vgg11_ws, batch 128, 3x32x32, T in {1,2,4,6,20}
    python -m ndot.bench --small      # small_cnn, batch 8: a CPU smoke run, well under a minute on 2 cores
    python -m ndot.bench --table FILE # the JSON lines of a run as Markdown tables (for the README)

Synthetic data, created on the device once. One JSON object per line on stdout (and in --out):

- "env": what was measured on.
- "ann": images/s of one forward + backward + SGD step of the same convs and
  weight standardisation with ReLU in place of LIF. One SNN time step does that
  conv work plus the neuron math, so the fastest ANN figure of a run is the
  per-time-step ceiling.
- "snn": image-steps/s of `train_batch` per arch x rule x mode x T x batch x
  precision x levers, with the ceiling and the ratio to it.
- "memory_vs_T": one per series over T: online rules should be flat, BPTT linear.
- "targets": the issue's throughput targets, read off this run's rows.
- "profile" (--profile): where the time of an NDOT_A batch goes: convolutions,
  neuron forward (LIF, factor, trace) and its backward, everything else.
- "error": a case that raised; the run goes on.

Memory: `peak_mem_mb` is torch.cuda.max_memory_allocated over the timed batches,
less what earlier cases left allocated (so: model, optimiser state, input and
activations of this case), CUDA only. `saved_mb` is the peak
of the tensors autograd holds for backward during one batch (ndot.memory), on
every device; it is the figure the memory check uses on a CPU, which keeps no
allocator peak.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import DeviceType

from ndot.cli import Parser, listed
from ndot.config import PRECISIONS, ConfigError, TrainConfig
from ndot.device import resolve_device
from ndot.fast import accelerate
from ndot.graphs import GraphedStep
from ndot.layers import LIF, Both, configure, neurons
from ndot.memory import SavedTensorMeter
from ndot.models import ARCHS, build
from ndot.step import step_loss, train_batch

Row = dict[str, Any]
LOSS_ALPHA = 0.05
CHANNELS, CLASSES = 3, 10


@dataclass(frozen=True)
class Levers:
    channels_last: bool = False
    fused_neuron: bool = False
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def timed(run: Callable[[], object], device: torch.device, warmup: int, min_seconds: float,
          base: int = 0) -> tuple[float, float | None]:
    """Seconds per call of `run` after warm-up, and the CUDA peak MB over the timed calls above `base` bytes."""
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
    """The same network with every LIF replaced by a ReLU times the LIF's output scale (in place)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LIF):
                c = child.out_scale
                setattr(parent, name, Both(lambda x, c=c: F.relu(x) * c, f"relu*{c}"))
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


def _data(s: Setup) -> tuple[Tensor, Tensor]:
    g = torch.Generator(device=s.device).manual_seed(0)
    size = ARCHS[s.arch].input_size
    x = torch.randn(s.batch, CHANNELS, size, size, device=s.device, generator=g)
    return x, torch.randint(0, CLASSES, (s.batch,), device=s.device, generator=g)


def _model(s: Setup, levers: Levers) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = accelerate(build(s.arch, CHANNELS, CLASSES).to(s.device),
                       channels_last=levers.channels_last, fused_neuron=levers.fused_neuron)
    model.train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _runner(step: Callable, model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, graph: bool) -> Callable[[], object]:
    if graph:
        graphed = GraphedStep(step, model, opt)
        return lambda: graphed(x, y)
    return lambda: step(model, opt, x, y)


def bench_ann(s: Setup, precision: str, levers: Levers) -> Row:
    base = allocated(s.device)
    model, opt = _model(s, levers)
    step = functools.partial(ann_step, precision=precision)
    x, y = _data(s)
    run = _runner(step, ann_twin(model), opt, x, y, levers.cuda_graph)
    seconds, peak = timed(run, s.device, s.warmup, s.min_seconds, base)
    return {"kind": "ann", "arch": s.arch, "batch": s.batch, "precision": precision, **dataclasses.asdict(levers),
            "images_per_s": s.batch / seconds, "step_ms": 1e3 * seconds, "peak_mem_mb": peak}


def bench_snn(s: Setup, rule: str, mode: str, T: int, precision: str, levers: Levers) -> Row:
    # What earlier cases left allocated is not this case's memory.
    base = allocated(s.device)
    model, opt = _model(s, levers)
    configure(model, rule)
    step = functools.partial(train_batch, rule=rule, mode=mode, T=T, loss_alpha=LOSS_ALPHA, precision=precision)
    x, y = _data(s)
    seconds, peak = timed(_runner(step, model, opt, x, y, levers.cuda_graph), s.device, s.warmup, s.min_seconds, base)
    # One more batch, eager, to count what autograd saves (after timing, so nothing compiles under the hooks).
    with SavedTensorMeter() as meter:
        step(model, opt, x, y)
    return {"kind": "snn", "arch": s.arch, "rule": rule, "mode": mode, "T": T, "batch": s.batch,
            "precision": precision, **dataclasses.asdict(levers), "image_steps_per_s": s.batch * T / seconds,
            "batch_ms": 1e3 * seconds, "peak_mem_mb": peak, "saved_mb": meter.peak / 2**20}


# Autograd nodes of the neuron's backward: the surrogate gradient, eager or compiled.
_NEURON_BACKWARD = ("SpikeFnBackward", "CompiledFunctionBackward")
_EVALUATE = "autograd::engine::evaluate_function: "


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
    """Time per batch by category: CPU op time on a CPU, CUDA kernel time on a GPU (no graph replay: it hides the ops)."""
    cuda = s.device.type == "cuda"
    model, opt = _model(s, levers)
    configure(model, rule)
    for n in neurons(model):
        n.step_fn = _labelled(n.step_fn)
    x, y = _data(s)
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
    return {"kind": "profile", "arch": s.arch, "rule": rule, "mode": mode, "T": T, "batch": s.batch,
            "precision": precision, **dataclasses.asdict(levers),
            "basis": "CUDA kernel time" if cuda else "CPU op time (wall clock for the total)",
            "batch_ms": wall_us / batches / 1e3, "ms_per_batch": {k: v / batches / 1e3 for k, v in us.items()},
            "fraction": {k: v / total for k, v in us.items()}, "neuron_over_conv": neuron / conv if conv else None}


def memory_checks(rows: list[Row], tolerance: float = 0.05) -> list[Row]:
    """Memory over T per series: online rules within `tolerance` of flat, BPTT linear (R² of a line fit)."""
    series: dict[tuple, list[Row]] = {}
    for r in rows:
        if r["kind"] == "snn":
            key = tuple(r[k] for k in ("arch", "batch", "rule", "mode", "precision", *Levers.__dataclass_fields__))
            series.setdefault(key, []).append(r)
    out = []
    for rs in series.values():
        if len({r["T"] for r in rs}) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["T"])
        metric = "peak_mem_mb" if rs[0]["peak_mem_mb"] is not None else "saved_mb"
        Ts, mem = [r["T"] for r in rs], [r[metric] for r in rs]
        check = {k: rs[0][k] for k in ("arch", "batch", "rule", "mode", "precision", *Levers.__dataclass_fields__)}
        check.update(kind="memory_vs_T", metric=metric, T=Ts, mb=mem, growth=mem[-1] / mem[0] - 1)
        if rs[0]["rule"] == "bptt":
            slope, r2 = _line_fit(Ts, mem)
            check.update(mb_per_step=slope, r2=r2, ok=slope > 0 and r2 >= 0.99)
        else:
            check.update(ok=max(mem) <= (1 + tolerance) * min(mem))
        out.append(check)
    return out


def _line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    ss_res = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def targets(rows: list[Row], T: int = 4) -> Row:
    """Issue 5's targets from this run: NDOT_A bf16 vs the ceiling, NDOT_O vs NDOT_A, fp32 throughput."""
    def best(rule: str, mode: str, precision: str) -> Row | None:
        rs = [r for r in rows if r["kind"] == "snn" and (r["rule"], r["mode"], r["precision"], r["T"]) == (rule, mode, precision, T)]
        return max(rs, key=lambda r: r["image_steps_per_s"], default=None)

    a16, o16, a32 = best("ndot", "A", "bf16"), best("ndot", "O", "bf16"), best("ndot", "A", "fp32")
    lever_keys = list(Levers.__dataclass_fields__)
    out: Row = {"kind": "targets", "T": T, "note": "issue 5 sets these for an H200; elsewhere they are only ratios to read"}
    if a16:
        out.update(ndot_A_bf16_ratio_to_ceiling=a16["ratio_to_ceiling"], ndot_A_bf16_levers={k: a16[k] for k in lever_keys},
                   ndot_A_bf16_ok=a16["ratio_to_ceiling"] >= 0.8)
    if a16 and o16:
        out.update(ndot_O_over_A_bf16=o16["image_steps_per_s"] / a16["image_steps_per_s"])
        out["ndot_O_ok"] = out["ndot_O_over_A_bf16"] >= 0.85
    if a32:
        out.update(ndot_A_fp32_image_steps_per_s=a32["image_steps_per_s"], ndot_A_fp32_ok=a32["image_steps_per_s"] >= 14_000)
    return out


def env_row(device: torch.device) -> Row:
    row: Row = {"kind": "env", "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        row.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    return row


def _levers_name(r: Row) -> str:
    return "+".join(k for k in Levers.__dataclass_fields__ if r[k]) or "plain"


def table(rows: list[Row]) -> str:
    """Markdown tables of a run: the ceiling, training throughput, memory over T, profiles, targets, errors."""
    out: list[str] = []

    def section(title: str, head: list[str], body: Iterable[list[Any]]) -> None:
        body = [["–" if v is None else f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 100 else f"{v:.3g}" if isinstance(v, float) else str(v)
                 for v in line] for line in body]
        if body:
            out.extend([f"\n{title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
            out.extend("| " + " | ".join(line) + " |" for line in body)

    env = next((r for r in rows if r["kind"] == "env"), {})
    out.append(" ".join(f"{k}={v}" for k, v in env.items() if k != "kind"))
    section("ANN step (the ceiling)", ["arch", "batch", "precision", "levers", "images/s", "peak MB"],
            ([r["arch"], r["batch"], r["precision"], _levers_name(r), r["images_per_s"], r["peak_mem_mb"]]
             for r in rows if r["kind"] == "ann"))
    section("Training", ["arch", "rule", "T", "batch", "precision", "levers", "image-steps/s", "x ceiling", "peak MB", "saved MB"],
            ([r["arch"], f"{r['rule']}_{r['mode']}", r["T"], r["batch"], r["precision"], _levers_name(r),
              r["image_steps_per_s"], r["ratio_to_ceiling"], r["peak_mem_mb"], r["saved_mb"]]
             for r in rows if r["kind"] == "snn"))
    section("Memory over T", ["rule", "precision", "levers", "metric", "T", "MB", "ok"],
            ([f"{r['rule']}_{r['mode']}", r["precision"], _levers_name(r), r["metric"], r["T"],
              [round(m, 1) for m in r["mb"]], r["ok"]] for r in rows if r["kind"] == "memory_vs_T"))
    section("Profile (fraction of the batch)", ["rule", "T", "precision", "levers", "batch ms", "conv fwd", "conv bwd",
                                                "neuron fwd", "neuron bwd", "other", "neuron / conv"],
            ([f"{r['rule']}_{r['mode']}", r["T"], r["precision"], _levers_name(r), r["batch_ms"],
              *r["fraction"].values(), r["neuron_over_conv"]] for r in rows if r["kind"] == "profile"))
    section("Targets", ["target", "value"], ([k, v] for r in rows if r["kind"] == "targets" for k, v in r.items() if k != "kind"))
    section("Errors", ["case", "args", "error"], ([r["case"], r["args"], r["error"]] for r in rows if r["kind"] == "error"))
    return "\n".join(out)


def _rule_mode(text: str) -> tuple[str, str]:
    rule, _, mode = text.rpartition("_")
    if not rule or mode not in ("A", "O"):
        raise argparse.ArgumentTypeError(f"expected RULE_MODE such as ndot_A, got {text!r}")
    return rule, mode


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ndot.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="small_cnn, batch 8, T 1,2,4: a CPU smoke run")
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", type=listed(str), default=None, help="comma-separated architectures")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--T", type=listed(int), default=None, help="comma-separated time steps")
    p.add_argument("--rules", type=listed(_rule_mode), default=None, help="comma-separated RULE_MODE, e.g. ndot_A,bptt_A")
    p.add_argument("--precisions", type=listed(str), default=PRECISIONS)
    p.add_argument("--levers", type=Levers.parse, default=None,
                   help="levers of the rule x T grid: plain or e.g. channels_last+fused_neuron (default: those on CUDA, plain on CPU)")
    p.add_argument("--ablation-T", type=int, default=None, help="T of the per-lever runs of ndot_A and ndot_O (0: none)")
    p.add_argument("--profile", action="store_true", help="also profile NDOT_A at the ablation T, plain and grid levers")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--min-seconds", type=float, default=None, help="timed seconds per case, at least")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; --small: 1, as a smoke run on a shared machine "
                        "crawls when its threads wait on each other)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--table", default=None, metavar="FILE", help="print the JSON lines in FILE as Markdown tables; measure nothing")
    return p


def plan(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Fill the defaults of the chosen size; every case the run will measure follows from this."""
    small = args.small
    cuda = device.type == "cuda"
    fast = Levers(channels_last=True, fused_neuron=True)
    ablation = [Levers(), Levers(channels_last=True), Levers(fused_neuron=True), fast]
    if cuda:
        ablation += [Levers(cuda_graph=True), Levers(True, True, True)]
    return {
        "archs": args.arch or ["small_cnn" if small else "vgg11_ws"],
        "batch": args.batch if args.batch is not None else (8 if small else 128),
        "Ts": args.T or ([1, 2, 4] if small else [1, 2, 4, 6, 20]),
        "rules": args.rules or [("ndot", "A"), ("ndot", "O"), ("ottt", "A"), ("sltt", "A"), ("bptt", "A")],
        "precisions": args.precisions,
        "grid_levers": args.levers or (fast if cuda else Levers()),
        "ablation": ablation,
        "profile": args.profile,
        "ablation_T": args.ablation_T if args.ablation_T is not None else (2 if small else 4),
        "ann_levers": [Levers(channels_last=c, cuda_graph=g) for c in (False, True) for g in ((False, True) if cuda else (False,))],
        "warmup": args.warmup if args.warmup is not None else (1 if small else 3),
        "min_seconds": args.min_seconds if args.min_seconds is not None else (0.05 if small else 0.5),
    }


def lever_T(p: dict[str, Any]) -> int:
    """The T of the per-lever runs, the targets read off them and the profiles."""
    return p["ablation_T"] or 4


def check_plan(p: dict[str, Any], device: torch.device) -> None:
    """Raise ConfigError for the first case that cannot run, before anything is measured."""
    for arch in p["archs"]:
        for rule, mode in p["rules"]:
            for T in p["Ts"]:
                for precision in p["precisions"]:
                    TrainConfig(arch=arch, rule=rule, mode=mode, T=T, batch_size=p["batch"], precision=precision).validate()
    if p["ablation_T"] < 0:
        raise ConfigError(f"--ablation-T must be >= 0 (0: no per-lever runs), got {p['ablation_T']}")
    if p["grid_levers"].cuda_graph and device.type != "cuda":
        raise ConfigError(f"the cuda_graph lever replays CUDA graphs: it needs a CUDA device, not {device}")
    if p["warmup"] < 0 or not p["min_seconds"] > 0:
        raise ConfigError("--warmup must be >= 0 and --min-seconds > 0")


def cases(p: dict[str, Any], device: torch.device) -> Iterable[tuple[str, Setup, tuple]]:
    """Every case once, in the order that loses least if a device run is cut short:
    the ceiling, the per-lever runs the targets are read from, the rule x T grid, the profiles."""
    for arch in p["archs"]:
        s = Setup(device, arch, p["batch"], p["warmup"], p["min_seconds"])
        for precision in p["precisions"]:
            for lv in p["ann_levers"]:
                # Graph replay is measured where the spec's ceiling has it: bf16.
                if not lv.cuda_graph or precision == "bf16":
                    yield "ann", s, (precision, lv)
        snn = [(rule, mode, p["ablation_T"], precision, lv) for precision in p["precisions"]
               for rule, mode in [("ndot", "A"), ("ndot", "O")] for lv in p["ablation"] if p["ablation_T"]]
        snn += [(rule, mode, T, precision, p["grid_levers"]) for precision in p["precisions"]
                for rule, mode in p["rules"] for T in p["Ts"]]
        for case in dict.fromkeys(snn):
            yield "snn", s, case
        if p["profile"]:
            for precision in p["precisions"]:
                for lv in dict.fromkeys([Levers(), p["grid_levers"]]):
                    yield "profile", s, ("ndot", "A", lever_T(p), precision, lv)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.table:
        with open(args.table) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not any(r["kind"] == "targets" for r in rows):
            # A run cut short (a device's time limit) never printed its summaries: read them off the rows it kept.
            env = next((r for r in rows if r["kind"] == "env"), {})
            rows += [*memory_checks(rows), targets(rows, env.get("lever_T", 4))]
        print(table(rows))
        return 0
    try:
        device = resolve_device(args.device)
        p = plan(args, device)
        check_plan(p, device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads or args.small:
        torch.set_num_threads(args.threads or 1)
    # As in training (ndot.train): cuDNN times its algorithms once per shape, for the ceiling and the SNN alike.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with open(args.out, "a") if args.out else contextlib.nullcontext() as out:
        def emit(row: Row) -> None:
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()

        rows = run_cases(p, device, emit)
        for check in memory_checks(rows):
            emit(check)
        emit(targets(rows, lever_T(p)))
    return 1 if any(r["kind"] == "error" for r in rows) else 0


def run_cases(p: dict[str, Any], device: torch.device, emit: Callable[[Row], None]) -> list[Row]:
    emit({**env_row(device), "lever_T": lever_T(p)})
    rows: list[Row] = []
    ceiling: dict[tuple[str, int], float] = {}
    for kind, s, case in cases(p, device):
        try:
            if kind == "ann":
                row = bench_ann(s, *case)
                ceiling[(s.arch, s.batch)] = max(ceiling.get((s.arch, s.batch), 0.0), row["images_per_s"])
            elif kind == "profile":
                row = profile_snn(s, *case)
            else:
                row = bench_snn(s, *case)
                row["ceiling_images_per_s"] = ceiling.get((s.arch, s.batch))
                row["ratio_to_ceiling"] = row["image_steps_per_s"] / row["ceiling_images_per_s"] if row["ceiling_images_per_s"] else None
        except Exception as e:  # one failing case (an OOM, a capture error) must not lose the rest of a device run
            row = {"kind": "error", "case": kind, "arch": s.arch, "batch": s.batch,
                   "args": list(case[:-1]), **dataclasses.asdict(case[-1]), "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        emit(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main())
