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

import json
import os
import re
import select
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, Union

from devices import discover, loop
from devices.block import freeze, mounts_of, stat_volume, thaw
from devices.errors import DeviceError

from .errors import CacheFullError, ImagerError, SnapshotError, UsageError
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
READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 60.0
# Filesystems are frozen while this runs out: a daemon that does not answer must not keep
# every writer of them waiting for long.
FROZEN_REQUEST_TIMEOUT = 10.0
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL
_MAX_SOCKET_PATH = 107

Hook = Union[Callable[[], object], str, Sequence[str]]


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
    name = check_name(name or _default_name(device))
    volumes = list_volumes()
    for v in volumes:
        if v.name == name:
            raise VolumeError(f"a volume named {name!r} is already attached ({v.device})")
        if _same_file(v.device, device):
            raise VolumeError(f"{device} is already managed as {v.name!r} (front {v.front})")
        if v.front and _same_file(v.front, device):
            raise VolumeError(f"{device} is the front device of managed volume {v.name!r}, "
                              f"which is already managed through {v.device}")
    state_dir = os.path.abspath(cache_path or default_state_dir(name))
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    for v in volumes:
        if v.front and state_dir_is_on(v.front, state_dir):
            raise VolumeError(f"the state directory {state_dir} is on the front of managed volume "
                              f"{v.name!r}; freezing that volume would stall this daemon")
    run_dir = run_dir_of(name)
    if len(os.path.join(run_dir, SOCKET_NAME)) > _MAX_SOCKET_PATH:
        raise VolumeError(f"run directory {run_dir} is too long for a Unix socket path; set "
                          f"{RUN_DIR_ENV} to a shorter directory")
    _clear_stale_run_dir(run_dir)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)

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
        with open(log_path, "ab") as log:
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
    snapshot exists or while the front is mounted or open."""
    with _connect(name) as conn:
        reply = conn.request({"op": "detach"})
        if not reply.get("ok"):
            raise _error_from(reply)
        # The daemon closes the connection by exiting: wait for that rather than guess.
        conn.wait_closed(REQUEST_TIMEOUT)


def status(name: str) -> VolumeInfo:
    return _volume_from(_request(name, {"op": "status"})["volume"])


def list_volumes() -> list[VolumeInfo]:
    """Every volume whose daemon answers, by name."""
    base = run_base()
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    result = []
    for name in names:
        if not os.path.exists(os.path.join(base, name, SOCKET_NAME)):
            continue
        try:
            result.append(status(name))
        except VolumeError:
            continue    # a daemon that died: attach() of that name clears what it left
    return result


# -- snapshots -------------------------------------------------------------------------------

def snapshot_create(names: str | Iterable[str], pre_freeze_hooks: Sequence[Hook] = (),
                    post_thaw_hooks: Sequence[Hook] = (),
                    while_frozen: Callable[[], object] | None = None) -> SnapshotSetInfo:
    """One point-in-time snapshot of every named volume, all in one freeze window.

    Runs the pre-freeze hooks, FIFREEZEs every filesystem mounted from the volumes' fronts,
    switches COW on in every daemon, FITHAWs (always), runs the post-thaw hooks (always, once the
    pre-freeze hooks started). Either every snapshot exists afterwards or none does.
    Hooks are callables, shell command strings, or argv lists. `while_frozen` runs inside the
    window, after COW is on everywhere: what it reads of the filesystems is the snapshot's state
    (the engine makes its used-block plans there)."""
    names = _name_list(names)
    volumes = [status(name) for name in names]
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
    try:
        with freeze_window(mount_points, pre_freeze_hooks, post_thaw_hooks) as window:
            for v in volumes:
                reply = _request(v.name, {"op": "snapshot-create"}, timeout=FROZEN_REQUEST_TIMEOUT)
                created.append(_volume_from(reply["volume"]).snapshot)
            if while_frozen is not None:
                while_frozen()
    except BaseException:
        # Every volume of the set, not only those that answered: a daemon whose answer timed
        # out may still have switched COW on.
        for v in volumes:
            try:
                _request(v.name, {"op": "snapshot-delete", "force": True})
            except ImagerError:
                pass
        raise
    return SnapshotSetInfo(created, window.milliseconds, window.frozen, created_at)


@dataclass
class FreezeWindow:
    frozen: list[str] = field(default_factory=list)
    milliseconds: float = 0.0


@contextmanager
def freeze_window(mount_points: Sequence[str], pre_freeze_hooks: Sequence[Hook] = (),
                  post_thaw_hooks: Sequence[Hook] = ()) -> Iterator[FreezeWindow]:
    """Run the pre-freeze hooks, FIFREEZE every mount point, run the body, FITHAW every one
    (always), run the post-thaw hooks (always, once the pre-freeze hooks started). The first
    failure is the one raised; the window's length is measured from first freeze to last thaw."""
    window = FreezeWindow()
    failure: BaseException | None = None
    try:
        run_hooks(pre_freeze_hooks, "pre-freeze")
        started = time.perf_counter()
        try:
            for point in mount_points:
                try:
                    freeze(point)
                except DeviceError as e:
                    raise SnapshotError(str(e)) from None
                window.frozen.append(point)
            yield window
        finally:
            thaw_failures = _thaw_all(reversed(window.frozen))
            window.milliseconds = (time.perf_counter() - started) * 1000.0
        if thaw_failures:
            raise SnapshotError("; ".join(thaw_failures))
    except BaseException as e:
        failure = e
    try:
        run_hooks(post_thaw_hooks, "post-thaw")
    except SnapshotError as e:
        failure = failure or e     # the first failure is the one to report
    if failure is not None:
        raise failure


