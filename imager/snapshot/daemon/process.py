"""The volume daemon as processes: started by launch.attach() in its own session, it forks once
more (no session leader, never a controlling terminal), logs to the state directory and becomes
the volume's supervisor (supervisor.py), which starts the worker (server.py, this module with
--worker) and a new one whenever a worker dies. The first worker's readiness (it serves the
front) or why it cannot is what the starter hears on its pipe.

    python -m imager.snapshot.daemon.process --name N --device DEV --state-dir DIR --run-dir DIR [--ready-fd FD]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from devices import fuse
from devices.errors import DeviceError
from devices.libc import check, libc

from ...errors import ImagerError, VolumeError
from ...spawn import become_daemon, send_ready
from ..cow import DEFAULT_BLOCK_SIZE
from .protocol import RECORD_NAME, error_reply
from .server import VolumeDaemon
from .supervisor import DEFAULT_WATCHDOG, Supervisor

log = logging.getLogger("imager.daemon")

PR_SET_IO_FLUSHER = 57
PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.foreground and not args.worker:
        become_daemon()
    role = "worker" if args.worker else "supervisor"
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s imager-daemon[{os.getpid()}] {args.name} {role}: %(levelname)s %(message)s")
    # Both sit in the write-back path of the front device.
    _mark_io_flusher()
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)
    if args.worker:
        return _worker(args)
    worker_args = ["--name", args.name, "--device", args.device, "--state-dir", args.state_dir,
                   "--run-dir", args.run_dir, "--block-size", str(args.block_size),
                   "--created-ns", str(time.time_ns())]
    if args.cache_size is not None:
        worker_args += ["--cache-size", str(args.cache_size)]
    return Supervisor(args, worker_args).run(args.ready_fd)


def _worker(args) -> int:
    # The worker goes with its supervisor: the recovery of a volume whose supervisor died (imager
    # recover) must not find a worker still holding the connection and the socket.
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    if os.getppid() == 1:
        return 1                    # it died before the line above
    daemon = VolumeDaemon(args.name, args.device, args.state_dir, args.run_dir, args.cache_size, args.block_size,
                          fuse_fd=args.fuse_fd, session=fuse.Session.from_arg(args.session),
                          listen_fd=args.listen_fd, front=args.front,
                          fingerprint=json.loads(args.fingerprint) if args.fingerprint else None,
                          restarts=args.restarts, created_ns=args.created_ns, watch_problem=args.watch_problem,
                          file_watch=(args.file_watch_fd, args.file_watch_path))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: _stop_as_detach_would(daemon, signum))
    try:
        daemon.start()
    except Exception as e:
        if isinstance(e, (ImagerError, DeviceError)):
            log.error("%s", e)
            failure = error_reply(e)
        else:
            log.exception("start failed")
            failure = error_reply(VolumeError(f"volume daemon failed to start: {e}"))
        daemon.abandon()
        send_ready(args.ready_fd, failure)
        return 1
    daemon.write_record()
    send_ready(args.ready_fd, {"ok": True, "volume": daemon.describe()})
    try:
        # The poll interval bounds how long detach waits for the server loop to notice shutdown().
        daemon.server.serve_forever(poll_interval=0.05)
    finally:
        _remove_run_dir(daemon)
    log.info("stopped")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imager.snapshot.daemon.process",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--cache-size", type=int)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--ready-fd", type=int, help="write one JSON line here when ready or failed")
    parser.add_argument("--foreground", action="store_true", help="do not fork (for debugging)")
    parser.add_argument("--watchdog", type=float, default=DEFAULT_WATCHDOG,
                        help="kill and replace a worker that does not answer for this long (0: never)")
    worker = parser.add_argument_group("worker (started by the supervisor)")
    worker.add_argument("--worker", action="store_true")
    worker.add_argument("--fuse-fd", type=int)
    worker.add_argument("--session", help="what the connection's INIT settled")
    worker.add_argument("--listen-fd", type=int)
    worker.add_argument("--front", help="the front loop device, attached by an earlier worker")
    worker.add_argument("--fingerprint", help="the source's write fingerprint before the volume was attached")
    worker.add_argument("--restarts", type=int, default=0)
    worker.add_argument("--watch-problem", default="", help="why writes past the front are not watched")
    worker.add_argument("--file-watch-fd", type=int, default=-1, help="the fanotify watch of a loop source's file")
    worker.add_argument("--file-watch-path", default="")
    worker.add_argument("--created-ns", type=int, default=0)
    return parser


def _stop_as_detach_would(daemon: VolumeDaemon, signum: int) -> None:
    """On SIGTERM/SIGINT: detach, refusing the same way while the volume is in use."""
    def stop() -> None:
        if daemon.server is None:
            return
        try:
            with daemon._control_lock:
                daemon.detach()
        except (ImagerError, DeviceError) as e:
            log.error("not stopping on signal %d: %s", signum, e)
            return
        daemon.server.shutdown()
    threading.Thread(target=stop, name="stop", daemon=True).start()


def _remove_run_dir(daemon: VolumeDaemon) -> None:
    daemon.server.server_close()
    for path in (daemon.socket_path, os.path.join(daemon.run_dir, RECORD_NAME)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(daemon.run_dir)
    except OSError:
        pass  # not empty: something else lives there, leave it


def _mark_io_flusher() -> None:
    # This process sits in the write-back path of the front device: memory reclaim must not make
    # it wait for its own writes (PR_SET_IO_FLUSHER, Linux 5.6, as loop and NBD servers do).
    try:
        check(libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0))
    except OSError as e:
        log.info("PR_SET_IO_FLUSHER refused (%s): reclaim may wait on this daemon", e.strerror)


if __name__ == "__main__":
    sys.exit(main())
