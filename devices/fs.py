"""Filesystems as the kernel serves them: a private read-only mount that no one else sees and
that nothing can leave behind.

`private_mount(device, attempts)` mounts a filesystem image or device read-only, over a loop
device the mount sets up itself (autoclear), in a mount namespace of its own, and hands back an
open descriptor of its root. The namespace's only process exits at once; the mount lives exactly
as long as that descriptor. When the descriptor closes, or the process holding it dies, even by
SIGKILL, the kernel unmounts the filesystem and the loop device clears itself: no mount point,
no mount, no loop device is ever left for anyone to clean up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from .errors import DeviceError

# Runs as the only process of a new mount namespace: mounts over a private tmpfs on /run (seen
# by no one else), sends the root's descriptor back and exits. Only the standard library: it
# starts in milliseconds.
_MOUNTER = r"""
import json, os, socket, subprocess, sys
sock = socket.socket(fileno=int(sys.argv[1]))
device, attempts = sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700,size=64k", "imager-private", "/run"], check=True)
os.mkdir("/run/mnt")
errors = []
for fs_type, options in attempts:
    r = subprocess.run(["mount", "-t", fs_type, "-o", options + ",loop", device, "/run/mnt"],
                       capture_output=True, text=True, errors="replace")
    if r.returncode == 0:
        try:
            fd = os.open("/run/mnt", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            sock.send(json.dumps({"options": options, "errors": errors, "open_errno": e.errno}).encode())
            sys.exit(0)
        socket.send_fds(sock, [json.dumps({"options": options, "errors": errors}).encode()], [fd])
        sys.exit(0)
    lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip() and "dmesg(1)" not in ln]
    errors.append((lines[0] if lines else f"mount exit status {r.returncode}").removeprefix("mount: ")
                  .removeprefix("/run/mnt: "))
sock.send(json.dumps({"options": None, "errors": errors}).encode())
"""


@dataclass
class PrivateMount:
    """An open descriptor of a privately mounted filesystem's root; close() lets it go."""

    fd: int
    options: str
    refusals: list[str] = field(default_factory=list)  # why the earlier attempts did not mount

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PrivateMount":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MountUnreadable(DeviceError):
    """The filesystem mounted but its root cannot be opened (xfs shuts itself down when it finds
    damaged metadata); `errno` says how."""

    def __init__(self, device: str, error: int):
        self.errno = error
        super().__init__(f"{device}: mounted, but its root cannot be read: {os.strerror(error)}")


class MountRefused(DeviceError):
    """No attempt mounted; `refusals` says why each did not, in order."""

    def __init__(self, device: str, refusals: list[str]):
        self.refusals = refusals
        super().__init__(f"{device}: cannot mount: {'; '.join(refusals) or 'no attempt given'}")


def private_mount(device: str, attempts: list[tuple[str, str]]) -> PrivateMount:
    """Mount `device` read-only with the first of `attempts` ((fs type, options) pairs) that the
    kernel accepts, privately (see the module docstring). Raises MountRefused when none does."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-S", "-I", "-c", _MOUNTER,
             str(theirs.fileno()), device, json.dumps([[t, o] for t, o in attempts])],
            pass_fds=(theirs.fileno(),), capture_output=True, text=True, errors="replace")
        theirs.close()
        if result.returncode != 0:
            raise DeviceError(f"{device}: cannot make a private mount: "
                              f"{(result.stderr.strip().splitlines() or ['unshare failed'])[-1]}")
        message, fds, _, _ = socket.recv_fds(ours, 65536, 1)
    finally:
        theirs.close()
        ours.close()
    reply = json.loads(message or b"{}")
    if reply.get("open_errno"):
        raise MountUnreadable(device, reply["open_errno"])
    if not fds:
        raise MountRefused(device, reply.get("errors", []))
    return PrivateMount(fds[0], reply["options"], reply.get("errors", []))
