"""A sweep's results as two Parquet tables: one row per epoch of every trial, one row per trial.

    python -m ndot.results collect DIR   # rebuild both tables from a Tune experiment directory
    python -m ndot.results plot DIR      # write the figures next to them
    python -m ndot.results summary DIR   # each stratum's best trial, as a table on stdout
    ndot.results.load("DIR")             # -> pandas DataFrame (table="trials" for the other one)

The source of truth is each trial's checkpoint: the trainable stores the
trial's whole epoch history next to the model state, so a trial that restarts
from checkpoint k continues a history of exactly k epochs (no epoch twice, none
lost), and a dead driver loses nothing that a checkpoint holds. DIR may be a
local folder or a URI such as s3://bucket/sweeps/name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ndot import checkpoint
from ndot.cli import Parser, logs_without, named, refuse, run
from ndot.config import TrainConfig, method
from ndot.files import STORAGE_ERRORS, filesystem, join, kind, read_bytes, uri_of, write_bytes
from ndot.sweep.space import STRATUM_KEY

log = logging.getLogger(__name__)

EPOCHS_TABLE = "epochs"
TRIALS_TABLE = "trials"
# The sweep's plan, written before its first trial (ndot.sweep.runner): the mark of an experiment folder.
PLAN_FILE = "sweep.json"

# Per-trial outcomes; unfinished trials keep Tune's state in lower case (pending, running, paused).
COMPLETED, STOPPED_EARLY, DIVERGED, ERRORED = "completed", "stopped_early", "diverged", "errored"
FINAL = (COMPLETED, STOPPED_EARLY, DIVERGED, ERRORED)
# The Tune state of a trial read from its folder alone, the experiment state that held it being lost.
UNKNOWN = "UNKNOWN"

Row = dict[str, Any]


# ----- rows, written by the trainable -----

def _identity(trial_id: str, config: dict[str, Any]) -> Row:
    """The columns both tables start with: the trial, its stratum, its method and every config value."""
    cfg = TrainConfig.from_record(config).to_dict()
    return {"trial_id": trial_id, "stratum": config.get(STRATUM_KEY, ""), "method": method(cfg["rule"], cfg["mode"]), **cfg}


def epoch_row(trial_id: str, config: dict[str, Any], metrics: dict[str, Any], node: dict[str, Any], timestamp: float) -> Row:
    """One epoch of one trial: ids, every config value, every metric, where and when it ran.

    A metric named like a config field (the scheduled `lr`) gets an `epoch_`
    prefix, so `lr` is always the trial's initial learning rate.
    """
    row = _identity(trial_id, config)
    row.update({f"epoch_{k}" if k in row else k: v for k, v in metrics.items()})
    row.update(node)
    row["timestamp"] = timestamp
    return row


# ----- trial records -----

@dataclass
class TrialRecord:
    trial_id: str
    config: dict[str, Any]
    # Tune's trial state: PENDING, RUNNING, PAUSED, TERMINATED or ERROR (UNKNOWN: see from_folders).
    tune_status: str
    num_failures: int | None
    history: list[Row]
    # The checkpoint the history was read from, relative to the experiment folder; it holds the best
    # epoch's weights too (see ndot.sweep.trainable). None before the trial's first epoch.
    checkpoint: str | None

    @classmethod
    def of(cls, trial: Any, history: list[Row], checkpoint: str | None, status: str | None = None) -> "TrialRecord":
        """From a ray.tune Trial (`status` overrides its state)."""
        return cls(trial.trial_id, dict(trial.config), status or trial.status, trial.run_metadata.num_failures, history, checkpoint)


def experiment_of(trial: Any) -> str:
    """The experiment folder a Tune trial belongs to, now: a local path or a URI (s3://bucket/prefix/name)."""
    return uri_of(trial.storage.storage_filesystem, trial.storage.experiment_fs_path)


def relative_checkpoint(trial: Any, checkpoint_path: str) -> str:
    """A checkpoint's path relative to the experiment folder (which can be synced or moved elsewhere)."""
    return str(PurePosixPath(checkpoint_path).relative_to(trial.storage.experiment_fs_path))


def outcome(tune_status: str, last: Row | None, epochs: int) -> str:
    """completed / stopped_early / diverged / errored, or Tune's state while the trial is unfinished."""
    if last is not None and last.get("status") == "diverged":
        return DIVERGED
    if tune_status == "ERROR":
        return ERRORED
    if last is not None and last["epoch"] >= epochs:
        return COMPLETED
    if tune_status == "TERMINATED":
        return STOPPED_EARLY
    return tune_status.lower()


def collect(experiment: str) -> list[TrialRecord]:
    """The trials of a Tune experiment directory, as its newest experiment state lists them.

    An unfinished trial's rows come from its newest checkpoint on storage,
    which is newer than the state when the driver died. Trial folders the
    state does not list (created after the last state save of a driver that
    then died) are left out: resuming re-creates those trials. Where there is
    no readable state (a driver killed before its first save, or while writing
    one), every trial folder is read instead (from_folders).
    """
    # Imported here so that load() and plotting work without Ray.
    from ray.tune import ExperimentAnalysis

    try:
        with without_tunes_metrics_notice():
            analysis = ExperimentAnalysis(experiment if "://" in experiment else os.path.abspath(experiment))
    except ValueError:  # no state, or one cut short (json's errors are ValueErrors)
        return from_folders(experiment)
    return [record(t) for t in analysis.trials]


# Tune's ExperimentAnalysis, which Tuner.restore and Tuner.fit build too, reads each trial's result.json, which
# ndot never uses (a trial's rows come from its checkpoints), and names in a warning every trial without one: on
# each interrupted sweep, its resume and its collect, the trials stopped before their first epoch ended.
_ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"


def _without_the_metrics_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to fetch metrics for ")


def without_tunes_metrics_notice() -> contextlib.AbstractContextManager[None]:
    """Tune's warning of trials it has no result.json of, left out until the block ends."""
    return logs_without(_ANALYSIS_LOGGER, _without_the_metrics_notice)


def from_folders(experiment: str) -> list[TrialRecord]:
    """Every trial folder's record, from its config and its newest readable checkpoint, without Tune's state.

    What only that state held is lost: a trial short of its epochs may have
    errored, been stopped early or still be running, so its Tune status is
    UNKNOWN, and its number of failures None.
    """
    fs, path = filesystem(experiment)
    out = []
    for folder in sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory):
        ckpt, history = checkpoint.newest(fs, folder)
        try:
            with fs.open_input_stream(f"{folder}/{checkpoint.TRIAL_PARAMS}") as f:
                config = json.loads(f.readall())
        except (FileNotFoundError, json.JSONDecodeError):
            if not history:
                continue  # not a trial's folder, or a trial with no epoch and no config yet: nothing to record
            # Tune uploads a trial's params.json with its experiment state, and the trial's checkpoints
            # as they are taken: a driver that died between the two left checkpoints only. Their rows
            # hold every config value.
            config = {**TrainConfig.from_record(history[-1]).to_dict(), STRATUM_KEY: history[-1]["stratum"]}
        # The inverse of ndot.sweep.runner.trial_dirname.
        trial_id = PurePosixPath(folder).name.removesuffix(f"_{config.get(STRATUM_KEY, '')}")
        relative = str(PurePosixPath(ckpt).relative_to(path)) if ckpt else None
        out.append(TrialRecord(trial_id, config, UNKNOWN, None, history, relative))
    return out


