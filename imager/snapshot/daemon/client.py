"""Managed volumes, the client side: a device served through FUSE so that every write passes
through a CowStore.

`attach(DEV)` starts a daemon (server.py) that serves DEV as the file `volume` in a FUSE mount
and puts a loop device, the *front*, on that file. Users mkfs/mount/write the front; the daemon
copies originals aside while a snapshot exists and serves the point-in-time view as the
read-only file `snapshot` next to `volume`, readable by any tool (dd, fsck, mount -o ro through
a loop device). This module starts daemons and talks to them (protocol.py).

Freezing is done here, not in the daemon, so that one caller can freeze the filesystems of
several volumes, switch COW on in every daemon, and thaw: one freeze window for a snapshot set.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import Callable

from devices import loop
from devices.errors import DeviceError
from devices.fs import mounts_of

from ...errors import VolumeError, VolumeRefused
from ...spawn import exit_watch, has_exited
from ..cow.watch import remove_trace
from .launch import attach
from .supervisor import HANDLES_FILE, WORKER_FILE
from .protocol import (FRONT_LINK, MOUNT_DIR_NAME, PID_NAME, RECORD_NAME, REQUEST_TIMEOUT, SOCKET_NAME, STATUS_TIMEOUT, VOLUME_FILE,
                       VolumeInfo, check_name, checked, connect, daemon_state, read_record, records, request,
                       socket_answers, volume_from)


def detach(name: str) -> None:
    """Stop managing a volume: the front loop device goes away, the daemon exits. Refused while a
    snapshot exists or while the front is mounted or open. A volume whose daemon died is cleaned
    up (refused while its dead front is still mounted)."""
    record = read_record(check_name(name))
    if record is not None and daemon_state(record)[0] == "failed":
        _clear_failed(record)
        return
    with connect(name, REQUEST_TIMEOUT) as conn:
        pid = checked(conn.request({"op": "status"}))["volume"]["pid"]
        checked(conn.request({"op": "detach"}))
        # The daemon closes the connection as it exits, then removes its run directory: wait for
        # the exit itself, so that what it cleans up is gone when detach returns.
        conn.wait_closed(REQUEST_TIMEOUT)
    _wait_for_exit(pid, REQUEST_TIMEOUT)


def _wait_for_exit(pid: int, timeout: float) -> None:
    with exit_watch(pid) as watch:
        if not has_exited(watch, timeout):
            raise VolumeError(f"the volume daemon (pid {pid}) did not exit in {timeout:g} s")


def status(name: str, timeout: float = STATUS_TIMEOUT) -> VolumeInfo:
    return volume_from(request(name, {"op": "status"}, timeout)["volume"])


def check_source(name: str, timeout: float = REQUEST_TIMEOUT) -> str:
    """Have the daemon of volume `name` write back its source's page cache and look for writes
    made past its front since it last looked (a snapshot they spoil is invalid from then on):
    what it found, "" for nothing."""
    return str(request(name, {"op": "check-source"}, timeout).get("foreign", ""))


# How long a new worker may take to answer after the old one handed over.
WORKER_START_TIMEOUT = 60.0


def restart_worker(name: str) -> VolumeInfo:
    """Replace the worker of volume `name` by a new one, started from the imager installed now (a
    live upgrade); the filesystem on the front sees a pause. Returns the volume as the new
    worker describes it."""
    old = request(name, {"op": "restart-worker"}, REQUEST_TIMEOUT)["worker"]["pid"]
    with exit_watch(old) as watch:
        if not has_exited(watch, WORKER_START_TIMEOUT):
            record = read_record(name) or {}
            raise VolumeError(f"the worker {old} of {name!r} did not hand over in {WORKER_START_TIMEOUT:.0f} s "
                              f"(see {record.get('log_path', 'its log')})")
    # Waits in the supervisor's socket backlog until the next worker answers.
    info = volume_from(request(name, {"op": "status"}, WORKER_START_TIMEOUT)["volume"])
    if info.worker is None or info.worker.get("pid") == old:
        raise VolumeError(f"the worker of {name!r} was not replaced (see {info.log_path})")
    return info


def known_volumes() -> list[VolumeInfo]:
    """Every attached volume as its record describes it (no snapshot details), without waiting on
    any daemon: for jobs that only need to know which devices are managed."""
    return [volume_from(dict(r, snapshot=None)) for r in records()]


def list_volumes() -> list[VolumeInfo]:
    """Every attached volume by name: what its daemon says, or, for a daemon that is gone or
    does not answer, what its record says with `state` and `problem` set."""
    result = []
    for record in records():
        state, problem = daemon_state(record)
        if state == "running":
            try:
                result.append(status(record["name"]))
                continue
            except VolumeError as e:
                state, problem = daemon_state(record)
                if state == "running":
                    state, problem = "not answering", f"{str(e).removesuffix(' (stopped or stuck? see its log)')} " \
                                                      f"(stopped or stuck; see {record['log_path']})"
        result.append(volume_from(dict(record, snapshot=None, state=state, problem=problem)))
    return result


def require_known(name: str) -> dict:
    """The record of volume `name`, which must be attached (its daemon alive or not)."""
    record = read_record(check_name(name))
    if record is None:
        attached = [r["name"] for r in records()]
        hint = f" (attached: {', '.join(attached)})" if attached else ""
        raise VolumeRefused(f"no managed volume named {name!r}{hint}")
    return record


def require_running(name: str) -> dict:
    """The record of volume `name`, which must be attached and have a live daemon."""
    record = require_known(name)
    state, problem = daemon_state(record)
    if state != "running":
        raise VolumeError(f"{name}: {problem}")
    return record


def recover(name: str, *, check: Callable[[str], str] | None = None) -> VolumeInfo:
    """Bring back a volume whose daemon died: clear what the dead daemon left (its front loop
    device and FUSE mount), attach the source again with the same state directory and cache
    size, and check the filesystem on the new front with `check` (front -> one-line verdict,
    returned in `problem`). Refused while the dead front is still mounted: only the user can
    unmount it safely."""
    record = read_record(check_name(name))
    if record is None:
        raise VolumeRefused(f"no managed volume named {name!r} to recover")
    if daemon_state(record)[0] == "running":
        raise VolumeRefused(f"{name}: its daemon is running; nothing to recover")
    _clear_failed(record)
    info = attach(record["device"], name=name, cache_path=record["state_dir"],
                  cache_size=record.get("cache_size"), block_size=record.get("block_size"))
    if check is not None and info.front:
        return dataclasses.replace(info, problem=check(info.front))
    return info


def _clear_failed(record: dict) -> None:
    """Remove what a dead daemon left: its front loop device, its dead FUSE mount, its run dir."""
    mounted = mounts_of(record["front"]) if record.get("front") else []
    if mounted:
        raise VolumeError(f"{record['name']}: its daemon is gone and its front {record['front']} is still "
                          f"mounted at {', '.join(m.mount_point for m in mounted)}; unmount it first (fuser -m "
                          f"shows who still uses it), then imager recover {record['name']}")
    run_dir = record["run_dir"]
    clear_stale_run_dir(run_dir)
    remove_trace(record["name"])
    for leftover in (RECORD_NAME, SOCKET_NAME):
        try:
            os.unlink(os.path.join(run_dir, leftover))
        except FileNotFoundError:
            pass
    for directory in (os.path.join(run_dir, MOUNT_DIR_NAME), run_dir):
        try:
            os.rmdir(directory)
        except OSError:
            pass


# -- snapshots -------------------------------------------------------------------------------


# -- helpers ---------------------------------------------------------------------------------


def clear_stale_run_dir(run_dir: str) -> None:
    """Remove what a daemon that died left behind: its socket and a dead FUSE mount."""
    sock = os.path.join(run_dir, SOCKET_NAME)
    if os.path.exists(sock):
        if socket_answers(sock):
            raise VolumeError(f"a daemon is already serving {run_dir}")
        os.unlink(sock)
    # The link would name a loop device that is detached below and may serve another file next;
    # the handles were the dead connection's. (The holder stays: the next daemon drops a resumed
    # snapshot when the backup that held it is gone.)
    for name in (FRONT_LINK, PID_NAME, WORKER_FILE, HANDLES_FILE):
        try:
            os.unlink(os.path.join(run_dir, name))
        except FileNotFoundError:
            pass
    mount_point = os.path.join(run_dir, MOUNT_DIR_NAME)
    # A front loop device on the dead FUSE file can only return errors now; detaching it is all
    # that is left to do (deferred by the kernel while something still holds it open).
    fuse_file = os.path.join(mount_point, VOLUME_FILE)
    for device in _loop_devices_backed_by(fuse_file):
        try:
            loop.detach(device)
        except DeviceError:
            pass
    if os.path.ismount(mount_point) or _is_dead_fuse_mount(mount_point):
        _umount_lazy(mount_point)


def _loop_devices_backed_by(path: str) -> list[str]:
    return [info.device for info in loop.list_attached() if info.backing_file == path]


def _is_dead_fuse_mount(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == 107  # ENOTCONN: the FUSE server behind this mount is gone
    return False


def _umount_lazy(path: str) -> None:
    subprocess.run(["umount", "-l", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


