"""The managed-volume daemon's worker: started (and restarted) by the supervisor
(supervisor.py), which holds the source device's O_EXCL claim, the mounted FUSE connection and
the control socket, and hands the worker the last two.

The worker opens the CowStore and serves the FUSE file `volume` whose every write goes through
it (files.VolumeFiles on devices.fuse), and while a snapshot exists the read-only file
`snapshot` beside it. The first worker attaches the front loop device on `volume`; later ones
find it attached. It answers the control protocol (protocol.py) on the socket (control.py) and
writes its record to the run directory.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import threading
import time

from devices import fuse, loop
from devices.block import BlockDevice
from devices.errors import DeviceError
from devices.fs import mounts_of
from devices.libc import check, libc
from devices.tracefs import TraceUnavailable

from ... import failpoints
from ...errors import ImagerError, SnapshotError, VolumeError, VolumeRefused
from ...ends.atomic import write_atomically
from ...spawn import exit_watch, has_exited, process_start_time
from ..cow import CowStore
from ..cow.tracker import Roll, tracking_off
from ..cow.watch import BUSY_POLL_INTERVAL, POLL_INTERVAL, SourceWatch
from .control import ControlServer
from .files import VolumeFiles
from .protocol import FRONT_LINK, HOLDER_NAME, LOG_NAME, MOUNT_DIR_NAME, RECORD_NAME, SNAPSHOT_FILE, SOCKET_NAME, VOLUME_FILE
from .supervisor import EXIT_HANDED_OVER, WORKER_FILE, source_fingerprint

log = logging.getLogger("imager.daemon")

MNT_DETACH = 2
# How long a worker asked to hand over waits for the requests in progress before it gives up.
HAND_OVER_TIMEOUT = 30.0
# The kernel sends RELEASE a moment after the last close (or loop detach): how long to wait for it.
HANDLE_RELEASE_TIMEOUT = 3.0
FUSE_STOP_TIMEOUT = 30.0
# Threads serving FUSE READs beside the one serving everything else: a reader of the snapshot (a
# backup) gets several disk reads in flight. Measured in bench/front.py (IMAGER_FUSE_READERS
# sets it there).
FUSE_READERS = int(os.environ.get("IMAGER_FUSE_READERS", "2"))
# The worker's exit status when it cannot serve FUSE any more: the supervisor starts another.
EXIT_NOT_SERVING = 70


class VolumeDaemon:
    """The worker of one volume: the CowStore, the FUSE server on the supervisor's connection,
    the front loop device (attached by the first worker) and the control socket."""

    def __init__(self, name: str, device_path: str, state_dir: str, run_dir: str,
                 cache_size: int | None, block_size: int, *, fuse_fd: int, session: fuse.Session,
                 listen_fd: int, front: str | None = None, fingerprint: dict | None = None,
                 restarts: int = 0, created_ns: int = 0, watch_problem: str = "",
                 file_watch: tuple[int, str] = (-1, "")):
        self.name = name
        self.device_path = device_path
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.cache_size = cache_size
        self.block_size = block_size
        self.fuse_fd = fuse_fd
        self.session = session
        self.listen_fd = listen_fd
        self.fingerprint = fingerprint
        self.restarts = restarts
        self.supervisor_pid = os.getppid()
        self.mount_point = os.path.join(run_dir, MOUNT_DIR_NAME)
        self.fuse_file = os.path.join(self.mount_point, VOLUME_FILE)
        self.socket_path = os.path.join(run_dir, SOCKET_NAME)
        self.device: BlockDevice | None = None
        self.snapshot_reader: BlockDevice | None = None
        self.store: CowStore | None = None
        self.fs: VolumeFiles | None = None
        self.front: str | None = front
        self._attached_front = False
        self.server: ControlServer | None = None
        self._fuse_thread: threading.Thread | None = None
        self._fuse_server: fuse.Server | None = None
        self._fuse_ended = threading.Event()
        self._mounted = True         # by the supervisor
        # Serialises snapshot create/delete and detach against each other.
        self._control_lock = threading.Lock()
        # The supervisor's mount time: the same for every worker, as the file is the same. (Not a
        # stat of the mount point: that would wait on this very worker's FUSE server.)
        self.fs_created_ns = created_ns or time.time_ns()
        self._reported_unreadable_generation = -1
        self._roll: Roll | None = None        # what the tracker said when the backup's snapshot was taken
        # The snapshot whose end its backup asked for and could not be recorded (a full state
        # filesystem): when that backup's connection drops, it has not gone away unannounced.
        self._undeleted_generation: int | None = None
        self._handing_over = False            # restart-worker was asked: this worker is on its way out
        self._replies = threading.Condition()
        self._replying = 0                    # control requests taken and not yet answered
        self.watch: SourceWatch | None = None
        self._watch_problem = watch_problem       # the supervisor's, when it has no watches
        self._file_watch = file_watch             # its watch of a loop source's file: (fd, path)
        self._watch_stop = threading.Event()

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        # Buffered, like a disk with a write cache: FUSE hands writes over at unaligned addresses
        # (O_DIRECT would cost a copy each), and fsync/flush on the front reach the device
        # through store.flush() before they return. Measured in bench/front.py. Not O_EXCL: the
        # supervisor holds the claim for every worker.
        self.device = BlockDevice(self.device_path, writable=True, exclusive=False, direct=False,
                                  on_notice=lambda msg: log.info("%s", msg))
        # The snapshot's blocks that are still on the source are read past the page cache: a
        # backup reading the whole volume would otherwise push the applications' cached data
        # out (and copy every block once more). O_DIRECT reads write back the dirty pages they
        # cover first, so they see every buffered write, and no write to those blocks runs
        # meanwhile (read_snapshot holds their stripes).
        self.snapshot_reader = BlockDevice(self.device_path, direct=True, on_notice=lambda msg: log.info("%s", msg))
        watch_problem = self._watch_problem
        try:
            if not tracking_off() and not watch_problem:
                self.watch = SourceWatch.open(self.name, self.device_path, *self._file_watch)
        except TraceUnavailable as e:
            watch_problem = str(e.strerror)
        if watch_problem and not tracking_off():
            watch_problem += ": every incremental compares digests"
            log.warning("%s", watch_problem)
        self.store = CowStore(self.device, self.state_dir, self.block_size, self.cache_size,
                              fingerprint=self.fingerprint, handover=supervisor_token(self.supervisor_pid),
                              snapshot_reader=self.snapshot_reader, watch=self.watch, watch_problem=watch_problem)
        tracker = self.store.tracker
        if tracker.fresh:
            log.info("tracking changes anew (series %s): %s", tracker.state.series, tracker.restarted)
        if self.watch is not None:
            # What the last worker wrote and the page cache still holds (all of it, if it was
            # killed) goes to the disk now, and every write since it started is checked, against
            # its marks too.
            self.store.check_source(flush=True)
        tracker.forget_inherited()
        if self.store.snapshot_active:
            log.info("resuming snapshot generation %d from %s", self.store.generation, self.state_dir)
            if not tracker.fresh and tracker.state.pending is not None:
                # Handed over during a backup: its roll is still the one its snapshot took.
                self._roll = Roll(tracker.state.series, tracker.state.pending, tracker.state.base,
                                  tracker.block_size)
        self.fs = VolumeFiles(self.store, self.fs_created_ns, self.run_dir, self._report_unreadable)
        started = time.monotonic()
        # What a dead predecessor had read but not answered is queued again, ahead of new requests.
        fuse.resend(self.fuse_fd)
        self._fuse_thread = threading.Thread(target=self._serve, args=(started,), name="fuse", daemon=True)
        self._fuse_thread.start()
        if self.watch is not None:
            threading.Thread(target=self._watch_source, name="watch", daemon=True).start()
        inherited = self.front
        if inherited is not None and not any(info.device == inherited and info.backing_file == self.fuse_file
                                             for info in loop.list_attached()):
            # Detached by an earlier worker (a detach that stopped half-way): the device may
            # serve another file by now, so it is not ours to name, nor to attach again.
            log.warning("the front %s no longer serves %s: the volume has no front", inherited, self.fuse_file)
            self.front = None
            _unlink(os.path.join(self.run_dir, FRONT_LINK))
        if self.front is None and inherited is None:
            # loop direct I/O: the front's requests go straight to FUSE (no second page cache of
            # the same data) and aio lets the loop driver keep several requests in flight.
            self.front = loop.attach(self.fuse_file, direct_io=True,
                                     block_size=self.device.logical_sector_size)
            self._attached_front = True
            _link(self.front, os.path.join(self.run_dir, FRONT_LINK))
        log.info("serving %s (%d bytes) as %s, front %s", self.device_path, self.store.size,
                 self.fuse_file, self.front)
        if self.store.snapshot_active:
            self._watch_holder(self.store.generation)
        self.server = ControlServer(self.socket_path, self, listen_fd=self.listen_fd)

    def _serve(self, started: float) -> None:
        server = self._fuse_server = fuse.Server(
            self.fuse_fd, self.session, self.fs, readers=FUSE_READERS,
            on_error=lambda opcode, e: log.error("FUSE request %d failed: %r", opcode, e),
            on_fatal=self._reader_failed)
        try:
            server.serve(on_first_reply=lambda: self._first_reply(started))
        except BaseException:
            # Nobody would answer the front any more: let the supervisor start a worker that does.
            log.exception("the FUSE server failed")
            os._exit(EXIT_NOT_SERVING)
        log.info("FUSE connection ended")
        self._fuse_ended.set()

    def _watch_source(self) -> None:
        """Read the trace of the source's writes often enough that its buffer never fills, and a
        snapshot spoiled by a write past the front is known to be at once."""
        while not self._watch_stop.wait(BUSY_POLL_INTERVAL if self.watch.busy else POLL_INTERVAL):
            try:
                self.store.check_source()
            except SnapshotError:
                return                  # the store is closed
            except Exception:
                log.exception("reading the trace of the source's writes failed")

    def _reader_failed(self, error: BaseException) -> None:
        # Its READs would wait forever: let the supervisor start a worker that answers them.
        log.error("a FUSE reader thread failed: %r", error)
        os._exit(EXIT_NOT_SERVING)

    def _first_reply(self, started: float) -> None:
        now = time.monotonic()
        log.info("first FUSE request answered %.3f s after the worker began serving", now - started)
        try:
            write_atomically(os.path.join(self.run_dir, WORKER_FILE), json.dumps(
                {"pid": os.getpid(), "restarts": self.restarts, "first_reply_monotonic": now}).encode())
        except OSError as e:
            log.warning("cannot write %s: %s", WORKER_FILE, e.strerror)

    def _report_unreadable(self, error: SnapshotError) -> None:
        # Say why once per snapshot, not once per request.
        if self.store.generation != self._reported_unreadable_generation:
            self._reported_unreadable_generation = self.store.generation
            log.error("%s", error)

    # -- control -----------------------------------------------------------------------------

    def describe(self) -> dict:
        store = self.store
        snapshot = None
        if store.snapshot_active:
            stats = store.stats()
            snapshot = {
                "name": self.name,
                "path": os.path.join(self.mount_point, SNAPSHOT_FILE),
                "created_at": stats["started_at"],
                "generation": stats["generation"],
                "block_size": stats["block_size"],
                "changed_blocks": stats["changed_blocks"],
                "cache_bytes_used": stats["cache_bytes_used"],
                "cache_bytes_needed": stats["cache_bytes_needed"],
                "cache_capacity": stats["cache_capacity"],
                "invalid": stats["snapshot_invalid"],
                "invalid_reason": stats["invalid_reason"],
                "cache_full": stats["cache_full"],
                "tracker": self._roll.to_dict() if self._roll else None,
                "delete_failed": self._undeleted_generation == stats["generation"],
            }
        return {"name": self.name, "device": self.device_path, "size": store.size, "front": self.front,
                "fuse_file": self.fuse_file, "state_dir": self.state_dir, "run_dir": self.run_dir,
                "pid": self.supervisor_pid, "worker": {"pid": os.getpid(), "restarts": self.restarts},
                "log_path": os.path.join(self.state_dir, LOG_NAME),
                "snapshot": snapshot, "tracker": store.tracker.describe()}

    def handle(self, request: dict, peer_pid: int = 0) -> dict:
        """Answer one control request. `peer_pid`: the process asking (it holds what it creates
        with "hold")."""
        op = request.get("op")
        if op == "status":
            return {"ok": True, "volume": self.describe()}
        if op == "ping":
            # Lock-free: the supervisor's watchdog asks whether the FUSE server is stuck on a request.
            server = self._fuse_server
            return {"ok": True, "fuse_busy": server.busy_for() if server is not None else 0.0}
        if op == "failpoints" and failpoints.ENABLED:
            failpoints.configure(str(request.get("set", "")))
            log.warning("failpoints armed: %r", request.get("set"))
            return {"ok": True}
        with self._control_lock:
            if self._handing_over:
                raise VolumeError(f"the worker of {self.name} is being replaced: ask again in a moment")
            if op == "snapshot-create":
                self._roll = self.store.start_snapshot(roll=bool(request.get("hold")))
                if request.get("hold"):
                    self.record_holder(self.store.generation, peer_pid)
                log.info("snapshot generation %d created%s", self.store.generation,
                         f" (tracker sequence {self._roll.sequence})" if self._roll else "")
                return {"ok": True, "volume": self.describe(), "generation": self.store.generation}
            if op == "check-source":
                return {"ok": True, "foreign": self.store.check_source(flush=True)}
            if op == "tracker-changes":
                return self._tracker_changes(request.get("sequence"))
            if op == "snapshot-delete":
                generation = request.get("generation")
                if generation is not None and (not self.store.snapshot_active or self.store.generation != generation):
                    return {"ok": True, "volume": self.describe()}     # gone already (its holder died)
                self._delete_snapshot(bool(request.get("force")), commit=request.get("tracker") == "commit")
                return {"ok": True, "volume": self.describe()}
            if op == "restart-worker":
                if not self._mounted:
                    raise VolumeError(f"{self.name} is being detached")
                self._handing_over = True       # from now on, no request but status and ping
                return {"ok": True, "restarting": True, "worker": {"pid": os.getpid(), "restarts": self.restarts}}
            if op == "detach":
                self.detach()
                return {"ok": True, "stopping": True}
        raise VolumeError(f"unknown request {op!r}")

    def _tracker_changes(self, sequence: object) -> dict:
        """The blocks written since the base of the snapshot's roll `sequence`, as a bitmap."""
        bits = self.store.tracker.changes(sequence) if isinstance(sequence, int) else None
        if bits is None:
            raise SnapshotError(f"{self.name}: no tracked changes pending for sequence {sequence!r}")
        return {"ok": True, "bits": base64.b64encode(bits).decode(), "block_size": self.store.tracker.block_size}

    def drop_abandoned_snapshot(self, generation: int) -> None:
        """The backup that held snapshot `generation` is gone without deleting it: delete it."""
        with self._control_lock:
            if not self.store.snapshot_active or self.store.generation != generation:
                return
            if generation == self._undeleted_generation:
                log.info("trying again to delete snapshot generation %d, which its backup could not delete",
                         generation)
            else:
                log.warning("the backup holding snapshot generation %d went away: deleting the snapshot", generation)
            try:
                self._delete_snapshot(force=True)
            except (ImagerError, DeviceError) as e:
                log.error("could not delete snapshot generation %d: %s", generation, e)

    # -- a backup's hold on its snapshot, across workers ----------------------------------------

    def record_holder(self, generation: int, pid: int) -> None:
        """Process `pid` holds snapshot `generation` (a backup): kept for the workers after this one."""
        try:
            write_atomically(os.path.join(self.run_dir, HOLDER_NAME), json.dumps(
                {"generation": generation, "pid": pid, "start": process_start_time(pid)}).encode())
        except OSError as e:
            log.warning("cannot record who holds the snapshot (%s): if this worker dies, the snapshot stays "
                        "until deleted", e.strerror)

    def _recorded_holder(self, generation: int) -> dict | None:
        """What record_holder() kept of the process that holds snapshot `generation` (pid,
        start), None when no process holds it (`imager snapshot create` keeps it until deleted)."""
        try:
            with open(os.path.join(self.run_dir, HOLDER_NAME)) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            return None
        if holder.get("generation") != generation or not isinstance(holder.get("pid"), int):
            return None
        return holder

    def _holder_of(self, generation: int) -> int | None:
        """The pid of the live process (a backup) that holds snapshot `generation`, if any."""
        holder = self._recorded_holder(generation)
        if holder is None or process_start_time(holder["pid"]) != holder.get("start"):
            return None
        return holder["pid"]

    def _watch_holder(self, generation: int) -> None:
        """The snapshot was taken under an earlier worker: if a backup holds it, delete it when
        that process ends (its connection went with the earlier worker)."""
        holder = self._recorded_holder(generation)
        if holder is None:
            return
        threading.Thread(target=self._drop_when_gone, args=(generation, holder["pid"], holder.get("start")),
                         name="holder", daemon=True).start()

    def _drop_when_gone(self, generation: int, pid: int, start: int | None) -> None:
        try:
            with exit_watch(pid) as watch:
                # A pid in use by another process since: the holder is gone.
                if process_start_time(pid) == start:
                    has_exited(watch, None)
            self.drop_abandoned_snapshot(generation)
        except Exception:
            log.exception("watching the process that holds snapshot generation %d failed: the snapshot stays "
                          "until deleted (imager snapshot delete %s)", generation, self.name)

    def hand_over(self) -> None:
        """Leave the volume to the next worker (a live upgrade) and exit: no control or FUSE
        request half done, the tracker handed over. What arrives meanwhile waits in the kernel's
        queue and the socket's backlog; what this worker had read and not answered, the next
        one has the kernel resend."""
        with self._replies:
            # Every other request answered first: its client must not see the connection drop.
            self._replies.wait_for(lambda: self._replying == 0, HAND_OVER_TIMEOUT)
        locked = self._control_lock.acquire(timeout=HAND_OVER_TIMEOUT)
        if not locked or (self._fuse_server is not None and not self._fuse_server.hold(HAND_OVER_TIMEOUT)):
            log.error("worker %d could not hand over: a request has been running for %g s; it keeps serving",
                      os.getpid(), HAND_OVER_TIMEOUT)
            if locked:                  # only ours: another thread's hold must stay
                self._control_lock.release()
            self._handing_over = False
            return
        try:
            self.store.hand_over(supervisor_token(self.supervisor_pid))
            log.info("worker %d handed over to the next one", os.getpid())
        except Exception as e:
            # The tracker stays "in-use": the next incremental compares digests, and says why.
            log.error("could not hand the change tracker over (%s): the next worker starts a new series", e)
        logging.shutdown()
        os._exit(EXIT_HANDED_OVER)

    def request_started(self) -> None:
        with self._replies:
            self._replying += 1

    def request_replied(self) -> None:
        with self._replies:
            self._replying -= 1
            self._replies.notify_all()

    def write_record(self) -> None:
        """Say who we are in the run directory, for clients that must not wait on a daemon that
        may be stuck (and to tell what a dead daemon left behind)."""
        record = dict(self.describe(), snapshot=None, cache_size=self.cache_size, block_size=self.block_size)
        write_atomically(os.path.join(self.run_dir, RECORD_NAME), json.dumps(record).encode())

    def _delete_snapshot(self, force: bool, commit: bool = False) -> None:
        """End the snapshot. With `commit`, its backup is stored: the tracker's next interval
        starts from it; otherwise what the tracker rolled out goes back to be found next time."""
        if not self.store.snapshot_active:
            raise VolumeRefused(f"{self.name} has no snapshot")
        if not self.fs.wait_for_handles(SNAPSHOT_FILE, 0, 0 if force else HANDLE_RELEASE_TIMEOUT):
            if not force:
                raise VolumeRefused(
                    f"the snapshot of {self.name} is still open ({self.fs.open_handles(SNAPSHOT_FILE)} "
                    f"handles); detach its loop devices and close it first")
            log.warning("deleting the snapshot of %s while it is open", self.name)
        generation = self.store.generation
        if self._roll is not None:
            if commit:
                self.store.check_source(flush=True)     # a write past the front since: no commit
            if commit and self.store.tracker.commit(self._roll.sequence):
                log.info("tracker sequence %d committed: the next incremental starts from it", self._roll.sequence)
            else:
                self.store.tracker.give_up(self._roll.sequence)
            self._roll = None
        try:
            self.store.end_snapshot()
        except SnapshotError:
            self._undeleted_generation = generation
            raise
        # Only now: a snapshot whose end could not be recorded is still dropped by the next
        # worker when its holder is gone.
        _unlink(os.path.join(self.run_dir, HOLDER_NAME))
        log.info("snapshot generation %d deleted", generation)

    def detach(self) -> None:
        """Refuse while in use; otherwise undo start() in reverse. Each step can be retried."""
        if self.store.snapshot_active:
            holder = self._holder_of(self.store.generation)
            if holder is not None:
                raise VolumeRefused(f"{self.name} has a snapshot a backup holds (pid {holder}); detach once that "
                                    f"backup has ended")
            raise VolumeRefused(f"{self.name} has a snapshot; delete it before detaching "
                                f"(imager snapshot delete {self.name})")
        if self.front is not None:
            mounted = mounts_of(self.front)
            if mounted:
                raise VolumeRefused(f"the front device {self.front} of {self.name} is mounted at "
                                        f"{', '.join(m.mount_point for m in mounted)}; unmount it first")
            _check_not_claimed(self.front)
            if not self.fs.wait_for_handles(SNAPSHOT_FILE, 0, HANDLE_RELEASE_TIMEOUT):
                raise VolumeError(f"the deleted snapshot file of {self.name} is still open; close it first")
            # The loop device holds one handle of `volume`; any other is a process using the file.
            if not self.fs.wait_for_handles(VOLUME_FILE, 1, HANDLE_RELEASE_TIMEOUT):
                raise VolumeError(f"{self.fuse_file} is open by another process; close it first")
            loop.detach(self.front)
            log.info("front %s detached", self.front)
            self.front = None
            _unlink(os.path.join(self.run_dir, FRONT_LINK))
        if self._mounted:
            if not self.fs.wait_for_handles(VOLUME_FILE, 0, HANDLE_RELEASE_TIMEOUT):
                raise VolumeError(f"{self.fuse_file} is still open; close it first")
            # The connection's last request (DESTROY) is answered by our own FUSE thread.
            _umount(self.mount_point)
            self._mounted = False
            self._fuse_ended.wait(FUSE_STOP_TIMEOUT)
        self.close(clean=True)

    def close(self, clean: bool = False) -> None:
        """Let go of the store and the device. A clean stop records the device's write fingerprint
        once every write is on it, so that the tracked changes are trusted at the next attach."""
        flushed = False
        self._watch_stop.set()
        if self.device is not None:
            # Writes went through the source's page cache: put them on the device before letting go.
            try:
                self.device.flush()
                flushed = True
            except DeviceError as e:
                log.error("%s", e)
        if self.store is not None:
            fingerprint = source_fingerprint(self.device_path) if clean and flushed else None
            self.store.close(fingerprint)
        if self.device is not None:
            self.device.close()
        if self.snapshot_reader is not None:
            self.snapshot_reader.close()
        if self.watch is not None:
            self.watch.close()

    def abandon(self) -> None:
        """Best-effort cleanup after a failed start: the front this worker attached goes; the
        supervisor unmounts and removes the run directory."""
        try:
            if self._attached_front and self.front is not None:
                loop.detach(self.front)
                self.front = None
        except Exception as e:
            log.error("cleanup after failed start: %s", e)
        finally:
            self.close()


def _link(target: str, path: str) -> None:
    """`path` -> `target`, replacing whatever link was there in one step."""
    temporary = f"{path}.new"
    _unlink(temporary)
    os.symlink(target, temporary)
    os.rename(temporary, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def supervisor_token(pid: int) -> str:
    """Names one supervisor process in one boot: a tracker handed over under it is trusted by
    its next worker only."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}/{pid}/{process_start_time(pid)}"


def _check_not_claimed(device: str) -> None:
    """O_EXCL on a block device fails while anything mounts or holds it exclusively, in any mount
    namespace: a stricter test than this namespace's mount table."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise VolumeError(f"the front device {device} is in use (mounted or claimed); "
                                    f"release it first") from None
        raise VolumeError(f"{device}: {e.strerror}") from None
    os.close(fd)


def _umount(path: str, flags: int = 0) -> None:
    try:
        check(libc.umount2(os.fsencode(path), flags))
    except OSError as e:
        raise VolumeError(f"cannot unmount {path}: {e.strerror}") from None
