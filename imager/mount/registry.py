"""What is mounted where: one run directory per mounted image under $IMAGER_RUN_DIR/.mounts/
(default /run/imager/.mounts/ID; a volume name cannot start with a dot), holding its record
(mount.json), the daemon's log and the FUSE mount point fs/.

The record is written before anything is created and says where to look: the directory the
image is mounted at, the FUSE mount point, and every entry imager creates in the directory
(written before it is created). What exists is then found, not remembered: the loop devices
are those whose backing file is in the FUSE mount point, the mounts those of these loop
devices. So teardown() clears everything after any failure, also after the daemon was killed
with SIGKILL at any moment, and can be run again.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import time
from typing import Any

from devices import fs, loop
from devices.errors import DeviceError

from ..ends.atomic import write_atomically
from ..errors import UsageError
from ..private import make_private_dir
from ..spawn import exit_watch, has_exited, process_start_time, run_base

log = logging.getLogger("imager.mount")

MOUNTS_DIR = ".mounts"
RECORD_NAME = "mount.json"
LOG_NAME = "daemon.log"
FUSE_DIR = "fs"
# Logs that hold a warning or an error outlive their mount here, the newest KEPT_LOGS of them.
KEPT_LOGS_DIR = "mount-logs"
KEPT_LOGS = 20

Record = dict[str, Any]


def base() -> str:
    return os.path.join(run_base(), MOUNTS_DIR)


def create(directory: str, images: list[str], cache_bytes: int) -> Record:
    """A new run directory and the record of a mount about to start."""
    make_private_dir(base())
    while True:
        # Never reused: a run directory names one mount, also to an umount that finds it later.
        mount_id = os.urandom(4).hex()
        run_dir = os.path.join(base(), mount_id)
        try:
            os.mkdir(run_dir, 0o700)
            break
        except FileExistsError:
            continue
    record: Record = {
        "id": mount_id, "dir": directory, "image": images[0], "images": images, "cache_bytes": cache_bytes,
        "run_dir": run_dir, "fuse": os.path.join(run_dir, FUSE_DIR), "log": os.path.join(run_dir, LOG_NAME),
        "pid": None, "start_time": None, "state": "starting", "created": [], "entries": [],
        "started_at": time.time(),
    }
    save(record)
    return record


def save(record: Record) -> None:
    write_atomically(os.path.join(record["run_dir"], RECORD_NAME), json.dumps(record, indent=1).encode())


def load(run_dir: str) -> Record | None:
    try:
        with open(os.path.join(run_dir, RECORD_NAME), "rb") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("run_dir") == run_dir else None


def records() -> list[Record]:
    try:
        names = os.listdir(base())
    except OSError:
        return []
    found = [load(os.path.join(base(), n)) for n in names]
    return sorted((r for r in found if r is not None), key=lambda r: r.get("started_at", 0))


def find(directory: str) -> Record | None:
    """The record of the image mounted at `directory` (its real path)."""
    for record in records():
        if record["dir"] == directory:
            return record
    return None


def daemon_alive(record: Record) -> bool:
    pid = record.get("pid")
    return isinstance(pid, int) and process_start_time(pid) == record.get("start_time")


def stop_daemon(record: Record, timeout: float) -> bool:
    """SIGTERM the record's daemon and wait for it to exit; False if it is still there."""
    if not daemon_alive(record):
        return True
    pid: int = record["pid"]
    with exit_watch(pid) as watch:
        if watch is None or not daemon_alive(record):       # the pid is ours, not a newer process's
            return True
        os.kill(pid, signal.SIGTERM)
        return has_exited(watch, timeout)


def kill_daemon(record: Record, timeout: float = 10.0) -> None:
    """SIGKILL a daemon that does not stop, and wait for it to be gone."""
    if not daemon_alive(record):
        return
    pid: int = record["pid"]
    with exit_watch(pid) as watch:
        if watch is not None and daemon_alive(record):
            os.kill(pid, signal.SIGKILL)
            has_exited(watch, timeout)


# -- what exists ---------------------------------------------------------------------------------

def _inside(path: str | None, directory: str) -> bool:
    return path is not None and (path == directory or path.startswith(directory.rstrip("/") + "/"))


def loop_devices(record: Record) -> list[str]:
    """The loop devices on files this mount serves (found by their backing file, from sysfs)."""
    return [info.device for info in loop.list_attached() if _inside(info.backing_file, record["fuse"])]


def filesystem_mounts(record: Record) -> list[fs.Mount]:
    """The mounts of filesystems on those loop devices, innermost last."""
    devices = set(loop_devices(record))
    return [m for m in fs.mounts() if m.source in devices]


def fuse_mounted(record: Record) -> bool:
    return any(m.mount_point == record["fuse"] for m in fs.mounts())


def leftovers(record: Record) -> list[str]:
    """What of this mount still exists (empty once teardown has done its work)."""
    found = [f"mount {m.mount_point}" for m in filesystem_mounts(record)]
    found += [f"loop device {d}" for d in loop_devices(record)]
    if fuse_mounted(record):
        found.append(f"FUSE mount {record['fuse']}")
    found += [f"{path}" for path in record.get("created", []) if os.path.lexists(path)]
    return found


