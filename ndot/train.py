"""Train one configuration: epochs of online training, per-epoch metrics, checkpoints.

    python -m ndot.train --dataset digits --arch small_cnn --rule ndot --mode A --T 4 --epochs 8

The library entry point is `train(cfg, on_epoch, resume, on_batch)`. It knows nothing of
Ray: a sweep passes a callback that reports the metrics and stores the state.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import numpy as np
import torch

from ndot import checkpoint, data, files
from ndot.cli import Pace, Parser, refuse, run, show_progress, sigterm_interrupts, stopped_by, threads, torch_threads
from ndot.config import (DVS_ENCODINGS, FIELD_HELP, LOADERS, MODES, PRECISIONS, RULES, ConfigError, TrainConfig,
                         check_data_flags, check_rule_flags, method, rule_flags_off)
from ndot.data import storage
from ndot.data.loader import worker_ended
from ndot.device import resolve_device
from ndot.evaluate import Metrics, evaluate, topk_correct
from ndot.fast import accelerate
from ndot.graphs import GraphedStep
from ndot.malloc import keep_freed_memory
from ndot.memory import out_of_memory, peak_mem_mb, reset_peak_mem
from ndot.models import ARCHS, finite, from_config
from ndot.step import train_batch

# What a callback returns is ignored: object, so that a lambda returning a value passes a type checker too.
OnEpoch = Callable[[Metrics, dict[str, Any]], object]
# on_batch(epoch, batches_done, batches_total): progress inside a long epoch, or its test pass (on_test_batch).
OnBatch = Callable[[int, int, int], object]


@dataclass
class TrainResult:
    status: str  # "completed" | "diverged"
    epochs_run: int
    metrics: Metrics
    best_test_acc: float
    # The trained network as its last epoch left it, on the run's device (the best epoch's weights are
    # in the state on_epoch got for it: ndot.evaluate.model_of builds its network).
    model: torch.nn.Module


def _rng_state(device: torch.device) -> dict[str, Any]:
    # Whole generator states, position and cached Gaussian included, as plain
    # lists and numbers (checkpoints load with weights_only). Of the GPUs, only the run's own:
    # restored by position, every visible GPU's would fail where a resume sees fewer, and give a
    # run moved from cuda:1 to cuda:0 another GPU's draws.
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": [keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# What a checkpoint's run must share with the run that continues it. The rest may change on
# resume: epochs (to extend a run), where and how it runs (device, levers, loader), the data's place, and
# the modules that register its architecture (moved, say: the weights are checked against the network).
_RESUMABLE_CHANGES = {"epochs", "device", "channels_last", "fused_neuron", "fused_ws", "cuda_graph",
                      "data_root", "download", "loader", "workers", "imports"}


def runnable_device(cfg: TrainConfig, root_origin: str | None = None) -> torch.device:
    """The device `cfg` trains on here; ConfigError or data.DataError when it cannot run on this machine
    (`root_origin`: what named the data root, where a checkpoint's config did; see data.check).

    Every check of a config is here, so that the command line refuses, before it touches the run
    folder, what train() would refuse after.
    """
    check_rule_flags(cfg.validate().to_dict(), [cfg.rule], [cfg.mode], [cfg.T], str)
    device = resolve_device(cfg.device)
    if cfg.cuda_graph and device.type != "cuda":
        raise ConfigError(f"cuda_graph needs a CUDA device; this run resolved to {device}")
    data.check(cfg, root_origin)
    return device


def epoch_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of `epoch` (1 to `epochs`): a cosine from base_lr towards zero, stepped per epoch.

    A closed form rather than a scheduler's saved state, so that a run extended on resume
    follows the cosine over its new length from the epoch it resumes at.
    """
    return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def _saved_run(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as a run of it holds it now: the settings that change nothing for its rule, mode
    or T (RULE_FLAGS, MODE_FLAGS, MULTISTEP_FLAGS) off, which train() refuses on. ndot before 7ea7bad saved them on
    where a sweep of several rules set them, so that its trials' checkpoints were of 'another run' to a resume."""
    return {**config, **rule_flags_off(config)}


def _to_this_cpu(cfg: TrainConfig, given: dict[str, Any]) -> str:
    """Where a run saved to train on a GPU is resumed on a machine with none: the flags that move it to the
    CPU, which a refusal names (the saved device, then cuda_graph, would each be refused in turn)."""
    if torch.cuda.is_available():
        return ""
    flags = [flag for flag, on in (("--device cpu", cfg.device.startswith("cuda") and "device" not in given),
                                   ("--no-cuda_graph", cfg.cuda_graph and "cuda_graph" not in given)) if on]
    return f": add {' '.join(flags)} to continue it on this machine's CPU" if flags else ""


def check_resume(cfg: TrainConfig, resume: dict[str, Any]) -> None:
    """Raise ConfigError when `resume` is a checkpoint of a different run than `cfg`."""
    saved = _saved_run(resume["config"])
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in cfg.to_dict().items()
               if k not in _RESUMABLE_CHANGES and k in saved and saved[k] != v]
    if changed:
        raise ConfigError(f"the checkpoint is of another run: {', '.join(changed)}")
    if cfg.epochs < resume["epoch"]:
        # The cosine schedule is over `epochs`: a shorter run is another run, not this one cut short.
        raise ConfigError(f"the checkpoint has run {resume['epoch']} epochs, more than epochs {cfg.epochs}")
    # Here, not where train() loads them after reading the data: another network's weights are refused before any work.
    info = data.info(cfg.dataset)
    checkpoint.check_weights(resume["model"], from_config(cfg, info.in_channels, info.num_classes).state_dict(),
                             f"{cfg.arch} for {cfg.dataset}")


def train(
    cfg: TrainConfig,
    on_epoch: OnEpoch | None = None,
    resume: dict[str, Any] | None = None,
    on_batch: OnBatch | None = None,
    on_test_batch: OnBatch | None = None,
) -> TrainResult:
    """Train `cfg` to its last epoch (or divergence), calling `on_epoch(metrics, state)` after every epoch.

    `state` is the checkpoint payload; passing it back as `resume` continues
    with the next epoch exactly as the uninterrupted run would have. `on_batch(epoch, i, n)` is called
    after batch i of the epoch's n, `on_test_batch(epoch, i, n)` after batch i of its test pass's n. Seeds the global torch, numpy and Python generators from cfg.seed,
    which the run draws from; on a GPU it turns on cuDNN's algorithm search for the process
    (torch.backends.cudnn.benchmark), on a CPU glibc's malloc keeps freed memory for reuse (ndot.malloc); the fused
    levers set Dynamo's recompile limit and float specialisation in the calling thread (ndot.fast.accelerate).
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train takes a TrainConfig, got {type(cfg).__name__}: TrainConfig.from_dict builds one from a dict")
    device = runnable_device(cfg)
    if resume is not None:
        check_resume(cfg, resume)
    # A run has a handful of conv shapes: let cuDNN time its algorithms once per shape.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    info = data.info(cfg.dataset)
    train_loader, test_loader = data.loaders(cfg, device)
    model = accelerate(from_config(cfg, info.in_channels, info.num_classes).to(device),
                       channels_last=cfg.channels_last, fused_neuron=cfg.fused_neuron, fused_ws=cfg.fused_ws)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step = functools.partial(train_batch, rule=cfg.rule, mode=cfg.mode, T=cfg.T,
                             loss_alpha=cfg.loss_alpha, weight_change=cfg.weight_change, precision=cfg.precision)
    run_batch = GraphedStep(step, model, opt) if cfg.cuda_graph else functools.partial(step, model, opt)

    start, best = 1, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        # A copy: torch's load_state_dict keeps the very tensors it is given where they already have the
        # parameters' device and dtype (on the CPU), and SGD then updates its momentum in place: the caller's
        # state would no longer be its epoch's, and a second resume from it (or its save) another run.
        opt.load_state_dict(checkpoint.on_cpu(resume["optimizer"]))
        _set_rng_state(resume["rng"], device)
        start, best = resume["epoch"] + 1, resume["best_test_acc"]
        if resume.get("status") == "diverged":
            # Its weights are not finite: the run ended there, and continuing cannot change that.
            return TrainResult("diverged", resume["epoch"], resume["metrics"], best, model)

    # A run resumed at its last epoch runs none: its result is that epoch's.
    metrics: Metrics = resume["metrics"] if resume is not None else {}
    for epoch in range(start, cfg.epochs + 1):
        reset_peak_mem(device)
        model.train()
        train_loader.set_epoch(epoch)
        lr = epoch_lr(cfg.lr, epoch, cfg.epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        # The samples seen, not the loader's num_samples: a dataset of the user's whose loader drops a
        # last partial batch would otherwise be scored over samples it never trained on.
        n = 0
        for i, (x, y) in enumerate(train_loader, 1):
            loss, logits = run_batch(x, y)
            loss_sum += loss * len(y)
            correct += topk_correct(logits, y, 1)
            n += len(y)
            if on_batch is not None:
                on_batch(epoch, i, len(train_loader))
        if not n:
            raise data.DataError(f"the {cfg.dataset} training loader yielded no batch in epoch {epoch}")
        train_loss = float(loss_sum) / n  # syncs the device
        seconds = time.perf_counter() - t0

        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": int(correct) / n,
            "lr": lr,
            "epoch_seconds": seconds,
            "image_steps_per_s": n * cfg.T / seconds,
        }
        if not math.isfinite(train_loss) or not finite(model):
            metrics.update(status="diverged", peak_mem_mb=peak_mem_mb(device), best_test_acc=best)
            _report_epoch(on_epoch, metrics, model, opt, epoch, best, cfg)
            return TrainResult("diverged", epoch, metrics, best, model)
        tested = None if on_test_batch is None else functools.partial(on_test_batch, epoch)
        metrics.update(evaluate(model, test_loader, cfg, info.num_classes, on_batch=tested))
        best = max(best, metrics["test_acc"])
        metrics.update(best_test_acc=best, peak_mem_mb=peak_mem_mb(device), status="ok")
        _report_epoch(on_epoch, metrics, model, opt, epoch, best, cfg)
    return TrainResult("completed", cfg.epochs, metrics, best, model)


def _report_epoch(on_epoch: OnEpoch | None, metrics: Metrics, model, opt, epoch: int, best: float, cfg: TrainConfig) -> None:
    if on_epoch is None:
        return
    state = {
        "format": checkpoint.FORMAT,
        "epoch": epoch,
        "status": metrics["status"],
        "metrics": metrics,
        "best_test_acc": best,
        # Copies: a state kept while training goes on (a list of them in a notebook) must stay its epoch's.
        "model": checkpoint.on_cpu(model.state_dict()),
        "optimizer": checkpoint.on_cpu(opt.state_dict()),
        "rng": _rng_state(next(model.parameters()).device),
        "config": cfg.to_dict(),
    }
    on_epoch(metrics, state)


# ----- command line -----

# The run folder when --out is not given; the names are TrainConfig's fields.
DEFAULT_OUT = "runs/{dataset}-{arch}-{rule}_{mode}-T{T}-seed{seed}"
LOG = "metrics.jsonl"
# What a run leaves in its folder; a fresh run refuses a folder holding any of them.
_RUN_FILES = (checkpoint.LAST, checkpoint.BEST, LOG)
# The file a run holds locked (files.claim) while it writes its folder. Two runs started into one --out at
# once both found it empty and each wrote there: metrics.jsonl held both runs' epochs interleaved, and
# checkpoint.pt and best.pt whichever wrote last; a --resume of a run still going did the same.
RUN_LOCK = "run.lock"
# What a resume reads of checkpoint.pt besides the weights and the config (see _report_epoch).
_RESUMED = ("epoch", "metrics", "best_test_acc", "optimizer", "rng")

_CHOICES = {"dataset": sorted(data.DATASETS), "arch": sorted(ARCHS), "rule": RULES, "mode": MODES,
            "precision": PRECISIONS, "loader": LOADERS, "dvs_encoding": DVS_ENCODINGS}


def _folder(text: str) -> Path:
    if not text.strip():
        # Path("") is ".": an empty --out (an unset shell variable) would put the run where it was typed.
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return Path(text).expanduser()  # the shell leaves ~ in --out=~/x


def _help(f: dataclasses.Field) -> str:
    text = FIELD_HELP.get(f.name, f.name)
    if f.name in _CHOICES:
        text += f"; one of {', '.join(_CHOICES[f.name])}"
    if f.name in ("dataset", "arch"):
        text += ", or one that a module of --imports registers"
    return text if f.default is None else f"{text} (default: {'none' if f.default == '' else f.default})"


def _prog() -> str:
    # The command as the user typed it: help and the resume line name the console script when it ran.
    return "ndot-train" if Path(sys.argv[0]).name == "ndot-train" else "python -m ndot.train"


def _parser() -> argparse.ArgumentParser:
    # No defaults in the namespace: it holds the flags given, which are all that override a checkpoint's config.
    p = Parser(prog=_prog(), argument_default=argparse.SUPPRESS,
               description="Train one spiking network online; its metrics, last state and best weights go to the run "
                           "folder --out. Each setting is a field of ndot.config.TrainConfig; --batch_size and "
                           "--batch-size are the same flag.")
    for f in dataclasses.fields(TrainConfig):
        flags = ["--" + f.name]
        if f.type == "bool":  # a string: `from __future__ import annotations` in ndot.config
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, help=_help(f))
        elif f.name == "data_root":
            p.add_argument(*flags, help=_help(f))
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(*flags, type=kind, help=_help(f))
    p.add_argument("--out", type=_folder, help=f"run folder: {LOG} (a line per epoch), {checkpoint.LAST} (the last "
                                            f"epoch) and {checkpoint.BEST} (the best epoch's weights) "
                                            f"(default: {DEFAULT_OUT})")
    p.add_argument("--threads", type=threads, help="torch's CPU threads (default: torch's); not part of the config: "
                                                 "give it again to --resume, as another count can move the results")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in OUT from its {checkpoint.LAST}, with the configuration saved there; "
                        "the flags given override it where a run may change (e.g. --epochs to extend it)")
    return p


def _prepare(given: dict[str, Any], out: Path, resume: bool,
             holding: contextlib.ExitStack) -> tuple[TrainConfig, torch.device, dict[str, Any] | None]:
    """The run's config, device and checkpoint to resume, or ConfigError (data.DataError) before the run
    writes anything but its lock and what mends the folder of a killed run it resumes (_mend).

    The folder is held (RUN_LOCK) in `holding` from before its files are looked at."""
    with _writing_in(out):  # a name longer than the filesystem takes fails even to be looked up
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder")
        if out.is_symlink() and not out.exists():
            # Else creating the folder fails as "File exists", naming neither the link nor its missing target.
            raise ConfigError(f"--out {out} is a link to {out.readlink()}, which does not exist: create it, or pass another --out")
    state = None
    if resume:
        ckpt_path = out / checkpoint.LAST
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume given but {ckpt_path} does not exist")
        _hold(out, holding, "resume it once that run has ended")
        state = checkpoint.read(str(ckpt_path))
        missing = [k for k in _RESUMED if k not in state]
        if missing and "scheduler" in state:
            raise ConfigError(f"{ckpt_path} is of an older ndot, whose checkpoints held a learning-rate scheduler's state and "
                              "no metrics: continue the run with the version that wrote it")
        if missing:  # e.g. best.pt copied over it: weights without the run's state
            raise ConfigError(f"{ckpt_path} holds no {', '.join(missing)}: not the {checkpoint.LAST} of a run to resume")
        # Before any refusal: a run that stopped at its last epoch is only ever resumed to be refused.
        with _writing_in(out):
            _mend(out, state)
        cfg = TrainConfig.from_record({**_saved_run(state["config"]), **given})
        # Most of the config came from the checkpoint, not from the command line: a refusal says so.
        try:
            # Another run's flags are named as such before its data is looked for.
            check_resume(cfg.validate(), state)
        except ConfigError as e:
            raise ConfigError(f"{e} (resuming {ckpt_path})") from None
        # $NDOT_DATA does not move the data root a checkpoint saved: a refusal names what does.
        saved_root = cfg.data_root is not None and "data_root" not in given
        try:
            device = runnable_device(cfg, storage.saved_root_origin(str(ckpt_path)) if saved_root else None)
        except ConfigError as e:
            raise ConfigError(f"{e} (resuming {ckpt_path}){_to_this_cpu(cfg, given)}") from None
        check_data_flags(given, cfg.dataset, lambda name: f"--{name}")
        if state["epoch"] == cfg.epochs and state.get("status") != "diverged":
            raise ConfigError(f"the run in {out} has done its {cfg.epochs} epochs: --epochs N (more) extends it")
    else:
        cfg = TrainConfig(**given)
        check_rule_flags(given, [cfg.validate().rule], [cfg.mode], [cfg.T], lambda name: f"--{name}")
        check_data_flags(given, cfg.dataset, lambda name: f"--{name}")
        device = runnable_device(cfg)
        if not (out / RUN_LOCK).exists():
            # No run writes there (it would hold the lock): refused before the lock's file is left in another
            # run's folder. Else once held, where a run still writing is named.
            _refuse_a_run_in(out)
        _hold(out, holding, "wait for it to end, or pass another --out")
        _refuse_a_run_in(out)
    with _writing_in(out):
        files.check_writable(str(out))
    return cfg, device, state


def _refuse_a_run_in(out: Path) -> None:
    """ConfigError where `out` holds a run's files: a fresh run would overwrite them, that run's results."""
    held = [name for name in _RUN_FILES if (out / name).exists()]
    if held:
        then = "--resume to continue it" if checkpoint.LAST in held else "remove them to start afresh"
        raise ConfigError(f"{out} holds a run already ({', '.join(held)}): {then}, or another --out")


def _hold(out: Path, holding: contextlib.ExitStack, then: str) -> None:
    """Lock the run folder `out` (created) for this process until `holding` closes; ConfigError where another run holds it."""
    with _writing_in(out):
        try:
            holding.enter_context(files.claim(out / RUN_LOCK))
        except files.Held as e:
            raise ConfigError(f"another run is writing in --out {out} ({e}): {then}") from None


@contextlib.contextmanager
def _writing_in(out: Path) -> Iterator[None]:
    """An OSError inside the block becomes the ConfigError of an --out that cannot be written."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"cannot write in --out {out}: {str(e).splitlines()[0]}") from None


class _NotSaved(Exception):
    """An epoch's files could not be written in --out: the run ends in one line, its saved epochs standing."""


def _log_line(metrics: Metrics) -> str:
    """An epoch's line of LOG, JSON as RFC 8259 has it: a number that is not finite (a diverged epoch's loss) is null.

    json.dumps writes it as a bare NaN or Infinity, which jq 1.6, JavaScript's JSON.parse and strict parsers refuse.
    """
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()},
                      allow_nan=False) + "\n"