def _thaw_all(mount_points: Iterable[str]) -> list[str]:
    """Thaw every one, whatever fails: a filesystem left frozen hangs its writers."""
    failures = []
    for point in mount_points:
        try:
            thaw(point)
        except DeviceError as e:
            failures.append(str(e))
    return failures


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
            _request(name, {"op": "snapshot-delete", "force": force})
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


def run_hooks(hooks: Sequence[Hook], stage: str) -> None:
    for hook in hooks:
        try:
            if callable(hook):
                hook()
            elif isinstance(hook, str):
                subprocess.run(hook, shell=True, check=True)
            else:
                subprocess.run(list(hook), check=True)
        except subprocess.CalledProcessError as e:
            raise SnapshotError(f"{stage} hook {hook!r} failed with exit status {e.returncode}") from None
        except ImagerError:
            raise
        except Exception as e:
            raise SnapshotError(f"{stage} hook {hook!r} failed: {e}") from None


_ERRORS = {cls.__name__: cls for cls in (ImagerError, UsageError, SnapshotError, CacheFullError, VolumeError)}


def _error_from(reply: dict) -> ImagerError:
    return _ERRORS.get(reply.get("kind"), VolumeError)(reply.get("error") or "unknown daemon error")


def _volume_from(d: dict) -> VolumeInfo:
    snap = d.get("snapshot")
    return VolumeInfo(
        name=d["name"], device=d["device"], size=d["size"], front=d.get("front"),
        fuse_file=d["fuse_file"], state_dir=d["state_dir"], run_dir=d["run_dir"], pid=d["pid"],
        log_path=d["log_path"], snapshot=SnapshotInfo(**snap) if snap else None)


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
            attached = [n for n in _names_with_sockets() if n != name]
            hint = f" (attached: {', '.join(attached)})" if attached else ""
            raise VolumeError(f"no managed volume named {name!r}{hint}") from None
        except OSError as e:
            self.sock.close()
            raise VolumeError(f"cannot reach the daemon of {name!r}: {e.strerror}") from None
        self.reader = self.sock.makefile("rb")

    def request(self, payload: dict) -> dict:
        try:
            self.sock.sendall(json.dumps(payload).encode() + b"\n")
            line = self.reader.readline()
        except socket.timeout:
            raise VolumeError(f"the daemon of {self.name!r} did not answer {payload['op']!r} "
                              f"in {self.timeout:.0f} s") from None
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
        reply = conn.request(payload)
    if not reply.get("ok"):
        raise _error_from(reply)
    return reply


def _names_with_sockets() -> list[str]:
    try:
        return sorted(n for n in os.listdir(run_base()) if os.path.exists(os.path.join(run_base(), n, SOCKET_NAME)))
    except OSError:
        return []
