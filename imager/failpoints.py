"""Faults injected on purpose, to prove the error path of every operation of the volume daemon.

A daemon started with IMAGER_FAILPOINTS set fails the named points the way a device or a full
filesystem would, and accepts new settings over its control socket (op "failpoints"), so a test
can arm a point once the volume is up:

    IMAGER_FAILPOINTS="cow.cache-write=ENOSPC,source.read=EIO@1048576+65536"   (or "on": none yet)

`NAME=ERRNO` fails every pass through the point; `@START+LENGTH` only those touching that byte
range (a bad sector). `NAME=HANG` blocks there for good instead (a stuck device, for the
watchdog). Points: source.read, source.write, source.flush (the source device),
cow.read-original (reading an original before its first overwrite), cow.cache-write,
cow.cache-read, cow.cache-sync (the cache region), state.persist (the snapshot state file);
in a mount, image.direct-open and image.direct-read (a filesystem refusing O_DIRECT).
Unset, every check is one test of an empty dict.
"""

from __future__ import annotations

import errno
import os
import threading

ENV = "IMAGER_FAILPOINTS"
HANG = -1


def _parse(spec: str) -> dict[str, tuple[int, int, int]]:
    points: dict[str, tuple[int, int, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == "on":
            continue
        name, _, rest = item.partition("=")
        code, _, where = rest.partition("@")
        start, _, length = where.partition("+")
        number = HANG if code == "HANG" else getattr(errno, code, None) or int(code)
        points[name] = (number, int(start or 0), int(length or -1))
    return points


ENABLED = bool(os.environ.get(ENV))
_ACTIVE = _parse(os.environ.get(ENV, ""))


def configure(spec: str) -> None:
    """Replace the armed points (only in a process started with IMAGER_FAILPOINTS set)."""
    global _ACTIVE
    if not ENABLED:
        raise PermissionError(f"failpoints are off: start the daemon with {ENV} set to use them")
    _ACTIVE = _parse(spec)


def check(name: str, offset: int = 0, length: int = 0) -> None:
    """Raise OSError if the point `name` is set to fail here."""
    if not _ACTIVE:
        return
    point = _ACTIVE.get(name)
    if point is None:
        return
    code, start, span = point
    if span >= 0 and (offset + max(length, 1) <= start or offset >= start + span):
        return
    if code == HANG:
        threading.Event().wait()
    raise OSError(code, f"{os.strerror(code)} (injected at {name})")
