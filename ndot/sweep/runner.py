"""One Tune experiment per sweep: build it, run it, resume it."""
from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import ray
import psutil  # after ray, as Ray's own modules import it: Ray ships its copy and puts it on the path
from ray import tune
# What ray.init does with "auto" (Ray is pinned to one version in pyproject.toml).
from ray._private import services as ray_services
# The variable `ray job submit` gives the driver its job's config in, runtime_env included.
from ray._private.runtime_env import constants as runtime_env_constants
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial

from ndot import files, results
from ndot.cli import logs_without
from ndot.sweep import resources
from ndot.sweep.recorder import CheckpointsCallback, TablesCallback, TensorBoardCallback, without_the_nonfinite_notice
from ndot.sweep.scheduler import StratifiedASHA
from ndot.sweep.searcher import StratifiedGenerator, StratifiedSearch, listed_trials
from ndot.sweep.space import STRATUM_KEY, SearchSpace, Stratum
from ndot.sweep.trainable import run_trial

log = logging.getLogger(__name__)

# What Optuna maximises and ASHA compares: the best test accuracy so far, as
# the paper reports it; unlike the last epoch's accuracy it is defined (and
# meaningful) for a trial that diverged.
METRIC, MODE = "best_test_acc", "max"
# Restarts of a trial from its checkpoint after its worker died (e.g. a spot node was reclaimed).
MAX_FAILURES = 3
# The newest checkpoint and the one before it: reading a trial's results falls back on that one
# when the newest upload was cut short (ndot.checkpoint.newest). A finished trial keeps its last
# alone once the sweep ends (ndot.sweep.recorder.CheckpointsCallback).
CHECKPOINTS_KEPT = 2
REDUCTION_FACTOR = 3


@dataclass(frozen=True)
class Plan:
    """A sweep, fully resolved: everything Tune needs."""

    name: str
    storage: str  # an absolute local path or a URI (s3://...)
    base: dict[str, Any]  # TrainConfig fields shared by every trial
    strata: tuple[Stratum, ...]
    space: SearchSpace
    trials_per_stratum: int
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int | None = None  # None: as many trials as the cluster can hold
    grace_period: int = 1
    seed: int = 0
    sweep: str = ""  # the Sweep's name, which a resume checks ("": a plan built outside a sweep's script)
    preset: str = ""  # the preset it was built from, which a resume's --preset must name ("": not recorded)

    @property
    def experiment(self) -> str:
        return files.join(self.storage, self.name)

    @property
    def num_trials(self) -> int:
        return len(self.strata) * self.trials_per_stratum


class Claimed(FileExistsError):
    """A new sweep's folder holds a plan already: another driver with its --name got there first."""


def save_plan(plan: Plan, new: bool = False) -> None:
    """Store the plan in the experiment, readable, so that a resume runs what was started.

    `new`: the plan of a sweep starting, which claims its folder: Claimed where a plan is there,
    as where another driver started with the same --name got there first (both pass the check of the
    folder before Ray starts, and both drivers' trials then went to one folder, the tables holding one's).
    """
    data = json.dumps(asdict(plan), indent=1).encode()
    if not new:
        files.write_bytes(results.plan_uri(plan.experiment), data)
        return
    try:
        files.write_new(results.plan_uri(plan.experiment), data)
    except FileExistsError:
        raise Claimed(f"experiment {plan.experiment} was started meanwhile, by another driver: "
                      "pass another --name") from None


def load_plan(experiment: str) -> Plan:
    d = json.loads(files.read_bytes(results.plan_uri(experiment)))
    d["strata"] = tuple(Stratum(**s) for s in d["strata"])
    # JSON turned the space's tuples into lists.
    d["space"] = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["space"].items()})
    return Plan(**d)


# The file a driver holds locked (flock) while it runs an experiment: in its folder where that is a path, on
# this machine where it is a URI. Two drivers in one experiment (a sweep resumed while it still runs, as
# a job resubmitted while the first is alive) each ran the trials into the same folders and created the
# trials left twice; the tables held the last writer's trials, the other's lost to them (seen with a
# smoke sweep resumed during its run). The system lets the lock go when its process ends, killed too:
# nothing stale is left to block a resume. Over NFS the server holds the lock for every client; an
# object store has no lock, and two drivers on different machines are not kept apart there.
DRIVER_FILE = "driver.lock"


class Busy(Exception):
    """Another driver runs the experiment; the message is one line."""


