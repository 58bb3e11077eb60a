"""Throughput and memory of online training, against an ANN step of the same network as the ceiling.

    python -m ndot.bench              # real size (GPU): vgg11_ws, batch 128, 3x32x32, T in {1,2,4,6,20}
    python -m ndot.bench --small      # small_cnn, batch 8: a CPU smoke run, about a minute on 2 cores, most of it torch.compile
    python -m ndot.bench --table FILE # the JSON lines of a run as Markdown tables (for docs/performance.md)

Synthetic data, created on the device once. One JSON object per line on stdout (and in --out):

- "env": what was measured on.
- "matmul": TFLOP/s of a large matrix product per precision, the device's own
  arithmetic ceiling; every "ann" and "snn" row carries its TFLOP/s beside it
  (the network's convolution FLOPs per image-step, counted by torch, times its rate).
- "ann": images/s of one forward + backward + SGD step of the same convs and
  weight standardisation with ReLU in place of LIF, under each lever that applies
  to it (channels_last, fused_ws, cuda_graph). One SNN time step does that conv
  work plus the neuron math, so the fastest ANN figure of a run is the
  per-time-step ceiling.
- "snn": image-steps/s of `train_batch` per arch x rule x mode x T x batch x
  precision x levers, with the ceiling and the ratio to it.
- "memory_vs_T": one per series over T: online rules should be flat from T = 1, BPTT linear.
- "targets": the throughput targets for one H200 (NDOT_A bf16 against the
  ceiling, NDOT_O against NDOT_A, NDOT_A fp32 image-steps/s), read off this run's rows.
- "profile" (--profile): where the time of an NDOT_A and an NDOT_O batch goes: convolutions,
  neuron forward (LIF, factor, trace) and its backward, the weight standardisation (forward and
  backward), the SGD step, everything else, and the ops that own the most of it.
- "error": a case that raised; the run goes on.

Memory (ndot.memory): `peak_mem_mb` is torch.cuda.max_memory_allocated over the timed
batches, less what earlier cases left allocated (so: model, optimiser state, input and
activations of this case), CUDA only and not under graph replay. `batch_peak_mb` is the
most that one batch allocates at once over what is allocated when it starts (neuron
state, saved tensors, gradients, temporaries), on every device: the figure the memory
check uses where there is no `peak_mem_mb`. `saved_mb` is the peak of the storage that tensors
autograd holds for backward during that batch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
from typing import Any, Callable, Iterable

import torch

from ndot.bench.measure import Levers, Row, Setup, bench_ann, bench_matmul, bench_snn, env_row
from ndot.bench.profile import profile_snn
from ndot.bench.report import memory_checks, table, targets
from ndot.cli import Parser, listed, named, refuse, show_progress, threads, torch_threads
from ndot.config import MAX_T, MODES, PRECISIONS, RULES, ConfigError, TrainConfig, parse_method
from ndot.device import resolve_device
from ndot.malloc import keep_freed_memory
from ndot.models import ARCHS

log = logging.getLogger(__name__)

# Every kind of row a run prints; --table refuses a file with any other line.
KINDS = ("env", "matmul", "ann", "snn", "memory_vs_T", "targets", "profile", "error")


def _rule_mode(text: str) -> tuple[str, str]:
    try:
        m = parse_method(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return m["rule"], m["mode"]


def _parser() -> argparse.ArgumentParser:
    # The summary, the sizes a run measures by default, and where its rows go: the docstring's first paragraphs.
    p = Parser(prog="python -m ndot.bench", description="\n\n".join(__doc__.split("\n\n")[:3]).rstrip(":") + ".",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small_cnn, batch 8, T 1,2,4: a CPU smoke run")
    p.add_argument("--device", default="auto", help="where to measure: auto (the GPU where there is one), cpu or cuda[:N] "
                                                    "(default: auto)")
    # The sweeps' spellings of these lists; --arch and --batch, this command's own before, still work.
    p.add_argument("--archs", "--arch", dest="arch", type=listed(str), default=None, metavar="ARCHS",
                   help=f"comma-separated architectures, of {', '.join(sorted(ARCHS))} or those --imports registers")
    p.add_argument("--imports", default="", metavar="MODULES",
                   help="comma-separated modules to import first, e.g. my_arch, which register architectures (ndot.models.register)")
    p.add_argument("--batch-size", "--batch", dest="batch", type=listed(int), default=None, metavar="SIZES",
                   help="comma-separated batch sizes; the per-lever runs, profiles and targets use the first")
    p.add_argument("--T", type=listed(int), default=None, help="comma-separated time steps")
    p.add_argument("--rules", type=listed(_rule_mode), default=None,
                   help=f"comma-separated RULE_MODE, e.g. ndot_A,bptt_A; RULE one of {', '.join(RULES)}, "
                        f"MODE one of {', '.join(MODES)}")
    p.add_argument("--precisions", type=listed(str), default=PRECISIONS,
                   help=f"comma-separated, of {','.join(PRECISIONS)} (default: {','.join(PRECISIONS)})")
    p.add_argument("--levers", type=Levers.parse, default=None,
                   help="levers of the rule x T grid: plain or e.g. channels_last+fused_neuron (default: those on CUDA, plain on CPU)")
    p.add_argument("--ablation-T", type=int, default=None,
                   help="T of the per-lever runs of ndot_A and ndot_O, 0 for none (default: 4; --small: 2)")
    p.add_argument("--profile", action="store_true", help="also profile NDOT_A and NDOT_O at the ablation T, plain and grid levers")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before each case (default: 3; --small: 1)")
    p.add_argument("--min-seconds", type=float, default=None, help="timed seconds per case, at least (default: 0.5; --small: 0.05)")
    p.add_argument("--threads", type=threads, default=None,
                   help="CPU threads for torch (default: torch's; --small: 1, as a smoke run on a shared machine "
                        "crawls when its threads wait on each other)")
    p.add_argument("--out", type=named, default=None, help="also append the JSON lines to this file")
    p.add_argument("--table", default=None, metavar="FILE", help="print the JSON lines in FILE as Markdown tables; measure nothing")
    return p


def plan(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Fill the defaults of the chosen size; every case the run will measure follows from this."""
    small = args.small
    cuda = device.type == "cuda"
    fast = Levers(channels_last=True, fused_neuron=True, fused_ws=True)
    ablation = [Levers(), Levers(channels_last=True), Levers(fused_neuron=True), Levers(fused_ws=True), fast]
    if cuda:
        # Graph replay with and without the compiled levers: it removes the launch cost they cut.
        ablation += [Levers(channels_last=True, fused_neuron=True), Levers(cuda_graph=True),
                     Levers(channels_last=True, fused_neuron=True, cuda_graph=True),
                     dataclasses.replace(fast, cuda_graph=True)]
    return {
        "imports": args.imports,
        "archs": args.arch or ["small_cnn" if small else "vgg11_ws"],
        "batches": args.batch or [8 if small else 128],
        "Ts": args.T or ([1, 2, 4] if small else [1, 2, 4, 6, 20]),
        "rules": args.rules or [("ndot", "A"), ("ndot", "O"), ("ottt", "A"), ("sltt", "A"), ("bptt", "A")],
        "precisions": args.precisions,
        "grid_levers": args.levers or (fast if cuda else Levers()),
        "ablation": ablation,
        "profile": args.profile,
        "ablation_T": args.ablation_T if args.ablation_T is not None else (2 if small else 4),
        # Every lever that applies to an ANN step, so that the ceiling is the fastest the same network
        # trains, not one the SNN's own levers outrun (fused_ws compiles the ANN's standardisation too).
        "ann_levers": [Levers(channels_last=c, fused_ws=w, cuda_graph=g) for c, w in ((False, False), (True, False), (True, True))
                       for g in ((False, True) if cuda else (False,))],
        # Large enough to fill a GPU (8192: the size of the H200 reading bench/NOTES.md compares with);
        # small on a CPU, where the product is timed at least three times after the warm-up.
        "matmul_n": 8192 if cuda else (512 if small else 2048),
        "warmup": args.warmup if args.warmup is not None else (1 if small else 3),
        "min_seconds": args.min_seconds if args.min_seconds is not None else (0.05 if small else 0.5),
        # None keeps torch's number of threads.
        "threads": args.threads if args.threads is not None else (1 if small else None),
    }


