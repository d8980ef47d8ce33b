"""What a path a user names may be opened as, checked before anything is created or opened for
writing: a device node is never replaced by a file, a file is never created where a device
belongs, and a device that holds data is never overwritten without being told so.

- An image output (-o) is a regular file (or a directory of them) outside /dev.
- A restore target under /dev is an existing block device; elsewhere a block device or a file.
- A tape under /dev is an existing character device (st/nst); a virtual tape is a regular file
  outside /dev.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from typing import Any

from ..errors import UsageError
from ..private import under_dev


def stat_or_none(path: str) -> os.stat_result | None:
    """os.stat(path), None when nothing is there; a path that cannot name anything (a trailing
    '/' after a file or device, a missing permission) is a one-line error."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        if path.endswith("/"):
            raise UsageError(f"{path}: not a directory (a trailing '/' names a directory)") from None
        raise UsageError(f"{path}: no such directory ({os.path.dirname(path)} is not a directory)") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    if path.endswith("/") and (st is None or not stat.S_ISDIR(st.st_mode)):
        raise UsageError(f"{path}: no such directory (a trailing '/' names a directory)")
    return st


def kind_of(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, name in ((stat.S_ISBLK, "block device"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return "special file"


def check_image_output(path: str) -> os.stat_result | None:
    """An image goes to a regular file (or into a directory) outside /dev."""
    if under_dev(path):
        raise UsageError(f"{path}: images go to files, not to devices or anything under /dev; "
                         f"to write a device use imager restore")
    st = stat_or_none(path)
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise UsageError(f"{path}: is a {kind_of(st)}; images go to files (to write a device use imager restore)")
    return st


def check_restore_target(path: str) -> os.stat_result | None:
    """A restore target under /dev must be an existing block device: a missing one is a typo or a
    disk not plugged in, never a place to create a file."""
    st = stat_or_none(path)
    if under_dev(path):
        if st is None:
            raise UsageError(f"{path}: no such block device (a restore target under /dev must exist)")
        if not stat.S_ISBLK(st.st_mode):
            raise UsageError(f"{path}: is a {kind_of(st)}, not a block device; a restore target under "
                             f"/dev must be a block device")
    elif st is not None and not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UsageError(f"{path}: is a {kind_of(st)}; give a block device or a file name")
    return st


def check_tape_path(path: str) -> bool:
    """Whether `path` is a real drive (a character device); a virtual tape must be a regular file
    (or not exist yet) outside /dev."""
    st = stat_or_none(path)
    if under_dev(path):
        if st is None:
            raise UsageError(f"{path}: no such tape drive (a tape under /dev must be an st device, "
                             f"e.g. /dev/nst0)")
        if not stat.S_ISCHR(st.st_mode):
            raise UsageError(f"{path}: is a {kind_of(st)}, not a tape drive; a tape under /dev must be "
                             f"an st character device (/dev/nstN)")
        return True
    if st is None:
        return False
    if stat.S_ISCHR(st.st_mode):
        return True
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: is a {kind_of(st)}; give a tape drive (/dev/nstN) or a virtual tape file (.tap)")
    return False


# --- what a device or file already holds ---------------------------------------------------------

def signatures(path: str) -> list[dict[str, Any]]:
    """Every filesystem, partition table, RAID or LVM signature wipefs finds on `path`.
    Raises UsageError when it cannot look: an unknown answer must not read as "blank"."""
    try:
        result = subprocess.run(["wipefs", "--json", path], capture_output=True, text=True,
                                errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"{path}: cannot check what it holds (wipefs: {e}); use --force to overwrite "
                         f"it without checking") from None
    if result.returncode != 0:
        problem = (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise UsageError(f"{path}: cannot check what it holds ({problem}); use --force to overwrite it "
                         f"without checking")
    text = result.stdout.strip()
    if not text:
        return []
    try:
        return list(json.loads(text).get("signatures") or [])
    except ValueError:
        raise UsageError(f"{path}: cannot check what it holds (unreadable wipefs output); use --force "
                         f"to overwrite it without checking") from None


def describe_signatures(found: list[dict[str, Any]]) -> str:
    """'ext4 'data' (UUID ...)', 'a gpt partition table', ... joined for a message."""
    parts = []
    for sig in found:
        kind = sig.get("type") or "unknown"
        if kind in ("gpt", "PMBR", "dos", "atari", "bsd", "sun", "sgi", "mac"):
            text = f"a {kind} partition table"
        else:
            text = kind + (f" {sig['label']!r}" if sig.get("label") else "")
        if sig.get("uuid"):
            text += f" (UUID {sig['uuid']})"
        if text not in parts:
            parts.append(text)
    return ", ".join(parts)


def refuse_overwriting_data(path: str) -> None:
    """A block device that holds a filesystem, partition table or RAID/LVM member is overwritten
    only with --force; the message names what would be destroyed."""
    found = signatures(path)
    if found:
        raise UsageError(f"{path} holds {describe_signatures(found)}, use --force to overwrite it")