def _lock_path(experiment: str) -> Path:
    if "://" not in experiment:
        return Path(experiment, DRIVER_FILE)
    key = hashlib.sha256(experiment.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir(), f"ndot-drivers-{os.getuid()}", f"{key}-{DRIVER_FILE}")


@contextlib.contextmanager
def held(experiment: str, resume: bool) -> Iterator[None]:
    """Hold `experiment` for this process while the block runs; Busy where another driver holds it."""
    with contextlib.ExitStack() as holding:
        try:
            holding.enter_context(files.claim(_lock_path(experiment)))
        except files.Held as e:
            then = "resume it once that driver has ended" if resume else "pass another --name"
            raise Busy(f"experiment {experiment} is being run by another driver ({e}): {then}") from None
        yield


def unreadable_state(experiment: str) -> str | None:
    """Why Tune cannot read the experiment state a resume would start from, in one line; None where it can.

    Tune starts an experiment afresh, in its folder, when that state cannot be read, and the sweep's
    earlier trials drop out of it. A driver killed while Tune copied the state to a filesystem left it
    cut short before the sweeps wrote through ndot.files.WholeLocalFiles (an upload to S3 lands whole
    or not at all), and a folder written by other means still can. No state at all passes.
    """
    try:
        listed_trials(experiment)
    except FileNotFoundError:
        return None
    except ValueError as e:
        fs, path = files.filesystem(experiment)
        states = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))
                        if fnmatch.fnmatch(i.base_name, TuneController.CKPT_FILE_TMPL.format("*")))
        what = (f"move it aside to resume from the one before it, {states[-2]}" if len(states) > 1 else
                f"there is no earlier one to resume from; the trials' checkpoints remain, and "
                f"python -m ndot.results collect {experiment} rebuilds the tables from them")
        return (f"the newest experiment state of {experiment}, {states[-1]}, is unreadable ({type(e).__name__}: {e}), "
                f"most likely cut short by a driver killed while writing it: {what}")
    return None


def trial_dirname(trial: Trial) -> str:
    return f"{trial.trial_id}_{trial.config[STRATUM_KEY]}"


# Ray's own defaults: the GCS of a cluster head, and the Ray Client server (ray://).
GCS_PORT, CLIENT_PORT = 6379, 10001


def check_address(address: str | None, timeout_s: float = 10.0, source: str = "--address") -> None:
    """Raise ConnectionError when nothing listens at a cluster address; ray.init would wait on it for minutes.

    None ("start a local Ray") and "local" pass. "auto" is looked up as ray.init looks it up ($RAY_ADDRESS,
    then the cluster this node last started or joined, then any running here), and what it finds is checked.
    `source` names where the address came from, for the error.
    """
    if address in (None, "local"):
        return
    if address == "auto":
        # ray.init refuses "auto" at once where no Ray runs here, but after the sweep has said that it starts,
        # in Ray's words that name no flag; and it waits minutes on a recorded cluster that has gone since.
        try:
            found = ray_services.get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise ConnectionError(f"{source} 'auto': no Ray cluster runs on this node: start one (ray start --head), "
                                  "or give HOST:PORT of its head") from None
        if found != "auto":  # an address, from $RAY_ADDRESS or this node's record
            check_address(found, timeout_s, f"{source} 'auto', which found")
        return
    if address.startswith(("http://", "https://")):
        # What `ray job` takes (and many export as RAY_ADDRESS): the dashboard, where no driver can join.
        raise ConnectionError(f"{source} {address!r} is a dashboard's URL, for `ray job`: a sweep joins a cluster "
                              "at HOST:PORT of its head, ray://HOST:PORT, or auto on one of its nodes")
    client = through_client(address)
    try:
        where = urlsplit(address if client else f"//{address}")
        host, port = where.hostname, where.port or (CLIENT_PORT if client else GCS_PORT)
    except ValueError:
        raise ConnectionError(f"{source} {address!r} is not HOST:PORT or ray://HOST:PORT") from None
    if not host:
        raise ConnectionError(f"{source} {address!r} is not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"{source} {address!r}: no Ray cluster answers at {host}:{port} ({e.strerror or e}): "
                              "is its head node up?") from None


