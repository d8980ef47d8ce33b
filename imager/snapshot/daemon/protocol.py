"""What a volume's daemon and its clients share: where things live, the names of the files it
serves, and the control protocol.

A daemon listens on a Unix socket in the volume's run directory and answers one JSON object per
line, request then reply:

    {"op": "status"}                                -> {"ok": true, "volume": {...}}
    {"op": "snapshot-create", "hold": b}            -> {"ok": true, "volume": {...}}   (COW on)
    {"op": "snapshot-delete", "force": b[, "generation": g]}
                                                    -> {"ok": true, "volume": {...}}   (COW off; with
                                                       "generation", a snapshot already gone is no error)
    {"op": "restart-worker"}                        -> {"ok": true}, then a new worker takes over
    {"op": "ping"}                                  -> {"ok": true, "fuse_busy": s}  (the watchdog)
    {"op": "detach"}                                -> {"ok": true}, then the daemon exits (EOF)
    {"op": "failpoints", "set": spec}               -> {"ok": true}   (tests: imager.failpoints)
    any failure                  -> {"ok": false, "error": "one line", "kind": "SnapshotError"}

A snapshot created with "hold" belongs to that connection: when it closes before a
snapshot-delete (the backup died), the daemon deletes the snapshot. The holder's pid is also
kept in the run directory (holder.json): a worker that replaces a dead one cannot see the old
connection, so it watches that process instead, and the backup reconnects to delete it.

Layout: run directory $IMAGER_RUN_DIR/<name> (default /run/imager/<name>) holds control.sock,
the daemon's record (volume.json: who it is, read without asking it) and the FUSE mount point
mnt/ with the files `volume` and, while a snapshot exists, `snapshot`; the state directory
(attach's cache path, default $IMAGER_STATE_DIR/<name>, default /var/lib/imager/<name>) holds
the COW bitmap, index, cache region and the daemon's log, and survives a reboot.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Iterable

from devices.fs import mounts_of

from ...errors import CacheFullError, ImagerError, SnapshotError, UsageError, VolumeError, VolumeRefused
from ...spawn import run_base

STATE_DIR_ENV = "IMAGER_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/imager"
SOCKET_NAME = "control.sock"
MOUNT_DIR_NAME = "mnt"
VOLUME_FILE = "volume"
SNAPSHOT_FILE = "snapshot"
LOG_NAME = "daemon.log"
# What a running daemon says of itself, in its run directory: read without asking the daemon,
# so that a dead or stuck daemon of one volume never holds up work on another.
RECORD_NAME = "volume.json"
# For boot (imager-volume@.service, fstab): a stable name of the front, whose loop device number
# varies, and the supervisor's pid for systemd's PIDFile=.
FRONT_LINK = "front"
PID_NAME = "supervisor.pid"
HOLDER_NAME = "holder.json"      # the process holding the snapshot: generation, pid, start time
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL
MAX_SOCKET_PATH = 107


def run_dir_of(name: str) -> str:
    return os.path.join(run_base(), name)


def socket_path_of(name: str) -> str:
    return os.path.join(run_dir_of(name), SOCKET_NAME)


def default_state_dir(name: str) -> str:
    return os.path.join(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR, name)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise UsageError(f"bad volume name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


_ERRORS = {cls.__name__: cls for cls in (ImagerError, UsageError, SnapshotError, VolumeError, VolumeRefused)}


def error_reply(e: Exception) -> dict:
    return {"ok": False, "error": str(e), "kind": type(e).__name__}


def error_from(reply: dict) -> ImagerError:
    """The error a failed reply stands for (a cache-full snapshot error arrives as what it says)."""
    kind = reply.get("kind")
    cls = SnapshotError if kind == CacheFullError.__name__ else _ERRORS.get(kind, VolumeError)
    return cls(reply.get("error") or "unknown daemon error")


# A daemon answers status and snapshot-create in milliseconds; one that does not within these
# is stopped or stuck, and must not hold up a job for long (filesystems may be frozen meanwhile).
STATUS_TIMEOUT = 2.0
# Deleting a snapshot or detaching waits up to a few seconds for the kernel to release handles.
REQUEST_TIMEOUT = 20.0


@dataclass(frozen=True)
class SnapshotInfo:
    name: str                   # the volume's name
    path: str                   # the read-only point-in-time file: open(), dd, losetup -r
    created_at: float           # epoch seconds when COW was switched on
    generation: int
    block_size: int
    changed_blocks: int
    cache_bytes_used: int
    cache_bytes_needed: int
    cache_capacity: int | None
    invalid: bool
    invalid_reason: str
    cache_full: bool = False    # invalid because the cache region ran out of room
    tracker: dict | None = None  # a backup's snapshot: the change tracker's roll (series, sequence, base)
    delete_failed: bool = False  # its delete was asked and could not be recorded: the next backup tries again


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    device: str                 # the source device the daemon owns
    size: int
    front: str | None           # the loop device users mkfs/mount/write
    fuse_file: str              # the FUSE file the front sits on
    state_dir: str
    run_dir: str
    pid: int
    log_path: str
    snapshot: SnapshotInfo | None
    state: str = "running"      # running | failed (the daemon is gone) | not answering
    problem: str = ""           # for a volume not running: what happened and what to do
    tracker: dict | None = None  # the change tracker: series, sequence, base, changed blocks
    worker: dict | None = None   # the process serving the volume under `pid`: its pid, restarts so far


@dataclass(frozen=True)
class SnapshotSetInfo:
    snapshots: list[SnapshotInfo]
    freeze_window_ms: float     # first FIFREEZE to last FITHAW
    frozen_mounts: list[str] = field(default_factory=list)
    created_at: float = 0.0


def name_list(names: str | Iterable[str]) -> list[str]:
    result = [names] if isinstance(names, str) else list(names)
    if not result:
        raise UsageError("no volume names given")
    if len(set(result)) != len(result):
        raise UsageError(f"a volume is named twice in {result}")
    return [check_name(n) for n in result]


def volume_from(d: dict) -> VolumeInfo:
    snap = d.get("snapshot")
    return VolumeInfo(
        name=d["name"], device=d["device"], size=d["size"], front=d.get("front"),
        fuse_file=d["fuse_file"], state_dir=d["state_dir"], run_dir=d["run_dir"], pid=d["pid"],
        log_path=d["log_path"], snapshot=SnapshotInfo(**snap) if snap else None,
        state=d.get("state", "running"), problem=d.get("problem", ""), tracker=d.get("tracker"),
        worker=d.get("worker"))


def checked(reply: dict) -> dict:
    if not reply.get("ok"):
        raise error_from(reply)
    return reply


class ConnectionLost(VolumeError):
    """The daemon's worker went away mid-conversation (killed or restarted): the supervisor's
    socket takes a new connection for the next worker."""


class Connection:
    def __init__(self, name: str, timeout: float):
        self.name = name
        self.timeout = timeout
        path = socket_path_of(name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            record = read_record(name)
            if record is not None:
                raise VolumeError(f"{name}: {daemon_state(record)[1]}") from None
            attached = [r["name"] for r in records() if r["name"] != name]
            hint = f" (attached: {', '.join(attached)})" if attached else ""
            raise VolumeRefused(f"no managed volume named {name!r}{hint}") from None
        except OSError as e:
            self.sock.close()
            raise VolumeError(f"cannot reach the daemon of {name!r}: {e.strerror}") from None
        self.reader = self.sock.makefile("rb")

    def request(self, payload: dict) -> dict:
        self.sock.settimeout(self.timeout)
        try:
            self.sock.sendall(json.dumps(payload).encode() + b"\n")
            line = self.reader.readline()
        except socket.timeout:
            raise VolumeError(f"the daemon of volume {self.name!r} did not answer {payload['op']!r} in "
                              f"{self.timeout:g} s (stopped or stuck? see its log)") from None
        except OSError as e:
            raise ConnectionLost(f"lost the daemon of {self.name!r}: {e.strerror}") from None
        if not line:
            raise ConnectionLost(f"the daemon of {self.name!r} closed the connection")
        return json.loads(line)

    def wait_closed(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            while self.reader.read(65536):
                pass
        except socket.timeout:
            raise VolumeError(f"the daemon of {self.name!r} did not exit in {timeout:.0f} s") from None

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(name: str, timeout: float = REQUEST_TIMEOUT) -> Connection:
    return Connection(check_name(name), timeout)


def request(name: str, payload: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
    with connect(name, timeout) as conn:
        return checked(conn.request(payload))


def read_record(name: str) -> dict | None:
    """What the daemon of volume `name` wrote of itself when it started, or None."""
    try:
        with open(os.path.join(run_dir_of(name), RECORD_NAME), "rb") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("name") == name else None


def records() -> list[dict]:
    """The record of every attached volume, running or not, without asking any daemon."""
    try:
        names = sorted(os.listdir(run_base()))
    except OSError:
        return []
    return [r for r in (read_record(n) for n in names) if r is not None]


def daemon_state(record: dict) -> tuple[str, str]:
    """("running", "") or ("failed", what happened and what to do) for a volume's record."""
    try:
        os.kill(int(record["pid"]), 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:
        alive = True
    if alive and socket_answers(socket_path_of(record["name"])):
        return "running", ""
    front = record.get("front") or "its front"
    mounted = mounts_of(record["front"]) if record.get("front") else []
    where = f", mounted at {', '.join(m.mount_point for m in mounted)}," if mounted else ""
    steps = (f"umount {' '.join(m.mount_point for m in mounted)}; imager recover {record['name']}"
             if mounted else f"imager recover {record['name']} (or imager detach {record['name']})")
    # The supervisor replaces dead workers; only its own death (or the FUSE connection's) ends here.
    return "failed", (f"the volume daemon's supervisor (pid {record['pid']}) is gone, and the FUSE connection with "
                      f"it: {front}{where} fails every request; "
                      f"recover: {steps} (re-attaches {record['device']} and checks the filesystem); "
                      f"log: {record['log_path']}")


def socket_answers(path: str) -> bool:
    """Whether a daemon listens on `path`: a connect is accepted by the kernel even while the
    daemon is stopped, so this tells a dead daemon from a live (maybe stuck) one without waiting."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def cache_full_error(name: str, snap: SnapshotInfo) -> CacheFullError:
    return CacheFullError(name, snap.invalid_reason, snap.cache_bytes_needed, snap.cache_capacity)
