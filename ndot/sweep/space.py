"""What a sweep varies: strata (every value is run) and the Optuna space (values are searched).

Both live here, in an importable module, because Tune pickles the searcher
(strata and the define-by-run space included) into the experiment, and an
object defined in a script's `__main__` cannot be unpickled on restore.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ndot.config import parse_method

# The trial-config key that names a trial's stratum; the scheduler and the
# result tables group by it.
STRATUM_KEY = "stratum"


@dataclass(frozen=True)
class Stratum:
    """One cell of the sweep grid, e.g. {"T": 4, "rule": "ndot", "mode": "O"}."""

    values: Mapping[str, Any]
    label: str


def _label_part(axis: str, value: Any) -> str:
    return str(value) if axis in ("method", "arch") else f"{axis}={value}"


def strata(axes: Mapping[str, Sequence[Any]]) -> list[Stratum]:
    """The cross product of `axes` in the given order; the axis "method" expands to rule and mode."""
    out = []
    for combo in itertools.product(*axes.values()):
        values: dict[str, Any] = {}
        for axis, value in zip(axes, combo):
            values.update(parse_method(value) if axis == "method" else {axis: value})
        label = ",".join(_label_part(a, v) for a, v in zip(axes, combo))
        out.append(Stratum(values, label))
    return out


@dataclass(frozen=True)
class SearchSpace:
    """The tuned parameters, as an Optuna define-by-run function.

    A (low, high) pair is searched (lr log-uniformly, the others uniformly); a
    pair with low == high is a constant. `batch_size` is a tuple of choices.
    `first` is the point each stratum evaluates first (e.g. the paper's
    recipe), so a small budget still contains the reference setting.
    """

    lr: tuple[float, float] = (0.1, 0.1)
    momentum: tuple[float, float] = (0.9, 0.9)
    loss_alpha: tuple[float, float] = (0.05, 0.05)
    batch_size: tuple[int, ...] = (128,)
    first: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, trial: Any) -> dict[str, Any]:
        fixed: dict[str, Any] = {}
        for name, (low, high) in self._ranges.items():
            if low == high:
                fixed[name] = low
            else:
                trial.suggest_float(name, low, high, log=name == "lr")
        if len(self.batch_size) == 1:
            fixed["batch_size"] = self.batch_size[0]
        else:
            trial.suggest_categorical("batch_size", list(self.batch_size))
        return fixed

    def first_point(self) -> dict[str, Any]:
        """The values of `first` that are searched and lie in their ranges; Optuna draws the others."""
        bounds = self._ranges
        return {k: v for k, v in self.first.items() if k in self.tuned
                and (v in self.batch_size if k == "batch_size" else bounds[k][0] <= v <= bounds[k][1])}

    @property
    def _ranges(self) -> dict[str, tuple[float, float]]:
        return {"lr": self.lr, "momentum": self.momentum, "loss_alpha": self.loss_alpha}

    @property
    def tuned(self) -> list[str]:
        names = [n for n, (low, high) in self._ranges.items() if low != high]
        return names + (["batch_size"] if len(self.batch_size) > 1 else [])

    def corners(self) -> list[dict[str, Any]]:
        """The extreme values of every parameter, for validating a sweep before it starts."""
        ends = [dict.fromkeys(v) for v in (self.lr, self.momentum, self.loss_alpha, self.batch_size)]
        return [{"lr": lr, "momentum": m, "loss_alpha": a, "batch_size": b} for lr, m, a, b in itertools.product(*ends)]