def record(trial: Any) -> TrialRecord:
    """A Tune trial's record, its history read from its checkpoints."""
    fs = trial.storage.storage_filesystem
    if trial.status not in ("TERMINATED", "ERROR"):
        path, history = checkpoint.newest(fs, trial.path)
    elif (c := trial.checkpoint) is None:
        path, history = None, []
    else:
        # Final: the checkpoint Tune recorded last is the trial's end. (A newer
        # one can remain from before a resume that ended the trial sooner.)
        try:
            path, history = c.path, checkpoint.read_history(c.filesystem, c.path)
        except (FileNotFoundError, ValueError) as e:
            # Deleted by checkpoint retention after the state naming it was saved, before the driver died,
            # which is expected; or damaged, which is worth a word. The newest whole one stands in.
            path, history = checkpoint.newest(fs, trial.path)
            if isinstance(e, ValueError):
                # Shown by logging's last-resort handler, message only: the word says what it is.
                log.warning("warning: trial %s: %s; read from %s instead", trial.trial_id, e, path or "no checkpoint")
    # Tune reads a saved state's RUNNING as PENDING, ready to restart: a trial with epochs had begun, and is
    # `running`, as the tables written when the sweep stopped say.
    status = "RUNNING" if trial.status == "PENDING" and history else None
    return TrialRecord.of(trial, history, relative_checkpoint(trial, path) if path else None, status)