# -- undoing it ----------------------------------------------------------------------------------

def unmount_filesystems(record: Record) -> list[str]:
    """Unmount every filesystem mounted from this image; raises UsageError, unmounting none,
    while the mount is in use (refuse_while_in_use), and if one turns out busy all the same (a
    file opened meanwhile) names it (those before it are unmounted, the rest stay)."""
    refuse_while_in_use(record)
    done = []
    for m in reversed(filesystem_mounts(record)):
        try:
            fs.umount(m.mount_point)
        except fs.Busy as e:
            raise UsageError(f"{e}; close it and run imager umount {shlex.quote(record['dir'])} again") from None
        except DeviceError as e:
            raise UsageError(str(e)) from None
        done.append(m.mount_point)
    return done


def refuse_while_in_use(record: Record) -> None:
    """UsageError, before anything is undone, while a process uses a file of the mount (also a
    served file: a partition shown as its bytes) or something is mounted inside it: unmounting
    the rest and then stopping at the busy one would leave a mount half there."""
    ours = [m.mount_point for m in filesystem_mounts(record)]
    if fuse_mounted(record):
        ours.append(record["fuse"])
    inside = [p for p in fs.mounts_inside(ours) if p not in ours]
    if inside:
        raise UsageError(f"{inside[0]} is mounted inside {record['dir']}: unmount it first"
                         f"{' (and ' + str(len(inside) - 1) + ' more)' if len(inside) > 1 else ''}, then run "
                         f"imager umount {shlex.quote(record['dir'])} again")
    busy = fs.users(ours, ignore={record["pid"]} if record.get("pid") else set())
    if busy:
        more = f" and {len(busy) - 3} more" if len(busy) > 3 else ""
        raise UsageError(f"{record['dir']} is in use by {', '.join(busy[:3])}{more} (a file open there, or its "
                         f"working directory); close it and run imager umount {shlex.quote(record['dir'])} again")


def detach_loop_devices(record: Record) -> None:
    for device in loop_devices(record):
        try:
            loop.detach(device)
        except DeviceError as e:
            log.info("%s", e)       # cleared itself meanwhile (autoclear)


def teardown(record: Record) -> str | None:
    """Undo everything of this mount that exists, in reverse order of creation: filesystem
    mounts, loop devices, the FUSE mount, the entries made in the directory, the run
    directory. Raises UsageError (leaving the rest) while a filesystem is in use. Returns
    where the daemon's log was kept, if it told of a problem (a damaged chunk, a failed
    read), else None: a log with nothing to look at goes with the mount."""
    unmount_filesystems(record)
    detach_loop_devices(record)
    if fuse_mounted(record):
        try:
            fs.umount(record["fuse"])
        except DeviceError:
            fs.umount(record["fuse"], lazy=True)
    for path in reversed(record.get("created", [])):
        _remove_created(path, record)
    kept = _keep_log(record)
    for name in (RECORD_NAME, LOG_NAME):
        try:
            os.unlink(os.path.join(record["run_dir"], name))
        except FileNotFoundError:
            pass
    for directory in (record["fuse"], record["run_dir"]):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s left in place: %s", directory, e.strerror)
    return kept


def kept_log_path(record: Record) -> str:
    """Where the mount's log is kept if it told of a problem (see teardown)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(record.get("started_at") or 0))
    return os.path.join(run_base(), KEPT_LOGS_DIR, f"{stamp}-{record['id']}-{os.path.basename(record['image'])}.log")


def _keep_log(record: Record) -> str | None:
    """Move the mount's log to KEPT_LOGS_DIR if it has a WARNING or ERROR line; drop the oldest
    kept logs beyond KEPT_LOGS."""
    try:
        with open(record["log"], "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    if b"] WARNING " not in text and b"] ERROR " not in text:
        return None
    kept = kept_log_path(record)
    directory = os.path.dirname(kept)
    try:
        make_private_dir(directory)
        os.replace(record["log"], kept)
    except (OSError, UsageError) as e:
        # Clearing the mount matters more than keeping its log.
        log.warning("the mount's log %s could not be kept in %s: %s", record["log"], directory,
                    e.strerror if isinstance(e, OSError) else e)
        return None
    logs = sorted(os.listdir(directory))
    for old in logs[:-KEPT_LOGS]:
        try:
            os.unlink(os.path.join(directory, old))
        except FileNotFoundError:
            pass
    return kept


def _remove_created(path: str, record: Record) -> None:
    """Remove an entry imager made in the directory: a symlink to a served file, or an empty
    directory that is no mount point. Anything else is left as it is."""
    try:
        if os.path.islink(path):
            if _inside(os.readlink(path), record["fuse"]):
                os.unlink(path)
        elif os.path.isdir(path) and not os.path.ismount(path):
            os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("%s left in place: %s", path, e.strerror)
