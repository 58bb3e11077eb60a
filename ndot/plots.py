"""Figures of a sweep's per-trial table: what a researcher looks at first.

accuracy_vs_T       best test accuracy of each stratum against T, one line per rule (the paper's table)
accuracy_vs_lr      every trial's best test accuracy against its learning rate, a panel per T (and
                    architecture); drawn only where the trials differ in learning rate
                    (in both, a hollow marker is a trial that did not complete: stopped early, diverged,
                    errored or still running, whose best is of fewer epochs or of weights that diverged)
cost_vs_T           peak memory and training throughput against T, per rule
curves_vs_epoch     test accuracy and training loss per epoch of each stratum's best trial (accuracy_vs_T's
                    point), a row per T: whether the trial had converged or was still learning when it stopped
                    (hollow markers: it did not complete)

A rule (method) has one colour and one marker shape in every figure of every table, and the rules come in the project's
order (ndot.config's RULES, each in mode O before A), in legends as in drawing; where a table holds several
architectures along T, a line style tells them apart. A table of several architectures at one T
(the architectures sweep) is drawn against the architecture instead: accuracy_vs_arch and
cost_vs_arch, a point per rule and architecture. Legends sit right of the axes, clear of the data.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import matplotlib
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ndot.config import MODES, RULES, method, parse_method
from ndot.results import COMPLETED

if TYPE_CHECKING:
    from pandas.api.typing import DataFrameGroupBy  # pandas >= 2.1; annotations only

XLABELS = {"T": "time steps T", "arch": "architecture"}
# tab10 holds the nine rule-mode pairs there are; shapes as well as colours keep rules apart in grey print.
# Points of several rules often coincide (at T = 1 every rule computes the same gradient): each rule's
# markers are drawn smaller than the one's before, so that coinciding markers nest rather than hide.
COLOURS = matplotlib.colormaps["tab10"].colors
MARKERS = "osD^vPX*ph"
LARGEST, SMALLEST = 9.0, 4.5  # marker sizes (points) of the first rule and of the last
LINESTYLES = ("-", "--", ":", "-.")


def axis(trials: pd.DataFrame) -> str:
    """What the accuracy and cost figures run along: T, or the architecture where T is one and they are several."""
    return "arch" if trials["T"].nunique() == 1 and trials["arch"].nunique() > 1 else "T"


def _method_order(method: str) -> tuple[int, int, str]:
    """Where a method sorts: by rule in RULES' order, then mode in MODES' (ndot_O, ndot_A, ottt_A, bptt_A, as the
    sweeps list them); a method of a rule or mode this version does not know, last, by name."""
    rule, _, mode = method.rpartition("_")
    if rule in RULES and mode in MODES:
        return RULES.index(rule), MODES.index(mode), method
    return len(RULES), 0, method


def _curve_order(curve: str) -> tuple[tuple[int, int, str], str]:
    method, _, arch = curve.partition(", ")
    return _method_order(method), arch


def _runs(name: str) -> bool:
    try:
        parse_method(name)
    except ValueError:  # bptt_O
        return False
    return True


# Every method there is, in the project's order. A method's colour and marker are its place here, not among the
# methods of the trials drawn: those differ between the figures of one table, a figure leaving out the trials that
# lack its values (ndot_O diverged in its first epoch: in the cost figure, not in the accuracy ones), and between tables.
METHODS = [m for m in (method(rule, mode) for rule in RULES for mode in MODES) if _runs(m)]


def _styles(trials: pd.DataFrame) -> dict[str, dict]:
    """A method's colour and marker, by its place in METHODS (a method this version does not know, after them), and
    its marker size by its place among the trials' methods (`_method_order`)."""
    methods = sorted(trials["method"].unique(), key=_method_order)
    unknown = [m for m in methods if m not in METHODS]
    slot = {m: METHODS.index(m) if m in METHODS else len(METHODS) + unknown.index(m) for m in methods}
    step = (LARGEST - SMALLEST) / max(len(methods) - 1, 1)
    return {m: {"color": COLOURS[slot[m] % len(COLOURS)], "marker": _marker(slot[m]),
                "markersize": LARGEST - i * step} for i, m in enumerate(methods)}


