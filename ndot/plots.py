"""Figures of a sweep's per-trial table: what a researcher looks at first.

accuracy_vs_T       best test accuracy of each stratum against T, one line per rule (the paper's table)
accuracy_vs_lr      every trial's best test accuracy against its learning rate, per rule
cost_vs_T           peak memory and training throughput against T, per rule
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _per_method_lines(ax: plt.Axes, series: pd.Series, ylabel: str) -> None:
    """`series` is indexed by (method, T)."""
    for name, s in series.groupby(level="method"):
        s = s.droplevel("method").sort_index()
        ax.plot(s.index, s.values, marker="o", label=name)
    ax.set_xticks(sorted(series.index.get_level_values("T").unique()))
    ax.set_xlabel("time steps T")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def accuracy_vs_T(trials: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    # The best trial of a stratum is the tuned result for that (rule, T).
    _per_method_lines(ax, trials.groupby(["method", "T"])["best_test_acc"].max() * 100, "best test accuracy (%)")
    ax.set_title(f"{', '.join(sorted(trials['dataset'].unique()))}: accuracy against T")
    return fig


def accuracy_vs_lr(trials: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in trials.groupby("method"):
        ax.scatter(g["lr"], g["best_test_acc"] * 100, label=name, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title("accuracy against learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def cost_vs_T(trials: pd.DataFrame) -> Figure:
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4))
    by = trials.groupby(["method", "T"])
    _per_method_lines(mem, by["peak_mem_mb"].median(), "peak memory (MB)")
    _per_method_lines(speed, by["image_steps_per_s"].median(), "training image-steps / s")
    mem.set_title("memory against T")
    speed.set_title("throughput against T")
    return fig


FIGURES = {"accuracy_vs_T": accuracy_vs_T, "accuracy_vs_lr": accuracy_vs_lr, "cost_vs_T": cost_vs_T}


def render(trials: pd.DataFrame) -> dict[str, bytes]:
    """PNG bytes of every figure, from the trials that ran at least one epoch."""
    ran = trials[trials["epochs_run"] > 0]
    if ran.empty:
        return {}
    out = {}
    for name, make in FIGURES.items():
        fig = make(ran)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out
