"""Managed volumes, as a user handles them: attach, detach, list, recover after a daemon died
(with a check of the filesystem on the new front), snapshot by hand."""

from __future__ import annotations

from ..snapshot.daemon import (HeldSnapshots, SnapshotInfo, SnapshotSetInfo, VolumeInfo, attach, detach,
                               list_volumes, restart_worker, snapshot_create, snapshot_delete, snapshot_list,
                               status)
from ..snapshot.daemon import recover as _recover
from ..snapshot.daemon.fsck import check_filesystem


def recover(name: str) -> VolumeInfo:
    """Bring back volume `name` after its daemon died; `problem` holds the filesystem check's verdict."""
    return _recover(name, check=check_filesystem)


__all__ = [
    "HeldSnapshots", "SnapshotInfo", "SnapshotSetInfo", "VolumeInfo", "attach", "detach", "list_volumes",
    "recover", "restart_worker", "snapshot_create", "snapshot_delete", "snapshot_list", "status",
]
