"""Figures of a sweep's per-trial table: what a researcher looks at first.

accuracy_vs_T       best test accuracy of each stratum against T, one line per rule (the paper's table)
accuracy_vs_lr      every trial's best test accuracy against its learning rate, per rule and T
cost_vs_T           peak memory and training throughput against T, per rule

A line is a rule (method), and a rule on one architecture when the table holds several.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

if TYPE_CHECKING:
    from pandas.api.typing import DataFrameGroupBy  # pandas >= 2.1; annotations only


def _curves(trials: pd.DataFrame) -> pd.Series:
    """The line each trial belongs to: its method, and its architecture when the table holds several
    (an architectures sweep would otherwise draw one architecture's points over the other's)."""
    if trials["arch"].nunique() > 1:
        return trials["method"] + ", " + trials["arch"]
    return trials["method"]


def _lines_over_T(ax: plt.Axes, series: pd.Series, ylabel: str) -> None:
    """`series` is indexed by (curve, T)."""
    for name, s in series.groupby(level="curve"):
        s = s.droplevel("curve").sort_index()
        ax.plot(s.index, s.values, marker="o", label=name)
    ax.set_xticks(sorted(series.index.get_level_values("T").unique()))
    ax.set_xlabel("time steps T")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def _by_curve_and_T(trials: pd.DataFrame) -> DataFrameGroupBy:
    return trials.assign(curve=_curves(trials)).groupby(["curve", "T"])


def _setting(trials: pd.DataFrame) -> str:
    """What every point shares, for titles: the dataset(s) and, when there is one, the architecture."""
    archs = sorted(trials["arch"].unique())
    return ", ".join(sorted(trials["dataset"].unique()) + (archs if len(archs) == 1 else []))


def accuracy_vs_T(trials: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    by = _by_curve_and_T(trials)
    # The best trial of a stratum is the tuned result for that (rule, T); each trial scores its best epoch.
    _lines_over_T(ax, by["best_test_acc"].max() * 100, "best test accuracy (%)")
    n = by.size()
    trials_per_point = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
    ax.set_title(f"{_setting(trials)}: best of {trials_per_point} trial(s) per point", fontsize=10)
    return fig


def accuracy_vs_lr(trials: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = _curves(trials)
    colours = dict(zip(sorted(curves.unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    # Trials at different T are different searches: a marker per T keeps them apart.
    markers = dict(zip(sorted(trials["T"].unique()), "osD^vP*Xph" * 4))
    for (curve, T), g in trials.groupby([curves, "T"]):
        ax.scatter(g["lr"], g["best_test_acc"] * 100, color=colours[curve], marker=markers[T], alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("initial learning rate")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title(f"{_setting(trials)}: every trial against its learning rate", fontsize=10)
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", ls="", label=name) for name, c in colours.items()]
    if len(markers) > 1:
        handles += [Line2D([], [], color="0.4", marker=m, ls="", label=f"T={T}") for T, m in markers.items()]
    ax.legend(handles=handles, fontsize="small")
    return fig


def cost_vs_T(trials: pd.DataFrame) -> Figure:
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.4))
    by = _by_curve_and_T(trials)
    _lines_over_T(mem, by["peak_mem_mb"].median(), "peak memory (MB)")
    _lines_over_T(speed, by["image_steps_per_s"].median(), "training image-steps / s")
    mem.set_title("memory against T (median over trials)", fontsize=10)
    speed.set_title(f"{_setting(trials)}: throughput against T (median over trials)", fontsize=10)
    # The column means different things per device; on a CPU it is not a measure of the rule alone.
    fig.supxlabel("peak memory: on a GPU, the most allocated in an epoch; on a CPU, the peak resident set of the "
                  "worker process, which includes Python, torch and Ray and, as Tune reuses workers, earlier trials",
                  fontsize=7, color="0.35")
    return fig


# Each figure and the columns its points need: a trial that diverged in its first epoch has no accuracy.
FIGURES = {"accuracy_vs_T": (accuracy_vs_T, ["best_test_acc"]), "accuracy_vs_lr": (accuracy_vs_lr, ["best_test_acc"]),
           "cost_vs_T": (cost_vs_T, ["peak_mem_mb", "image_steps_per_s"])}


def render(trials: pd.DataFrame) -> dict[str, bytes]:
    """PNG bytes of every figure that has a point, each from the trials that have its values."""
    out = {}
    ran = trials[trials["epochs_run"] > 0]
    for name, (make, needs) in FIGURES.items():
        points = ran.dropna(subset=needs) if set(needs) <= set(ran) else ran.iloc[:0]
        if points.empty:
            continue
        fig = make(points)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out
