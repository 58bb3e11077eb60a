"""How many trials fit at once: the concurrency a sweep asks Tune for.

On a cluster started by `ray up`, the autoscaler has launched few workers (or
none) when the sweep starts, so the cluster's current resources understate
it. The launcher leaves its config on the head (~/ray_bootstrap_config.yaml);
its node types times their max_workers are what the cluster can grow to.
Asking for that many trials at once makes the autoscaler request every node
in one go rather than one node per finished trial.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import ray
import yaml

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def autoscaler_capacity(config: Mapping) -> dict[str, float]:
    """CPU and GPU of a cluster-launcher config at its largest (head plus every worker type at max_workers)."""
    total = {"CPU": 0.0, "GPU": 0.0}
    for name, node_type in config.get("available_node_types", {}).items():
        count = 1 if name == config.get("head_node_type") else node_type.get("max_workers", 0)
        for key in total:
            total[key] += count * node_type.get("resources", {}).get(key, 0)
    return total


def _launcher_config() -> dict:
    path = BOOTSTRAP_CONFIG.expanduser()
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def capacity() -> dict[str, float]:
    """The larger of the connected cluster's resources now and what its autoscaler can grow it to."""
    now = ray.cluster_resources()
    grown = autoscaler_capacity(_launcher_config())
    return {key: max(now.get(key, 0.0), grown.get(key, 0.0)) for key in ("CPU", "GPU")}


def node_shapes() -> list[dict[str, float]]:
    """The resources of every live node of the connected cluster and of every node type its autoscaler can launch."""
    live = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return live + [t.get("resources", {}) for t in _launcher_config().get("available_node_types", {}).values()]


def fits(cpus_per_trial: float, gpus_per_trial: float, shapes: list[dict[str, float]]) -> bool:
    """Whether some node can hold one trial: Tune would otherwise wait for one forever."""
    return any(s.get("CPU", 0.0) + 1e-6 >= cpus_per_trial and s.get("GPU", 0.0) + 1e-6 >= gpus_per_trial for s in shapes)


def slots(cpus_per_trial: float, gpus_per_trial: float, available: Mapping[str, float]) -> int:
    """Trials that fit in `available` at once (at least one, so a sweep can always start)."""
    # A little slack so that e.g. 1.0 / 0.25 counts as 4 despite rounding.
    fits = [math.floor(available.get(key, 0.0) / need + 1e-6) for key, need in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)) if need > 0]
    return max(1, min(fits, default=1))
