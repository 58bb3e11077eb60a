"""A running sweep's own lines: one per finished trial, and a status line every few minutes on where the
sweep stands and, until their first epoch, what its running trials do (ndot.sweep.activity)."""
from __future__ import annotations

import datetime
import time
from typing import Any, Callable

from ray import tune
from ray.actor import ActorHandle
from ray.tune.experiment import Trial

from ndot import results
from ndot.sweep import activity
from ndot.sweep.runner import METRIC
from ndot.sweep.space import STRATUM_KEY

# Seconds between the status lines of a running sweep.
STATUS_EVERY_S = 300.0


class Progress(tune.Callback):
    """One line per finished trial and, while trials run, a line every `every_s` on where they are:
    a paper-preset trial runs for hours before it finishes."""

    def __init__(self, total: int, every_s: float = STATUS_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._total, self._every_s, self._clock = total, every_s, clock
        self._started()
        self._board: ActorHandle | None = None

    def setup(self, **info: Any) -> None:
        # Here too, not in __init__ alone: Tune stores this callback with the experiment before the sweep runs, and
        # restores it for a resume, whose run calls setup again. Its clock then is another process's, on another
        # machine or boot maybe: the restored times said a negative time in, or no line for as long as that uptime.
        self._started()
        self._board = activity.board()

    def _started(self) -> None:
        self._start = self._clock()
        self._next = self._start + self._every_s

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = self._clock()
        if now >= self._next:
            self._next = now + self._every_s
            running = [t for t in trials if t.status == Trial.RUNNING]
            # Before its first epoch result a trial reads as 0 epochs done: for tens of minutes where it builds its
            # data caches on a cluster's node, whose output the driver never sees. It says what it does instead.
            said = activity.read(self._board) if running and self._board is not None else {}
            doing = [f"  {_label(t)}: {said[t.trial_id]}" for t in running if t.trial_id in said]
            print("\n".join([status_line(trials, self._total, now - self._start), *doing]), flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._line(trials, trial, Trial.TERMINATED)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._line(trials, trial, Trial.ERROR)

    def _line(self, trials: list[Trial], trial: Trial, status: str) -> None:
        # Counted from the trial list, so that the count is right after a resume too.
        done = 1 + sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials if t is not trial)
        last = trial.last_result if "epoch" in (trial.last_result or {}) else None
        outcome = results.outcome(status, last, trial.config["epochs"])
        if last is None:
            progress = "no epoch"
        elif not _tested(last):
            progress = "epoch 1, not tested"
        else:
            progress = f"epoch {last['epoch']}, best acc {last[METRIC]:.4f}"
        print(f"[{done}/{self._total}] {_label(trial)}: {outcome} ({progress})", flush=True)


def _label(trial: Trial) -> str:
    return f"{trial.config[STRATUM_KEY]} lr={trial.config['lr']:.3g}"


def status_line(trials: list[Trial], total: int, elapsed_s: float) -> str:
    """Where a sweep of `total` trials stands, in one line: `trials` are those the searcher has created so far."""
    done = sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)
    running = [t for t in trials if t.status == Trial.RUNNING]
    line = f"{datetime.timedelta(seconds=round(elapsed_s))} in: {done}/{total} trials done, {len(running)} running"
    if running:
        epochs = sorted((t.last_result or {}).get("epoch", 0) for t in running)
        span = f"{epochs[0]}-{epochs[-1]}" if epochs[0] != epochs[-1] else f"{epochs[0]}"
        line += f" ({span} of {running[0].config['epochs']} epochs done)"
    line += f", {total - done - len(running)} waiting"
    tested = [t for t in trials if METRIC in (t.last_result or {}) and _tested(t.last_result)]
    if tested:
        best = max(tested, key=lambda t: t.last_result[METRIC])
        line += f"; best acc so far {best.last_result[METRIC]:.4f} ({_label(best)})"
    return line


def _tested(result: dict[str, Any]) -> bool:
    # A trial that diverged in its first epoch reports METRIC 0, ASHA's and Optuna's, without having
    # been tested: the tables hold no accuracy for it.
    return not (result["status"] == "diverged" and result["epoch"] == 1)
