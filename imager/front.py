"""Managed volumes: a device served through FUSE so that every write passes through a CowStore.

`attach(DEV)` starts a daemon (imager.frontd) that serves DEV as the file `volume` in a FUSE mount
and puts a loop device, the *front*, on that file. Users mkfs/mount/write the front; the daemon
copies originals aside while a snapshot exists and serves the point-in-time view as the read-only
file `snapshot` next to `volume`, readable by any tool (dd, fsck, mount -o ro through a loop device).

This module is the client side: it starts daemons and talks to them over a Unix socket in the
volume's run directory with one JSON object per line, request then reply:

    {"op": "status"}                        -> {"ok": true, "volume": {...}}
    {"op": "snapshot-create"}               -> {"ok": true, "volume": {...}}   (COW switched on)
    {"op": "snapshot-delete", "force": b}   -> {"ok": true, "volume": {...}}   (COW off, cache gone)
    {"op": "detach"}                        -> {"ok": true}, then the daemon exits (socket EOF)
    any failure                             -> {"ok": false, "error": "one line", "kind": "SnapshotError"}

Freezing is done here, not in the daemon, so that one caller can freeze the filesystems of
several volumes, switch COW on in every daemon, and thaw: one freeze window for a snapshot set.

Layout: run directory $IMAGER_RUN_DIR/<name> (default /run/imager/<name>) holds control.sock and
the FUSE mount point mnt/; the state directory (attach's cache_path, default
$IMAGER_STATE_DIR/<name>, default /var/lib/imager/<name>) holds the COW bitmap, index, cache
region and the daemon's log, and survives a reboot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from devices import discover, loop
from devices.block import mounts_of, stat_volume
from devices.errors import DeviceError

from .errors import CacheFullError, ImagerError, SnapshotError, UsageError
from .freeze import DEFAULT_MAX_FREEZE, Hook, freeze_window
from .private import make_private_dir, open_private
from .snapshot import state_dir_is_on

RUN_DIR_ENV = "IMAGER_RUN_DIR"
STATE_DIR_ENV = "IMAGER_STATE_DIR"
DEFAULT_RUN_DIR = "/run/imager"
DEFAULT_STATE_DIR = "/var/lib/imager"
SOCKET_NAME = "control.sock"
MOUNT_DIR_NAME = "mnt"
VOLUME_FILE = "volume"
SNAPSHOT_FILE = "snapshot"
LOG_NAME = "daemon.log"
# What a running daemon says of itself, in its run directory: read without asking the daemon,
# so that a dead or stuck daemon of one volume never holds up work on another.
RECORD_NAME = "volume.json"
READY_TIMEOUT = 60.0
# A daemon answers status and snapshot-create in milliseconds; one that does not within these
# is stopped or stuck, and must not hold up a job for long (filesystems may be frozen meanwhile).
STATUS_TIMEOUT = 2.0
# Deleting a snapshot or detaching waits up to a few seconds for the kernel to release handles.
REQUEST_TIMEOUT = 20.0
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL
_MAX_SOCKET_PATH = 107


class VolumeError(ImagerError):
    """A volume could not be attached, detached or reached."""


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


@dataclass(frozen=True)
class SnapshotSetInfo:
    snapshots: list[SnapshotInfo]
    freeze_window_ms: float     # first FIFREEZE to last FITHAW
    frozen_mounts: list[str] = field(default_factory=list)
    created_at: float = 0.0


# -- paths -----------------------------------------------------------------------------------

def run_base() -> str:
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


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


# -- attach / detach ---------------------------------------------------------------------------

def attach(device: str, name: str | None = None, cache_path: str | None = None,
           cache_size: int | None = None, *, block_size: int | None = None) -> VolumeInfo:
    """Start managing `device`: returns once the daemon serves it and its front loop device exists.

    `cache_path` is the state directory (bitmap, index, cache region, log); it must not be on the
    device itself nor on the front of any managed volume. `cache_size` caps the cache region in
    bytes (None: bounded only by free space there)."""
    try:
        return _attach(device, name, cache_path, cache_size, block_size)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise VolumeError(f"cannot attach {device}: {e.strerror}{where}") from None


def _attach(device: str, name: str | None, cache_path: str | None, cache_size: int | None,
            block_size: int | None) -> VolumeInfo:
    device = os.path.abspath(device)
    _check_attachable(device)
    name = check_name(name if name is not None else _default_name(device))
    volumes = records()
    for v in volumes:
        failed = _daemon_state(v)[0] == "failed"
        recovery = (f"; its daemon died: recover it with imager recover {v['name']}" if failed else "")
        if v["name"] == name:
            raise VolumeError(f"a volume named {name!r} is already attached ({v['device']}){recovery}")
        if _same_file(v["device"], device):
            raise VolumeError(f"{device} is already managed as {v['name']!r} (front {v.get('front')}){recovery}")
        if v.get("front") and _same_file(v["front"], device):
            raise VolumeError(f"{device} is the front device of managed volume {v['name']!r}, "
                              f"which is already managed through {v['device']}")
    state_dir = os.path.abspath(cache_path or default_state_dir(name))
    make_private_dir(state_dir)
    for v in volumes:
        if v.get("front") and state_dir_is_on(v["front"], state_dir):
            raise VolumeError(f"the state directory {state_dir} is on the front of managed volume "
                              f"{v['name']!r}; freezing that volume would stall this daemon")
    run_dir = run_dir_of(name)
    if len(os.path.join(run_dir, SOCKET_NAME)) > _MAX_SOCKET_PATH:
        raise VolumeError(f"run directory {run_dir} is too long for a Unix socket path; set "
                          f"{RUN_DIR_ENV} to a shorter directory")
    _clear_stale_run_dir(run_dir)
    make_private_dir(run_dir)

    log_path = os.path.join(state_dir, LOG_NAME)
    ready_read, ready_write = os.pipe()
    command = [sys.executable, "-m", "imager.frontd", "--name", name, "--device", device,
               "--state-dir", state_dir, "--run-dir", run_dir, "--ready-fd", str(ready_write)]
    if cache_size is not None:
        command += ["--cache-size", str(int(cache_size))]
    if block_size is not None:
        command += ["--block-size", str(int(block_size))]
    env = dict(os.environ)
    # The daemon must import this very engine, also from a source checkout that is not installed.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        with open_private(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "ab") as log:
            starter = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       pass_fds=(ready_write,), start_new_session=True, cwd="/", env=env)
        os.close(ready_write)
        ready_write = -1
        # The starter forks the daemon and exits at once; reap it so no zombie stays behind.
        starter.wait()
        reply = _read_ready(ready_read, log_path)
    finally:
        os.close(ready_read)
        if ready_write >= 0:
            os.close(ready_write)
    if not reply.get("ok"):
        raise _error_from(reply)
    return _volume_from(reply["volume"])


def detach(name: str) -> None:
    """Stop managing a volume: the front loop device goes away, the daemon exits. Refused while a
    snapshot exists or while the front is mounted or open. A volume whose daemon died is cleaned
    up (refused while its dead front is still mounted)."""
    record = read_record(check_name(name))
    if record is not None and _daemon_state(record)[0] == "failed":
        _clear_failed(record)
        return
    with _connect(name, REQUEST_TIMEOUT) as conn:
        pid = _checked(conn.request({"op": "status"}))["volume"]["pid"]
        _checked(conn.request({"op": "detach"}))
        # The daemon closes the connection as it exits, then removes its run directory: wait for
        # the exit itself, so that what it cleans up is gone when detach returns.
        conn.wait_closed(REQUEST_TIMEOUT)
    _wait_for_exit(pid, REQUEST_TIMEOUT)


def _wait_for_exit(pid: int, timeout: float) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise VolumeError(f"the volume daemon (pid {pid}) did not exit in {timeout:g} s")
    finally:
        os.close(pidfd)


def status(name: str) -> VolumeInfo:
    return _volume_from(_request(name, {"op": "status"}, STATUS_TIMEOUT)["volume"])


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


def known_volumes() -> list[VolumeInfo]:
    """Every attached volume as its record describes it (no snapshot details), without waiting on
    any daemon: for jobs that only need to know which devices are managed."""
    return [_volume_from(dict(r, snapshot=None)) for r in records()]


def list_volumes() -> list[VolumeInfo]:
    """Every attached volume by name: what its daemon says, or, for a daemon that is gone or
    does not answer, what its record says with `state` and `problem` set."""
    result = []
    for record in records():
        state, problem = _daemon_state(record)
        if state == "running":
            try:
                result.append(status(record["name"]))
                continue
            except VolumeError as e:
                state, problem = _daemon_state(record)
                if state == "running":
                    state, problem = "not answering", f"{e} (stopped or stuck; see {record['log_path']})"
        result.append(_volume_from(dict(record, snapshot=None, state=state, problem=problem)))
    return result


def _daemon_state(record: dict) -> tuple[str, str]:
    """("running", "") or ("failed", what happened and what to do) for a volume's record."""
    try:
        os.kill(int(record["pid"]), 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:
        alive = True
    if alive and _socket_answers(socket_path_of(record["name"])):
        return "running", ""
    front = record.get("front") or "its front"
    mounted = mounts_of(record["front"]) if record.get("front") else []
    where = f", mounted at {', '.join(m.mount_point for m in mounted)}," if mounted else ""
    steps = (f"umount {' '.join(m.mount_point for m in mounted)}; imager recover {record['name']}"
             if mounted else f"imager recover {record['name']} (or imager detach {record['name']})")
    return "failed", (f"the volume daemon (pid {record['pid']}) is gone: {front}{where} fails every request; "
                      f"recover: {steps} (re-attaches {record['device']} and checks the filesystem); "
                      f"log: {record['log_path']}")


def _socket_answers(path: str) -> bool:
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


def require_running(name: str) -> dict:
    """The record of volume `name`, which must be attached and have a live daemon."""
    record = read_record(check_name(name))
    if record is None:
        attached = [r["name"] for r in records()]
        hint = f" (attached: {', '.join(attached)})" if attached else ""
        raise VolumeError(f"no managed volume named {name!r}{hint}")
    state, problem = _daemon_state(record)
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
        raise VolumeError(f"no managed volume named {name!r} to recover")
    if _daemon_state(record)[0] == "running":
        raise VolumeError(f"{name}: its daemon is running; nothing to recover")
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
    _clear_stale_run_dir(run_dir)
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
        self.names = _name_list(names)
        self.hold = hold
        self._connections: list[_Connection] = []
        self._asked: list[str] = []       # the volumes told to switch COW on
        try:
            self.info = self._take(pre_freeze_hooks, post_thaw_hooks, while_frozen, max_freeze)
        except BaseException:
            self._drop_all()
            raise

    def _take(self, pre_freeze_hooks, post_thaw_hooks, while_frozen, max_freeze) -> SnapshotSetInfo:
        for name in self.names:
            require_running(name)
            self._connections.append(_connect(name, STATUS_TIMEOUT))
        volumes = [_volume_from(_checked(conn.request({"op": "status"}))["volume"]) for conn in self._connections]
        for v in volumes:
            if v.snapshot is not None:
                raise SnapshotError(f"{v.name} already has a snapshot (generation {v.snapshot.generation}); "
                                    f"delete it first")
        # Every mount of one block device shares its superblock: freeze it through one of them
        # (a second FIFREEZE of the same filesystem fails with EBUSY).
        mount_points = []
        for v in volumes:
            mounted = mounts_of(v.front) if v.front else []
            if mounted:
                mount_points.append(mounted[0].mount_point)
        created: list[SnapshotInfo] = []
        created_at = time.time()
        with freeze_window(mount_points, pre_freeze_hooks, post_thaw_hooks, max_seconds=max_freeze) as window:
            for conn in self._connections:
                self._asked.append(conn.name)
                reply = _checked(conn.request({"op": "snapshot-create", "hold": self.hold}))
                created.append(_volume_from(reply["volume"]).snapshot)
            if while_frozen is not None:
                while_frozen()
            window.check()
        return SnapshotSetInfo(created, window.milliseconds, window.frozen, created_at)

    def _drop_all(self) -> None:
        """Delete every snapshot this set asked for, not only those that answered: a daemon whose
        answer timed out may still have switched COW on. (A held one also goes when its
        connection closes; a stuck daemon is not waited for long.)"""
        for conn in self._connections:
            conn.close()
        self._connections = []
        for name in self._asked:
            try:
                _request(name, {"op": "snapshot-delete", "force": True}, STATUS_TIMEOUT)
            except ImagerError:
                pass

    def close(self) -> None:
        """Delete the snapshots of a held set, waiting for each daemon's answer."""
        failures = []
        for conn in self._connections:
            try:
                conn.timeout = REQUEST_TIMEOUT
                _checked(conn.request({"op": "snapshot-delete", "force": True}))
            except ImagerError as e:
                failures.append(str(e))
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
    for name in _name_list(names):
        try:
            info = status(name)
            if info.snapshot is None:
                if not missing_ok:
                    failures.append(f"{name} has no snapshot")
                continue
            _request(name, {"op": "snapshot-delete", "force": force}, REQUEST_TIMEOUT)
        except ImagerError as e:
            failures.append(str(e))
    if failures:
        raise SnapshotError("; ".join(failures))


def snapshot_list() -> list[SnapshotInfo]:
    return [v.snapshot for v in list_volumes() if v.snapshot is not None]


# -- helpers ---------------------------------------------------------------------------------

def _check_attachable(device: str) -> None:
    try:
        st = stat_volume(device)
    except DeviceError as e:
        raise VolumeError(str(e)) from None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise VolumeError(f"{device}: is empty (size 0); a volume needs room for a filesystem")
    if stat.S_ISBLK(st.st_mode):
        refuse_esp(device, "cow")
    mounted = mounts_of(device)
    if mounted:
        raise VolumeError(f"{device} is mounted at {', '.join(m.mount_point for m in mounted)}; "
                          f"unmount it, attach, then mount the front device instead")


def refuse_esp(device: str, provider: str) -> None:
    """The cow provider cannot stand between the firmware and an EFI system partition: the
    firmware and boot loaders write it before any daemon can intercept their writes."""
    try:
        info = discover.describe(device)
    except DeviceError:
        return
    if info.is_esp:
        raise VolumeError(f"{device} is an EFI system partition: the {provider} provider cannot snapshot it "
                          f"(firmware and boot loaders write it where no daemon can intercept the writes); image it "
                          f"with --snapshot freeze (kept frozen while read; it is small) or, unmounted, "
                          f"with --snapshot none")


def _default_name(device: str) -> str:
    base = os.path.basename(device)
    return re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-") or "volume"


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _clear_stale_run_dir(run_dir: str) -> None:
    """Remove what a daemon that died left behind: its socket and a dead FUSE mount."""
    sock = os.path.join(run_dir, SOCKET_NAME)
    if os.path.exists(sock):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock)
        except OSError:
            os.unlink(sock)
        else:
            raise VolumeError(f"a daemon is already serving {run_dir}")
        finally:
            probe.close()
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


