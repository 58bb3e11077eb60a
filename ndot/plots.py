"""Figures of a sweep's per-trial table: what a researcher looks at first.

accuracy_vs_T       best test accuracy of each stratum against T, one line per rule (the paper's table)
accuracy_vs_lr      every trial's best test accuracy against its learning rate, per rule and T
                    (in both, a hollow marker is a trial that did not complete: stopped early, diverged,
                    errored or still running, whose best is of fewer epochs or of weights that diverged)
cost_vs_T           peak memory and training throughput against T, per rule

A line is a rule (method), and a rule on one architecture when the table holds several. A table
of several architectures at one T (the architectures sweep) is drawn against the architecture
instead: accuracy_vs_arch and cost_vs_arch, a point per rule and architecture.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ndot.results import COMPLETED  # noqa: E402

if TYPE_CHECKING:
    from pandas.api.typing import DataFrameGroupBy  # pandas >= 2.1; annotations only

XLABELS = {"T": "time steps T", "arch": "architecture"}


def axis(trials: pd.DataFrame) -> str:
    """What the accuracy and cost figures run along: T, or the architecture where T is one and they are several."""
    return "arch" if trials["T"].nunique() == 1 and trials["arch"].nunique() > 1 else "T"


def _curves(trials: pd.DataFrame) -> pd.Series:
    """The line each trial belongs to: its method, and its architecture when the table holds several
    along another axis (an architectures sweep at several T would otherwise draw one architecture's
    points over the other's)."""
    if trials["arch"].nunique() > 1 and axis(trials) != "arch":
        return trials["method"] + ", " + trials["arch"]
    return trials["method"]


UNFINISHED = "did not complete"


def _unfinished(trials: pd.DataFrame) -> pd.Series:
    return trials["status"] != COMPLETED


def _lines(ax: Axes, series: pd.Series, x: str, ylabel: str, hollow: pd.Series | None = None) -> None:
    """`series` is indexed by (curve, x); so is `hollow`, True where the point's marker is to be hollow."""
    for name, s in series.groupby(level="curve"):
        s = s.droplevel("curve").sort_index()
        empty = hollow.loc[name].reindex(s.index).to_numpy() if hollow is not None else [False] * len(s)
        # Architectures are categories: points, not a line through them.
        line, = ax.plot(s.index, s.values, marker="o", ls="-" if x == "T" else "", label=name,
                        markevery=[i for i, e in enumerate(empty) if not e])
        if any(empty):
            ax.plot(s.index[empty], s.values[empty], marker="o", ls="", mfc="none", color=line.get_color(), label="_" + name)
    if x == "T":
        ax.set_xticks(sorted(series.index.get_level_values("T").unique()))
    else:
        ax.margins(x=0.25)  # the outer categories' points clear of the frame
    ax.set_xlabel(XLABELS[x])
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if hollow is not None and hollow.any():
        handles.append(Line2D([], [], color="0.4", marker="o", mfc="none", ls="", label=f"best trial {UNFINISHED}"))
    ax.legend(handles=handles)


def _by_curve_and(trials: pd.DataFrame, x: str) -> DataFrameGroupBy:
    return trials.assign(curve=_curves(trials)).groupby(["curve", x])


def _setting(trials: pd.DataFrame) -> str:
    """What every point shares, for titles: the dataset(s), and the architecture or T where there is one."""
    shared = sorted(trials["dataset"].unique())
    archs = sorted(trials["arch"].unique())
    if len(archs) == 1:
        shared += archs
    if axis(trials) == "arch":
        shared.append(f"T={trials['T'].iloc[0]}")
    return ", ".join(shared)


def accuracy_vs_axis(trials: pd.DataFrame) -> Figure:
    """Against T, or against the architecture (see `axis`)."""
    x = axis(trials)
    trials = trials.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    by = _by_curve_and(trials, x)
    # The best trial of a stratum is the tuned result for that (rule, T); each trial scores its best epoch.
    best = by["best_test_acc"].idxmax()
    _lines(ax, by["best_test_acc"].max() * 100, x, "best test accuracy (%)",
           hollow=pd.Series(_unfinished(trials).loc[best].to_numpy(), index=best.index))
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
        # The alpha in the colours: a collection's own alpha would fill the hollow markers too.
        colour = to_rgba(colours[curve], 0.8)
        ax.scatter(g["lr"], g["best_test_acc"] * 100, marker=markers[T], edgecolors=[colour],
                   facecolors=[colour if done else "none" for done in ~_unfinished(g)])
    ax.set_xscale("log")
    ax.set_xlabel("initial learning rate")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title(f"{_setting(trials)}: every trial against its learning rate", fontsize=10)
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", ls="", label=name) for name, c in colours.items()]
    if len(markers) > 1:
        handles += [Line2D([], [], color="0.4", marker=m, ls="", label=f"T={T}") for T, m in markers.items()]
    if _unfinished(trials).any():
        handles.append(Line2D([], [], color="0.4", marker="o", mfc="none", ls="", label=f"trial {UNFINISHED}"))
    ax.legend(handles=handles, fontsize="small")
    return fig


def cost_vs_axis(trials: pd.DataFrame) -> Figure:
    """Against T, or against the architecture (see `axis`)."""
    x = axis(trials)
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.4))
    by = _by_curve_and(trials, x)
    _lines(mem, by["peak_mem_mb"].median(), x, "peak memory (MiB)")  # ndot.memory: 2**20 bytes
    _lines(speed, by["image_steps_per_s"].median(), x, "training image-steps / s")
    along = "T" if x == "T" else "architecture"
    mem.set_title(f"memory against {along} (median over trials)", fontsize=10)
    speed.set_title(f"{_setting(trials)}: throughput against {along} (median over trials)", fontsize=10)
    # The column means different things per device; on a CPU it is not a measure of the rule alone.
    fig.supxlabel("peak memory: on a GPU, the most allocated in an epoch; on a CPU, the peak resident set of the "
                  "worker process, which includes Python, torch and Ray and, as Tune reuses workers, earlier trials",
                  fontsize=7, color="0.35")
    return fig


# Each figure and the columns its points need: a trial that diverged in its first epoch has no accuracy.
# Named for the axis its points run along (`axis`): accuracy_vs_T or accuracy_vs_arch.
FIGURES = {"accuracy_vs_{axis}": (accuracy_vs_axis, ["best_test_acc"]), "accuracy_vs_lr": (accuracy_vs_lr, ["best_test_acc"]),
           "cost_vs_{axis}": (cost_vs_axis, ["peak_mem_mb", "image_steps_per_s"])}


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
        out[name.format(axis=axis(points))] = buf.getvalue()
    return out
