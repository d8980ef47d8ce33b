"""The daemon's control socket: one thread per connection, one JSON request per line (see
protocol.py). A connection that holds a snapshot takes it down when it drops."""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
from typing import TYPE_CHECKING

from devices.errors import DeviceError

from ...errors import ImagerError
from .protocol import error_reply

if TYPE_CHECKING:
    from .server import VolumeDaemon

log = logging.getLogger("imager.daemon")


class ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, daemon: VolumeDaemon, listen_fd: int | None = None):
        self.daemon = daemon
        if listen_fd is not None:
            # The supervisor's socket, bound for as long as the volume is attached: clients that
            # connect while no worker runs wait in its backlog for the next one.
            super().__init__(path, ControlHandler, bind_and_activate=False)
            self.socket.close()
            self.socket = socket.socket(fileno=listen_fd)
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            super().__init__(path, ControlHandler)
        finally:
            os.umask(old_umask)


class ControlHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        daemon: VolumeDaemon = self.server.daemon
        # The snapshot generation this connection holds (a backup's): when the connection drops
        # before the backup deletes it, the backup died, and the snapshot goes with it.
        held: int | None = None
        try:
            for line in self.rfile:
                daemon.request_started()
                try:
                    request = json.loads(line)
                    reply = daemon.handle(request, _peer_pid(self.request))
                    if request.get("op") == "snapshot-create" and request.get("hold"):
                        held = reply.get("generation")
                    elif request.get("op") == "snapshot-delete":
                        held = None
                except (ImagerError, DeviceError) as e:
                    reply = error_reply(e)
                except Exception as e:
                    log.exception("request %r failed", line)
                    reply = {"ok": False, "error": f"internal error in the volume daemon: {e}", "kind": "VolumeError"}
                stopping = reply.pop("stopping", False)
                restarting = reply.pop("restarting", False)
                try:
                    self.wfile.write(json.dumps(reply).encode() + b"\n")
                    self.wfile.flush()
                finally:
                    daemon.request_replied()
                if restarting:
                    daemon.hand_over()          # exits, unless a request is stuck: the next worker takes over
                if stopping:
                    # The client learns that the daemon is gone when this connection closes at exit.
                    self.server.shutdown()
                    return
        except OSError:
            pass    # the client went away mid-request: handled below like any other drop
        finally:
            if held is not None:
                daemon.drop_abandoned_snapshot(held)


def _peer_pid(sock: socket.socket) -> int:
    pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid
