"""Tune's saves of the experiment state, each held back until the upload of the last one has ended.

Ray Tune 2.60 writes the experiment state into the driver's staging folder (the
list of trials in place, the searcher's files through temporary names) and only
then waits for the upload of the previous save, which may still be copying that
folder: the copy fails on a temporary file renamed away while it ran, or uploads
a list of trials cut short, which a driver killed before the next upload leaves
to resume from. Tune saves whenever a trial has checkpointed twice (every second
epoch here), so uploads to S3 overlap saves often. Each save here first waits
for the last upload.

ndot.sweep.searcher installs it on import: every process that runs a sweep's
Tune controller unpickles the searcher, through ray:// too.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

logger = logging.getLogger(__name__)


def _after_the_last_upload(sync_up: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(sync_up)
    def sync_up_experiment_state(self: _ExperimentCheckpointManager, save_fn: Callable[[], None],
                                 force: bool = False, wait: bool = False) -> None:
        def save() -> None:
            try:
                self._storage.syncer.wait()
            except Exception as e:  # Tune only logs a failed upload too: the next one sends the state again
                logger.warning("an upload of the experiment state to %s failed: %s", self._storage.experiment_fs_path, e)
            save_fn()

        sync_up(self, save, force=force, wait=wait)

    sync_up_experiment_state.waits_for_the_last_upload = True  # type: ignore[attr-defined]
    return sync_up_experiment_state


def install() -> None:
    """Make every later save of the experiment state in this process wait for the last upload (idempotent)."""
    method: Any = _ExperimentCheckpointManager.sync_up_experiment_state
    if not getattr(method, "waits_for_the_last_upload", False):
        _ExperimentCheckpointManager.sync_up_experiment_state = _after_the_last_upload(method)
