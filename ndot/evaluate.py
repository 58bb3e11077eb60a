"""Test-set evaluation: the trainer's per-epoch metrics, and a command line for saved weights.

    python -m ndot.evaluate runs/NAME                        # best.pt there (the best epoch's weights)
    python -m ndot.evaluate runs/NAME/checkpoint.pt --T 8    # the last epoch's weights, run for 8 steps
    python -m ndot.evaluate runs/sweeps/NAME/CHECKPOINT      # a sweep trial's best weights (trials.parquet names it)
    python -m ndot.evaluate s3://BUCKET/PREFIX/NAME/CHECKPOINT   # the same where the sweep stored it

Besides top-1 (top-5 with more than 10 classes) the command reports the
accuracy after each time step, argmax of Σ_{t' ≤ t} o[t'] (how early the
network decides), and the firing rate of each spiking layer; it writes them as
JSON beside the weights, a sweep trial's in the trial's folder (or to --out).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import pyarrow.fs as pafs
import torch

from ndot import checkpoint, data, files
from ndot.cli import Pace, Parser, named, refuse, run, show_progress, threads, torch_threads
from ndot.config import PRECISIONS, ConfigError, TrainConfig, method
from ndot.data import storage
from ndot.data.loader import Loader, worker_ended
from ndot.device import resolve_device
from ndot.layers import clear_spike_counts, firing_rate, layer_firing_rates
from ndot.malloc import keep_freed_memory
from ndot.memory import out_of_memory
from ndot.models import finite, from_config
from ndot.step import eval_batch

Metrics = dict[str, Any]


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    return (logits.topk(k, dim=-1).indices == y[..., None]).any(dim=-1).sum(dim=-1)


def evaluate(model: torch.nn.Module, loader: Loader, cfg: TrainConfig, num_classes: int, detail: bool = False,
             on_batch: Callable[[int, int], object] | None = None) -> Metrics:
    """Test loss, top-1 (top-5 with more than 10 classes) and mean firing rate of `model` over `loader`, T = cfg.T.

    `detail` adds `acc_by_step` (top-1 of the logits summed up to each step) and
    `layer_firing_rates` (per spiking layer, by module name). `on_batch(i, n)` is called after batch i of n.
    The model is left in evaluation mode, as eval_batch leaves it (ndot.step.train_batch sets training mode again).
    """
    clear_spike_counts(model)  # what earlier evaluation calls counted is not this set's
    device = next(model.parameters()).device
    loss = torch.zeros((), device=device)
    top1 = torch.zeros(cfg.T, device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    n = 0  # the samples seen (a user's loader may drop a partial batch that its num_samples counts)
    for i, (x, y) in enumerate(loader, 1):
        l, o = eval_batch(model, x, y, T=cfg.T, loss_alpha=cfg.loss_alpha, precision=cfg.precision)
        loss += l * len(y)
        summed = o.cumsum(0) if detail else o.sum(0, keepdim=True)
        top1[-len(summed):] += topk_correct(summed, y, 1)
        if num_classes > 10:
            top5 += topk_correct(summed[-1], y, 5)
        n += len(y)
        if on_batch is not None:
            on_batch(i, len(loader))
    if not n:
        raise data.DataError(f"the {cfg.dataset} test loader yielded no batch")
    out: Metrics = {"test_loss": float(loss) / n, "test_acc": int(top1[-1]) / n}
    if num_classes > 10:
        out["test_top5"] = int(top5) / n
    if detail:
        out.update(acc_by_step=[int(c) / n for c in top1], layer_firing_rates=layer_firing_rates(model))
    out["firing_rate"] = firing_rate(model)
    return out


def weights_file(path: str | os.PathLike) -> str:
    """The file to evaluate: `path` itself, or the best epoch's weights in the folder `path`.

    In a run folder that is best.pt, else (a run that diverged in its first epoch) the last epoch's
    checkpoint.pt, else a state.pt. A sweep trial's folder stands for its
    newest checkpoint. In a sweep trial's checkpoint it is
    the file its history names (checkpoint.weights_of): state.pt when its epoch
    was the best so far, and then a best.pt left by an earlier attempt at the same
    checkpoint (Tune writes a re-run epoch's checkpoint into the same folder) is ignored.
    `path` is local or a URI (s3://...).
    """
    path = str(path)
    kind = files.kind(path)
    if kind == pafs.FileType.Directory:
        folder = path.rstrip("/")
        fs, fs_folder = files.filesystem(folder)
        newest, _ = checkpoint.newest(fs, fs_folder)
        if newest is not None:  # a sweep trial's folder: its newest checkpoint
            folder, fs_folder = f"{folder}/{newest.rpartition('/')[2]}", newest
        names = [checkpoint.BEST, checkpoint.LAST, checkpoint.TRIAL]
        if files.kind(f"{folder}/{checkpoint.HISTORY}") == pafs.FileType.File:
            names = [checkpoint.weights_of(checkpoint.read_history(fs, fs_folder))]
        for name in names:
            if files.kind(f"{folder}/{name}") == pafs.FileType.File:
                return f"{folder}/{name}"
        raise ConfigError(f"{folder} holds none of {', '.join(names)}: name a run folder of python -m ndot.train, "
                          "a sweep trial's folder or one of its checkpoints")
    if kind != pafs.FileType.File:
        raise ConfigError(f"{path} does not exist")
    return path


def model_of(state: dict[str, Any], cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """cfg's network on `device` with the weights in `state`; ConfigError where they are another network's."""
    info = data.info(cfg.dataset)
    model = from_config(cfg, info.in_channels, info.num_classes).to(device)
    checkpoint.check_weights(state["model"], model.state_dict(), f"{cfg.arch} for {cfg.dataset}")
    model.load_state_dict(state["model"])
    if not finite(model):
        # A silent network scores chance with a finite loss: a number that looks like a result.
        epoch = f" at epoch {state['epoch']}" if "epoch" in state else ""
        raise ConfigError(f"the weights are not finite (a run that diverged{epoch}): nothing to evaluate")
    return model


def default_out(weights: str, T: int) -> str:
    """Where a result goes without --out: eval-<weights>-T<T>.json beside the weights, or, for weights in a
    sweep trial's checkpoint, eval-<checkpoint>-<weights>-T<T>.json in the trial's folder, where Tune's
    checkpoint retention, which deletes the checkpoint's folder two epochs on, leaves it."""
    folder, _, name = weights.rpartition("/")
    if checkpoint.in_trial(folder):
        trial, _, ckpt = folder.rpartition("/")
        return f"{trial or '.'}/eval-{ckpt}-{name.removesuffix('.pt')}-T{T}.json"
    return f"{folder or '.'}/eval-{name.removesuffix('.pt')}-T{T}.json"


def _parser() -> Parser:
    p = Parser(prog="python -m ndot.evaluate", description="Evaluate saved weights on the test set of their run's dataset: the "
                                                            "accuracy (after each time step too), loss and firing rates, printed "
                                                            "and written as JSON to --out.")
    p.add_argument("path", type=named, help="a saved state, or a folder to take the best epoch's weights from: a run folder, a "
                               "sweep trial's folder (its newest checkpoint) or one of its checkpoints; local or a URI (s3://...)")
    p.add_argument("--T", type=int, default=None,
                   help="time steps (default: the run's); on CIFAR10-DVS each recording is cut into T frames")
    p.add_argument("--device", default=None, help="where to evaluate: auto (the GPU where there is one), cpu or cuda[:N] "
                                                  "(default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the run's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--data-root", default=None, help="data folder (default: the run's, else $NDOT_DATA, else ~/data)")
    p.add_argument("--workers", type=int, default=None, help="CPU loader processes (loader cpu, DVS conversion; default: "
                                                             "the run's)")
    p.add_argument("--threads", type=threads, default=None, help="torch's CPU threads (default: torch's)")
    p.add_argument("--out", type=named, default=None,
                   help="JSON file, local or a URI (default: eval-<weights>-T<T>.json beside the weights; for a sweep "
                        "trial's checkpoint, eval-<checkpoint>-<weights>-T<T>.json in the trial's folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    show_progress()
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("T", args.T), ("precision", args.precision), ("batch_size", args.batch_size),
                                   ("data_root", args.data_root), ("workers", args.workers)) if v is not None}
    # Where the run trained says nothing about where its weights are read: auto unless asked
    # (an empty --device is asked, and refused, not auto).
    overrides.update(device="auto" if args.device is None else args.device, cuda_graph=False)
    try:
        path = weights_file(args.path)
        state = checkpoint.read(path)
        cfg = TrainConfig.from_record({**state["config"], **overrides}).validate()
        device = resolve_device(cfg.device)
        model = model_of(state, cfg, device)
        # $NDOT_DATA does not move the data root the run saved: a refusal names what does.
        saved_root = cfg.data_root is not None and "data_root" not in overrides
        data.check(cfg, storage.saved_root_origin(path) if saved_root else None)
        out = args.out or default_out(path, cfg.T)
        try:
            # Errors of the result's storage (a scheme pyarrow lacks, a URI without bucket) are named as
            # the result's: the handler below names the weights.
            is_folder = files.kind(out) == pafs.FileType.Directory
            if not is_folder:
                files.check_writable(out.rpartition("/")[0] or ".")
        except files.STORAGE_ERRORS as e:
            raise ConfigError(f"cannot write the result to {out}: {str(e).splitlines()[0]}") from None
        if is_folder:
            raise ConfigError(f"--out {out} is a folder: name the JSON file to write")
    except (ConfigError, data.DataError) as e:
        return refuse(e)
    except files.STORAGE_ERRORS as e:  # storage that cannot be reached or read (credentials, network, scheme)
        return refuse(f"{args.path}: {e}")
    trained = TrainConfig.from_record(state["config"])
    epoch = f"epoch {state['epoch']}, " if "epoch" in state else ""
    print(f"{path} ({epoch}{method(trained.rule, trained.mode)} T={trained.T} {trained.arch} on {trained.dataset}): "
          f"evaluating with T={cfg.T} on {device}", flush=True)
    if device.type == "cpu":  # as in training
        keep_freed_memory()
    pace = Pace()

    def on_batch(done: int, total: int) -> None:
        # On a CPU, CIFAR-10's test set takes minutes (VGG-11 at T=6: some 8 on two cores).
        if done < total and pace.due():
            print(f"batch {done}/{total}", flush=True)

    try:
        _, test_loader = data.loaders(cfg, device)
        m = evaluate(model, test_loader, cfg, data.info(cfg.dataset).num_classes, detail=True, on_batch=on_batch)
    except torch.OutOfMemoryError as e:
        refuse(f"{out_of_memory(e, device, cfg.batch_size, cfg.T)}: give a smaller --batch_size")
        return 1  # the command was sound, the device too small for it
    except data.DataError as e:  # found only in reading the data (a CIFAR10-DVS recording cut short), or no batch
        return refuse(e)
    except RuntimeError as e:
        ended = worker_ended(e)
        if ended is None:
            raise
        refuse(f"{ended}: fewer --workers hold less memory, where it ran out")
        return 1
    # Written before it is printed: a reader of stdout that goes away (`| head -1`) ends the command.
    # The run's own config (what trained the weights) and, apart, what this evaluation ran with.
    evaluated_with = {"T": cfg.T, "precision": cfg.precision, "batch_size": cfg.batch_size, "data_root": cfg.data_root,
                      "device": str(device)}
    weights = path if "://" in path else os.path.abspath(path)
    result = {"weights": weights, "epoch": state.get("epoch"), "config": state["config"],
              "evaluated_with": evaluated_with, **m}
    try:
        files.write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
        unwritten = None
    except files.STORAGE_ERRORS as e:  # storage that filled or failed during the evaluation: its scores are printed all the same
        unwritten = e
    top5 = f", top-5 {m['test_top5']:.4f}" if "test_top5" in m else ""
    print(f"test accuracy {m['test_acc']:.4f}{top5}, loss {m['test_loss']:.4f}")
    print("accuracy after step t: " + "  ".join(f"{t}: {a:.4f}" for t, a in enumerate(m["acc_by_step"], 1)))
    print(f"firing rate {m['firing_rate']:.4f}; by layer: "
          + ", ".join(f"{k} {v:.4f}" for k, v in m["layer_firing_rates"].items()))
    if unwritten is not None:
        refuse(f"cannot write the result to {out}: {unwritten}")
        return 1  # not the status of bad input, refuse's: the evaluation itself ran
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    run(main)
