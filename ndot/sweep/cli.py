"""The command line shared by the scripts in sweeps/: parse, validate, run, summarise.

What can be checked before Ray starts is; what needs the cluster (does it reach --storage, fit a trial,
import --set imports' modules) is checked once connected, before any trial.

Every flag defaults to the chosen preset's value. Lists are comma-separated
(--T 1,2,4,6); a range is LOW,HIGH and searched, a single value is fixed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import pyarrow.fs as pafs
import ray
from ray import tune

from ndot import data, files, results
from ndot.cli import Parser, handle, listed, logs_without, refuse, show_progress, signal_handlers_kept
from ndot.config import (MODES, RULES, ConfigError, TrainConfig, check_data_flags, check_rule_flags,
                         import_names, method, parse_field, parse_method)
from ndot.data import storage
from ndot.models import ARCHS, BUILT_IN_ARCHS, REGISTERED_BY
from ndot.sweep import reach, resources, runner
from ndot.sweep.definitions import Sweep
from ndot.sweep.progress import Progress
from ndot.sweep.runner import Plan
from ndot.sweep.space import SearchSpace, Stratum, strata

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "runs/sweeps"
# Seconds after which the check of --storage says that it is running.
SLOW_CHECK_S = 3.0
# Seconds an interrupted sweep waits for what is left of its local Ray to end once killed.
RAY_END_S = 10.0
DEFAULT_PRESET = "smoke"
_FLAGS_HELP = " ".join(__doc__.split("\n\n")[1].split())


class InputError(ValueError):
    """A command line that cannot run; the message is one line."""


def _span(text: str) -> tuple[float, float]:
    values = listed(float)(text)
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected VALUE or LOW,HIGH, got {text!r}")
    low, high = values[0], values[-1]
    if low > high:
        raise argparse.ArgumentTypeError(f"LOW must not exceed HIGH, got {text!r}")
    return low, high


def parser(sweep: Sweep) -> argparse.ArgumentParser:
    p = Parser(prog=f"{sweep.name}.py", description=f"{sweep.about} Results go to the experiment folder --storage/--name: "
                                                    f"each trial's checkpoints, the tables {results.EPOCHS_TABLE}.parquet and "
                                                    f"{results.TRIALS_TABLE}.parquet (python -m ndot.results) and the figures. "
                                                    f"{_FLAGS_HELP}")  # run from Python too
    p.add_argument("--preset", choices=sorted(sweep.presets), help=f"defaults for every flag (default: {DEFAULT_PRESET})")
    p.add_argument("--dataset", help=f"one of {', '.join(sorted(data.DATASETS))}, or one the modules of --set imports=MODULES "
                                     "register")
    p.add_argument("--data-root", help="data folder (default: $NDOT_DATA, else ~/data on each node)")
    p.add_argument("--download", action="store_true", help="fetch a missing dataset (on every node that lacks it)")
    p.add_argument("--rules", type=listed(str), help=f"RULE_MODE list, e.g. ndot_O,ndot_A,ottt_A,bptt_A; RULE one of {', '.join(RULES)}, "
                                                       f"MODE one of {', '.join(MODES)}")
    p.add_argument("--T", type=listed(int), help="time steps, e.g. 1,2,4,6")
    p.add_argument("--archs", type=listed(str), help=f"architectures, e.g. vgg11_ws,resnet_ws; of {', '.join(sorted(ARCHS))}, "
                                                         "or those the modules of --set imports=MODULES register")
    p.add_argument("--lr", type=_span, help="learning rate, or LOW,HIGH searched log-uniformly")
    p.add_argument("--momentum", type=_span, help="SGD momentum, or LOW,HIGH searched")
    p.add_argument("--loss-alpha", type=_span, help="MSE weight of the loss, or LOW,HIGH searched")
    p.add_argument("--batch-size", type=listed(int), help="batch size, or several to choose from")
    p.add_argument("--trials", type=int, help="Optuna trials per stratum")
    p.add_argument("--epochs", type=int, help="epochs per trial (ASHA stops a hopeless one sooner)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs each trial reserves")
    p.add_argument("--gpus-per-trial", type=float, help="a fraction packs trials on one GPU, e.g. 0.25")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster can hold)")
    p.add_argument("--seed", type=int, help="seed of the samplers and of every trial (default: 0)")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="any other TrainConfig field, the same for every trial; repeatable, e.g. "
        "--set precision=bf16 --set fused_neuron=true --set readout_trace=true",
    )
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"folder, or s3:// or gs:// URI, for the experiment (default: {DEFAULT_STORAGE}); "
                                                                 "on a cluster of several machines a URI, or a folder every node mounts")
    p.add_argument("--address", help="Ray cluster to join: auto on one of its nodes, HOST:PORT of its head, or ray://HOST:PORT; "
                                     "local for a private Ray on this machine (default: $RAY_ADDRESS where set, as `ray job "
                                     "submit` sets it; else auto on the head `ray up` started; else local)")
    p.add_argument("--name", help="experiment name (default: SWEEP-PRESET-TIME); required with --resume")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the experiment --name in --storage as it was started, errored trials included (a flag that "
        "defines the sweep, such as --trials or --T, is refused unless it has the value the sweep started with; "
        "--cpus-per-trial, --gpus-per-trial and, but through ray://, --max-concurrent apply)",
    )
    return p


def _axis_values(sweep: Sweep, args: argparse.Namespace) -> dict[str, tuple]:
    preset = sweep.presets[args.preset or DEFAULT_PRESET]
    given = {"method": (args.rules, "--rules"), "T": (args.T, "--T"), "arch": (args.archs, "--archs")}
    values = {}
    for axis, (value, flag) in given.items():
        value = value if value is not None else getattr(preset, axis)
        if not value:
            raise InputError(f"{flag} needs at least one value")
        if axis not in sweep.strata and len(value) != 1:
            raise InputError(f"{flag} takes one value in the {sweep.name} sweep, whose strata are {' x '.join(sweep.strata)}")
        values[axis] = value
    return values


def _given(value: Any, default: Any) -> Any:
    """A flag's value, or the preset's when the flag was not given."""
    return default if value is None else value


def _resources(cpus: float, gpus: float) -> tuple[float, float]:
    # Trials need a CPU so that none lands on a head node that advertises none.
    if not (cpus > 0 and math.isfinite(cpus)):
        raise InputError(f"--cpus-per-trial must be a finite number > 0, got {cpus}")
    if not math.isfinite(gpus) or gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise InputError(f"--gpus-per-trial must be a fraction in [0, 1] or a whole number, got {gpus}")
    return cpus, gpus


def _max_concurrent(n: int | None) -> int | None:
    if n is not None and n < 1:
        raise InputError(f"--max-concurrent must be at least 1, got {n}")
    return n


def _storage(args: argparse.Namespace) -> str:
    storage = args.storage
    if not storage.removeprefix("file://").strip():
        # `file://` alone is no path either, and abspath("") is the folder the sweep was typed in, where
        # the experiment would land.
        raise InputError(f"--storage must name a folder or a URI, got {args.storage!r}")
    if storage.startswith("file:"):
        # A local path, kept plain: Tune then writes it through ndot.files.WholeLocalFiles. Its path as pyarrow,
        # Ray and RFC 8089 read it, percent-decoded: file:///my%20sweeps is "/my sweeps", where ndot.results finds it.
        try:
            storage = pafs.FileSystem.from_uri(storage)[1]
        except ValueError as e:  # pyarrow's ArrowInvalid: a relative path, a host, a space left unescaped
            raise InputError(f"--storage {args.storage} is no file URI: {e}") from None
    if "://" not in storage:
        return _absolute(storage)
    if not storage.partition("://")[2].strip("/"):
        raise InputError(f"--storage {args.storage} names no bucket: give e.g. s3://BUCKET/PREFIX")
    return storage


# TrainConfig fields that have flags of their own (--set refuses them).
_FLAGGED = {"dataset": "--dataset", "data_root": "--data-root", "download": "--download", "T": "--T",
            "arch": "--archs", "rule": "--rules", "mode": "--rules", "lr": "--lr", "momentum": "--momentum",
            "loss_alpha": "--loss-alpha", "batch_size": "--batch-size", "epochs": "--epochs", "seed": "--seed"}


def _settings(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise InputError(f"--set takes FIELD=VALUE, got {item!r}")
        if name in _FLAGGED:
            raise InputError(f"{name} has a flag of its own: use {_FLAGGED[name]}")
        out[name] = parse_field(name, text)
    return out


def _absolute(path: str) -> str:
    """A local path as every trial reads it, whatever folder Tune runs it in; ~ too: the shell leaves it in --x=~/y."""
    return os.path.abspath(os.path.expanduser(path))


def _name(name: str | None) -> str | None:
    # The experiment is one folder of --storage: a path would put it elsewhere.
    if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
        raise InputError(f"--name {name!r} must be a folder name, without '/'")
    # Ray stages every experiment in a local folder of this name, whatever --storage is: filesystems take 255 bytes.
    if name is not None and len(os.fsencode(name)) > 255:
        raise InputError(f"--name is {len(os.fsencode(name))} bytes long: a folder name takes at most 255")
    return name


def _check_trials(base: dict[str, Any], cells: Sequence[Stratum], space: SearchSpace) -> None:
    """ConfigError where some trial would be refused: each stratum at each corner of the searched space."""
    for cell in cells:
        for corner in space.corners():
            TrainConfig.from_dict({**base, **cell.values, **corner}).validate()


def _check_trials_know(registered: Sequence[tuple[str, str, str, tuple[str, ...]]], imports: str) -> None:
    """InputError for an architecture or dataset of the user's that the trials would not know: they run in processes
    of their own, which know only ndot's and those the modules of `imports` register. `registered`: (what, name, the
    module that defines its function, the modules whose import registered it) of each the trials use that is not
    ndot's own."""
    named = import_names(imports)
    known: dict[str, list[str]] | None = None
    for what, name, where, registered_by in registered:
        if where == "__main__":
            raise InputError(f"{what} {name!r} is defined in the script that started the sweep, which its trials cannot "
                             "import: register it in a module of its own and name that with --set imports=MODULE")
        if not imports:
            # The module that defines the function most likely registers it, unless the function is ndot's own.
            module = "MODULE" if where.partition(".")[0] == "ndot" else where
            raise InputError(f"{what} {name!r} is registered in this process only, and the sweep's trials run in "
                             f"processes of their own: name the module that registers it with --set imports={module}")
        # Importing a module imports its packages first: one of them may be what registers the name.
        if not any(m == r or m.startswith(r + ".") for m in named for r in registered_by):
            # Credited by none in this process, whose order of imports may have hidden it: a fresh one, as a trial is, decides.
            known = _known_after_importing(imports) if known is None else known
            if name in known.get(what, ()):
                continue
            by = registered_by[0] if registered_by else "__main__"
            by, fix = (("the script that started the sweep", "register it in a module of its own and add that")
                       if by == "__main__" else (by, f"add {by}"))
            raise InputError(f"{what} {name!r} is registered by {by}, not by the modules the sweep's trials import "
                             f"(--set imports={imports}): {fix} to imports")