def _marker(slot: int) -> str:
    # Each round of the colours shifts the markers by one: past the palette (methods this version does not know), a
    # method's colour is an earlier one's, never with its marker too (for len(COLOURS) * len(MARKERS) methods).
    return MARKERS[(slot + slot // len(COLOURS)) % len(MARKERS)]


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


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def _legend(ax: Axes, handles: list) -> None:
    # Outside the axes: inside, a legend of many lines sits on some of them wherever it goes.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize="small")


def _lines(ax: Axes, series: pd.Series, x: str, ylabel: str, styles: dict[str, dict], archs: dict[str, str],
           hollow: pd.Series | None = None) -> None:
    """`series` is indexed by (curve, x); so is `hollow`, True where the point's marker is to be hollow.
    `archs` maps a curve to its architecture's line style where the curves are (method, architecture)."""
    # In the rules' order: each next rule's smaller markers are drawn over the larger ones before them.
    for name in sorted(series.index.unique("curve"), key=_curve_order):
        s = series.loc[name].sort_index()
        method, _, arch = name.partition(", ")
        empty = hollow.loc[name].reindex(s.index).to_numpy() if hollow is not None else [False] * len(s)
        # Architectures are categories: points, not a line through them.
        ls = "" if x != "T" else archs.get(arch, "-")
        line, = ax.plot(s.index, s.values, ls=ls, label=name, markevery=[i for i, e in enumerate(empty) if not e],
                        **styles[method])
        if any(empty):
            ax.plot(s.index[empty], s.values[empty], ls="", mfc="none", label="_" + name, **styles[method])
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
    _legend(ax, handles)


def _percent_axis(ax: Axes) -> None:
    # Autoscaled round a single value (one T, one point) the axis ran to 102 %.
    low, high = ax.get_ylim()
    if high > 100:
        ax.set_ylim(low, 100 + 0.05 * (100 - low))


def _arch_styles(trials: pd.DataFrame) -> dict[str, str]:
    return {a: LINESTYLES[i % len(LINESTYLES)] for i, a in enumerate(sorted(trials["arch"].unique()))}


def _by_curve_and(trials: pd.DataFrame, x: str) -> DataFrameGroupBy:
    return trials.assign(curve=_curves(trials)).groupby(["curve", x])


def _best_trials(trials: pd.DataFrame) -> pd.Series:
    """The row label of each point's best trial, indexed by (curve, x): the tuned result for a stratum (rule, T and
    architecture), each trial scored by its best epoch. `trials` is to have unique labels."""
    return _by_curve_and(trials, axis(trials))["best_test_acc"].idxmax()


def _setting(trials: pd.DataFrame) -> str:
    """What every point shares, for titles: the dataset(s), and the architecture or T where there is one."""
    shared = sorted(trials["dataset"].unique())
    archs = sorted(trials["arch"].unique())
    if len(archs) == 1:
        shared += archs
    if trials["T"].nunique() == 1:
        shared.append(f"T={trials['T'].iloc[0]}")
    return ", ".join(shared)


def _subplots(figsize: tuple[float, float], *grid: int, **share: Any) -> tuple[Figure, Any]:
    """A figure and its axes (Figure.subplots' `grid` rows and columns) on an Agg canvas of its own, outside pyplot:
    drawing here sets no backend and leaves pyplot's figures alone, so that a notebook that renders a sweep's figures
    (or runs the sweep) keeps its own."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*grid, **share)


def accuracy_vs_axis(trials: pd.DataFrame) -> Figure:
    """Against T, or against the architecture (see `axis`)."""
    x = axis(trials)
    trials = trials.reset_index(drop=True)
    fig, ax = _subplots((7, 4))
    by = _by_curve_and(trials, x)
    best = _best_trials(trials)
    _lines(ax, by["best_test_acc"].max() * 100, x, "best test accuracy (%)", _styles(trials), _arch_styles(trials),
           hollow=pd.Series(_unfinished(trials).loc[best].to_numpy(), index=best.index))
    _percent_axis(ax)
    n = by.size()
    per_point = _trials(n.min()) if n.min() == n.max() else f"{n.min()}-{n.max()} trials"
    ax.set_title(f"{_setting(trials)}: best of {per_point} per point", fontsize=10)
    return fig


def _decimal_log(axis: Axis, values: pd.Series) -> None:
    """Label a log-scaled axis over `values` (positive) in decimals, at 1, 2 and 5 of each decade where they span
    two decades at most, else at each decade: a range under a decade otherwise gets matplotlib's minor labels
    (2×10⁻¹ 3×10⁻¹ …), and 1-2-5 over three decades, labels that run into each other."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if values.max() / values.min() <= 100 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _lr_axis(ax: Axes, lr: pd.Series) -> None:
    ax.set_xscale("log")
    _decimal_log(ax.xaxis, lr)
    ax.grid(alpha=0.3)


def accuracy_vs_lr(trials: pd.DataFrame) -> Figure:
    """A panel per T (and architecture): trials at different T, or on different architectures, are different searches."""
    panels = sorted(trials.groupby(["arch", "T"]).groups)
    several_archs = trials["arch"].nunique() > 1
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = _subplots((2 + 4 * cols, 0.8 + 3.2 * rows), rows, cols, sharex=True, sharey=True, squeeze=False)
    styles = _styles(trials)
    for ax, (arch, T) in zip(axes.flat, panels):
        panel = trials[(trials["arch"] == arch) & (trials["T"] == T)]
        for m, g in sorted(panel.groupby("method"), key=lambda mg: _method_order(mg[0])):
            # The alpha in the colours: a collection's own alpha would fill the hollow markers too.
            colour = to_rgba(styles[m]["color"], 0.8)
            ax.scatter(g["lr"], g["best_test_acc"] * 100, marker=styles[m]["marker"], s=styles[m]["markersize"] ** 2,
                       edgecolors=[colour],
                       facecolors=[colour if done else "none" for done in ~_unfinished(g)])
        if len(panels) > 1:  # what tells the panels apart; the figure's title says what they share
            ax.set_title(f"{arch}, T={T}" if several_archs else f"T={T}", fontsize=10)
        _lr_axis(ax, trials["lr"])
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    # The lowest panel of each column carries its rates, the last row being short of panels where it is.
    for column in axes.T:
        lowest = [ax for ax in column if ax.get_visible()][-1]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel("initial learning rate (log scale)")
    for ax in axes[:, 0]:
        ax.set_ylabel("best test accuracy (%)")
    _percent_axis(axes[0, 0])  # shared by every panel
    fig.suptitle(f"{_setting(trials)}: every trial against its learning rate", fontsize=10)
    handles = [Line2D([], [], ls="", label=m, **s) for m, s in styles.items()]
    if _unfinished(trials).any():
        handles.append(Line2D([], [], color="0.4", marker="o", mfc="none", ls="", label=f"trial {UNFINISHED}"))
    _legend(axes[0, -1], handles)
    return fig


def cost_vs_axis(trials: pd.DataFrame) -> Figure:
    """Against T, or against the architecture (see `axis`)."""
    x = axis(trials)
    fig, (mem, speed) = _subplots((12, 4.4), 1, 2)
    by = _by_curve_and(trials, x)
    styles, archs = _styles(trials), _arch_styles(trials)
    _lines(mem, by["peak_mem_mb"].median(), x, "peak memory (MiB)", styles, archs)  # ndot.memory: 2**20 bytes
    _lines(speed, by["image_steps_per_s"].median(), x, "training image-steps / s", styles, archs)
    # From 0: on an axis cut to the data's range, a cost 10 % above another looked several times it.
    for ax in (mem, speed):
        ax.set_ylim(bottom=0)
    mem.get_legend().remove()  # the same lines in both panels: one legend says it
    along = "T" if x == "T" else "architecture"
    mem.set_title(f"memory against {along}", fontsize=10)
    speed.set_title(f"throughput against {along}", fontsize=10)
    fig.suptitle(f"{_setting(trials)}: median over trials per point", fontsize=10)
    fig.supxlabel(_peak_memory_is(trials), fontsize=7, color="0.35")
    return fig


# Markers spaced along a curve by a tenth of the axes' diagonal: at every epoch of a short trial, and not
# a solid band of them along 300 epochs.
MARK_EVERY = 0.1


def curves_vs_epoch(trials: pd.DataFrame, epochs: pd.DataFrame) -> Figure:
    """A row per T, test accuracy and training loss by epoch, a line per stratum: the epochs (from the epochs
    table) of the trial that accuracy_vs_axis draws for it."""
    trials = trials.reset_index(drop=True)
    best = trials.loc[_best_trials(trials)]
    drawn = epochs[epochs["trial_id"].isin(best["trial_id"])].sort_values("epoch")
    several_archs = trials["arch"].nunique() > 1
    Ts = sorted(best["T"].unique())
    fig, axes = _subplots((12, 1 + 2.8 * len(Ts)), len(Ts), 2, sharex=True, sharey="col", squeeze=False)
    styles, archs = _styles(trials), _arch_styles(trials)
    handles = {}
    for (acc, loss), T in zip(axes, Ts):
        for t in sorted(best[best["T"] == T].itertuples(), key=lambda t: (_method_order(t.method), t.arch)):
            h = drawn[drawn["trial_id"] == t.trial_id]
            label = f"{t.method}, {t.arch}" if several_archs else t.method
            look = {"ls": archs[t.arch] if several_archs else "-", "markevery": MARK_EVERY, **styles[t.method]}
            hollow = {"mfc": "none"} if t.status != COMPLETED else {}
            acc.plot(h["epoch"], h["test_acc"] * 100, label=label, **look, **hollow)
            loss.plot(h["epoch"], h["train_loss"], label=label, **look, **hollow)  # a diverged epoch's inf: no point
            handles[label] = Line2D([], [], label=label, **look)
        if len(Ts) > 1:  # what tells the rows apart; the figure's title says what they share
            acc.set_title(f"T={T}", fontsize=10)
            loss.set_title(f"T={T}", fontsize=10)
        acc.set_ylabel("test accuracy (%)")
        loss.set_ylabel("training loss (log scale)")
        loss.set_yscale("log")  # the late epochs' small changes stay visible beside the first epoch's loss
        for ax in (acc, loss):
            ax.grid(alpha=0.3)
    # Once the column is log-scaled, which resets its ticks; over the losses drawn, finite.
    _decimal_log(axes[0, 1].yaxis, drawn["train_loss"][(drawn["train_loss"] > 0) & (drawn["train_loss"] < math.inf)])
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no epoch 0.95 beside a single epoch
    _percent_axis(axes[0, 0])  # shared by the column
    fig.suptitle(f"{_setting(trials)}: each point's best trial (accuracy_vs_{axis(trials)}), by epoch", fontsize=10)
    ordered = [handles[k] for k in sorted(handles, key=_curve_order)]
    if _unfinished(best).any():
        ordered.append(Line2D([], [], color="0.4", marker="o", mfc="none", ls="", label=f"best trial {UNFINISHED}"))
    _legend(axes[0, -1], ordered)
    return fig


# The column means different things per device; on a CPU it is not a measure of the rule alone.
_PEAK_MEMORY = {"gpu": "the most allocated on the GPU in an epoch",
                "cpu": "the peak resident set of the worker process, which includes Python, torch and Ray and, "
                       "as Tune reuses workers, earlier trials"}


def _peak_memory_is(trials: pd.DataFrame) -> str:
    """What the figure's peak memory is, for the devices its trials ran on (both where a table predates `ran_on`)."""
    ran_on = trials["ran_on"].dropna() if "ran_on" in trials else pd.Series([], dtype=str)
    kinds = {"cpu" if r == "cpu" else "gpu" for r in ran_on}
    if len(ran_on) < len(trials) or len(kinds) > 1:
        return f"peak memory: on a GPU, {_PEAK_MEMORY['gpu']}; on a CPU, {_PEAK_MEMORY['cpu']}"
    [kind] = kinds
    where = "on the CPU" if kind == "cpu" else f"on {', '.join(sorted(set(ran_on)))}"
    return f"peak memory, every trial {where}: {_PEAK_MEMORY[kind]}"


def _lr_varies(trials: pd.DataFrame) -> bool:
    return trials["lr"].nunique() > 1


# Each figure, the columns its points need (a trial that diverged in its first epoch has no accuracy), and
# whether it says anything of these trials: a learning-rate axis with every trial on one rate does not.
# Named for the axis its points run along (`axis`): accuracy_vs_T or accuracy_vs_arch.
FIGURES = {"accuracy_vs_{axis}": (accuracy_vs_axis, ["best_test_acc"], None),
           "accuracy_vs_lr": (accuracy_vs_lr, ["best_test_acc"], _lr_varies),
           "cost_vs_{axis}": (cost_vs_axis, ["peak_mem_mb", "image_steps_per_s"], None),
           "curves_vs_epoch": (curves_vs_epoch, ["best_test_acc"], None)}


# Every name a figure can have: what a table's figures are beside the others a folder may hold.
NAMES = frozenset(name.format(axis=x) for name in FIGURES for x in XLABELS)


def render(trials: pd.DataFrame, epochs: pd.DataFrame) -> dict[str, bytes]:
    """PNG bytes of every figure that has a point, each from the trials that have its values (the trials table);
    curves_vs_epoch draws those trials' rows of the epochs table too."""
    out = {}
    ran = trials[trials["epochs_run"] > 0]
    for name, (make, needs, tells) in FIGURES.items():
        points = ran.dropna(subset=needs) if set(needs) <= set(ran) else ran.iloc[:0]
        if points.empty or (tells is not None and not tells(points)):
            continue
        fig = make(points, epochs) if make is curves_vs_epoch else make(points)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        out[name.format(axis=axis(points))] = buf.getvalue()
    return out
