"""Checking (and where it is safe, repairing) the filesystem on a device that lost its writer
mid-flight: what `imager recover` runs on a volume's new front after its daemon died."""

from __future__ import annotations

import os
import subprocess
import tempfile

from devices import discover


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, errors="replace")


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"


def check_filesystem(device: str) -> str:
    """Check the filesystem on the unmounted `device`; returns a one-line verdict. ext2/3/4 are
    preened (e2fsck -p: only the repairs that need no decision); xfs gets its log replayed by a
    mount on a private directory, then xfs_repair -n; btrfs gets btrfs check --readonly."""
    fs_type = discover.probe_with_blkid(device).get("TYPE")
    if fs_type in ("ext2", "ext3", "ext4"):
        result = _run("e2fsck", "-p", "-f", device)
        if result.returncode == 0:
            return f"{fs_type} clean (e2fsck -p)"
        if result.returncode in (1, 2):
            return f"{fs_type} repaired by e2fsck -p: {_last_line(result)}"
        return (f"{fs_type} needs a manual check: e2fsck -p left problems (exit {result.returncode}): "
                f"run e2fsck -f {device}")
    if fs_type == "xfs":
        point = tempfile.mkdtemp(prefix="imager-recover-")
        try:
            if _run("mount", "-t", "xfs", device, point).returncode == 0:
                _run("umount", point)
        finally:
            os.rmdir(point)
        result = _run("xfs_repair", "-n", device)
        if result.returncode == 0:
            return "xfs clean (log replayed, xfs_repair -n)"
        return f"xfs needs repair: xfs_repair -n found problems: run xfs_repair {device}"
    if fs_type == "btrfs":
        result = _run("btrfs", "check", "--readonly", device)
        if result.returncode == 0:
            return "btrfs clean (btrfs check --readonly)"
        return f"btrfs needs a manual check: {_last_line(result)}"
    if not fs_type:
        return "no filesystem found on the front; nothing to check"
    return f"{fs_type}: imager has no check for it; check it with its own tool before mounting"