def _mend(out: Path, state: dict[str, Any]) -> None:
    """Make the folder of a run killed at any moment agree with its checkpoint, before it resumes.

    The log then holds each epoch up to the checkpoint's once, the checkpoint's last: a run killed
    after an epoch's line but before its checkpoint redoes that epoch, one killed in mid-line left
    half a line, and the checkpoint's own metrics stand in for a line that is missing. best.pt
    holds the checkpoint's weights when its epoch is the best, as a run killed between the two
    files did not get to write (and as a run already at its last epoch would never write again).
    """
    log_path, best_path = out / LOG, out / checkpoint.BEST
    logged = log_path.read_text() if log_path.is_file() else ""
    rows: dict[int, Metrics] = {}
    for line in logged.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["epoch"] < state["epoch"]:
            rows[row["epoch"]] = row
    rows[state["epoch"]] = state["metrics"]
    text = "".join(_log_line(rows[k]) for k in sorted(rows))
    if logged != text:
        files.write_local(log_path, lambda f: f.write(text.encode()))
    if checkpoint.is_best(state["metrics"]) and not (
            best_path.is_file() and checkpoint.read(str(best_path))["epoch"] == state["epoch"]):
        checkpoint.save(best_path, checkpoint.best_of(state))


def _saved_epoch(ckpt_path: Path) -> int:
    """The epoch a resume continues from, 0 where none was saved: the checkpoint's own, as a signal can land
    after its rename and before the rest of the epoch's files (best.pt) or anything that counts them."""
    return checkpoint.load(ckpt_path)["epoch"] if ckpt_path.is_file() else 0


