"""The volume daemon's supervisor: the part of a managed volume that must never die, kept small.

It claims the source device (O_EXCL, so nothing else mounts or claims it), mounts the FUSE
connection and answers its INIT (devices.fuse), binds the control socket, and holds all three
for as long as the volume is attached. The work is done by a worker process (server.py) that
inherits the FUSE descriptor and the listening socket. When a worker dies (a bug, the OOM
killer, kill -9), the supervisor starts another on the same descriptors: the kernel queues the
front's requests meanwhile, and the new worker has the kernel resend those the dead one had
taken, so the filesystem on the front sees a pause, never an error. Clients' connections wait in
the socket's backlog the same way.

A worker that exits 0 has detached the volume (unmounted the connection): the supervisor
cleans up and exits too. If the supervisor itself dies, the connection dies with it and the
front fails every request, as a daemon's death did before (imager recover).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time

from devices import fuse
from devices.errors import DeviceError
from devices.topology import write_fingerprint

from ...ends.atomic import write_atomically
from ...errors import VolumeError
from ...spawn import exit_watch, send_ready
from ..cow.tracker import tracking_off
from ..cow.watch import start_watches
from .protocol import FRONT_LINK, HOLDER_NAME, MOUNT_DIR_NAME, PID_NAME, RECORD_NAME, SOCKET_NAME, error_reply

log = logging.getLogger("imager.daemon")

MAX_WRITE = 1 << 20          # the largest FUSE write (and read) the kernel may send
WORKER_READY_TIMEOUT = 60.0
# A worker that dies sooner than this after its start, before answering any request, is failing
# to start: wait before the next, longer each time.
QUICK_DEATH = 5.0
MAX_BACKOFF = 10.0
# A worker that does not answer its health check in this long, or spends it on one FUSE request,
# is stuck: the kernel's FUSE requests and the clients would wait for it forever.
DEFAULT_WATCHDOG = 30.0
WORKER_START_GRACE = 15.0
# A worker that exits with this has handed the volume over on request (a live upgrade).
EXIT_HANDED_OVER = 75
WORKER_FILE = "worker.json"  # the worker's pid and when it first answered (worker.py)
HANDLES_FILE = "handles.json"


class Supervisor:
    def __init__(self, args, worker_args: list[str]):
        self.args = args
        self.worker_args = worker_args   # passed on to every worker
        self.mount_point = os.path.join(args.run_dir, MOUNT_DIR_NAME)
        self.socket_path = os.path.join(args.run_dir, SOCKET_NAME)
        self.claim = -1
        self.fuse_fd = -1
        self.listener: socket.socket | None = None
        self.session: fuse.Session | None = None
        self.worker: subprocess.Popen | None = None
        self.front: str | None = None
        self.restarts = 0
        self.worker_answered = False   # the current worker answered a health check (or its start)
        self.trace = None              # of the source's writes, read by the workers (cow/watch.py)
        self.file_watch = None         # of a loop source's backing file (cow/watch.py)
        self.watch_problem = ""        # why there are no watches, for the workers to say

    def run(self, ready_fd: int | None) -> int:
        fingerprint = source_fingerprint(self.args.device)     # before anything of ours writes
        try:
            self._claim_and_mount()
        except (VolumeError, OSError) as e:
            error = e if isinstance(e, VolumeError) else VolumeError(f"cannot serve {self.args.device} "
                                                                     f"through FUSE: {e.strerror}")
            log.error("%s", error)
            self._clean_up()
            send_ready(ready_fd, error_reply(error))
            return 1
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._forward)
        reply = self._first_worker(fingerprint)
        if reply.get("ok"):
            try:
                write_atomically(os.path.join(self.args.run_dir, PID_NAME), f"{os.getpid()}\n".encode())
            except OSError as e:
                log.warning("cannot write %s: %s", PID_NAME, e.strerror)
        send_ready(ready_fd, reply)
        if not reply.get("ok"):
            self._clean_up()
            return 1
        return self._supervise()

    # -- start -----------------------------------------------------------------------------------

    def _claim_and_mount(self) -> None:
        try:
            self.claim = os.open(self.args.device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise VolumeError(f"{self.args.device}: device is busy (mounted or in use)") from None
            raise VolumeError(f"{self.args.device}: cannot open: {e.strerror}") from None
        # Before anything of ours can write to the source: every write from now on is recorded.
        if not tracking_off():
            self.trace, self.file_watch, self.watch_problem = start_watches(self.args.name, self.args.device)
        os.makedirs(self.mount_point, mode=0o700, exist_ok=True)
        self.fuse_fd = fuse.mount(self.mount_point, f"imager:{self.args.name}", "imager")
        self.session = fuse.negotiate(self.fuse_fd, MAX_WRITE)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        self.listener.listen(16)

    def _first_worker(self, fingerprint: dict | None) -> dict:
        ready_read, ready_write = os.pipe()
        extra = ["--ready-fd", str(ready_write)]
        if fingerprint is not None:
            extra += ["--fingerprint", json.dumps(fingerprint)]
        try:
            self.worker = self._spawn(extra, (ready_write,))
            os.close(ready_write)
            ready_write = -1
            reply = _read_line(ready_read, WORKER_READY_TIMEOUT)
        finally:
            os.close(ready_read)
            if ready_write >= 0:
                os.close(ready_write)
        if reply is None:
            self._stop_worker()
            return error_reply(VolumeError(f"the volume worker did not start (see {self.args.state_dir})"))
        if reply.get("ok"):
            self.front = reply["volume"]["front"]
            self.worker_answered = True
        else:
            self.worker.wait()
        return reply

    def _spawn(self, extra: list[str], fds: tuple[int, ...] = ()) -> subprocess.Popen:
        command = [sys.executable, "-m", "imager.snapshot.daemon.process", *self.worker_args, "--worker",
                   "--fuse-fd", str(self.fuse_fd), "--session", self.session.to_arg(),
                   "--listen-fd", str(self.listener.fileno()), "--restarts", str(self.restarts), *extra]
        if self.front:
            command += ["--front", self.front]
        if self.watch_problem:
            command += ["--watch-problem", self.watch_problem]
        if self.file_watch is not None:
            command += ["--file-watch-fd", str(self.file_watch.fd), "--file-watch-path", self.file_watch.path]
            fds = (*fds, self.file_watch.fd)
        worker = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                  pass_fds=(self.fuse_fd, self.listener.fileno(), *fds))
        log.info("worker %d started%s", worker.pid, f" (restart {self.restarts})" if self.restarts else "")
        self.worker_answered = False
        return worker

    # -- serving ---------------------------------------------------------------------------------

    def _supervise(self) -> int:
        backoff = 0.0
        while True:
            started = time.monotonic()
            code = self._wait_worker()
            if code == 0:
                log.info("worker %d stopped: the volume is detached", self.worker.pid)
                self._clean_up()
                return 0
            if self._connection_gone():
                log.error("worker %d ended (%s) and the FUSE connection is gone: stopping", self.worker.pid,
                          _how(code))
                self._clean_up()
                return 1
            self.restarts += 1
            if code == EXIT_HANDED_OVER:
                log.info("worker %d handed over: starting the next (installed) one", self.worker.pid)
                backoff = 0.0
                self.worker = self._spawn([])
                continue
            failing = not self._served(self.worker.pid) and time.monotonic() - started < QUICK_DEATH
            backoff = min(MAX_BACKOFF, max(0.1, backoff * 2)) if failing else 0.0
            log.error("worker %d ended (%s): starting another%s", self.worker.pid, _how(code),
                      f" in {backoff:.1f} s" if backoff else "")
            if backoff:
                time.sleep(backoff)     # it failed right after its start: do not spin
            self.worker = self._spawn([])

    def _wait_worker(self) -> int:
        """The worker's exit status. With the watchdog on, a worker that stops answering its
        control socket, or whose FUSE server is stuck on one request, is killed (and replaced)."""
        limit = self.args.watchdog
        if not limit:
            return self.worker.wait()
        while True:
            try:
                return self.worker.wait(timeout=limit / 3)
            except subprocess.TimeoutExpired:
                pass
            problem = self._health(limit)
            if problem and self.worker.poll() is None:
                log.error("worker %d %s: killing it (watchdog, %g s)", self.worker.pid, problem, limit)
                self.worker.kill()

    def _health(self, limit: float) -> str:
        """What is wrong with the worker ("" if nothing): asked on the control socket, where the
        connection waits in the backlog while a new worker starts."""
        # A new interpreter takes a while to start on a busy machine: until a worker has answered
        # once, it has longer.
        wait = limit if self.worker_answered else max(limit, WORKER_START_GRACE)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, exit_watch(self.worker.pid) as exited:
                if exited is None:
                    return ""           # it has ended already
                sock.settimeout(wait)
                sock.connect(self.socket_path)
                sock.sendall(b'{"op": "ping"}\n')
                # A worker that dies meanwhile never answers: its end is news enough.
                ready = select.select([sock, exited], [], [], wait)[0]
                if exited in ready and sock not in ready:
                    return ""
                if not ready:
                    raise socket.timeout()
                reply = json.loads(sock.makefile("rb").readline() or b"{}")
        except socket.timeout:
            return f"did not answer in {wait:g} s"
        except FileNotFoundError:
            return ""           # the socket is gone: the worker is detaching the volume
        except (OSError, ValueError) as e:
            return f"answered no health check ({e})"
        if not reply.get("ok"):
            return f"failed its health check ({reply.get('error')})"
        self.worker_answered = True
        if reply.get("fuse_busy", 0.0) > limit:
            return f"has been serving one FUSE request for {reply['fuse_busy']:.0f} s"
        return ""

    def _served(self, pid: int) -> bool:
        """Whether worker `pid` answered a request (it says so in the run directory)."""
        try:
            with open(os.path.join(self.args.run_dir, WORKER_FILE)) as f:
                return json.load(f).get("pid") == pid
        except (OSError, ValueError):
            return False

    def _connection_gone(self) -> bool:
        poller = select.poll()
        poller.register(self.fuse_fd, select.POLLIN)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))

    def _forward(self, signum, frame) -> None:
        # A stop request is the worker's to judge: it detaches as `imager detach` would, or refuses.
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signum)

    def _stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()

    def _clean_up(self) -> None:
        """Undo what _claim_and_mount() did; a worker that detached has unmounted already."""
        if self.fuse_fd >= 0:
            # No stat of the mount point first: with no worker, it would wait forever for GETATTR.
            try:
                fuse.umount(self.mount_point)
            except OSError as e:
                if e.errno != errno.EINVAL:          # EINVAL: not mounted (any more)
                    fuse.umount(self.mount_point, lazy=True)
            os.close(self.fuse_fd)
            self.fuse_fd = -1
        if self.listener is not None:
            self.listener.close()
        run_dir = self.args.run_dir
        for name in (SOCKET_NAME, RECORD_NAME, WORKER_FILE, HANDLES_FILE, HOLDER_NAME, FRONT_LINK, PID_NAME):
            try:
                os.unlink(os.path.join(run_dir, name))
            except FileNotFoundError:
                pass
        for directory in (self.mount_point, run_dir):
            try:
                os.rmdir(directory)
            except OSError:
                pass            # not empty: something else lives there, leave it
        if self.trace is not None:
            try:
                self.trace.remove()
            except OSError as e:
                log.warning("cannot remove the trace of %s's writes (%s): %s", self.args.device, self.trace.directory,
                            e.strerror)
            self.trace = None
        if self.file_watch is not None:
            self.file_watch.close()
            self.file_watch = None
        if self.claim >= 0:
            os.close(self.claim)
            self.claim = -1


def _read_line(fd: int, timeout: float) -> dict | None:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def _how(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit {code}"


def source_fingerprint(device: str) -> dict | None:
    """The device's write fingerprint (see ChangeTracker), None when it cannot be taken."""
    try:
        return write_fingerprint(device)
    except (OSError, DeviceError) as e:
        log.info("cannot fingerprint the writes of %s (%s): tracked changes are not kept across restarts",
                 device, e)
        return None
