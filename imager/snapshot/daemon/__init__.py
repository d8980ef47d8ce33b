"""Managed volumes: a daemon per volume serves the device through FUSE with a COW store in its
write path (server.py); clients attach, detach, recover and snapshot them (client.py,
launch.py, snapshots.py) over the control protocol (protocol.py)."""

from .client import (check_source, clear_stale_run_dir, detach, known_volumes, list_volumes, recover, require_running,
                     restart_worker, status)
from .launch import attach, refuse_esp
from ...spawn import RUN_DIR_ENV
from .protocol import (MOUNT_DIR_NAME, RECORD_NAME, REQUEST_TIMEOUT, SNAPSHOT_FILE, STATE_DIR_ENV, VOLUME_FILE,
                       SnapshotInfo, SnapshotSetInfo, VolumeInfo, cache_full_error, read_record, records)
from .snapshots import HeldSnapshots, snapshot_create, snapshot_delete, snapshot_list

__all__ = [
    "MOUNT_DIR_NAME", "RECORD_NAME", "REQUEST_TIMEOUT", "RUN_DIR_ENV", "SNAPSHOT_FILE", "STATE_DIR_ENV", "VOLUME_FILE",
    "HeldSnapshots", "SnapshotInfo", "cache_full_error", "check_source", "SnapshotSetInfo", "VolumeInfo", "attach", "clear_stale_run_dir", "detach",
    "known_volumes", "list_volumes", "read_record", "records", "recover", "refuse_esp", "require_running", "restart_worker",
    "snapshot_create", "snapshot_delete", "snapshot_list", "status",
]