def main(argv: list[str] | None = None) -> int:
    given = vars(_parser().parse_args(argv))
    show_progress()
    n_threads = given.pop("threads", None)
    with torch_threads(n_threads):
        return _run(given, n_threads)


def _run(given: dict[str, Any], n_threads: int | None) -> int:
    out, resume = given.pop("out", None), given.pop("resume", False)
    # With --resume the config is in the folder: its name can only come from the flags given.
    out = out or Path(DEFAULT_OUT.format(**{**TrainConfig().to_dict(), **given}))
    with contextlib.ExitStack() as holding:
        try:
            cfg, device, state = _prepare(given, out, resume, holding)
        except (ConfigError, data.DataError) as e:
            return refuse(e)
        return _train_held(cfg, device, state, out, n_threads)


def _train_held(cfg: TrainConfig, device: torch.device, state: dict[str, Any] | None, out: Path,
                n_threads: int | None) -> int:
    """Train the run of a checked command line into `out`, which this process holds, and say how it ended."""
    ckpt_path, best_path, log_path = out / checkpoint.LAST, out / checkpoint.BEST, out / LOG
    pace = Pace()

    def on_epoch(m: Metrics, st: dict[str, Any]) -> None:
        # In the order _mend repairs from: a run killed after the log's line redoes the epoch, and
        # one killed after checkpoint.pt has there the weights best.pt then lacks.
        try:
            with open(log_path, "a") as f:
                f.write(_log_line(m))
            checkpoint.save(ckpt_path, st)
            if checkpoint.is_best(m):
                checkpoint.save(best_path, checkpoint.best_of(st))
        except OSError as e:
            # A full disk, say. Each file lands whole or not at all: the folder holds the epochs saved
            # before this one, which a resume continues from (_mend drops this epoch's line).
            raise _NotSaved(f"cannot write in --out {out}: {str(e).splitlines()[0]}") from None
        top5 = f" top5 {m['test_top5']:.3f}" if "test_top5" in m else ""
        test = f"test {m['test_acc']:.4f}{top5} (best {m['best_test_acc']:.4f}) " if m["status"] == "ok" else "DIVERGED "
        print(
            f"epoch {m['epoch']:3d}/{cfg.epochs}  loss {m['train_loss']:.4f}  train {m['train_acc']:.4f}  {test}"
            f"{m['epoch_seconds']:.1f}s  {m['image_steps_per_s']:.0f} img-steps/s",
            flush=True,
        )
        pace.printed()

    def on_batch(epoch: int, done: int, total: int, what: str = "batch") -> None:
        # The last batch has no line: the epoch's line, or the test pass's first, follows it.
        if done < total and pace.due():
            print(f"epoch {epoch:3d}/{cfg.epochs}  {what} {done}/{total}", flush=True)

    print(f"{method(cfg.rule, cfg.mode)} T={cfg.T} {cfg.arch} on {cfg.dataset} ({device}) -> {out}", flush=True)
    try:
        with sigterm_interrupts():
            result = train(cfg, on_epoch, state, on_batch, functools.partial(on_batch, what="test batch"))
    except data.DataError as e:  # found only in reading the data (a CIFAR10-DVS recording cut short)
        return refuse(e)
    except torch.OutOfMemoryError as e:
        # A batch too large for the GPU (BPTT's memory grows with T too): the words that matter, not a traceback.
        return _ended_early(cfg, out, n_threads, out_of_memory(e, device, cfg.batch_size, cfg.T),
                            "where the memory was another process's")
    except RuntimeError as e:
        ended = worker_ended(e)
        if ended is None:
            raise
        return _ended_early(cfg, out, n_threads, ended, "with fewer --workers, where memory ran out")
    except _NotSaved as e:
        return _ended_early(cfg, out, n_threads, str(e), "once it can be written")
    except KeyboardInterrupt as e:
        return _ended_early(cfg, out, n_threads, e)
    print(f"{result.status}: best test accuracy {result.best_test_acc:.4f}")
    return 0 if result.status == "completed" else 3