# A trial's view, printed as one line of JSON after the mark (argv[2]): what a process knows once it has imported the
# modules of imports (argv[1]).
_KNOWN_AFTER_IMPORTS = """import json, sys
from ndot import config, data, models
config._import_modules(sys.argv[1])
print(sys.argv[2] + json.dumps({"architecture": sorted(models.ARCHS), "dataset": sorted(data.DATASETS)}))"""
# What the answer follows: a module of imports may write to stdout too, a line without its end (a progress bar's).
_KNOWN_MARK = "ndot-known:"


def _known_after_importing(imports: str) -> dict[str, list[str]]:
    """The architectures and datasets that a fresh process knows once it has imported the modules of `imports`, as a
    trial does; {} where that fails. REGISTERED_BY credits only the modules importing when the name was registered: a
    module of imports that imports the registering one, which this process had imported before, is not among them."""
    # This process's sys.path, on which its own check of the config found the modules.
    done = subprocess.run([sys.executable, "-c", _KNOWN_AFTER_IMPORTS, imports, _KNOWN_MARK], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    _, marked, known = done.stdout.rpartition(_KNOWN_MARK)
    return json.loads(known.splitlines()[0]) if done.returncode == 0 and marked else {}


def build_plan(sweep: Sweep, args: argparse.Namespace) -> Plan:
    """The run the command line asks for; raises InputError or ConfigError on bad input."""
    preset = sweep.presets[args.preset or DEFAULT_PRESET]
    seed = _given(args.seed, 0)
    axes = _axis_values(sweep, args)
    given = _settings(args.set)
    base: dict[str, Any] = {
        **preset.config, **given,
        "dataset": _given(args.dataset, preset.dataset), "epochs": _given(args.epochs, preset.epochs), "seed": seed,
    }
    for axis, value in axes.items():
        if axis not in sweep.strata:
            base.update(parse_method(value[0]) if axis == "method" else {axis: value[0]})
    try:
        cells = strata({axis: axes[axis] for axis in sweep.strata})
    except ValueError as e:  # parse_method's, of a RULE_MODE
        raise InputError(f"--rules: {e}") from None
    space = SearchSpace(
        lr=_given(args.lr, preset.lr), momentum=_given(args.momentum, preset.momentum),
        loss_alpha=_given(args.loss_alpha, preset.loss_alpha), batch_size=_given(args.batch_size, preset.batch_size),
        first=preset.first,
    )
    trials = _given(args.trials, preset.trials)
    if trials < 1:
        raise InputError(f"--trials must be at least 1, got {trials}")
    if trials > 1 and not space.tuned:
        # Every trial of a stratum shares the seed too: they would be one run repeated.
        raise InputError(f"--trials {trials} with nothing searched (one lr, momentum, loss alpha and batch size) "
                         "repeats one run: give --trials 1, or a range such as --lr 0.03,0.3")
    cpus, gpus = _resources(_given(args.cpus_per_trial, preset.cpus_per_trial), _given(args.gpus_per_trial, preset.gpus_per_trial))
    _check_trials(base, cells, space)
    # By name, not by the module of its function: ndot's own builder registered under another name is unknown to a trial.
    registered = [("architecture", name, ARCHS[name].build.__module__, REGISTERED_BY.get(name, ()))
                  for name in axes["arch"] if name not in BUILT_IN_ARCHS]
    if base["dataset"] not in data.BUILT_IN_DATASETS:
        registered.append(("dataset", base["dataset"], data.origin(base["dataset"]), data.REGISTERED_BY.get(base["dataset"], ())))
    _check_trials_know(registered, base.get("imports", ""))
    rules = list(dict.fromkeys(cell.values.get("rule", base.get("rule")) for cell in cells))
    modes = list(dict.fromkeys(cell.values.get("mode", base.get("mode")) for cell in cells))
    Ts = list(dict.fromkeys(cell.values.get("T", base.get("T")) for cell in cells))
    # A preset's setting that none of the rules, or T, asked for reads (paper_dvs's weight_change, mode O's at T > 1)
    # is off in their trials, not refused.
    check_rule_flags(given, rules, modes, Ts, lambda name: f"--set {name}")
    if args.data_root == "":
        raise InputError("--data-root must name a folder, got ''")
    check_data_flags(vars(args), base["dataset"], lambda name: _FLAGGED[name])
    # The root the driver checks is the one every trial reads: absolute, as Tune runs each trial in a folder of
    # its own, and named in the config, as $NDOT_DATA does not reach the processes of a cluster's other nodes.
    root = args.data_root if args.data_root is not None else os.environ.get("NDOT_DATA")
    if root and data.info(base["dataset"]).in_data_root:
        base["data_root"] = _absolute(root)
    if args.download:
        base["download"] = True
    return Plan(
        name=_name(args.name) or f"{sweep.name}-{args.preset or DEFAULT_PRESET}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage=_storage(args), base=base, strata=tuple(cells), space=space, trials_per_stratum=trials,
        cpus_per_trial=cpus, gpus_per_trial=gpus, max_concurrent=_max_concurrent(args.max_concurrent),
        grace_period=preset.grace_period, seed=seed, sweep=sweep.name, preset=args.preset or DEFAULT_PRESET,
    )


def resumed_plan(sweep: Sweep, args: argparse.Namespace) -> Plan:
    """The plan an experiment was started with; only the resources per trial and the trials at once may change on resume."""
    if not args.name:
        raise InputError("--resume needs the --name of the experiment to continue")
    experiment = files.join(_storage(args), _name(args.name))
    if not tune.Tuner.can_restore(experiment):
        raise InputError(f"no experiment to resume at {experiment}")
    try:
        plan = runner.load_plan(experiment)
    except FileNotFoundError:
        raise InputError(f"{experiment} has no {results.PLAN_FILE}: it is not a sweep of this project, or its "
                         f"driver died before its first trial (start it again)") from None
    except (ValueError, TypeError, KeyError) as e:  # JSON that is not a plan (json's errors are ValueErrors)
        raise InputError(f"{experiment}/{results.PLAN_FILE} is not a readable sweep plan ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if plan.name != args.name:
        # Tune's state holds the folder the experiment was started in: a resume would write there.
        raise InputError(f"experiment {args.name} was started as {plan.name}: resume it under that name and folder")
    if plan.sweep and plan.sweep != sweep.name:
        # It would run as started all the same, under the other script's name and help.
        raise InputError(f"experiment {args.name} is a {plan.sweep} sweep: resume it with sweeps/{plan.sweep}.py")
    if plan.storage.rstrip("/") != _storage(args).rstrip("/"):
        # Tune 2.60 restores the trials it has at the new place but creates the later ones
        # where the experiment was started: they would fail, or write beside the original.
        raise InputError(f"experiment {args.name} was started in {plan.storage}: resume it there "
                         f"(Ray Tune creates a resumed sweep's new trials where it started)")
    problem = runner.unreadable_state(experiment)
    if problem:
        raise InputError(problem)
    try:
        # A plan saved by another ndot, whose settings or their bounds were other: every trial it creates would fail.
        _check_trials(plan.base, plan.strata, plan.space)
    except ConfigError as e:
        raise ConfigError(f"experiment {args.name} cannot run as started ({results.PLAN_FILE}): {e}") from None
    changed = _changed_on_resume(plan, args)
    if changed:
        # Run as started, the sweep would not be the one asked for; run as asked, its trials would mix two plans.
        raise InputError(f"a resume continues experiment {args.name} as it was started, not with {', '.join(changed)}: "
                         "leave them out, or start a sweep with them under another --name")
    cpus, gpus = _resources(_given(args.cpus_per_trial, plan.cpus_per_trial), _given(args.gpus_per_trial, plan.gpus_per_trial))
    # A plan that counted the cluster's slots counts them again: it may have grown, or trials shrunk.
    return dataclasses.replace(plan, cpus_per_trial=cpus, gpus_per_trial=gpus,
                               max_concurrent=_max_concurrent(_given(args.max_concurrent, plan.max_concurrent)))


def _text(value: Any) -> str:
    """A plan flag's value as typed: a list comma-separated, a span of one value as that value."""
    return ",".join(map(str, dict.fromkeys(value))) if isinstance(value, tuple) else str(value)


def _changed_on_resume(plan: Plan, args: argparse.Namespace) -> list[str]:
    """Each plan flag given to a resume whose value is not the one `plan` runs, as 'FLAG VALUE (started with VALUE)'.
    Those it runs with may be given: the command line that started the sweep, --resume added, continues it."""
    configs = [TrainConfig.from_dict({**plan.base, **s.values}) for s in plan.strata]

    def each(field: str) -> tuple:
        return tuple(dict.fromkeys(getattr(c, field) for c in configs))

    started = {
        "preset": plan.preset or args.preset,  # a plan saved before plans named their preset: not compared
        "dataset": configs[0].dataset, "data_root": configs[0].data_root, "download": configs[0].download,
        "rules": tuple(dict.fromkeys(method(c.rule, c.mode) for c in configs)), "T": each("T"), "archs": each("arch"),
        "lr": plan.space.lr, "momentum": plan.space.momentum, "loss_alpha": plan.space.loss_alpha,
        "batch_size": plan.space.batch_size, "trials": plan.trials_per_stratum, "epochs": configs[0].epochs,
        "seed": plan.seed,
    }
    given = {name: getattr(args, name) for name in started if getattr(args, name) not in (None, False)}
    if "data_root" in given:
        given["data_root"] = _absolute(given["data_root"])  # as build_plan saves it
    changed = [f"--{name.replace('_', '-')}{'' if value is True else ' ' + _text(value)} (started with {_text(started[name])})"
               for name, value in given.items() if value != started[name]]
    return changed + [f"--set {name}={_text(value)} (started with {_text(getattr(configs[0], name))})"
                      for name, value in _settings(args.set).items() if value != getattr(configs[0], name)]


def check(plan: Plan, resume: bool) -> None:
    """What can be checked before Ray starts: the data, the device, the storage, and that a new experiment is new."""
    # A resume keeps the data root its plan saved, which neither $NDOT_DATA nor --data-root moves.
    saved = storage.saved_root_origin(f"{plan.experiment}/{results.PLAN_FILE}", "a resume keeps it: put the data there")
    each = data_configs(plan)
    for labels, cfg in each.values():
        try:
            data.check(cfg, saved if resume and cfg.data_root else None)
        except data.DataError as e:
            if len(each) == 1:
                raise
            # Strata that read other data (CIFAR10-DVS frames of another T) can fail alone: the line says which.
            more = f" and {len(labels) - 1} more that read its data" if len(labels) > 1 else ""
            raise data.DataError(f"stratum {labels[0]}{more}: {e}") from e.__cause__
    # The job's, unlike this process's (runner.trial_env), reaches the trials as it is, each in a folder of its own.
    cache = runner.job_env_vars().get("NDOT_CACHE")
    if cache and not os.path.isabs(os.path.expanduser(cache)):
        raise InputError(f"NDOT_CACHE={cache} in the job's runtime_env is relative, and Tune runs each trial in a folder "
                         "of its own, where each would build the caches again: make it absolute")
    # Device and cuda_graph are no axis of a sweep: every stratum has the first's.
    cfg = TrainConfig.from_dict({**plan.base, **plan.strata[0].values})
    if (cfg.device.startswith("cuda") or cfg.cuda_graph) and plan.gpus_per_trial == 0:
        what = f"device {cfg.device}" if cfg.device.startswith("cuda") else "cuda_graph"
        raise InputError(f"{what} needs --gpus-per-trial > 0: a trial sees only the GPUs Ray gives it")
    # An object store can take a while to answer (files.GCS_RETRY_S): a check that does is said to run.
    slow = threading.Timer(SLOW_CHECK_S, log.info, [f"checking that {plan.storage} can be written"])
    slow.start()
    try:
        files.check_writable(plan.storage)
    except files.STORAGE_ERRORS as e:  # ArrowInvalid (a ValueError) for a scheme pyarrow does not know, among others
        raise InputError(f"storage {plan.storage} is not writable: {str(e).splitlines()[0]}") from None
    finally:
        slow.cancel()
    if not resume and tune.Tuner.can_restore(plan.experiment):
        raise InputError(f"experiment {plan.experiment} exists: pass --resume to continue it, or another --name")
    if not resume and results.is_experiment(plan.experiment):
        # The plan is written once Ray has started, Tune's first file just after it: a driver is starting the
        # sweep now, or one died in between, before any trial could run.
        raise InputError(f"experiment {plan.experiment} is being started by another driver, or one that died before "
                         f"its first trial left it (then remove it and start again): else pass another --name")


def data_configs(plan: Plan) -> dict[tuple, tuple[list[str], TrainConfig]]:
    """Each distinct data the plan's trials read (ndot.data.key): the labels of the strata that read it, and the
    config of the first of them."""
    out: dict[tuple, tuple[list[str], TrainConfig]] = {}
    for stratum in plan.strata:
        cfg = TrainConfig.from_dict({**plan.base, **stratum.values})
        out.setdefault(data.key(cfg), ([], cfg))[0].append(stratum.label)
    return out


def _without_tunes_resume_hint(record: logging.LogRecord) -> bool:
    # Tune's hint names Tuner.restore; the sweep prints the command line that resumes it instead.
    return not record.getMessage().startswith("Experiment has been interrupted")


def cluster_address(given: str | None) -> tuple[str | None, str]:
    """The cluster a sweep joins, and what named it: --address, else $RAY_ADDRESS, else "auto" on the head of a
    `ray up` cluster, else None (a private local Ray).

    `ray job submit` runs its driver with RAY_ADDRESS set to the cluster's head: a sweep submitted
    without --address joins that cluster, as ray.init() itself would, not a Ray of its own on the head node.
    So does a sweep started on the head in a shell (`ray attach`, `ray submit`), where the launcher left its
    config: a Ray of its own there would have the head's resources alone (no GPU, in cluster/gpu.yaml).
    """
    if given is not None:
        return None if given == "local" else given, "--address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    if resources.on_launcher_head():
        return "auto", f"on a `ray up` head ({resources.BOOTSTRAP_CONFIG}; --address local: a Ray of its own), the default --address"
    return None, "$RAY_ADDRESS"


def resume_command(plan: Plan, address: str | None) -> str:
    """The command line that continues `plan`'s sweep, each value quoted for the shell (a folder may hold a space)."""
    q = shlex.quote
    # The script as it was typed; where the sweep ran from Python (a notebook, whose sys.argv[0] is its
    # kernel's launcher), the sweep's script in sweeps/.
    ran = sys.argv[0] if os.path.basename(sys.argv[0]) == f"{plan.sweep}.py" else f"sweeps/{plan.sweep}.py"
    script = f"python {q(ran)}" if plan.sweep else "the sweep"
    if address is None and cluster_address(None)[0] is not None:
        address = "local"  # where the default joins a cluster, as on a `ray up` head
    return (f"{script} --resume --name {q(plan.name)} --storage {q(plan.storage)}"
            + (f" --address {q(address)}" if address else ""))


def _on_sigterm(head: str | None, ended: threading.Event, again: str, experiment: str) -> Callable[..., None]:
    """SIGTERM (`ray job stop`, a scheduler's time limit) ends the sweep as Ctrl-C does: Tune saves its
    state and stops the trials (SIGUSR1 is Tune's other signal for that)."""
    watch = threading.Thread(target=_exit_if_ray_ends, args=(head, ended, again, experiment), daemon=True)

    def handler(*_: Any) -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        if head is not None and watch.ident is None:
            watch.start()

    return handler


def _end_local_ray(experiment: str) -> None:
    # Before the tables are rewritten: a trial's worker left running can still store an epoch.
    if not runner.end_local_ray(timeout_s=RAY_END_S):
        print(f"Ray's processes still running {RAY_END_S:g} s after SIGKILL: the tables may lack the epochs "
              f"they write; python -m ndot.results collect {experiment} rebuilds them", file=sys.stderr)


def _settle_tables(experiment: str) -> list[str]:
    """Rewrite the tables and figures of an interrupted sweep, its local Ray ended, from every epoch its
    trials' checkpoints hold; returns the figures' URIs ([] where storage failed).

    The sweep writes the tables from the checkpoints Tune has registered, and a trial cut short may have
    stored an epoch that Tune never saw (its checkpoint written, its report not yet read).
    """
    try:
        results.write_tables(experiment, results.collect(experiment))
        return results.write_plots(experiment)
    except files.STORAGE_ERRORS as e:
        print(f"the tables may lack the last epochs ({e}): python -m ndot.results collect {experiment} "
              "rebuilds them", file=sys.stderr)
        return []


def _exit_if_ray_ends(head: str, ended: threading.Event, again: str, experiment: str) -> None:
    # A SIGTERM to the whole process group (`timeout`, a batch scheduler) also ends the local Ray this
    # driver started, on which Tune would wait a minute and then die with status 1. What the trials
    # finished is on disk once what is left of that Ray has been ended: end as an interrupted sweep
    # does, with the tables brought up to it (the sweep rewrites them at most every few seconds, and
    # Tune's last word does not come).
    while not ended.wait(1.0):
        try:
            runner.check_address(head, timeout_s=1.0)
        except ConnectionError:
            _end_local_ray(experiment)
            _settle_tables(experiment)
            print(f"interrupted, Ray with it: continue with {again}", file=sys.stderr, flush=True)
            os._exit(130)


def main(sweep: Sweep, argv: Sequence[str] | None = None) -> int:
    args = parser(sweep).parse_args(argv)
    show_progress()
    try:
        if ray.is_initialized():
            # ray.init refused a second connection after the sweep had said it starts, in a traceback; and the
            # sweep, which ends its connection when it ends, would have ended the caller's.
            raise InputError("Ray is already initialised in this process: ray.shutdown() first (a sweep connects to "
                             "Ray itself, and disconnects when it ends)")
        plan = resumed_plan(sweep, args) if args.resume else build_plan(sweep, args)
        check(plan, args.resume)
        args.address, source = cluster_address(args.address)
        runner.check_address(args.address, source=source)
        if args.address is None:
            # The cluster is a Ray this sweep would start here: what it has is known before it starts.
            here = resources.local_ray()
            _check_fits_here(plan, here)
            # Its trials run on this machine and read the caches built here, before Ray starts, where the progress
            # lines of a build that takes minutes (CIFAR10-DVS frames) are seen: Ray forwards none of a trial's
            # (runner.connect). The build has the cores Ray would give the trials, which do not run yet.
            for _, cfg in data_configs(plan).values():
                data.prepare(cfg, workers=int(here.get("CPU", 1)))
    except (InputError, ConfigError, data.DataError, ConnectionError) as e:
        return refuse(e)
    # Held from before the sweep runs to after its tables are settled, once taken.
    with contextlib.ExitStack() as holding:
        return _drive(plan, args, source, holding)


def _drive(plan: Plan, args: argparse.Namespace, source: str, holding: contextlib.ExitStack) -> int:
    """Run the sweep of a checked command line, its experiment held in `holding`, and say how it ended."""
    action = "resuming" if args.resume else "starting"
    ignored = _ignored_on_resume(args) if args.resume else []
    print(
        f"{action} {plan.name}: {len(plan.strata)} strata x {plan.trials_per_stratum} trials, "
        f"{plan.base['epochs']} epochs, {plan.cpus_per_trial:g} CPU + {plan.gpus_per_trial:g} GPU per trial -> {plan.experiment}"
        + (f" (as started; ignored: {', '.join(ignored)})" if ignored else "")
        + (f", on the cluster at {args.address} ({source})" if source != "--address" and args.address else ""),
        flush=True,
    )
    start = time.monotonic()
    again = resume_command(plan, args.address)
    ended = threading.Event()
    # The SIGTERM handlers of ray.init and of this sweep (below), and the SIGINT and SIGUSR1 handlers Ray Tune
    # installs in fit, end with the sweep, where they stayed: run from Python, the process would afterwards
    # exit at SIGTERM with no cleanup of its own (or ignore it), and ignore a first Ctrl-C.
    with signal_handlers_kept(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        try:
            runner.connect(args.address)
        except ConnectionError as e:  # "auto" on a node that belongs to no cluster
            return refuse(e)
        try:
            launcher = args.address is not None and not runner.through_client(args.address)
            # A private local Ray (no --address) runs on this machine alone.
            unreachable = reach.unreachable(plan.storage, launcher) if args.address is not None else None
            if unreachable:
                return refuse(unreachable)
            trial = f"{plan.cpus_per_trial:g} CPU and {plan.gpus_per_trial:g} GPU for a trial"
            if not resources.fits(plan.cpus_per_trial, plan.gpus_per_trial, resources.node_shapes(launcher)):
                if not runner.through_client(args.address):
                    return refuse(f"no node of this cluster has, or can be launched with, {trial}: "
                                  "lower --cpus-per-trial or --gpus-per-trial")
                # The launcher's config is on the head, out of a ray:// client's sight: a fresh cluster (a head
                # that runs no trial) has no such node yet, and its autoscaler may well launch one.
                print(f"no node up now has {trial}; through ray:// the sweep cannot read what the cluster can launch: "
                      "its trials wait for the autoscaler (for ever if no node type fits)", file=sys.stderr, flush=True)
            missing = reach.unimportable(plan.base.get("imports", ""), runner.through_client(args.address))
            if missing:
                return refuse(missing)
            holding.enter_context(runner.held(plan.experiment, args.resume))
            handle(signal.SIGTERM, _on_sigterm(runner.head_address(args.address), ended, again, plan.experiment))
            with logs_without("ray.tune.tune", _without_tunes_resume_hint):
                figures = runner.run(plan, resume=args.resume, callbacks=[Progress(plan.num_trials)], launcher=launcher)
        except (runner.Claimed, runner.Busy) as e:  # another driver with this --name got there first, or runs it
            return refuse(e)
        finally:
            ended.set()
            ray.shutdown()
            # ray.shutdown() ends the local Ray's daemons; its workers it leaves to end on their own.
            _end_local_ray(plan.experiment)
    try:
        trials = results.load(plan.experiment, results.TRIALS_TABLE)
    except files.STORAGE_ERRORS:  # never written: storage that failed all along (a full disk)
        trials = None
    if trials is None or len(trials) < plan.num_trials or not trials["status"].isin(results.FINAL).all():
        figures = _settle_tables(plan.experiment) or figures
        try:
            trials = results.load(plan.experiment, results.TRIALS_TABLE)
        except files.STORAGE_ERRORS as e:
            print(f"error: no tables in {plan.experiment} ({str(e).splitlines()[0]}); the trials' checkpoints hold every "
                  f"epoch they stored: python -m ndot.results collect {plan.experiment} writes the tables once storage "
                  f"takes them, and {again} continues the sweep", file=sys.stderr)
            return 1
    counts = trials["status"].value_counts().to_dict()
    print(f"ran for {time.monotonic() - start:.0f} s: {', '.join(f'{n} {s}' for s, n in counts.items())}")
    print(results.summary_text(trials, order=[s.label for s in plan.strata]))
    print(f"tables: {results.table_uri(plan.experiment, results.EPOCHS_TABLE)}, {results.table_uri(plan.experiment, results.TRIALS_TABLE)}")
    print(f"figures: {', '.join(figures)}")
    unfinished = plan.num_trials - sum(counts.get(s, 0) for s in results.FINAL)
    if unfinished:
        print(f"interrupted with {unfinished} of {plan.num_trials} trials unfinished: continue with {again}", file=sys.stderr)
        return 130
    if counts.get(results.ERRORED):
        print(f"{counts[results.ERRORED]} trials errored: retry them with {again}", file=sys.stderr)
        return 1
    return 0


def _check_fits_here(plan: Plan, here: dict[str, float]) -> None:
    if not resources.fits(plan.cpus_per_trial, plan.gpus_per_trial, [here]):
        raise InputError(f"the Ray a sweep without --address starts here has {here.get('CPU', 0):g} CPU and "
                         f"{here.get('GPU', 0):g} GPU, too few for {plan.cpus_per_trial:g} CPU and "
                         f"{plan.gpus_per_trial:g} GPU for a trial: lower --cpus-per-trial or --gpus-per-trial, "
                         "or join a cluster with --address")


def _ignored_on_resume(args: argparse.Namespace) -> list[str]:
    # Through ray:// Tune's tuner runs in the cluster, where a resume cannot reset its limit (ndot.sweep.runner).
    return ["--max-concurrent"] if args.max_concurrent is not None and runner.through_client(args.address) else []
