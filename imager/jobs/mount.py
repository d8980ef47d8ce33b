"""File-level restore: mount an image or chain point read-only (a daemon serves it until
umount), list what is mounted, and list or extract files without a visible mount.

mount() checks the image (and finds its parents: the catalog, else beside it) and the
directory here, in one-line errors, then starts the mount daemon (imager.mount.daemon) and
returns what it mounted where. umount() unmounts the filesystems first (refusing while one is in
use, changing nothing else), then stops the daemon, then clears whatever a daemon that was
killed left behind (imager.mount.registry). ls() and extract() run in a process of their own
in a private mount namespace (imager.mount.private).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

from devices import fs

from ..catalog import Catalog
from ..errors import ChunkError, ImageFormatError, ImagerError, UsageError
from ..mount import daemon, registry
from ..mount.serve import spin_seconds
from ..mount.volume import DEFAULT_CACHE_BYTES
from ..private import under_dev
from ..spawn import engine_env, fork_daemon, start_daemon
from ..units import counted
from .chains import open_chain
from .results import ExtractResult, FileEntry, MountedEntry, MountInfo

log = logging.getLogger("imager.mount")

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def mount(image: str, directory: str, *, catalog: Catalog | None = None,
          cache_bytes: int = DEFAULT_CACHE_BYTES) -> MountInfo:
    """Mount the volume of the image file `image` (an incremental: at its point) read-only at the
    empty directory `directory`: a filesystem there, a whole disk's partitions in it as
    `<n>-<label or fstype>`, what the kernel cannot mount as the file of its bytes. Returns once
    everything is mounted; a daemon (a fork of this process if it has no other thread, else a new
    interpreter) serves it until umount()."""
    spin_seconds()      # a wrong setting is the caller's, said before any daemon starts
    images = chain_files(image, catalog)
    directory = _check_mount_point(directory)
    record = registry.create(directory, images, cache_bytes)
    try:
        if threading.active_count() == 1:
            # The command (one thread): a fork of it has everything imported already.
            reply = fork_daemon(lambda ready_fd: daemon.serve(record["run_dir"], ready_fd), record["log"],
                                what="the mount daemon", error=ImagerError, timeout=READY_TIMEOUT)
        else:
            # A program with threads of its own is not forked (a lock one of them holds would stay
            # held in the child forever): a new interpreter, as the volume daemon is started.
            reply = start_daemon([sys.executable, "-m", "imager.mount.daemon", "--run-dir", record["run_dir"]],
                                 record["log"], what="the mount daemon", error=ImagerError, timeout=READY_TIMEOUT)
    except BaseException:
        _abandon(record)
        raise
    if not reply.get("ok"):
        _abandon(record)        # the daemon has undone its work; whatever it could not, now
        raise _error_from(reply)
    return mount_info(reply["mount"])


def chain_files(image: str, catalog: Catalog | None) -> list[str]:
    """The image files of the chain point `image`, the point first, back to its full."""
    if image == "-":
        raise UsageError("mounting needs an image file (random access), not standard input")
    if under_dev(image) and os.path.exists(image) and not stat.S_ISREG(os.stat(image).st_mode):
        raise UsageError(f"{image}: is a device, not an image file (imager backup makes one)")
    with ExitStack() as stack:
        chain = open_chain(image, stack, catalog=catalog)
        return [os.path.abspath(reader.path) for reader in chain.images]


def _check_mount_point(directory: str) -> str:
    if under_dev(directory):
        raise UsageError(f"{directory}: images are not mounted under /dev; give an empty directory elsewhere")
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise UsageError(f"{directory}: no such directory") from None
    except OSError as e:
        raise UsageError(f"{directory}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{directory}: not a directory")
    real = os.path.realpath(directory)
    previous = registry.find(real)
    if previous is not None:
        if registry.daemon_alive(previous):
            raise UsageError(f"{directory}: {previous['image']} is mounted there already (imager umount {directory})")
        registry.teardown(previous)         # what a dead daemon left; it says so in its log
    mounted = [m for m in fs.mounts() if m.mount_point == real]
    if mounted:
        m = mounted[-1]
        raise UsageError(f"{directory}: already a mount point ({m.fs_type} from {m.source})")
    if os.listdir(real):
        raise UsageError(f"{directory}: not empty; mount an image on an empty directory")
    return real


def _abandon(record: registry.Record) -> None:
    """After a failed or interrupted start: stop the daemon if it still runs, clear the rest."""
    current = registry.load(record["run_dir"]) or record
    if not registry.stop_daemon(current, STOP_TIMEOUT):
        registry.kill_daemon(current)
    kept = registry.teardown(current)
    if kept:
        log.warning("the mount daemon's log is kept at %s", kept)


def umount(directory: str) -> MountInfo:
    """Unmount the image mounted at `directory`: its filesystems (refused, changing nothing else,
    while one is in use), its loop devices, its FUSE file and daemon, and what it made in the
    directory; also after its daemon was killed."""
    real = os.path.realpath(directory)
    record = registry.find(real)
    if record is None:
        mounted = [m for m in fs.mounts() if m.mount_point == real]
        if mounted:
            raise UsageError(f"{directory}: not an image mounted by imager ({mounted[-1].fs_type} from "
                             f"{mounted[-1].source}); use umount(8)")
        raise UsageError(f"{directory}: no image is mounted there (imager mounts lists them)")
    info = mount_info(record)
    if registry.daemon_alive(record):
        registry.unmount_filesystems(record)
        if not registry.stop_daemon(record, STOP_TIMEOUT):
            registry.kill_daemon(record)
    registry.teardown(record)
    left = registry.leftovers(record)
    if left:
        raise ImagerError(f"{directory}: could not clear {', '.join(left)}")
    info.state = "unmounted"
    # The log goes with the mount unless it told of a problem (a damaged chunk, a failed read);
    # kept by this teardown or by the daemon's own on SIGTERM.
    kept = registry.kept_log_path(record)
    info.log_path = kept if os.path.exists(kept) else ""
    return info


def mounts() -> list[MountInfo]:
    """Every image mounted by imager, with what its daemon mounted where; a mount whose daemon is
    gone is listed as failed (imager umount clears what it left)."""
    result = []
    for record in registry.records():
        info = mount_info(record)
        if not registry.daemon_alive(record):
            info.state = "failed"
            info.problem = (f"its daemon (pid {record.get('pid')}) is gone: reads fail; imager umount "
                            f"{shlex.quote(record['dir'])} clears what it left")
        else:
            errors = _logged_errors(record)
            if errors:
                info.problem = f"{counted(len(errors), 'error')} in its log {record['log']}, the first: {errors[0]}"
        result.append(info)
    return result


def _logged_errors(record: registry.Record) -> list[str]:
    """The ERROR lines of the daemon's log (a damaged chunk, a read that failed), their message."""
    try:
        with open(record["log"], errors="replace") as f:
            return [line.split(" ERROR ", 1)[1].strip() for line in f if " ERROR " in line]
    except OSError:
        return []


