"""The mount daemon: serves one image's volume (or chain point) read-only through FUSE and shows
what it holds at the user's directory, until SIGTERM (imager umount) ends it.

Started by imager.jobs.mount in a session of its own (spawn.fork_daemon: a fork of the command,
which has imported everything already; `python -m imager.mount.daemon` starts one the same way
from a new interpreter, for debugging), it logs to its run directory and tells its starter on a
pipe what it mounted where, or why it could not; whatever it made before a failure, or before a SIGTERM during the start, is undone
first (registry.teardown). Its record is in the run directory (registry.py) before anything is
created, so `imager umount` clears everything also after this process was killed with SIGKILL.

    python -m imager.mount.daemon --run-dir DIR [--ready-fd FD] [--foreground]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from contextlib import ExitStack

from devices.errors import DeviceError

from ..errors import ImagerError, UsageError
from ..spawn import become_daemon, send_ready
from . import registry
from .layout import Entry, MountRefused, describe, mount_entry
from .serve import VolumeServer
from .volume import CachedVolume, open_chain_files

log = logging.getLogger("imager.mount")

class Stopped(BaseException):
    """SIGTERM or SIGINT arrived while the mount was being set up."""


class MountDaemon:
    """Owns the image files, the cached volume, the FUSE server and what it shows at the
    directory of one mount."""

    def __init__(self, record: registry.Record):
        self.record = record
        self.directory: str = record["dir"]
        self.stack = ExitStack()
        self.volume: CachedVolume | None = None
        self.server: VolumeServer | None = None
        self.entries: list[Entry] = []

    def start(self) -> None:
        chain = open_chain_files(self.record["images"], self.stack)
        self.volume = CachedVolume(chain, cache_bytes=self.record["cache_bytes"])
        self.stack.callback(self.volume.close)
        point = self.record["images"][0]
        self.server = VolumeServer(self.volume, self.record["fuse"], f"imager:{os.path.basename(point)}",
                                   os.stat(point).st_mtime_ns)
        self.server.start()
        self.entries = describe(self.server)
        for entry in self.entries:
            entry.path = os.path.join(self.directory, entry.name) if entry.name else self.directory
        self._save(entries=[e.to_dict() for e in self.entries])
        for entry in self.entries:
            self._show(entry)
        self._save(state="mounted", entries=[e.to_dict() for e in self.entries])
        log.info("%s mounted at %s: %s", point, self.directory,
                 "; ".join(f"{e.path} ({e.how}, {e.fs_type or 'unknown'})" for e in self.entries))

    def _show(self, entry: Entry) -> None:
        if entry.mount_type:
            if entry.name:
                self._created(entry.path)
                os.mkdir(entry.path, 0o755)
            try:
                mount_entry(entry, entry.path)
                return
            except MountRefused as refused:
                log.warning("%s; shown as a file instead", refused)
                entry.reason, entry.mount_type, entry.options = str(refused), None, None
                if entry.name:
                    os.rmdir(entry.path)
                else:
                    entry.name, entry.path = "volume", os.path.join(self.directory, "volume")
        self._created(entry.path)
        os.symlink(entry.file, entry.path)
        entry.how = "file"

    def _created(self, path: str) -> None:
        """Record an entry in the directory before making it, so that teardown removes it."""
        self.record["created"].append(path)
        registry.save(self.record)

    def _save(self, **changes: object) -> None:
        self.record.update(changes)
        registry.save(self.record)

    def stop(self) -> None:
        """Unmount the filesystems (UsageError while one is in use: nothing else is undone), then
        everything else."""
        registry.unmount_filesystems(self.record)
        self._save(state="stopping")
        self.close()

    def close(self) -> None:
        """Undo whatever exists, in reverse order; also after a start that failed halfway."""
        try:
            registry.unmount_filesystems(self.record)
        except UsageError as e:
            log.error("%s", e)
        registry.detach_loop_devices(self.record)
        if self.server is not None:
            self.server.stop()
        self.stack.close()
        registry.teardown(self.record)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.foreground:
        become_daemon()
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)
    return serve(args.run_dir, args.ready_fd)


def serve(run_dir: str, ready_fd: int | None) -> int:
    """The daemon's life: mount what the record in `run_dir` says, tell the starter on
    `ready_fd`, serve until SIGTERM, clear everything. Runs in a process of its own (main(), or
    forked by imager.jobs.mount through spawn.fork_daemon)."""
    _log_to_stderr()
    record = registry.load(run_dir)
    if record is None:
        log.error("no mount record in %s", run_dir)
        send_ready(ready_fd, {"ok": False, "error": f"no mount record in {run_dir}", "kind": "ImagerError"})
        return 1
    record.update(pid=os.getpid(), start_time=registry.process_start_time(os.getpid()))
    registry.save(record)

    daemon = MountDaemon(record)
    stop = threading.Event()
    starting = [True]

    def on_signal(signum: int, frame: object) -> None:
        if starting[0]:
            starting[0] = False
            raise Stopped(f"stopped by signal {signum} while mounting")
        stop.set()

    # Installed before FUSE starts, so that libfuse does not install its own.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        daemon.start()
        starting[0] = False
    except BaseException as e:
        starting[0] = False
        failure = _failure(e)
        log.error("%s", failure["error"])
        try:
            daemon.close()
        except BaseException as cleanup:
            log.exception("cleanup after the failed start: %s", cleanup)
        send_ready(ready_fd, failure)
        return 1
    send_ready(ready_fd, {"ok": True, "mount": record})
    while True:
        stop.wait(1.0)
        if not stop.is_set():
            continue
        try:
            daemon.stop()
            break
        except UsageError as e:
            log.error("not stopping: %s", e)
            stop.clear()
    log.info("unmounted %s", record["dir"])
    return 0


def _log_to_stderr() -> None:
    """Log with time and pid to standard error (the log file), whatever a forking parent set up."""
    for name in ("imager", ""):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("imager").setLevel(logging.NOTSET)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format=f"%(asctime)s imager-mount[{os.getpid()}] %(levelname)s %(message)s")


def _failure(e: BaseException) -> dict:
    if isinstance(e, (ImagerError, DeviceError)):
        return {"ok": False, "error": str(e), "kind": type(e).__name__}
    if isinstance(e, Stopped):
        return {"ok": False, "error": str(e), "kind": "ImagerError"}
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return {"ok": False, "error": f"{e.strerror or e}{where}", "kind": "ImagerError"}
    logging.getLogger("imager.mount").exception("mount failed")
    return {"ok": False, "error": f"the mount daemon failed: {type(e).__name__}: {e}", "kind": "ImagerError"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imager.mount.daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--ready-fd", type=int, help="write one JSON line here when mounted or failed")
    parser.add_argument("--foreground", action="store_true", help="do not fork (for debugging)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