def _read_ready(fd: int, log_path: str) -> dict:
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VolumeError(f"the volume daemon did not get ready in {READY_TIMEOUT:.0f} s; see {log_path}")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise VolumeError(f"the volume daemon exited before it was ready: {_log_tail(log_path)}")
        data += chunk
    return json.loads(data.split(b"\n", 1)[0])


def _log_tail(log_path: str) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {log_path}"
    return (lines[-1] if lines else "no message") + f" (log: {log_path})"


def _name_list(names: str | Iterable[str]) -> list[str]:
    result = [names] if isinstance(names, str) else list(names)
    if not result:
        raise UsageError("no volume names given")
    if len(set(result)) != len(result):
        raise UsageError(f"a volume is named twice in {result}")
    return [check_name(n) for n in result]


_ERRORS = {cls.__name__: cls for cls in (ImagerError, UsageError, SnapshotError, CacheFullError, VolumeError)}


def _error_from(reply: dict) -> ImagerError:
    return _ERRORS.get(reply.get("kind"), VolumeError)(reply.get("error") or "unknown daemon error")


def _volume_from(d: dict) -> VolumeInfo:
    snap = d.get("snapshot")
    return VolumeInfo(
        name=d["name"], device=d["device"], size=d["size"], front=d.get("front"),
        fuse_file=d["fuse_file"], state_dir=d["state_dir"], run_dir=d["run_dir"], pid=d["pid"],
        log_path=d["log_path"], snapshot=SnapshotInfo(**snap) if snap else None,
        state=d.get("state", "running"), problem=d.get("problem", ""))


def _checked(reply: dict) -> dict:
    if not reply.get("ok"):
        raise _error_from(reply)
    return reply


class _Connection:
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
                raise VolumeError(f"{name}: {_daemon_state(record)[1]}") from None
            attached = [r["name"] for r in records() if r["name"] != name]
            hint = f" (attached: {', '.join(attached)})" if attached else ""
            raise VolumeError(f"no managed volume named {name!r}{hint}") from None
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
            raise VolumeError(f"lost the daemon of {self.name!r}: {e.strerror}") from None
        if not line:
            raise VolumeError(f"the daemon of {self.name!r} closed the connection")
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

    def __enter__(self) -> "_Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _connect(name: str, timeout: float = REQUEST_TIMEOUT) -> _Connection:
    return _Connection(check_name(name), timeout)


def _request(name: str, payload: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
    with _connect(name, timeout) as conn:
        return _checked(conn.request(payload))