def trial_env() -> dict[str, Any] | None:
    """The runtime_env that carries this driver's $NDOT_CACHE to every trial, made absolute as Tune runs each trial
    in a folder of its own; None where it is unset.

    Set on the driver alone it reached the trials on the driver's node alone: those on the others cached their
    frames in <data root>/ndot-cache. (The data root needs none: it is in each trial's config, ndot.sweep.cli.)
    Where `ray job submit` set it in the job's runtime_env, that one reaches every trial, and ray.init would
    refuse a second one.
    """
    cache = os.environ.get("NDOT_CACHE")
    if not cache or "NDOT_CACHE" in job_env_vars():
        return None
    return {"env_vars": {"NDOT_CACHE": os.path.abspath(os.path.expanduser(cache))}}


def job_env_vars() -> dict[str, str]:
    """The variables the runtime_env of the job this driver runs in (`ray job submit`) sets in every process of it."""
    job = json.loads(os.environ.get(runtime_env_constants.RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def connect(address: str | None) -> None:
    """Join the cluster at `address` ("auto": the one this node belongs to), or start a private local Ray when None."""
    global _not_ray, _adopted_before
    if address is None:
        if _not_ray is None:  # not a Ray this process has yet to end: the setting from before that one stands
            _adopted_before = _adopt_orphans(True)
        _not_ray = {child.pid for child in psutil.Process().children()}
    # "local": without it, ray.init() joins any Ray already running on this machine
    # (someone's test cluster, say) instead of starting one of its own.
    # Trials' output is not forwarded: their errors are stored with the trial, and a sweep on a Ray of its own
    # builds the data caches, whose progress lines matter, before its trials start (ndot.sweep.cli.main).
    with logs_without(_TOKEN_NOTICE_LOGGER, _without_the_token_notice) if address is None else contextlib.nullcontext():
        ray.init(address=address or "local", log_to_driver=False, logging_level="WARNING", runtime_env=trial_env())


# A new local Ray turns token authentication on by itself and says so at every start, with how to opt
# out: news for whoever runs that Ray, not for a sweep that starts its own and ends it (the token stays on).
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _without_the_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster.")


# This process's children from before it started a private local Ray (connect(None)), which are not
# that Ray's (a notebook's own, a test session's cluster); None where it started none.
_not_ray: set[int] | None = None
# Whether this process adopted orphans before that Ray (a process supervisor's own setting), to give back.
_adopted_before = False
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37


def _adopt_orphans(adopt: bool) -> bool:
    """Set whether this process adopts orphans; whether it did before. Linux only (elsewhere False, nothing set)."""
    # A trial's worker whose raylet ends before it is re-parented: made a subreaper, this process
    # inherits it instead of init, so that end_local_ray still finds it.
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int()
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, int(adopt), 0, 0, 0)
    return bool(was.value)


def end_local_ray(timeout_s: float) -> bool:
    """Kill what is left of the private local Ray this process started, trial workers included, and wait
    until it has ended; False if some process outlives `timeout_s` (True at once where it started none).

    Ray's daemons outlive a SIGTERM to the sweep's process group (they close their ports but linger),
    and a trial's worker outlives its raylet: it goes on to the end of its epoch and writes that
    epoch's checkpoint, seconds after the driver would have rebuilt the tables. Once this returns
    True nothing more lands in the experiment. (A checkpoint cut off in mid-write is passed over
    by ndot.checkpoint.newest, and the resume trains that epoch again.)
    """
    global _not_ray
    if _not_ray is None:
        return True
    procs = []
    for child in psutil.Process().children():
        if child.pid not in _not_ray:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs += [child, *child.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    if not alive:
        _not_ray = None
        _adopt_orphans(_adopted_before)
    return not alive


def through_client(address: str | None) -> bool:
    """Whether `address` joins through the Ray Client server (ray://), from outside the cluster."""
    return address is not None and address.startswith("ray://")


def head_address(address: str | None) -> str | None:
    """HOST:PORT of the connected cluster's GCS; None through a ray:// client, which does not reach it."""
    if through_client(address):
        return None
    return ray.get_runtime_context().gcs_address


def _trainable(plan: Plan) -> Any:
    return tune.with_resources(run_trial, {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial})


def _trials_at_once(plan: Plan, launcher: bool) -> int:
    return plan.max_concurrent or resources.slots(plan.cpus_per_trial, plan.gpus_per_trial, launcher)


def _restored_tuner(plan: Plan, launcher: bool) -> tune.Tuner:
    tuner = tune.Tuner.restore(plan.experiment, trainable=_trainable(plan), resume_errored=True,
                               storage_filesystem=files.tune_filesystem(plan.storage))
    # Tune 2.60 restores the TuneConfig it pickled with the experiment, and Tuner.restore takes
    # none: set the limit of this driver, which StratifiedSearch then keeps over its saved one.
    # (Through ray:// the tuner lives in a remote actor, out of reach: the limit stays as started.)
    if not tuner._is_ray_client:
        tuner._local_tuner._tune_config.search_alg.set_max_concurrency(_trials_at_once(plan, launcher))
    return tuner


def _new_tuner(plan: Plan, callbacks: Sequence[tune.Callback], launcher: bool) -> tune.Tuner:
    search = StratifiedSearch(plan.strata, plan.space, plan.trials_per_stratum, METRIC, MODE, plan.experiment, plan.seed,
                              plan.space.first_point(), plan.base)
    search_alg = StratifiedGenerator(search, _trials_at_once(plan, launcher))
    asha = StratifiedASHA(
        METRIC, MODE, time_attr="epoch", max_t=plan.base["epochs"],
        grace_period=plan.grace_period, reduction_factor=REDUCTION_FACTOR,
    )
    return tune.Tuner(
        _trainable(plan),
        param_space=dict(plan.base),
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=asha,
            # The searcher ends the sweep when every stratum has its trials. Tune's own count of
            # trials created is restored from the searcher's file, which a resume may find a step
            # off Tune's list of trials (ndot.sweep.searcher): it must not end the sweep first.
            num_samples=-1,
            trial_dirname_creator=trial_dirname,
            # A new process per trial costs seconds of imports (torch, the data):
            # a third of the smoke sweep. The trainer resets its memory peak every
            # epoch, so a reused process does not carry an earlier trial's peak.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage,
            storage_filesystem=files.tune_filesystem(plan.storage),
            callbacks=[TablesCallback(), TensorBoardCallback(), CheckpointsCallback(), *callbacks],
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            verbose=0,
        ),
    )


# Tune's settings that a sweep changes, read from the environment where not set there already.
_TUNE_SETTINGS = {
    # Every epoch checkpoints, and Tune snapshots the experiment state whenever a
    # trial has checkpointed num_to_keep times: frequent snapshots are intended here.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Tune's default console output prints its own banner whatever `verbose` says; with the
    # classic one, verbose=0 is silent and the progress lines are the sweep's own (ndot.sweep.cli).
    "RAY_AIR_NEW_OUTPUT": "0",
}


@contextlib.contextmanager
def _tune_settings() -> Iterator[None]:
    # Taken away again after the sweep: run from Python, they would be those of the process's later Tune runs.
    added = [name for name in _TUNE_SETTINGS if name not in os.environ]
    os.environ.update({name: _TUNE_SETTINGS[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def run(plan: Plan, resume: bool = False, callbacks: Sequence[tune.Callback] = (), launcher: bool = False) -> list[str]:
    """Run the sweep (or continue it, errored trials included); needs a connected Ray (see `connect`).

    `launcher`: the connected cluster is the one this node's cluster launcher started (joined with
    --address on its head), whose config says what it can grow to (ndot.sweep.resources).

    The Parquet tables are kept current while it runs (ndot.sweep.recorder);
    at the end the figures are drawn from them. Returns the figures' URIs.

    On resume, Tune restores the searcher and callbacks the experiment was
    started with, and a fresh scheduler rebuilds its rungs from the trials'
    checkpoints (ndot.sweep.scheduler); only the resources per trial and the
    trials at once come from `plan` (see `load_plan`), and `callbacks` are not used.
    """
    # The recorder's TensorBoardCallback sets the filter of tensorboardX's notice in the process that runs Tune, and
    # a second Ctrl-C ends fit without its on_experiment_end: where that is this process, this block takes it away.
    with results.without_tunes_metrics_notice(), without_the_nonfinite_notice(), _tune_settings():
        if resume:
            tuner = _restored_tuner(plan, launcher)
        else:
            save_plan(plan, new=True)
            tuner = _new_tuner(plan, callbacks, launcher)
        tuner.fit()
    try:
        return results.write_plots(plan.experiment)
    except (OSError, pa.ArrowException) as e:
        # Storage that fails now (a full disk) has lost no trial: the checkpoints hold them, and the
        # figures can be drawn again. Not STORAGE_ERRORS' bare ValueError: drawing raises that for a bug.
        log.warning("ndot: could not write the figures to %s (%s): python -m ndot.results plot %s draws them",
                    plan.experiment, str(e).splitlines()[0], plan.experiment)
        return []
