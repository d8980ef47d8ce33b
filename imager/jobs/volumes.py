"""Managed volumes, as a user handles them: attach, detach, list, recover after a daemon died
(with a check of the filesystem on the new front), snapshot by hand."""

from __future__ import annotations

from devices.fs import mounts_of

from ..errors import ImagerError, VolumeRefused
from ..snapshot.daemon import (HeldSnapshots, SnapshotInfo, SnapshotSetInfo, VolumeInfo, attach, detach,
                               list_volumes, restart_worker, snapshot_create, snapshot_delete, snapshot_list,
                               status)
from ..snapshot.daemon import recover as _recover
from ..snapshot.daemon.client import require_known
from ..snapshot.daemon.fsck import check_filesystem


def detach_all(names: list[str]) -> list[str]:
    """Detach every volume of `names`, each checked first (known, no snapshot, front not
    mounted), so that a refusal leaves them all attached. Returns the names detached."""
    for name in dict.fromkeys(names):
        require_known(name)
    for volume in list_volumes():
        if volume.name in names and volume.state == "running":
            refuse_detaching(volume)
    done: list[str] = []
    for name in dict.fromkeys(names):
        try:
            detach(name)
        except ImagerError as e:
            if done:
                e.args = (f"detached {', '.join(done)}; {name}: {e}",)
            raise
        done.append(name)
    return done


def refuse_detaching(volume: VolumeInfo) -> None:
    """The refusals of a volume's detach that its status tells (the daemon checks them again)."""
    if volume.snapshot is not None:
        raise VolumeRefused(f"{volume.name} has a snapshot; delete it before detaching "
                            f"(or wait for the backup that holds it)")
    mounted = mounts_of(volume.front) if volume.front else []
    if mounted:
        raise VolumeRefused(f"the front device {volume.front} of {volume.name} is mounted at "
                            f"{', '.join(m.mount_point for m in mounted)}; unmount it first")


def recover(name: str) -> VolumeInfo:
    """Bring back volume `name` after its daemon died; `problem` holds the filesystem check's verdict."""
    return _recover(name, check=check_filesystem)


__all__ = [
    "HeldSnapshots", "SnapshotInfo", "SnapshotSetInfo", "VolumeInfo", "attach", "detach", "detach_all", "list_volumes",
    "recover", "restart_worker", "snapshot_create", "snapshot_delete", "snapshot_list", "status",
]