def mount_info(record: registry.Record) -> MountInfo:
    entries = [MountedEntry(name=e["name"], path=e["path"], how=e["how"] or "pending", fs_type=e["fs_type"],
                            label=e["label"], partition=e["number"], offset=e["offset"], size=e["size"],
                            device=e["device"], options=e["options"] if e["how"] == "mounted" else None,
                            file=e["file"], reason=e["reason"])
               for e in record.get("entries", [])]
    return MountInfo(directory=record["dir"], image=record["image"], images=record["images"],
                     state=record["state"], pid=record.get("pid"), log_path=record["log"],
                     volume_file=os.path.join(record["fuse"], "volume"), entries=entries)


def ls(image: str, path: str = "", *, catalog: Catalog | None = None,
       cache_bytes: int = DEFAULT_CACHE_BYTES) -> list[FileEntry]:
    """The files at `path` in the image (a directory's entries, or the file itself), from a
    private mount nobody else sees and nothing outlives. In a whole disk's image the top holds
    its partitions, `<n>-<label or fstype>`, as imager mount shows them."""
    reply = _private({"op": "ls", "images": chain_files(image, catalog), "path": path, "cache_bytes": cache_bytes})
    return [FileEntry(**entry) for entry in reply["entries"]]


def extract(image: str, paths: list[str], dest: str, *, force: bool = False, catalog: Catalog | None = None,
            cache_bytes: int = DEFAULT_CACHE_BYTES) -> ExtractResult:
    """Copy `paths` (relative to the image's root) from the image to `dest`/PATH as cp -a does:
    modes, owners, times, symlinks, hard links and extended attributes. Refuses to overwrite
    unless `force`; never writes under /dev."""
    started = time.monotonic()
    if not paths:
        raise UsageError("give the paths to extract (imager ls IMAGE shows them)")
    if under_dev(dest):
        raise UsageError(f"{dest}: files are not extracted under /dev; give a directory elsewhere")
    if not os.path.exists(dest):
        raise UsageError(f"{dest}: no such directory")
    if not os.path.isdir(dest):
        raise UsageError(f"{dest}: not a directory")
    images = chain_files(image, catalog)
    reply = _private({"op": "extract", "images": images, "paths": list(paths), "dest": os.path.realpath(dest),
                      "force": force, "cache_bytes": cache_bytes})
    return ExtractResult(image=os.path.abspath(image), dest=os.path.realpath(dest), copied=reply["copied"],
                         seconds=time.monotonic() - started)


def _private(request: dict) -> dict:
    spin_seconds()
    command = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "imager.mount.private"]
    try:
        done = subprocess.run(command, input=json.dumps(request), capture_output=True, text=True, errors="replace",
                              env=engine_env(), cwd="/")
    except OSError as e:
        raise ImagerError(f"cannot start a private mount namespace (unshare): {e.strerror}") from None
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        raise ImagerError(f"the private mount failed: {lines[-1] if lines else f'exit status {done.returncode}'}") \
            from None
    if not reply.get("ok"):
        raise _error_from(reply)
    return reply


def _error_from(reply: dict) -> ImagerError:
    kind = reply.get("kind")
    cls: type[ImagerError] = {UsageError.__name__: UsageError, ImageFormatError.__name__: ImageFormatError,
                              ChunkError.__name__: ImageFormatError}.get(kind or "", ImagerError)
    return cls(reply.get("error") or "the mount daemon failed")