def lever_case(p: dict[str, Any]) -> Row:
    """Where the targets are read: the first architecture and batch, at the T of the per-lever runs
    and the profiles (4 where there are none). Recorded in the env row, for --table."""
    return {"lever_arch": p["archs"][0], "lever_batch": p["batches"][0], "lever_T": p["ablation_T"] or 4}


def check_plan(p: dict[str, Any], device: torch.device) -> None:
    """Raise ConfigError for the first case that cannot run, before anything is measured."""
    for arch in p["archs"]:
        for rule, mode in p["rules"]:
            for T in p["Ts"]:
                for batch in p["batches"]:
                    for precision in p["precisions"]:
                        TrainConfig(arch=arch, rule=rule, mode=mode, T=T, batch_size=batch, precision=precision,
                                    imports=p["imports"]).validate()
    if not 0 <= p["ablation_T"] <= MAX_T:
        raise ConfigError(f"--ablation-T must be in [0, {MAX_T}] (0: no per-lever runs), got {p['ablation_T']}")
    if p["grid_levers"].cuda_graph and device.type != "cuda":
        raise ConfigError(f"the cuda_graph lever replays CUDA graphs: it needs a CUDA device, not {device}")
    if p["warmup"] < 0:
        raise ConfigError(f"--warmup must be >= 0, got {p['warmup']}")
    # Written so that nan fails too; inf would ask for endless timed calls.
    if not (p["min_seconds"] > 0 and math.isfinite(p["min_seconds"])):
        raise ConfigError(f"--min-seconds must be a finite number > 0, got {p['min_seconds']}")


