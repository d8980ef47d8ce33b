"""Snapshot sets of managed volumes, client side: one freeze window for all of them, held by a
backup for its lifetime or kept until deleted."""

from __future__ import annotations

import base64
import logging
import time
from typing import Callable, Iterable, Sequence

from devices.fs import mounts_of

from ...errors import ImagerError, SnapshotError, VolumeRefused
from ..freeze import DEFAULT_MAX_FREEZE, FreezeGuard, Hook, freeze_window
from .client import list_volumes, require_running, status
from .protocol import (REQUEST_TIMEOUT, STATUS_TIMEOUT, Connection, ConnectionLost, SnapshotInfo, SnapshotSetInfo,
                       checked, connect, name_list, request, volume_from)

log = logging.getLogger(__name__)

def snapshot_create(names: str | Iterable[str], pre_freeze_hooks: Sequence[Hook] = (),
                    post_thaw_hooks: Sequence[Hook] = (),
                    while_frozen: Callable[[], object] | None = None, *,
                    max_freeze: float = DEFAULT_MAX_FREEZE) -> SnapshotSetInfo:
    """One point-in-time snapshot of every named volume, all in one freeze window; they stay until
    snapshot_delete(). See HeldSnapshots for what the window does."""
    with HeldSnapshots(names, pre_freeze_hooks, post_thaw_hooks, while_frozen, max_freeze=max_freeze,
                       hold=False) as held:
        return held.info