def _ended_early(cfg: TrainConfig, out: Path, n_threads: int | None, why: str | KeyboardInterrupt, when: str = "") -> int:
    """Say in one line why a run ended early (an error's words, or the interrupt) and how it stands: its last saved
    epoch and the command that continues it, `when` it can; its exit status."""
    ckpt_path, log_path = out / checkpoint.LAST, out / LOG
    # Every finished epoch is saved; the one cut short is run again by a resume.
    saved = _saved_epoch(ckpt_path)
    if not saved:
        # The first epoch's line without its checkpoint: a fresh run would refuse the folder for it.
        log_path.unlink(missing_ok=True)
    # --threads is not saved with the run, and another count can move its results.
    same_threads = f" --threads {n_threads}" if n_threads is not None else ""
    again = (f"continue with {_prog()} --out {shlex.quote(str(out))} --resume{same_threads}"
             if saved else "no epoch finished: start it again")
    if isinstance(why, str):
        kept = f"epoch {saved} of {cfg.epochs} is the last saved: {when}, {again}" if saved else \
            f"no epoch was saved: {when}, start it again"
        print(f"error: {why}; {kept}", file=sys.stderr, flush=True)
        return 1
    print(f"interrupted after epoch {saved} of {cfg.epochs}: {again}", file=sys.stderr, flush=True)
    return 128 + stopped_by(why)


def cli() -> NoReturn:
    """The ndot-train console script: main() as `python -m ndot.train` runs it (a closed stdout ends it quietly)."""
    run(main)


if __name__ == "__main__":
    cli()