def cases(p: dict[str, Any], device: torch.device) -> Iterable[tuple[str, Setup, tuple]]:
    """Every case once, in the order that loses least if a device run is cut short: the device's and the
    network's ceilings, then per architecture the per-lever runs (at the first batch) the targets are read from,
    the profiles (a few batches each), the rule x T x batch grid."""
    setups = {(arch, batch): Setup(device, arch, batch, p["warmup"], p["min_seconds"]) for arch in p["archs"] for batch in p["batches"]}
    first = next(iter(setups.values()))
    for precision in p["precisions"]:
        yield "matmul", first, (precision, p["matmul_n"])
    for arch in p["archs"]:
        for batch in p["batches"]:
            for precision in p["precisions"]:
                for lv in p["ann_levers"]:
                    # Graph replay is measured where the spec's ceiling has it: bf16.
                    if not lv.cuda_graph or precision == "bf16":
                        yield "ann", setups[arch, batch], (precision, lv)
        s = setups[arch, p["batches"][0]]
        snn = [(rule, mode, p["ablation_T"], precision, lv) for precision in p["precisions"]
               for rule, mode in [("ndot", "A"), ("ndot", "O")] for lv in p["ablation"] if p["ablation_T"]]
        for case in dict.fromkeys(snn):
            yield "snn", s, case
        if p["profile"]:
            for precision in p["precisions"]:
                for mode in "AO":
                    for lv in dict.fromkeys([Levers(), p["grid_levers"]]):
                        yield "profile", s, ("ndot", mode, lever_case(p)["lever_T"], precision, lv)
        grid = [(rule, mode, T, precision, p["grid_levers"]) for precision in p["precisions"]
                for rule, mode in p["rules"] for T in p["Ts"]]
        for batch in p["batches"]:
            for case in dict.fromkeys(grid):
                if batch != p["batches"][0] or case not in snn:
                    yield "snn", setups[arch, batch], case


def describe(kind: str, s: Setup, case: tuple) -> str:
    """A case in words, e.g. "snn vgg11_ws batch 128: ndot_A T=4 bf16 channels_last+fused_neuron"."""
    if kind == "matmul":
        precision, n = case
        return f"matmul {n}x{n} {precision}"
    if kind == "ann":
        precision, lv = case
        return f"ann {s.arch} batch {s.batch}: {precision} {lv}"
    rule, mode, T, precision, lv = case
    return f"{kind} {s.arch} batch {s.batch}: {rule}_{mode} T={T} {precision} {lv}"


