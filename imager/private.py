"""Files that hold volume data or control a root daemon (state directories, caches, logs,
catalogs) are created 0600/0700 and opened without following a path that another user controls:
a symlink planted by another user, or a directory another user can write into, would let them
read a volume's contents or make root overwrite their choice of file.

The rule, as for root daemons generally: walking the path from /, every directory passed through
is owned by root or by us and not writable by group or others (a sticky directory such as /tmp
is fine: only an entry's owner can replace it), every symlink met is owned by root or by us, and
the final file or directory, if it exists, is ours.
"""

from __future__ import annotations

import os
import stat
from typing import IO

from .errors import UsageError

_TRUSTED = {0, os.geteuid()}


def _unsafe_reason(path: str) -> str | None:
    """Why `path` passes through something another user controls, or None when it does not."""
    current = "/"
    pending = [p for p in os.path.abspath(path).split("/") if p]
    hops = 0
    while pending:
        name = pending.pop(0)
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return None     # what is missing is created by us, in a directory already checked
        except OSError as e:
            return f"{candidate}: {e.strerror}"
        last = not pending
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in _TRUSTED:
                return f"{candidate} is a symlink owned by uid {st.st_uid}"
            hops += 1
            if hops > 40:
                return f"{candidate}: too many levels of symbolic links"
            target = os.readlink(candidate)
            pending = [p for p in target.split("/") if p] + pending
            if target.startswith("/"):
                current = "/"
            continue
        if last:
            if st.st_uid not in _TRUSTED:
                return f"{candidate} is owned by uid {st.st_uid}"
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None     # the open fails with ENOTDIR and says so
        if st.st_uid not in _TRUSTED:
            return f"the directory {candidate} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"the directory {candidate} is writable by other users"
        current = candidate
    return None


def under_dev(path: str) -> bool:
    """Whether `path`, as given or with its symlinks resolved, names something in /dev."""
    return any(p == "/dev" or p.startswith("/dev/") for p in (os.path.abspath(path), os.path.realpath(path)))


def check_not_under_dev(path: str, what: str) -> None:
    """A file imager creates (a catalog, a log) never goes under /dev, where a typo would make a
    regular file among the devices."""
    if under_dev(path):
        raise UsageError(f"{what} {path}: is under /dev; give a file elsewhere")


def check_private_path(path: str, what: str = "") -> None:
    reason = _unsafe_reason(path)
    if reason is not None:
        raise UsageError(f"{what or path}: refusing a path that another user controls ({reason})")


def make_private_dir(path: str) -> None:
    """Create `path` (0700, parents too) or accept it as it is when it is safe and ours."""
    check_private_path(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{path}: exists and is not a directory") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        check_private_path(path)    # a symlink to a directory: trusted above, or refused now
        st = os.stat(path)
    if st.st_mode & 0o022:
        raise UsageError(f"{path}: writable by other users; it must be private (chmod go-w {path})")


def open_private(path: str, flags: int, mode: str) -> IO:
    """os.open without following a final symlink, created 0600, as a file object of `mode`."""
    check_private_path(path)
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, mode)
