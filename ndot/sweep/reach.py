"""Whether every node of the cluster reaches a sweep's local --storage, and the modules its trials import.

Ray Tune writes a trial's checkpoints from the node that runs it into the storage the driver names.
A folder on the driver's own disk is out of reach of a node on another machine: Ray Tune 2.60 fails
the trial there at its first checkpoint (its marker of the storage, written by the driver, is
missing), after a whole epoch, and again on each of its restarts, so a paper sweep on a `ray up`
cluster would burn every trial's first epochs and end with none. Through ray:// the tuner itself
runs on the cluster's head, and a path on the client's machine is not the one it writes.

A path on a network filesystem (NFS, which EFS is; Lustre; a FUSE mount of a bucket) is taken as
mounted alike on every node; nodes on this machine (a test cluster) share its disk.
"""
from __future__ import annotations

import importlib
import os

import ray
import psutil  # after ray, as Ray's own modules import it: Ray ships its copy and puts it on the path

from ndot.config import import_names
from ndot.sweep import resources

# Filesystems that several machines mount (/proc/mounts' names), besides any FUSE one ("fuse.s3fs",
# "fuse.mountpoint-s3", "fuse.gcsfuse", "fuse.sshfs"), which mostly mounts a bucket or another machine.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "gpfs", "beegfs"})


def filesystem_type(path: str) -> str:
    """The type of the filesystem that holds `path`, or would hold it (ext4, nfs4, overlay, ...)."""
    real, found = os.path.realpath(path), ("", "")
    for mount in psutil.disk_partitions(all=True):
        inside = real == mount.mountpoint or real.startswith(mount.mountpoint.rstrip("/") + "/")
        # The deepest mount point holds the path; of two at one point, the later covers the earlier.
        if inside and len(mount.mountpoint) >= len(found[0]):
            found = (mount.mountpoint, mount.fstype)
    return found[1]


def is_shared(fstype: str) -> bool:
    """Whether a filesystem of this type can be mounted alike on several machines."""
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.")


def spans_machines(launcher: bool) -> bool:
    """Whether a node of the connected cluster, up now or launchable by its autoscaler (where the cluster
    is the launcher's, `launcher`), runs on another machine than this process."""
    here = {address.address for addresses in psutil.net_if_addrs().values() for address in addresses}
    elsewhere = any(node["NodeManagerAddress"] not in here for node in ray.nodes() if node["Alive"])
    return elsewhere or resources.launchable_workers(launcher) > 0


def unreachable(storage: str, launcher: bool) -> str | None:
    """Why some node of the connected cluster cannot reach `storage` (a URI or an absolute path), in one
    line; None where every node can, as far as can be told."""
    if "://" in storage or not spans_machines(launcher):
        return None
    fstype = filesystem_type(storage)
    if is_shared(fstype):
        return None
    return (f"--storage {storage} is on this machine's own disk ({fstype or 'unknown filesystem'}), which the "
            "cluster's nodes on other machines cannot reach: Ray Tune would fail every trial at its first "
            "checkpoint; give s3://BUCKET/PREFIX, or a folder of a filesystem every node mounts (NFS)")


@ray.remote(num_cpus=0)
def _not_importable(names: list[str]) -> str | None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            return f"{name!r} ({e})"
    return None


def unimportable(imports: str, client: bool) -> str | None:
    """Why the connected cluster's processes, which run the trials, cannot import the modules of `imports`
    (TrainConfig.imports), in one line; None where they can, or where there are none.

    The driver found them on its own sys.path, which no trial shares: a Ray worker's holds the driver's current
    folder and its script's (as paths on the worker's node), a `ray job submit`'s working_dir, and its node's
    PYTHONPATH, the driver's only on a Ray the sweep started itself. Every trial would error at its start, on each
    of its restarts too. Tried in one process, on a node Ray picks: a folder on that node alone passes. Through
    ray:// (`client`) Ray puts none of the driver's folders on their path: only a shipped working_dir helps there.
    """
    names = import_names(imports)
    missing = ray.get(_not_importable.remote(names)) if names else None
    if missing is None:
        return None
    fix = ("" if client else "run the sweep from the module's folder, which Ray puts on their path, or ") + \
        "ship that folder with `ray job submit --working-dir`"
    return (f"--set imports={imports}: Ray's worker processes, which run the trials, cannot import {missing}, which "
            f"this driver finds on a path of its own: {fix}")