def read_run(path: str) -> list[Row]:
    """The rows of a run's JSON lines in `path`; ConfigError if it cannot be read or is not a run's output."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read --table {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--table {path} is not a text file") from None
    rows: list[Row] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and rows:
                break  # a run killed while writing its last row (a device's time limit)
            raise ConfigError(f"--table {path} line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or row.get("kind") not in KINDS:
            raise ConfigError(f"--table {path} line {n} is not a row of python -m ndot.bench "
                              f"(a JSON object whose kind is one of {', '.join(KINDS)})")
        if row["kind"] not in ("env", "matmul", "targets"):
            # A run from before a lever existed ran without it.
            row = {**dict.fromkeys(Levers.__dataclass_fields__, False), **row}
        rows.append(row)
    if not rows:
        raise ConfigError(f"--table {path} holds no rows")
    return rows


def print_table(rows: list[Row]) -> None:
    """Print a run's rows as Markdown tables, with the summaries it printed or, cut short, never reached."""
    if not any(r["kind"] == "targets" for r in rows):
        # A run cut short (a device's time limit) never printed its summaries: read them off the rows it kept.
        env = next((r for r in rows if r["kind"] == "env"), {})
        rows = [*rows, *memory_checks(rows), targets(rows, env)]
    print(table(rows))


def _open_out(path: str | None) -> contextlib.AbstractContextManager:
    """--out for appending; the half row a killed run left at its end is cut off, or this run's first row would join it."""
    if not path:
        return contextlib.nullcontext()
    try:
        with open(path, "a+b") as f:
            f.seek(0)
            kept = f.read()
            if kept and not kept.endswith(b"\n"):
                f.truncate(kept.rfind(b"\n") + 1)
        return open(path, "a")
    except OSError as e:
        raise ConfigError(f"cannot open --out {path}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    show_progress()
    if args.table is not None:
        # --table measures nothing: a flag of a measurement given with it (--out, say, where the tables
        # were meant to go) would be ignored without a word.
        ignored = ["--" + k.replace("_", "-") for k, v in vars(args).items() if k != "table" and v != parser.get_default(k)]
        if ignored:
            parser.error(f"--table prints a run's rows and measures nothing: {', '.join(ignored)} would be ignored")
    try:
        if args.table is not None:  # an empty path too: it must not start the full-size benchmark
            print_table(read_run(args.table))
            return 0
        device = resolve_device(args.device)
        p = plan(args, device)
        check_plan(p, device)
        # Opened before anything is measured, so that a path that cannot be written costs no run.
        opened = _open_out(args.out)
    except ConfigError as e:
        return refuse(e)
    # As in training (ndot.train): cuDNN times its algorithms once per shape, for the ceiling and the SNN alike;
    # on a CPU, malloc keeps what a step frees.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        keep_freed_memory()
    with torch_threads(p["threads"]), opened as out:
        def emit(row: Row) -> None:
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()

        rows = run_cases(p, device, emit)
        for check in memory_checks(rows):
            emit(check)
        emit(targets(rows, lever_case(p)))
    return 1 if any(r["kind"] == "error" for r in rows) else 0


def run_cases(p: dict[str, Any], device: torch.device, emit: Callable[[Row], None]) -> list[Row]:
    emit({**env_row(device), **lever_case(p)})
    rows: list[Row] = []
    ceiling: dict[tuple[str, int], float] = {}
    todo = list(cases(p, device))
    for n, (kind, s, case) in enumerate(todo, 1):
        # On stderr, before the case: a GPU run has some hundred, and one can compile for minutes.
        log.info(f"bench: {n}/{len(todo)} {describe(kind, s, case)}")
        try:
            if kind == "matmul":
                row = bench_matmul(s, *case)
            elif kind == "ann":
                row = bench_ann(s, *case)
                ceiling[(s.arch, s.batch)] = max(ceiling.get((s.arch, s.batch), 0.0), row["images_per_s"])
            elif kind == "profile":
                row = profile_snn(s, *case)
            else:
                row = bench_snn(s, *case)
                row["ceiling_images_per_s"] = ceiling.get((s.arch, s.batch))
                row["ratio_to_ceiling"] = row["image_steps_per_s"] / row["ceiling_images_per_s"] if row["ceiling_images_per_s"] else None
        except Exception as e:  # one failing case (an OOM, a capture error) must not lose the rest of a device run
            levers = [dataclasses.asdict(a) for a in case if isinstance(a, Levers)]
            row = {"kind": "error", "case": kind, "arch": s.arch, "batch": s.batch,
                   "args": [a for a in case if not isinstance(a, Levers)], **(levers[0] if levers else {}),
                   "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        emit(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