class HeldSnapshots:
    """A snapshot of every named volume, taken in one freeze window.

    Runs the pre-freeze hooks, FIFREEZEs every filesystem mounted from the volumes' fronts (held
    by a guard process that thaws when this process dies), switches COW on in every daemon,
    thaws (always), runs the post-thaw hooks (always, once the pre-freeze hooks started). Either
    every snapshot exists afterwards or none does. `while_frozen` runs inside the window, after
    COW is on everywhere: what it reads of the filesystems is the snapshot's state (the engine
    makes its used-block plans there).

    With `hold` (a backup), each snapshot is tied to a connection to its daemon: close() deletes
    them, and if this process dies instead, each daemon deletes its snapshot when the connection
    drops. Without it (`imager snapshot create`) the snapshots stay until deleted."""

    def __init__(self, names: str | Iterable[str], pre_freeze_hooks: Sequence[Hook] = (),
                 post_thaw_hooks: Sequence[Hook] = (), while_frozen: Callable[[], object] | None = None, *,
                 max_freeze: float = DEFAULT_MAX_FREEZE, hold: bool = True):
        self.names = name_list(names)
        self.hold = hold
        self._connections: list[Connection] = []
        self._asked: list[str] = []       # the volumes told to switch COW on
        self._committed: set[str] = set()  # the volumes whose backup is stored
        try:
            self.info = self._take(pre_freeze_hooks, post_thaw_hooks, while_frozen, max_freeze)
        except BaseException:
            self._drop_all()
            raise

    def _take(self, pre_freeze_hooks, post_thaw_hooks, while_frozen, max_freeze) -> SnapshotSetInfo:
        # Its interpreter starts while the daemons are asked; a set with nothing mounted closes it.
        guard = FreezeGuard()
        try:
            mount_points = self._connect()
        except BaseException:
            guard.close()
            raise
        created: list[SnapshotInfo] = []
        created_at = time.time()
        with freeze_window(mount_points, pre_freeze_hooks, post_thaw_hooks, max_seconds=max_freeze,
                           guard=guard) as window:
            for conn in self._connections:
                self._asked.append(conn.name)
                reply = checked(conn.request({"op": "snapshot-create", "hold": self.hold}))
                created.append(volume_from(reply["volume"]).snapshot)
            if while_frozen is not None:
                while_frozen()
            window.check()
        return SnapshotSetInfo(created, window.milliseconds, window.frozen, created_at)

    def _connect(self) -> list[str]:
        """Connect to each volume's daemon; returns the mount points to freeze."""
        for name in self.names:
            require_running(name)
            self._connections.append(connect(name, STATUS_TIMEOUT))
        volumes = [volume_from(checked(conn.request({"op": "status"}))["volume"]) for conn in self._connections]
        for conn, v in zip(self._connections, volumes):
            if v.snapshot is not None and v.snapshot.delete_failed:
                self._delete_left_over(conn, v.snapshot)
            elif v.snapshot is not None:
                raise VolumeRefused(f"{v.name} already has a snapshot (generation {v.snapshot.generation}); "
                                    f"delete it first (imager snapshot delete {v.name})")
        # Every mount of one block device shares its superblock: freeze it through one of them
        # (a second FIFREEZE of the same filesystem fails with EBUSY).
        mount_points = []
        for v in volumes:
            mounted = mounts_of(v.front) if v.front else []
            if mounted:
                mount_points.append(mounted[0].mount_point)
        return mount_points

    @staticmethod
    def _delete_left_over(conn: Connection, left: SnapshotInfo) -> None:
        """Delete the snapshot a delete was asked of and failed (a backup's, stored, whose end
        could not be recorded): nobody keeps it, and the nights after must not wait for a user
        to delete it once there is room to."""
        log.info("%s: deleting snapshot generation %d first: its delete failed before", left.name, left.generation)
        try:
            checked(conn.request({"op": "snapshot-delete", "force": True, "generation": left.generation}))
        except ImagerError as e:
            raise SnapshotError(f"{left.name} still has the snapshot (generation {left.generation}) whose delete "
                                f"failed, and it fails again: {e}; once that is mended, the next backup deletes "
                                f"it, or: imager snapshot delete {left.name}") from None

    def _drop_all(self) -> None:
        """Delete every snapshot this set asked for, not only those that answered: a daemon whose
        answer timed out may still have switched COW on. (A held one also goes when its
        connection closes; a stuck daemon is not waited for long.)"""
        for conn in self._connections:
            conn.close()
        self._connections = []
        for name in self._asked:
            try:
                request(name, {"op": "snapshot-delete", "force": True}, STATUS_TIMEOUT)
            except ImagerError:
                pass

    def tracked_changes(self, name: str) -> bytes | None:
        """The change tracker's bitmap of the blocks of `name` written since the base of this
        snapshot's roll (None when the daemon has none for it)."""
        snapshot = next(s for s in self.info.snapshots if s.name == name)
        conn = next(c for c in self._connections if c.name == name)
        if not snapshot.tracker:
            return None
        try:
            reply = checked(conn.request({"op": "tracker-changes", "sequence": snapshot.tracker["sequence"]}))
        except ImagerError:
            return None
        return base64.b64decode(reply["bits"])

    def commit(self, name: str) -> None:
        """The backup of `name` is stored: when the snapshot goes, its tracker interval is done."""
        self._committed.add(name)

    def close(self) -> None:
        """Delete the snapshots of a held set, waiting for each daemon's answer."""
        failures = []
        generations = {s.name: s.generation for s in self.info.snapshots}
        for conn in self._connections:
            stored = conn.name in self._committed
            try:
                conn.timeout = REQUEST_TIMEOUT
                tracker = "commit" if stored else "give-up"
                delete = {"op": "snapshot-delete", "force": True, "tracker": tracker,
                          "generation": generations[conn.name]}
                try:
                    checked(conn.request(delete))
                except ConnectionLost:
                    # Its worker died or was restarted during the backup; the next one serves
                    # the same snapshot and takes the delete on a new connection.
                    log.info("%s: the volume's worker changed during the backup; deleting its snapshot anew",
                             conn.name)
                    request(conn.name, delete, REQUEST_TIMEOUT)
            except ImagerError as e:
                if not stored:
                    failures.append(str(e))
                else:
                    # The image is stored and catalogued: failing the backup now would have a
                    # good image counted as a failed night. The daemon marks the snapshot left
                    # (delete_failed): the next backup ends it, or the user does.
                    log.warning("%s: the backup is stored, but its snapshot could not be deleted (%s); the "
                                "next backup of it deletes it first, or: imager snapshot delete %s", conn.name, e,
                                conn.name)
            finally:
                conn.close()
        self._connections = []
        if failures:
            raise SnapshotError("; ".join(failures))

    def __enter__(self) -> "HeldSnapshots":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.hold:
            try:
                self.close()
            except ImagerError:
                if exc_type is None:
                    raise   # a failure of the job itself is the one to report
        else:
            for conn in self._connections:
                conn.close()
            self._connections = []


def snapshot_delete(names: str | Iterable[str], *, force: bool = False, missing_ok: bool = False) -> None:
    """Delete the snapshots of the named volumes: COW off, cache discarded. Refused while a
    snapshot file is still open unless `force` (its readers then get EIO). Tries every name and
    reports every failure."""
    failures = []
    refused = True          # every failure a refusal (no such volume or snapshot, still open): exit 2
    for name in name_list(names):
        try:
            info = status(name)
            if info.snapshot is None:
                if not missing_ok:
                    failures.append(f"{name} has no snapshot")
                continue
            request(name, {"op": "snapshot-delete", "force": force}, REQUEST_TIMEOUT)
        except ImagerError as e:
            failures.append(str(e))
            refused = refused and isinstance(e, VolumeRefused)
    if failures:
        raise (VolumeRefused if refused else SnapshotError)("; ".join(failures))


def snapshot_list() -> list[SnapshotInfo]:
    return [v.snapshot for v in list_volumes() if v.snapshot is not None]
