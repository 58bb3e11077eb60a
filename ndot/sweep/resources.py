"""How many trials fit at once: the concurrency a sweep asks Tune for.

On a cluster started by `ray up`, the autoscaler has launched few workers (or
none) when the sweep starts, so the cluster's current resources understate
it. The launcher leaves its config on the head (~/ray_bootstrap_config.yaml);
its node types times their max_workers (within the cluster's max_workers) are
what the cluster can grow to. Asking for that many trials at once makes the
autoscaler request every node in one go rather than one node per finished
trial. Trials are counted node by node, as Tune places them: a node's spare
CPUs cannot hold a trial that needs another node's GPU. That config describes
the cluster a sweep joins (`launcher`), not a private local Ray that a sweep
without --address starts on the same head node.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import ray
import yaml

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def on_launcher_head() -> bool:
    """Whether this machine is the head of a cluster `ray up` started: the launcher left its config here."""
    return BOOTSTRAP_CONFIG.expanduser().is_file()


def _launcher_config(launcher: bool) -> dict:
    return yaml.safe_load(BOOTSTRAP_CONFIG.expanduser().read_text()) if launcher and on_launcher_head() else {}


def _live_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def node_shapes(launcher: bool) -> list[dict[str, float]]:
    """The resources of every live node of the connected cluster and, where it is the launcher's (`launcher`),
    of every node type its autoscaler can launch."""
    types = _launcher_config(launcher).get("available_node_types", {})
    return _live_nodes() + [t.get("resources", {}) for t in types.values()]


def node_slots(cpus_per_trial: float, gpus_per_trial: float, shape: Mapping[str, float]) -> int:
    """Trials one node of this shape holds at once."""
    # A little slack so that e.g. 1.0 / 0.25 counts as 4 despite rounding.
    return min(math.floor(shape.get(key, 0.0) / need + 1e-6)
               for key, need in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)) if need > 0)


def grown_slots(cpus_per_trial: float, gpus_per_trial: float, config: Mapping) -> int:
    """Trials a cluster-launcher config holds at its largest: the head, and each worker type at its
    max_workers, at most the cluster's max_workers workers in all (those that hold the most)."""
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    workers = sorted((node_slots(cpus_per_trial, gpus_per_trial, t.get("resources", {}))
                      for name, t in types.items() if name != head for _ in range(t.get("max_workers", 0))), reverse=True)
    on_head = node_slots(cpus_per_trial, gpus_per_trial, types[head].get("resources", {})) if head in types else 0
    return on_head + sum(workers[:config.get("max_workers", len(workers))])


def launchable_workers(launcher: bool) -> int:
    """Worker nodes the connected cluster's autoscaler can launch, where the cluster is the launcher's
    (`launcher`): each worker type at its max_workers, at most the cluster's max_workers in all."""
    config = _launcher_config(launcher)
    head = config.get("head_node_type")
    workers = sum(t.get("max_workers", 0) for name, t in config.get("available_node_types", {}).items() if name != head)
    return min(workers, config.get("max_workers", workers))


def slots(cpus_per_trial: float, gpus_per_trial: float, launcher: bool) -> int:
    """Trials the connected cluster holds at once, node by node, now or, where it is the launcher's
    (`launcher`), grown by its autoscaler (at least one, so a sweep can always start)."""
    now = sum(node_slots(cpus_per_trial, gpus_per_trial, shape) for shape in _live_nodes())
    return max(1, now, grown_slots(cpus_per_trial, gpus_per_trial, _launcher_config(launcher)))


def local_ray() -> dict[str, float]:
    """The resources of the private local Ray that a sweep without --address starts on this machine, as
    ray.init would count them (a container's CPU quota, CUDA_VISIBLE_DEVICES), without starting it."""
    # Ray's own count (Ray is pinned to one version in pyproject.toml): os.cpu_count() and torch's GPUs can differ from it.
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    return ResourceAndLabelSpec().resolve(is_head=True).to_resource_dict()


def fits(cpus_per_trial: float, gpus_per_trial: float, shapes: list[dict[str, float]]) -> bool:
    """Whether some node can hold one trial: Tune would otherwise wait for one forever."""
    return any(node_slots(cpus_per_trial, gpus_per_trial, s) >= 1 for s in shapes)