# ----- tables -----

# Written only by an epoch that was tested: a table of trials that all diverged at once would lack them.
_TESTED = ("test_loss", "test_acc", "firing_rate")


def _epochs_of(r: TrialRecord) -> pd.DataFrame:
    """A trial's rows of the epochs table."""
    df = pd.DataFrame(r.history)
    if len(df):
        df = df.assign(**{col: math.nan for col in _TESTED if col not in df})
    if "best_test_acc" in df:
        # train() starts a run's best at 0: before its trial's first tested epoch (one that diverged in
        # epoch 1) a row has no best, as the trials table has none, not an accuracy of 0.
        df["best_test_acc"] = df["best_test_acc"].where(df["test_acc"].notna().cummax())
    for col in ("started_at", "timestamp"):
        if col in df:
            df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    return df


def _epochs(parts: Iterable[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def epochs_frame(records: Sequence[TrialRecord]) -> pd.DataFrame:
    return _epochs(map(_epochs_of, records))


def _trial_row(r: TrialRecord) -> Row:
    row = _identity(r.trial_id, r.config)
    last = r.history[-1] if r.history else None
    row.update(status=outcome(r.tune_status, last, row["epochs"]), epochs_run=len(r.history), num_failures=r.num_failures)
    if last is None:
        return row
    h = pd.DataFrame(r.history)
    tested = h.dropna(subset=["test_acc"]) if "test_acc" in h else h.iloc[:0]
    # When the trial's first process began it (data, model, then epoch 1); histories written before
    # rows carried it give the first epoch's start instead.
    started = h["started_at"].iloc[0] if "started_at" in h else h["timestamp"].iloc[0] - h["epoch_seconds"].iloc[0]
    row.update(
        final_test_acc=last.get("test_acc", math.nan),
        best_test_acc=float(tested["test_acc"].max()) if len(tested) else math.nan,
        # The last epoch reaching the best, whose weights the trial's checkpoint holds.
        best_epoch=int(tested["epoch"][tested["test_acc"] == tested["test_acc"].max()].iloc[-1]) if len(tested) else None,
        final_train_loss=last["train_loss"],
        wall_time_s=last["timestamp"] - started,
        train_time_s=float(h["epoch_seconds"].sum()),
        peak_mem_mb=float(h["peak_mem_mb"].max()),
        image_steps_per_s=float(h["image_steps_per_s"].median()),
        started_at=started,
        ended_at=last["timestamp"],
        node_ip=last.get("node_ip"),
        hostname=last.get("hostname"),
        ran_on=last.get("ran_on"),
        checkpoint=r.checkpoint,
    )
    return row


def _trials(rows: Iterable[Row]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    for col in ("best_epoch", "num_failures"):
        if col in df:
            df[col] = df[col].astype("Int64")
    for col in ("started_at", "ended_at"):
        if col in df:
            df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    return df


def trials_frame(records: Sequence[TrialRecord]) -> pd.DataFrame:
    return _trials(map(_trial_row, records))


# What a sweep may search besides lr (ndot.sweep.space): the summary names the best trial's where they vary.
SEARCHED_TOO = ("momentum", "loss_alpha", "batch_size")


def summary(trials: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """One row per stratum: its best trial's best and last-epoch accuracy, learning rate (and momentum, loss alpha
    and batch size where the table's trials differ in them) and checkpoint, and how its trials ended. Strata
    named in `order` come first, in that order; the others follow in the table's order."""
    rows = []
    searched = [k for k in SEARCHED_TOO if k in trials and trials[k].nunique() > 1]
    for stratum, g in trials.groupby("stratum", sort=False):
        scored = g.dropna(subset=["best_test_acc"]) if "best_test_acc" in g else g.iloc[:0]
        best = scored.loc[scored["best_test_acc"].idxmax()] if len(scored) else None
        rows.append({
            "stratum": stratum, "trials": len(g),
            "best_test_acc": best["best_test_acc"] if best is not None else math.nan,
            "final_test_acc": best["final_test_acc"] if best is not None else math.nan,
            "lr": best["lr"] if best is not None else math.nan,
            **{k: best[k] if best is not None else math.nan for k in searched},
            "best_epoch": best["best_epoch"] if best is not None else None,
            "checkpoint": best["checkpoint"] if best is not None else None,
            "outcomes": ", ".join(f"{n} {s}" for s, n in g["status"].value_counts().items()),
        })
    rank = {label: i for i, label in enumerate(order)}
    rows.sort(key=lambda r: rank.get(r["stratum"], len(rank)))
    # Int64: a stratum with no scored trial yet must not turn every best_epoch into a float (1.0).
    counts = {"best_epoch": "Int64", **({"batch_size": "Int64"} if "batch_size" in searched else {})}
    return pd.DataFrame(rows).astype(counts).set_index("stratum")


def plan_uri(experiment: str) -> str:
    """Where an experiment keeps its plan (PLAN_FILE), written by ndot.sweep.runner."""
    return join(experiment, PLAN_FILE)


def is_experiment(folder: str) -> bool:
    """Whether `folder` is a sweep's experiment folder: the one that holds its plan (PLAN_FILE)."""
    return kind(plan_uri(folder)) == pafs.FileType.File


def sweeps_in(folder: str) -> list[str]:
    """The names of the experiment folders directly in `folder` (a sweep's --storage), sorted."""
    fs, path = filesystem(folder)
    subfolders = [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory]
    return sorted(i.base_name for i in subfolders if is_experiment(join(folder, i.base_name)))


def _not_a_sweep(folder: str, why: str) -> str:
    # Pointed at the --storage folder (runs/sweeps), the user meant one of the sweeps in it. (Called while
    # an error is handled: a folder that cannot be listed only goes without the names.)
    try:
        names = sweeps_in(folder)
    except STORAGE_ERRORS:
        names = []
    inside = f"; the sweeps in it: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names else ""
    return f"{folder} is not a sweep's experiment folder ({why}){inside}"


def _plan(experiment: str) -> dict[str, Any]:
    """The experiment's plan (PLAN_FILE) as ndot.sweep.runner wrote it; {} without one."""
    return json.loads(read_bytes(plan_uri(experiment))) if is_experiment(experiment) else {}


def plan_order(experiment: str) -> list[str]:
    """The strata as the sweep's plan (PLAN_FILE) lists them, the order its own summary uses; [] without a plan."""
    return [s["label"] for s in _plan(experiment).get("strata", [])]


def summary_text(trials: pd.DataFrame, order: Sequence[str] = ()) -> str:
    acc = "{:.4f}".format
    # lr in full: the sweep draws it from a continuous range, and a rerun of the best trial takes it as it is.
    return summary(trials, order).to_string(formatters={"best_test_acc": acc, "final_test_acc": acc, "lr": lambda v: repr(float(v))})


# ----- files -----

def table_uri(experiment: str, table: str) -> str:
    return join(experiment, f"{table}.parquet")


# TrainConfig's fields that may be None (data_root, where the trials read the data module's root), and ran_on,
# which histories written before it lack.
_OPTIONAL_STR = (*(f.name for f in dataclasses.fields(TrainConfig) if f.type == "str | None"), "ran_on")


def _parquet(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    # A column that no row has a value in would be of Arrow's type null, to which a dataset over several
    # sweeps' tables cannot cast the strings of a sweep that set it: a string column, as where one did.
    for name in _OPTIONAL_STR:
        if name in table.column_names and pa.types.is_null(table.schema.field(name).type):
            i = table.column_names.index(name)
            table = table.set_column(i, name, table.column(i).cast(table.schema.field("trial_id").type))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _began(r: TrialRecord) -> tuple[bool, float, str]:
    """The order of the trials in the tables: as they began, those that have not yet last (by id)."""
    if not r.history:
        return True, 0.0, r.trial_id
    first = r.history[0]
    return False, first["started_at"] if "started_at" in first else first["timestamp"] - first["epoch_seconds"], r.trial_id


class Tables:
    """The two tables of `experiment`, written whole again and again as its trials go on (ndot.sweep.recorder).

    Each write builds anew only the rows of the trials whose record changed since the last: a record
    whose history is another list, or whose checkpoint, status or number of failures differ. Building
    every trial's rows each time was most of a write's time, which grew with the trials finished
    (0.6 s a write at 64 trials of 300 epochs, 4 s at 500, every ten seconds in the driver's loop).
    """

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        # trial id -> (history, (checkpoint, status, failures), (its rows of the epochs table, its row of the trials table))
        self._built: dict[str, tuple[list[Row], tuple[str | None, str, int | None], tuple[pd.DataFrame, Row]]] = {}

    def _parts(self, r: TrialRecord) -> tuple[pd.DataFrame, Row]:
        changes = (r.checkpoint, r.tune_status, r.num_failures)
        built = self._built.get(r.trial_id)
        # The history by identity: the same list is the same rows (comparing them would cost what building does).
        if built is None or built[0] is not r.history or built[1] != changes:
            built = self._built[r.trial_id] = r.history, changes, (_epochs_of(r), _trial_row(r))
        return built[2]

    def write(self, records: Sequence[TrialRecord]) -> None:
        # Tune lists the trials in one order while the sweep runs (a restarted trial moved last) and in another
        # in the experiment state that collect reads: in the order they began, both write the same tables, and
        # the summary picks the same one of two trials that tie.
        parts = [self._parts(r) for r in sorted(records, key=_began)]
        # Whose rows they are, once several sweeps' tables are concatenated: the sweep's --name, script and --storage
        # (two sweeps of one --name in two storages), as its plan records them, so a copy of the folder elsewhere still
        # says ("" where the plan does not say).
        plan = _plan(self.experiment)
        sweep = {"experiment": plan.get("name", ""), "sweep": plan.get("sweep", ""), "storage": plan.get("storage", "")}
        for table, frame in ((EPOCHS_TABLE, _epochs(e for e, _ in parts)), (TRIALS_TABLE, _trials(t for _, t in parts))):
            frame = pd.concat([pd.DataFrame(sweep, index=frame.index), frame], axis=1)
            write_bytes(table_uri(self.experiment, table), _parquet(frame))


def write_tables(experiment: str, records: Sequence[TrialRecord]) -> None:
    Tables(experiment).write(records)


def load(path: str | os.PathLike[str], table: str = EPOCHS_TABLE) -> pd.DataFrame:
    """A results table: `path` is a .parquet file or an experiment directory (then `table` picks which)."""
    if table not in (EPOCHS_TABLE, TRIALS_TABLE):
        raise ValueError(f"table must be {EPOCHS_TABLE!r} or {TRIALS_TABLE!r}, got {table!r}")
    # A notebook often holds a pathlib.Path: ndot.files takes text, and a Path to a table failed there (TypeError).
    path = os.fspath(path)
    uri = path if path.endswith(".parquet") else table_uri(path, table)
    fs, p = filesystem(uri)
    return pd.read_parquet(p, filesystem=fs)


def write_plots(experiment: str) -> list[str]:
    """Render the figures of an experiment's tables into its directory; returns their URIs."""
    from ndot import plots

    out = []
    figures = plots.render(load(experiment, TRIALS_TABLE), load(experiment, EPOCHS_TABLE))
    for name, png in figures.items():
        uri = join(experiment, f"{name}.png")
        write_bytes(uri, png)
        out.append(uri)
    # A figure drawn before and not now would stand beside the new ones, stale: accuracy_vs_arch of an
    # architectures sweep whose first trials all ran at one T, now drawn against T.
    fs, path = filesystem(experiment)
    for name in plots.NAMES - set(figures):
        try:
            fs.delete_file(f"{path}/{name}.png")
        except FileNotFoundError:
            pass
    return out


# ----- command line -----

def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m ndot.results", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command, does in (("collect", f"rebuild {EPOCHS_TABLE}.parquet and {TRIALS_TABLE}.parquet in DIR from its trials' checkpoints"),
                          ("plot", "write PNG figures into DIR from its tables"),
                          ("summary", "print each stratum's best trial from the tables in DIR")):
        sub.add_parser(command, help=does, description=f"{does[0].upper()}{does[1:]}.").add_argument(
            "dir", type=named, metavar="DIR", help="a sweep's experiment folder (STORAGE/NAME), local or a URI (s3://...)")
    args = p.parse_args(argv)
    if args.dir.endswith(".parquet"):
        return refuse(f"{args.dir} is a table; give the experiment folder that holds it")
    try:
        if kind(args.dir) == pafs.FileType.NotFound:
            return refuse(f"{args.dir} does not exist")
        if args.command == "collect":
            if not is_experiment(args.dir):
                return refuse(_not_a_sweep(args.dir, f"it holds no {PLAN_FILE}"))
            records = collect(args.dir)
            write_tables(args.dir, records)
            rows = sum(len(r.history) for r in records)
            if any(r.tune_status == UNKNOWN for r in records):
                print(f"{args.dir} has no readable experiment state: its trials were read from their folders, and one "
                      f"short of its epochs is {UNKNOWN.lower()} (errored, stopped early or unfinished)", file=sys.stderr)
            print(f"{len(records)} trials, {rows} epochs -> {table_uri(args.dir, EPOCHS_TABLE)}, {table_uri(args.dir, TRIALS_TABLE)}")
        else:
            trials = load(args.dir, TRIALS_TABLE)
            if trials.empty:  # collected before any trial began
                print(f"{args.dir}: no trial yet; the tables fill when the sweep's first epoch ends", file=sys.stderr)
                return 1
            if args.command == "plot":
                uris = write_plots(args.dir)
                if not uris:  # every trial pending, or diverged before its first measure
                    print(f"{args.dir}: nothing to draw: no trial has an accuracy or a cost yet", file=sys.stderr)
                    return 1
                for uri in uris:
                    print(uri)
            else:
                print(summary_text(trials, order=plan_order(args.dir)))
    except FileNotFoundError as e:
        if args.command != "collect" and is_experiment(args.dir):
            print(f"{args.dir}: no tables yet; they appear when the sweep's first epoch ends", file=sys.stderr)
            return 1
        return refuse(_not_a_sweep(args.dir, f"not found: {str(e).splitlines()[0]}"))
    except BrokenPipeError:
        raise  # an OSError, but the reader of stdout gone (`| head`), not storage: cli.run ends the command as SIGPIPE would
    except KeyError as e:
        return refuse(f"{args.dir}: a table lacks the column {e}: not the tables of a sweep "
                      f"(python -m ndot.results collect {args.dir} rebuilds them)")
    except STORAGE_ERRORS as e:  # pyarrow's words name a table's path at most (s3:// reads 's3:/trials.parquet')
        return refuse(f"{args.dir}: {e}")
    return 0


if __name__ == "__main__":
    run(main)
