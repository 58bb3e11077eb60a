"""What a sweep's running trials do before their first epoch result, for the driver's status lines.

Tune hears from a trial only through tune.report, which ASHA, Optuna and the tables count as an epoch, and a
trial's output stays on its node (ndot.sweep.runner.connect). On a cluster a trial builds its data caches
there (CIFAR10-DVS frames: tens of minutes), and the first epoch of a paper run takes minutes: the status
line said "0 epochs done" all along. Each trial sends a short line on what it does to an actor of the
driver's job, which the driver reads for its status line; neither waits on the other's answer
(ndot.sweep.trainable.Reporter sends them). This module imports Ray alone: the actor's process imports it.
"""
from __future__ import annotations

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# The longest a status line waits on the actor: a line without the trials' words beats a stalled sweep.
READ_S = 2.0


@ray.remote(num_cpus=0)  # a CPU would be one trial fewer, or none on a head that advertises none
class _Board:
    def __init__(self) -> None:
        self._lines: dict[str, str] = {}

    def set(self, trial_id: str, line: str) -> None:
        self._lines[trial_id] = line

    def drop(self, trial_id: str) -> None:
        self._lines.pop(trial_id, None)

    def lines(self) -> dict[str, str]:
        return self._lines


def name() -> str:
    """The actor's name, in the driver's process and its trials' alike: they are one Ray job."""
    # The job's, not one for all sweeps: drivers given one namespace (RAY_NAMESPACE through ray://, both given
    # ray.init(namespace=...)) share their named actors, and an actor ends with the driver that made it. A second
    # sweep's trials sent their lines to the first's actor, and the driver read none once the first sweep ended.
    return f"ndot_trial_status_{ray.get_runtime_context().get_job_id()}"


def board() -> ActorHandle:
    """The driver's: the actor its trials send their lines to. It lives as long as a handle to it does."""
    # On the driver's node, which outlives the sweep: elsewhere it could go with a node that the autoscaler
    # or a spot market takes, and the lines with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _Board.options(name=name(), get_if_exists=True, scheduling_strategy=here).remote()


def read(handle: ActorHandle) -> dict[str, str]:
    """Each trial's last line by trial id; {} where the actor does not answer within READ_S."""
    try:
        return ray.get(handle.lines.remote(), timeout=READ_S)
    except RayError:
        return {}
